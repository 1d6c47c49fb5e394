"""The relay's durable state: identity, roster, the UP spool and the DOWN cache (SQLite).

Contract:

* One SQLite file, ``relay.db`` in the state folder, created 0600 (it holds the relay's
  secret and its computers' tickle keys), WAL, ``synchronous=FULL``. FULL, not NORMAL,
  because the relay acknowledges an agent's messages as soon as they are spooled (the
  agent may then drop its own copies), so a power cut must not undo a spool write.
* Group commit: ``receive`` (the agent exchange, the hot path) called on a running
  event loop joins the loop iteration's open transaction as a SAVEPOINT (a failing
  write rolls back alone) instead of committing itself; ONE commit (one fsync) for the
  whole group runs at the end of the iteration (``call_soon``), and the caller answers
  its agent only after ``await durable()``. Agents whose requests arrive while an
  fsync runs thus share the next one instead of queueing for one each (the relay
  benchmark: 75-82% of a relay's time was in per-exchange COMMITs). Every other write
  commits the open group first, then itself: when such a method returns, it and
  everything before it are on disk. If a group's COMMIT fails, it is rolled back, the
  memory mirror is reloaded from the file (so the agents' resends are taken again) and
  ``durable()`` raises ``SpoolError`` for the group's waiters. Without a running loop
  (tools, tests) every write commits at once.
* Per computer, both directions are numbered by their sender (``protocol/exchange.py``):

  - up (agent -> server): ``up_top`` is the highest agent message the relay holds
    (spooled, or already acknowledged by the server); ``server_ack`` what the server
    acknowledged. Spool rows above ``server_ack`` are forwarded until the server acks
    them, then dropped. A message at or below ``up_top`` is a resend and is ignored.
  - down (server -> agent): ``down_top`` is the highest server message the relay holds;
    ``agent_ack`` what the agent acknowledged. Cache rows above ``agent_ack`` are handed
    to the agent; rows at or below it are dropped.

* The roster (id, generation, secret hash, tickle key and port) comes whole from the
  server; a computer whose generation changes (re-enrolled) starts over: its spool and
  cache are dropped, since the server numbers the new generation's messages from 1.
  A computer that leaves the roster keeps its spool (the server refuses it per entry,
  then it is dropped) and loses its cache.
* Identity (docs/relays.md "Copies behind a relay"): per computer, the relay's own
  lineage of its agent's identity nonces (``domain/identity.py``; hashes only) in the
  ``identity`` table, with ``server_flagged`` (the last roster's ``flagged``).
  ``check_identity`` applies the rule to an agent exchange inside the group commit:
  a fresh offer is durable before the reply carrying it is sent. A computer the
  relay holds no lineage for starts one open (the first nonce presented is taken: a
  computer new to this relay, or back to it); its lineage is dropped when it leaves
  the roster or is re-enrolled, and opened afresh when a roster clears a flag the
  relay had seen (an administrator's reset). Tables are created if missing: a spool
  from before this feature just gains the table.
* Everything is mirrored in memory (``computers``); the database is written first.
  Methods are synchronous and meant for one thread (the relay's event loop).

Why one module of about 750 lines: roster, spool, cache and identity lineages are rows
of one file changed together in one transaction per agent exchange or server reply
(a roster change drops a computer's spool, cache and lineage at once); split, each
part would need the others' transaction and memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from taskfleet.domain.identity import Nonces, Verdict, decide, hash_nonce, reset, with_offer
from taskfleet.protocol.relay import RelayReply, Roster

log = logging.getLogger("taskfleet.relay")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS computers (
    id INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL,
    secret_hash TEXT NOT NULL,        -- hex SHA-256 of the agent's secret
    tickle_key TEXT NOT NULL,         -- hex
    tickle_port INTEGER,
    in_roster INTEGER NOT NULL DEFAULT 1,
    address TEXT,                     -- where the relay last heard the agent
    reported_address TEXT,            -- ... as last told to the server
    agent_ack INTEGER NOT NULL DEFAULT 0,
    reported_ack INTEGER NOT NULL DEFAULT 0,   -- agent_ack as last told to the server
    server_ack INTEGER NOT NULL DEFAULT 0,
    up_top INTEGER NOT NULL DEFAULT 0,
    down_top INTEGER NOT NULL DEFAULT 0,
    agent_info TEXT,                  -- the agent's "agent" object, until the server has it
    agent_port INTEGER                -- the tickle port the agent last told us (see _tickle_port)
);
CREATE TABLE IF NOT EXISTS up (
    computer INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    message TEXT NOT NULL,            -- the agent's message, JSON, as it sent it
    spooled_at REAL NOT NULL,
    PRIMARY KEY (computer, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS identity (
    computer INTEGER PRIMARY KEY,
    state TEXT NOT NULL,              -- domain/identity.py Nonces as JSON (hashes only)
    server_flagged INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS down (
    computer INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    message TEXT NOT NULL,            -- the server's message, JSON, as it sent it
    PRIMARY KEY (computer, seq)
) WITHOUT ROWID;
"""

