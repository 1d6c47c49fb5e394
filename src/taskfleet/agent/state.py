"""The agent's durable local state: identity, operations, unacknowledged results,
and the relay the server assigned the computer to.

Contract: one SQLite file (``state.db``) in the agent's state folder, written
with ``synchronous=FULL`` so that every committed step survives a crash or a
power cut. An operation is recorded (with its server sequence number) before
the agent acknowledges it, and its result is appended to the outbox in the
same transaction that marks it finished, before it is sent (then ``on_finish``
is called: the inventory may have changed); a server message
the agent refuses is acknowledged in the same transaction that queues its
``refused`` message; a job's terminate order is recorded (``terminate_requested``)
in the transaction that acknowledges it, and so is its latest windows order
(``windows``: one issued later replaces it, an older one changes nothing). A
restart is marked ``awaiting`` before its command runs, and Deferred with its status
message once the command ran (see ``agent/operations.py``). A job's step reports (``job_phase``,
``queue``, and those ``finish`` takes with its result) are queued in the
transaction that changes its status, or on their own. Outbox messages
stay until the server acknowledges their sequence number. A folder that is
missing-and-uncreatable, unwritable or corrupt raises :class:`StateError` with
a clear message; the agent then refuses to start rather than pretend to work.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Local status codes (SPEC 5).
UNKNOWN, WORKING, DOWNLOADING, INSTALLING, SUCCESS, FAILED, CANCELED, DEFERRED = range(8)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS operations (
    op INTEGER PRIMARY KEY,          -- operation id given by the server
    seq INTEGER NOT NULL,            -- server message sequence number
    type TEXT NOT NULL,
    body TEXT NOT NULL,              -- the signed canonical text, as received
    status INTEGER NOT NULL,         -- local status code 0..7 (SPEC 5)
    received_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    terminate_requested INTEGER NOT NULL DEFAULT 0,  -- a job's terminate order arrived
    attempts INTEGER NOT NULL DEFAULT 0,
    pushed INTEGER NOT NULL DEFAULT 1,       -- arrived on a wake-up (1) or at a poll (0)
    mode TEXT NOT NULL DEFAULT 'required',   -- required | optional
    interval TEXT NOT NULL DEFAULT 'once',   -- once | recurring
    every REAL,                              -- recurring: seconds between runs
    next_run_at REAL,                        -- deferred or recurring: when to run next
    pgid INTEGER,                            -- process group of the running attempt
    pstart TEXT,                             -- its start time in /proc, to recognise it
    awaiting TEXT,                           -- a restart's wait for the computer (JSON)
    windows TEXT,                            -- a job's latest windows order (JSON)
    result TEXT                      -- the final operation-result message once finished
);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, message TEXT NOT NULL);
"""
# Columns added after a release: a state file written by an older agent gets them at open.
_ADDED_COLUMNS = {
    "terminate_requested": "ALTER TABLE operations ADD COLUMN "
    "terminate_requested INTEGER NOT NULL DEFAULT 0",
    "awaiting": "ALTER TABLE operations ADD COLUMN awaiting TEXT",
    "windows": "ALTER TABLE operations ADD COLUMN windows TEXT",
}


class StateError(RuntimeError):
    pass