_COLUMNS = (
    "id, generation, secret_hash, tickle_key, tickle_port, in_roster, address, "
    "reported_address, agent_ack, reported_ack, server_ack, up_top, down_top, agent_info, "
    "agent_port"
)


class SpoolError(RuntimeError):
    """The state folder or file cannot be used; the relay refuses to start."""


@dataclass(frozen=True)
class RelayIdentity:
    server: str
    relay_id: int
    secret: str
    generation: int
    tickle_key: bytes
    server_public_key: str


@dataclass
class Computer:
    """One computer behind the relay: its roster entry and both directions' state."""

    id: int
    generation: int
    secret_hash: str
    tickle_key: bytes
    tickle_port: int | None
    in_roster: bool = True
    address: str | None = None
    reported_address: str | None = None
    agent_ack: int = 0
    reported_ack: int = 0
    server_ack: int = 0
    up_top: int = 0
    down_top: int = 0
    agent_info: str | None = None
    # The agent's own word on its tickle port (0: it told us it has none), kept across
    # restarts: it says so only when it starts, and the roster's may be older.
    agent_port: int | None = None
    spooled: int = 0  # up rows (memory only, counted at start)
    cached: int = 0  # down rows (memory only, counted at start)
    seen: float | None = None  # memory only: sent to the server with the next entry
    # Memory only: the server wants the agent's whole inventory (its last reply said so);
    # lost with a restart, the server says it again at the agent's next report.
    inventory_full: bool = False
    # Memory only: the agent's seq of the last whole inventory it sent us. A server ask
    # in a reply whose ack is below it was made before the server had it: not passed on.
    whole_at: int = 0
    nonces: Nonces | None = None  # its relay lineage (None: none yet, the next opens one)
    server_flagged: bool = False  # the last roster said the server flags it

    @property
    def identity_report(self) -> str | None:
        """A conflict this relay caught that the server does not show yet: reported."""
        n = self.nonces
        if n is None or n.conflict_at is None or self.server_flagged:
            return None
        return n.conflict_reason or "identity conflict"

    @property
    def ack_for_agent(self) -> int:
        """What the relay tells the agent it holds of its messages."""
        return max(self.up_top, self.server_ack)

    @property
    def have(self) -> int:
        """The highest server message the relay holds (or the agent already has)."""
        return max(self.down_top, self.agent_ack)

    @property
    def work_waiting(self) -> bool:
        """Cached server messages the agent has not acknowledged yet."""
        return self.in_roster and self.down_top > self.agent_ack

    @property
    def has_news(self) -> bool:
        """Something to tell the server: spooled messages, a new ack, address or info."""
        return bool(
            self.spooled
            or self.agent_ack != self.reported_ack
            or (self.address is not None and self.address != self.reported_address)
            or self.agent_info is not None
            or self.identity_report is not None
        )


@dataclass(frozen=True)
class Sent:
    """What one entry of a relay request told the server (applied once it answers)."""

    generation: int
    ack: int
    address: str | None
    agent_info: str | None
    messages: int


@dataclass
class Applied:
    """What applying a relay reply changed."""

    new_down: set[int] = field(default_factory=set)  # computers with new server messages
    more: bool = False  # the server holds more: exchange again at once
    forwarded: int = 0  # agent messages the server acknowledged
    retry: set[int] = field(default_factory=set)  # entries refused with 5xx: sent again
    dropped: dict[int, int] = field(default_factory=dict)  # computer -> messages dropped
    roster_changed: bool = False


@dataclass(frozen=True)
class SpoolStats:
    spooled: int
    cached: int
    oldest: float | None  # when the oldest spooled message arrived


def _state(n: Nonces) -> str:
    return json.dumps(
        {
            "confirmed": n.confirmed,
            "confirmed_at": n.confirmed_at,
            "previous": n.previous,
            "offered": n.offered,
            "offered_at": n.offered_at,
            "superseded": list(n.superseded),
            "conflict_at": n.conflict_at,
            "conflict_reason": n.conflict_reason,
        }
    )


def _nonces(text: str) -> Nonces:
    d = json.loads(text)
    return Nonces(**{**d, "superseded": tuple(d.get("superseded") or ())})


def encode(obj: Any) -> str:
    """A decoded JSON value as compact text. orjson refuses unpaired surrogates, which
    an agent's text may hold (protocol/exchange.py loads_body): the stdlib escapes them."""
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)