def _private_file(path: Path) -> None:
    """Create the state file 0600 before SQLite does (it holds the computer's secret).

    SQLite gives its -wal and -shm files the database file's mode, so they are
    0600 too whatever the umask; files left wider by an older agent are narrowed.
    """
    for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            fd = os.open(f, os.O_RDONLY | (os.O_CREAT if f == path else 0), 0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StateError(f"cannot open state file {f}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)
        except OSError as exc:
            raise StateError(f"cannot make state file {f} private: {exc.strerror}") from None
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Identity:
    server: str
    computer_id: int
    secret: str
    generation: int
    tickle_key: bytes
    server_public_key: str


@dataclass(frozen=True)
class NewOperation:
    op: int
    seq: int
    type: str
    body: str
    pushed: bool
    mode: str = "required"
    interval: str = "once"
    every: float | None = None


@dataclass(frozen=True)
class Operation:
    op: int
    seq: int
    type: str
    body: str
    status: int
    cancel_requested: bool
    attempts: int
    pushed: bool
    mode: str
    interval: str
    every: float | None
    next_run_at: float | None
    pgid: int | None
    pstart: str | None
    received_at: float
    started_at: float | None
    ended_at: float | None
    finished: bool = False  # its final result is queued (or sent): nothing more to do
    terminate_requested: bool = False  # a job's terminate order arrived (SPEC 6)
    # A restart that waits for the computer to come back (boot_id, since, until, ...):
    # never run again, never scrubbed; it ends when the agent sees another boot.
    awaiting: dict[str, Any] | None = None
    # A job's maintenance windows changed after hand-out: the latest signed order's
    # payload ({"windows": [...], "issued_at": t}); it replaces the body's windows.
    windows_order: dict[str, Any] | None = None

    def checkpoint_path(self, folder: Path) -> Path:
        return folder / "checkpoints" / str(self.op)

    def has_checkpoint(self, folder: Path) -> bool:
        try:
            return self.checkpoint_path(folder).stat().st_size > 0
        except OSError:
            return False


class LocalState:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(f"cannot create state folder {folder}: {exc.strerror}") from None
        if not folder.is_dir():
            raise StateError(f"state folder {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StateError(f"state folder {folder} is not writable by this user")
        path = folder / "state.db"
        _private_file(path)
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            # A few hundred records: a small page cache keeps the idle agent lean.
            self.db.execute("PRAGMA cache_size=-128")
            result = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                raise sqlite3.DatabaseError(result)
            self.db.executescript(_SCHEMA)
            have = {r[1] for r in self.db.execute("PRAGMA table_info(operations)")}
            for column, ddl in _ADDED_COLUMNS.items():
                if column not in have:
                    self.db.execute(ddl)
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"state file {path} is corrupt or unreadable ({exc}); move it away and "
                "re-enroll the agent"
            ) from None
        except OSError as exc:
            raise StateError(f"cannot open state file {path}: {exc}") from None
        self.on_finish: Callable[[], None] | None = None  # after an operation finished

    def close(self) -> None:
        self.db.close()

    # -- meta ------------------------------------------------------------------

    def get(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def _set(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def identity(self) -> Identity | None:
        raw = self.get("identity")
        if raw is None:
            return None
        d = json.loads(raw)
        return Identity(
            d["server"],
            d["computer_id"],
            d["secret"],
            d["generation"],
            bytes.fromhex(d["tickle_key"]),
            d["server_public_key"],
        )

    def save_identity(self, ident: Identity, nonce: str | None = None) -> None:
        """A new identity starts a fresh conversation: forget the old one's messages;
        ``nonce``: its first identity nonce (the enrollment's answer), if any."""
        value = json.dumps(
            {
                "server": ident.server,
                "computer_id": ident.computer_id,
                "secret": ident.secret,
                "generation": ident.generation,
                "tickle_key": ident.tickle_key.hex(),
                "server_public_key": ident.server_public_key,
            }
        )
        with self._tx():
            self._set("identity", value)
            self.db.execute("DELETE FROM meta WHERE key='identity_nonce'")
            self.db.execute("DELETE FROM meta WHERE key='relay_identity_nonce'")
            if nonce is not None:
                self._set("identity_nonce", nonce)
            self._set("server_seq", "0")
            self._set("next_seq", "1")
            self.db.execute("DELETE FROM outbox")
            # Another key (and perhaps another server's clock): the old floor means nothing.
            self.db.execute("DELETE FROM meta WHERE key='tickle_high_water_ms'")
            self.db.execute(
                "DELETE FROM operations WHERE status NOT IN (?, ?, ?)", (SUCCESS, FAILED, CANCELED)
            )
        os.chmod(self.folder / "state.db", 0o600)

    @property
    def identity_nonce(self) -> str | None:
        """The identity nonce the server last offered (None: none yet); presented in
        every direct exchange (domain/identity.py)."""
        return self.get("identity_nonce")

    def save_identity_nonce(self, nonce: str) -> None:
        # Durable (synchronous=FULL: the commit is fsynced, in the 0600 state file)
        # before anything of the reply that carried it is acted on or acknowledged:
        # the server has already replaced the nonce it confirmed with this one.
        self._set("identity_nonce", nonce)

    @property
    def relay_identity_nonce(self) -> str | None:
        """The identity nonce this computer's relay last offered (None: none yet);
        presented in every exchange through a relay. A lineage apart from the
        server's: moving between the relay and the server never mixes them up
        (docs/relays.md "Copies behind a relay")."""
        return self.get("relay_identity_nonce")

    def save_relay_identity_nonce(self, nonce: str) -> None:
        # Durable before the reply that carried it is acted on, as the server's.
        self._set("relay_identity_nonce", nonce)

    @property
    def relay_assignment(self) -> str | None:
        """The relay URL the server last assigned this computer to (None: none told);
        it outlives re-enrollment, as the server keeps the computer behind its relay."""
        return self.get("relay")

    def save_relay_assignment(self, url: str) -> None:
        self._set("relay", url)

    @property
    def tickle_high_water_ms(self) -> int:
        """The newest tickle timestamp that passed verification (-1: none yet)."""
        return int(self.get("tickle_high_water_ms", "-1") or -1)

    def save_tickle_high_water(self, ms: int) -> None:
        # Durable before the tickle is acted on: after a restart, the in-memory
        # nonce cache is gone and only this keeps a captured tickle refused.
        self._set("tickle_high_water_ms", str(ms))

    @property
    def last_seq(self) -> int:
        """The last sequence number given to a message of this agent (0: none yet)."""
        return int(self.get("next_seq", "1") or 1) - 1

    @property
    def server_seq(self) -> int:
        return int(self.get("server_seq", "0") or 0)

    # -- transactions ----------------------------------------------------------

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type: Any, *_: Any) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> LocalState._Tx:
        return LocalState._Tx(self.db)

    # -- operations ------------------------------------------------------------

    _COLS = (
        "op, seq, type, body, status, cancel_requested, attempts, pushed, mode, interval, "
        "every, next_run_at, pgid, pstart, received_at, started_at, ended_at, "
        "result IS NOT NULL, terminate_requested, awaiting, windows"
    )

    def _op(self, row: tuple[Any, ...]) -> Operation:
        return Operation(
            op=row[0],
            seq=row[1],
            type=row[2],
            body=row[3],
            status=row[4],
            cancel_requested=bool(row[5]),
            attempts=row[6],
            pushed=bool(row[7]),
            mode=row[8],
            interval=row[9],
            every=row[10],
            next_run_at=row[11],
            pgid=row[12],
            pstart=row[13],
            received_at=row[14],
            started_at=row[15],
            ended_at=row[16],
            finished=bool(row[17]),
            terminate_requested=bool(row[18]),
            awaiting=json.loads(row[19]) if row[19] else None,
            windows_order=json.loads(row[20]) if row[20] else None,
        )

    def receive(
        self,
        ops: list[NewOperation],
        cancels: list[int],
        last_seq: int,
        refusals: list[dict[str, Any]] | None = None,
        terminates: list[int] | None = None,
        windows: dict[int, dict[str, Any]] | None = None,
    ) -> list[int]:
        """Record new operations, cancel, terminate and windows orders, queue the ``refused``
        messages for the server messages that were not acted on, then the new server
        ack, atomically.

        Returns the ops that are new here (an op seen before is dropped:
        exactly-once per computer).
        """
        now = time.time()
        new = []
        with self._tx() as db:
            for o in ops:
                cur = db.execute(
                    "INSERT OR IGNORE INTO operations(op, seq, type, body, status, received_at, "
                    "pushed, mode, interval, every) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        o.op,
                        o.seq,
                        o.type,
                        o.body,
                        UNKNOWN,
                        now,
                        int(o.pushed),
                        o.mode,
                        o.interval,
                        o.every,
                    ),
                )
                if cur.rowcount:
                    new.append(o.op)
            for op in cancels:
                db.execute("UPDATE operations SET cancel_requested=1 WHERE op=?", (op,))
            for op in terminates or ():
                db.execute("UPDATE operations SET terminate_requested=1 WHERE op=?", (op,))
            for op, order in (windows or {}).items():
                # A later order (or one of the same time, sent after it) replaces the one kept:
                # a replayed older one changes nothing.
                row = db.execute("SELECT windows FROM operations WHERE op=?", (op,)).fetchone()
                kept = json.loads(row[0]) if row is not None and row[0] else None
                if kept is None or kept["issued_at"] <= order["issued_at"]:
                    db.execute(
                        "UPDATE operations SET windows=? WHERE op=?", (json.dumps(order), op)
                    )
            for message in refusals or ():
                self._queue(db, message)
            if last_seq > self.server_seq:
                self._set("server_seq", str(last_seq))
        return new

    def operation(self, op: int) -> Operation | None:
        row = self.db.execute(f"SELECT {self._COLS} FROM operations WHERE op=?", (op,)).fetchone()
        return self._op(row) if row else None

    def unfinished(self) -> list[Operation]:
        rows = self.db.execute(
            f"SELECT {self._COLS} FROM operations WHERE result IS NULL ORDER BY seq"
        ).fetchall()
        return [self._op(r) for r in rows]

    def _queue(self, db: sqlite3.Connection, message: dict[str, Any]) -> str:
        seq = int(self.get("next_seq", "1") or 1)
        text = json.dumps({**message, "seq": seq}, separators=(",", ":"))
        db.execute("INSERT INTO outbox(seq, message) VALUES (?, ?)", (seq, text))
        self._set("next_seq", str(seq + 1))
        return text

    def start(self, op: int, message: dict[str, Any] | None = None) -> int:
        """Count an attempt and mark it Working; optionally queue a status message."""
        with self._tx() as db:
            db.execute(
                "UPDATE operations SET status=?, started_at=?, attempts=attempts+1, "
                "next_run_at=NULL, pgid=NULL, pstart=NULL WHERE op=?",
                (WORKING, time.time(), op),
            )
            attempts = int(
                db.execute("SELECT attempts FROM operations WHERE op=?", (op,)).fetchone()[0]
            )
            if message is not None:
                self._queue(db, {**message, "attempt": attempts})
        return attempts

    def expect_restart(self, op: int, awaiting: dict[str, Any] | None) -> None:
        """Mark ``op`` as a restart whose command may have run (None: it did not)."""
        text = None if awaiting is None else json.dumps(awaiting)
        self.db.execute("UPDATE operations SET awaiting=? WHERE op=?", (text, op))

    def await_restart(self, op: int, awaiting: dict[str, Any], message: dict[str, Any]) -> None:
        """The restart command ran: ``op`` waits (Deferred locally, until ``awaiting``'s
        ``until``) for the computer to come back; ``message`` tells the server."""
        with self._tx() as db:
            db.execute(
                "UPDATE operations SET status=?, next_run_at=?, awaiting=?, pgid=NULL WHERE op=?",
                (DEFERRED, awaiting["until"], json.dumps(awaiting), op),
            )
            self._queue(db, message)

    def running(self, op: int, pgid: int | None, pstart: str | None) -> None:
        self.db.execute("UPDATE operations SET pgid=?, pstart=? WHERE op=?", (pgid, pstart, op))

    def set_status(
        self,
        op: int,
        status: int,
        *,
        next_run_at: float | None = None,
        message: dict[str, Any] | None = None,
        attempts: int | None = None,
    ) -> None:
        """A new local status (deferred, a recurring run's outcome), its message queued;
        ``attempts``: the attempt count to keep (a run that was no attempt)."""
        with self._tx() as db:
            db.execute(
                "UPDATE operations SET status=?, next_run_at=?, ended_at=?, pgid=NULL WHERE op=?",
                (status, next_run_at, time.time(), op),
            )
            if attempts is not None:
                db.execute("UPDATE operations SET attempts=? WHERE op=?", (attempts, op))
            if message is not None:
                self._queue(db, message)

    def queue(self, messages: list[dict[str, Any]]) -> None:
        """Queue ``messages`` to send, in order, in one transaction."""
        with self._tx() as db:
            for message in messages:
                self._queue(db, message)

    def job_phase(self, op: int, status: int, messages: list[dict[str, Any]]) -> None:
        """A job's local status for the phase it is in (Working, Downloading, Installing)
        and the step reports that go with it, in one transaction."""
        with self._tx() as db:
            db.execute("UPDATE operations SET status=? WHERE op=?", (status, op))
            for message in messages:
                self._queue(db, message)

    def finish(
        self,
        op: int,
        status: int,
        message: dict[str, Any],
        before: list[dict[str, Any]] | None = None,
    ) -> int:
        """Mark ``op`` finished and queue its result, after the ``before`` messages (a
        job's last step reports); returns the result's sequence number."""
        with self._tx() as db:
            for earlier in before or ():
                self._queue(db, earlier)
            text = self._queue(db, message)
            db.execute(
                "UPDATE operations SET status=?, ended_at=?, result=?, next_run_at=NULL, "
                "pgid=NULL WHERE op=?",
                (status, time.time(), text, op),
            )
        if self.on_finish is not None:
            self.on_finish()
        return int(json.loads(text)["seq"])

    def queue_text(self, text: str) -> int:
        """Queue a message given as its JSON object text without ``seq`` (an inventory,
        made by another process: never decoded here); returns its sequence number."""
        if not (text.startswith("{") and text.endswith("}")):
            raise ValueError("queue_text: not a JSON object")
        with self._tx() as db:
            seq = int(self.get("next_seq", "1") or 1)
            db.execute(
                "INSERT INTO outbox(seq, message) VALUES (?, ?)",
                (seq, f'{text[:-1]},"seq":{seq}}}'),
            )
            self._set("next_seq", str(seq + 1))
        return seq

    def is_queued(self, seq: int) -> bool:
        """Whether message ``seq`` is still waiting for the server's ack."""
        row = self.db.execute("SELECT 1 FROM outbox WHERE seq=?", (seq,)).fetchone()
        return row is not None

    def requeue(self, op: int) -> None:
        """A decision to continue taken outside the agent: it runs at the agent's start."""
        self.db.execute("UPDATE operations SET status=?, pgid=NULL WHERE op=?", (UNKNOWN, op))

    # -- outbox ----------------------------------------------------------------

    def pending(self, max_messages: int, max_bytes: int, above: int = 0) -> list[str]:
        """Queued messages above sequence number ``above``, oldest first, within the limits
        (one at least)."""
        return [text for _, text in self.pending_seqs(max_messages, max_bytes, above)]

    def pending_seqs(
        self, max_messages: int, max_bytes: int, above: int = 0
    ) -> list[tuple[int, str]]:
        """``pending`` with each message's sequence number."""
        out: list[tuple[int, str]] = []
        size = 0
        for seq, text in self.db.execute(
            "SELECT seq, message FROM outbox WHERE seq > ? ORDER BY seq", (above,)
        ):
            if out and (len(out) >= max_messages or size + len(text) > max_bytes):
                break
            out.append((seq, text))
            size += len(text)
        return out

    def queued_above(self, seq: int) -> bool:
        """Whether a message above ``seq`` is queued (not yet sent to the current peer)."""
        return (
            self.db.execute("SELECT 1 FROM outbox WHERE seq > ? LIMIT 1", (seq,)).fetchone()
            is not None
        )

    def outbox_size(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def acked(self, seq: int) -> None:
        self.db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))

    def records(self) -> list[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT op, seq, type, status, received_at, started_at, ended_at, attempts, "
            "cancel_requested, terminate_requested, pushed, mode, interval, every, next_run_at, "
            "pgid, awaiting IS NOT NULL AS awaiting_restart, result IS NOT NULL FROM operations "
            "ORDER BY op"
        )
        names = [d[0] for d in cur.description]
        names[-1] = "finished"
        return [dict(zip(names, row, strict=True)) for row in cur]