def _private_file(path: Path) -> None:
    """The file and its WAL companions exist 0600 before SQLite opens them."""
    for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            fd = os.open(f, os.O_RDONLY | (os.O_CREAT if f == path else 0), 0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise SpoolError(f"cannot open state file {f}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot make state file {f} private: {exc.strerror}") from None
        finally:
            os.close(fd)


class Spool:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise SpoolError(f"cannot create state folder {folder}: {exc.strerror}") from None
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise SpoolError(f"state folder {folder} is not a writable folder")
        self.path = folder / "relay.db"
        _private_file(self.path)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            result = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                raise sqlite3.DatabaseError(result)
            self.db.executescript(_SCHEMA)
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(computers)")}
            if "agent_port" not in columns:  # a state file of an earlier version
                self.db.execute("ALTER TABLE computers ADD COLUMN agent_port INTEGER")
        except sqlite3.DatabaseError as exc:
            raise SpoolError(
                f"state file {self.path} is corrupt or unreadable ({exc}); move it away and "
                "enroll the relay again"
            ) from None
        self.computers: dict[int, Computer] = {}
        self._group: asyncio.Future[None] | None = None  # the open group's commit
        self.commits = 0  # transactions committed (a group counts once)
        self._load()
        self.settings_json = self.get("settings", "{}") or "{}"  # answered to every agent

    def close(self) -> None:
        self.flush()
        self.db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction, committed (after the open group) when the block ends."""
        self.flush()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self.commits += 1

    @contextlib.contextmanager
    def _group_tx(self) -> Iterator[sqlite3.Connection]:
        """Join (or open) the event-loop iteration's group; ``durable()`` awaits it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            with self._tx() as db:
                yield db
            return
        if self._group is None:
            self.db.execute("BEGIN IMMEDIATE")
            self._group = loop.create_future()
            loop.call_soon(self.flush)
        self.db.execute("SAVEPOINT tf_write")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK TO tf_write")
            self.db.execute("RELEASE tf_write")
            raise
        self.db.execute("RELEASE tf_write")

    def flush(self) -> None:
        """Commit the open group now, if any, and tell its waiters."""
        group, self._group = self._group, None
        if group is None:
            return
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back itself
                self.db.execute("ROLLBACK")
            # Memory ran ahead of the file: take it back from the file, so the agents'
            # resends of what was lost are spooled again.
            self.computers.clear()
            self._load()
            log.error("a spool commit failed (%s); its agents are asked to resend", exc)
            if not group.done():
                group.set_exception(SpoolError(f"spool commit failed: {exc}"))
                group.exception()  # retrieved: nobody may be waiting
            return
        self.commits += 1
        if not group.done():
            group.set_result(None)

    async def durable(self) -> None:
        """Return once every write made so far is on disk (raise ``SpoolError`` if its
        commit failed)."""
        if self._group is not None:
            await asyncio.shield(self._group)

    def _load(self) -> None:
        for row in self.db.execute(f"SELECT {_COLUMNS} FROM computers"):
            c = Computer(
                row[0], row[1], row[2], bytes.fromhex(row[3]), row[4], bool(row[5]), *row[6:]
            )
            self.computers[c.id] = c
        for cid, state, flagged in self.db.execute(
            "SELECT computer, state, server_flagged FROM identity"
        ):
            if cid in self.computers:
                c = self.computers[cid]
                c.nonces, c.server_flagged = _nonces(state), bool(flagged)
        for table, attr in (("up", "spooled"), ("down", "cached")):
            for cid, n in self.db.execute(f"SELECT computer, count(*) FROM {table} GROUP BY 1"):
                if cid in self.computers:
                    setattr(self.computers[cid], attr, n)

    # -- meta ------------------------------------------------------------------

    def get(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def _set(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def identity(self) -> RelayIdentity | None:
        raw = self.get("identity")
        if raw is None:
            return None
        d = json.loads(raw)
        return RelayIdentity(
            d["server"],
            d["relay_id"],
            d["secret"],
            d["generation"],
            bytes.fromhex(d["tickle_key"]),
            d["server_public_key"],
        )

    def save_identity(self, ident: RelayIdentity, relay_settings: dict[str, Any]) -> None:
        """A new identity starts over: the old roster, spool and cache belong to another."""
        value = json.dumps(
            {
                "server": ident.server,
                "relay_id": ident.relay_id,
                "secret": ident.secret,
                "generation": ident.generation,
                "tickle_key": ident.tickle_key.hex(),
                "server_public_key": ident.server_public_key,
            }
        )
        with self._tx() as db:
            for table in ("computers", "up", "down"):
                db.execute(f"DELETE FROM {table}")
            db.execute("DELETE FROM meta")
            self._set("identity", value)
            self._set("relay_settings", encode(relay_settings))
        self.computers.clear()
        self.settings_json = "{}"

    @property
    def roster_version(self) -> str:
        return self.get("roster_version", "") or ""

    @property
    def settings(self) -> dict[str, Any]:
        """The agent settings the server sent last."""
        return dict(json.loads(self.get("settings", "{}") or "{}"))

    @property
    def relay_settings(self) -> dict[str, Any]:
        return dict(json.loads(self.get("relay_settings", "{}") or "{}"))

    @property
    def revoked(self) -> bool:
        """The server refused this relay (401) at its last try; kept across restarts so a
        revoked relay does not take agents' messages it could never forward."""
        return self.get("revoked") == "1"

    def set_revoked(self, revoked: bool) -> None:
        if revoked != self.revoked:
            with self._tx():
                self._set("revoked", "1" if revoked else "0")

    @property
    def tickle_high_water_ms(self) -> int:
        return int(self.get("tickle_high_water_ms", "-1") or -1)

    def save_tickle_high_water(self, ms: int) -> None:
        with self._tx():
            self._set("tickle_high_water_ms", str(ms))

    # -- agents ----------------------------------------------------------------

    def receive(
        self,
        cid: int,
        *,
        ack: int,
        messages: list[tuple[int, str]],
        agent_info: str | None,
        address: str | None,
        now: float,
        agent_port: int | None = None,
    ) -> int:
        """One agent exchange: spool its new messages (seq above ``up_top``; resends are
        ignored), note its ack, info and address. Durable when it returns, or on a running
        loop once ``durable()`` returns (group commit). Returns how many messages were
        new."""
        c = self.computers[cid]
        c.seen = now
        new = [(seq, text) for seq, text in messages if seq > c.ack_for_agent]
        ack_changed = ack != c.agent_ack
        # With its "agent" object the agent tells its tickle port (None: it has none).
        port = c.agent_port if agent_info is None else (agent_port or 0)
        if not (new or ack_changed or agent_info is not None or address != c.address):
            return 0
        up_top = max(c.up_top, new[-1][0]) if new else c.up_top
        with self._group_tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO up(computer, seq, message, spooled_at) VALUES (?,?,?,?)",
                [(cid, seq, text, now) for seq, text in new],
            )
            dropped = 0
            if ack > c.agent_ack:
                dropped = db.execute(
                    "DELETE FROM down WHERE computer=? AND seq<=?", (cid, ack)
                ).rowcount
            db.execute(
                "UPDATE computers SET up_top=?, agent_ack=?, address=?, "
                "agent_info=coalesce(?, agent_info), agent_port=? WHERE id=?",
                (up_top, ack, address, agent_info, port, cid),
            )
        c.up_top, c.agent_ack, c.address, c.agent_port = up_top, ack, address, port
        c.spooled += len(new)
        c.cached -= dropped
        if agent_info is not None:
            c.agent_info = agent_info
        return len(new)

    def check_identity(
        self, cid: int, presented: str | None, now: float, *, rotate: float, grace: float
    ) -> tuple[str | None, str | None]:
        """The identity rule on an agent exchange of ``cid`` presenting ``presented``
        (the plain nonce; None: none): (why it is refused, None) or (None, the fresh
        nonce to send, if one is offered). Written in the group commit: the caller
        answers only after ``durable()``. A computer the server flags is refused."""
        c = self.computers[cid]
        if c.server_flagged:
            why = c.nonces.conflict_reason if c.nonces and c.nonces.conflict_at else None
            return why or "the server flags this computer's identity", None
        state = c.nonces if c.nonces is not None else reset(now)
        h = None if presented is None else hash_nonce(presented)
        d = decide(state, h, now, rotate=rotate, grace=grace)
        new, offer = d.state, None
        if d.offer:
            offer = secrets.token_hex(16)  # 128 random bits, as the server's
            new = with_offer(new, hash_nonce(offer), now)
        if new != c.nonces:
            with self._group_tx() as db:
                self._save_nonces(db, c, new)
        if d.verdict is Verdict.CONFLICT:
            if d.changed:
                log.error(
                    "computer %d: %s; refused, and reported to the server (which flags it)",
                    cid,
                    d.reason,
                )
            return d.reason or "identity conflict", None
        return None, offer

    def _save_nonces(self, db: sqlite3.Connection, c: Computer, new: Nonces | None) -> None:
        if new is None:
            db.execute("DELETE FROM identity WHERE computer=?", (c.id,))
        else:
            db.execute(
                "INSERT OR REPLACE INTO identity(computer, state, server_flagged) VALUES (?,?,?)",
                (c.id, _state(new), int(c.server_flagged)),
            )
        c.nonces = new

    def up_messages(
        self, cid: int, limit: int, budget: int, *, at_least_one: bool = True
    ) -> list[str]:
        """Spooled messages of ``cid`` to forward, oldest first: at most ``limit`` and
        ``budget`` bytes (with ``at_least_one``, one however large)."""
        c = self.computers[cid]
        out: list[str] = []
        size = 0
        for (text,) in self.db.execute(
            "SELECT message FROM up WHERE computer=? AND seq>? ORDER BY seq LIMIT ?",
            (cid, c.server_ack, limit),
        ):
            if (out or not at_least_one) and size + len(text) > budget:
                break
            out.append(text)
            size += len(text)
        return out

    def down_messages(self, cid: int, above: int, budget: int) -> tuple[list[str], bool]:
        """Cached server messages above ``above`` within ``budget`` bytes (one at least),
        and whether more are waiting."""
        out: list[str] = []
        size = 0
        for (text,) in self.db.execute(
            "SELECT message FROM down WHERE computer=? AND seq>? ORDER BY seq", (cid, above)
        ):
            if out and size + len(text) > budget:
                return out, True
            out.append(text)
            size += len(text)
        return out, False

    def enrolled(
        self, cid: int, generation: int, secret_hash: str, tickle_key: bytes, port: int | None
    ) -> None:
        """A computer the server just enrolled through this relay (before the roster says so)."""
        with self._tx():
            self._put(cid, generation, secret_hash, tickle_key, port)

    def _put(
        self, cid: int, generation: int, secret_hash: str, tickle_key: bytes, port: int | None
    ) -> bool:
        """Insert or update a roster entry (inside a transaction); True if it started over."""
        c = self.computers.get(cid)
        if c is not None and c.generation == generation:
            self.db.execute(
                "UPDATE computers SET secret_hash=?, tickle_key=?, tickle_port=?, in_roster=1 "
                "WHERE id=?",
                (secret_hash, tickle_key.hex(), port, cid),
            )
            c.secret_hash, c.tickle_key, c.tickle_port, c.in_roster = (
                secret_hash,
                tickle_key,
                port,
                True,
            )
            return False
        self.db.execute("DELETE FROM up WHERE computer=?", (cid,))
        self.db.execute("DELETE FROM down WHERE computer=?", (cid,))
        self.db.execute("DELETE FROM identity WHERE computer=?", (cid,))  # a new lineage
        self.db.execute(
            "INSERT OR REPLACE INTO computers(id, generation, secret_hash, tickle_key, "
            "tickle_port) VALUES (?,?,?,?,?)",
            (cid, generation, secret_hash, tickle_key.hex(), port),
        )
        self.computers[cid] = Computer(cid, generation, secret_hash, tickle_key, port)
        return True

    # -- upstream --------------------------------------------------------------

    def apply(self, reply: RelayReply, sent: dict[int, Sent]) -> Applied:
        """Apply the server's reply to a relay request whose entries were ``sent``, in one
        transaction: the roster first (a new generation starts over), then per computer
        the server's ack (spool rows at or below it dropped) and its messages (cached
        unless the agent has them), refused entries, settings."""
        out = Applied()
        with self._tx():
            if reply.roster is not None:
                out.roster_changed = self._replace_roster(reply.roster)
            for cr in reply.computers:
                c = self.computers.get(cr.id)
                if c is None or not c.in_roster:
                    continue  # not ours (any more): the roster in this reply says so
                out.more |= cr.more
                full = cr.inventory_full and cr.ack >= c.whole_at
                if full and not c.inventory_full:
                    out.new_down.add(c.id)  # tickled: it hears the ask at once
                c.inventory_full = full
                out.forwarded += self._server_acked(c, cr.ack)
                if self._cache(c, cr.messages):
                    out.new_down.add(c.id)
                s = sent.get(cr.id)
                if s is not None and s.generation == c.generation:
                    self._reported(c, s)
            for err in reply.errors:
                c = self.computers.get(err.id)
                if c is None:
                    continue
                if err.status >= 500:
                    out.retry.add(err.id)
                    continue
                # Refused for good (malformed, not this relay's): telling it again is no use.
                if c.spooled:
                    out.dropped[err.id] = c.spooled
                    self.db.execute("DELETE FROM up WHERE computer=?", (err.id,))
                    c.spooled = 0
                s = sent.get(err.id)
                if s is not None and s.generation == c.generation:
                    self._reported(c, s)
            news = (("settings", reply.settings), ("relay_settings", reply.relay_settings))
            for key, value in news:
                text = encode(value)
                if value and text != self.get(key):
                    self._set(key, text)
                    if key == "settings":
                        self.settings_json = text
        out.more |= reply.more
        return out

    def _replace_roster(self, roster: Roster) -> bool:
        ids = set()
        now = time.time()
        for r in roster.computers:
            ids.add(r.id)
            self._put(r.id, r.generation, r.secret_hash, bytes.fromhex(r.tickle_key), r.tickle_port)
            self._server_flag(self.computers[r.id], r.flagged, now)
        for c in self.computers.values():
            if c.id not in ids and c.in_roster:
                c.in_roster = False
                self.db.execute("UPDATE computers SET in_roster=0 WHERE id=?", (c.id,))
                self.db.execute("DELETE FROM down WHERE computer=?", (c.id,))
                c.cached = 0
                c.server_flagged = False
                self._save_nonces(self.db, c, None)  # back one day: a new lineage
        changed = roster.version != self.roster_version
        self._set("roster_version", roster.version)
        return changed

    def _server_flag(self, c: Computer, flagged: bool, now: float) -> None:
        """The roster says whether the server flags ``c``. A flag cleared after the
        relay saw it set is an administrator's reset: the lineage starts afresh. A
        flag the relay raised is cleared only that way (never by a roster built
        before its report arrived: that roster never showed it set)."""
        if flagged == c.server_flagged:
            return
        was, c.server_flagged = c.server_flagged, flagged
        new = reset(now) if was and not flagged else c.nonces
        if new is None:
            self.db.execute(
                "INSERT OR REPLACE INTO identity(computer, state, server_flagged) VALUES (?,?,?)",
                (c.id, _state(reset(now)), int(flagged)),
            )
            c.nonces = reset(now)
        else:
            self._save_nonces(self.db, c, new)
        if was and not flagged:
            log.warning("computer %d: its identity was reset on the server: a new lineage", c.id)

    def _server_acked(self, c: Computer, ack: int) -> int:
        if ack <= c.server_ack:
            return 0
        dropped = self.db.execute(
            "DELETE FROM up WHERE computer=? AND seq<=?", (c.id, ack)
        ).rowcount
        # Above up_top: the agent sent it to the server directly (failover).
        up_top = max(c.up_top, ack)
        self.db.execute(
            "UPDATE computers SET server_ack=?, up_top=? WHERE id=?", (ack, up_top, c.id)
        )
        c.server_ack, c.up_top = ack, up_top
        c.spooled -= dropped
        return int(dropped)

    def _cache(self, c: Computer, messages: list[dict[str, Any]]) -> bool:
        rows = [(c.id, int(m["seq"]), encode(m)) for m in messages if int(m["seq"]) > c.agent_ack]
        if not rows:
            return False
        added = self.db.executemany(
            "INSERT OR IGNORE INTO down(computer, seq, message) VALUES (?,?,?)", rows
        ).rowcount
        top = max(c.down_top, max(r[1] for r in rows))
        if top != c.down_top:
            self.db.execute("UPDATE computers SET down_top=? WHERE id=?", (top, c.id))
            c.down_top = top
        c.cached += added
        return added > 0

    def _reported(self, c: Computer, s: Sent) -> None:
        info = c.agent_info if c.agent_info != s.agent_info else None
        self.db.execute(
            "UPDATE computers SET reported_ack=?, reported_address=?, agent_info=? WHERE id=?",
            (s.ack, s.address, info, c.id),
        )
        c.reported_ack, c.reported_address, c.agent_info = s.ack, s.address, info

    # -- reads -----------------------------------------------------------------

    def stats(self) -> SpoolStats:
        spooled, oldest = self.db.execute("SELECT count(*), min(spooled_at) FROM up").fetchone()
        cached = sum(c.cached for c in self.computers.values())
        return SpoolStats(int(spooled), cached, oldest)
