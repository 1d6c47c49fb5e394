"""The server's in-memory view of enrolled computers and relays: the "has work" index.

Contract: one :class:`ComputerState` per enrolled computer and one
:class:`RelayState` per enrolled relay, loaded at start and kept in step by the
single writer (``writer.py``). It answers, without touching the database,
whether an exchange has anything to do: a computer with no new work, nothing
unacknowledged and no new results costs a dict lookup and a hash; so does a
quiet relay. Sequence counters here are only updated after the transaction that
persisted them commits. Memory per idle computer is a few hundred bytes (see
benchmarks). A computer behind a relay is linked to its relay here (``relay``),
and remembers whether its last exchange came through it (``via_relay``): that
decides where its wake-ups go (``server/tickler.py``). A relay holds the
``"relay": URL`` bytes the direct agent exchange adds to every reply for its
computers (``reply_field``: its advertised URL, nothing once revoked), built once
when the relay is enrolled or loaded: assigning a computer only relinks it.
``assign`` says whom to wake so the agents learn of it soon (docs/relays.md
"Moving computers to another relay").

Several server processes (PostgreSQL): memory is then a cache, not the truth. The
counters are read from the ``computers`` rows under a lock by every transaction that
moves them (``server/exchange.py``, ``server/outbox.py``) and memory takes the stored
values after the commit; ``mark_work`` also tells the other processes
(``on_work``: ``server/hints.py``), whose hints come back here through
``mark_work(..., hint=False)`` and ``look_all``; computers and relays changed by
another process are reloaded by ``server/fleet_load.py``. Where a computer's
wake-ups go (address, tickle port, ``via_relay``) is set through ``reach``, which
tells the others of a change (``on_reach``; they apply it with ``reached``), so
the leader, which alone tickles, knows it whichever process served the agent. On
SQLite (one process) memory stays the truth and nothing of this runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable, Iterable
from typing import Any

from taskfleet.domain.identity import Nonces
from taskfleet.protocol.exchange import relay_field


def hash_secret(secret: str) -> str:
    # Secrets are 256-bit random strings, so a plain SHA-256 resists guessing;
    # a slow KDF would put milliseconds on every exchange for nothing.
    return hashlib.sha256(secret.encode()).hexdigest()


def reach_entry(state: ComputerState | RelayState) -> list[Any]:
    """Where a computer's or a relay's wake-ups go, as the ``reach`` hint carries it
    (``Fleet.reached``)."""
    if isinstance(state, RelayState):
        return ["relay", state.id, state.generation, state.address]
    return [state.id, state.generation, state.address, state.tickle_port, state.via_relay]


class ComputerState:
    __slots__ = (
        "address",
        "dirty",
        "generation",
        "has_work",
        "id",
        "identity",
        "in_acked",
        "inventory_full",
        "last_seen",
        "out_acked",
        "out_seq",
        "relay",
        "secret_hash",
        "served_at",
        "tenant_id",
        "tickle_port",
        "via_relay",
        "waiter",
    )

    def __init__(
        self,
        id: int,
        tenant_id: int,
        secret_hash: str,
        generation: int,
        in_acked: int = 0,
        out_seq: int = 0,
        out_acked: int = 0,
        address: str | None = None,
        tickle_port: int | None = None,
        last_seen: float | None = None,
    ) -> None:
        self.id = id
        self.tenant_id = tenant_id
        self.secret_hash = bytes.fromhex(secret_hash)
        self.generation = generation
        self.in_acked = in_acked
        self.out_seq = out_seq
        self.out_acked = out_acked
        self.address = address
        self.tickle_port = tickle_port
        self.last_seen = last_seen
        self.has_work = True  # unknown at load: the first exchange looks once
        self.dirty = False  # last_seen/address changed since the last flush
        self.waiter: asyncio.Event | None = None  # set while a long poll is held
        # When this process last answered its exchange (server clock; memory only).
        self.served_at = 0.0
        self.relay: RelayState | None = None  # the relay it is behind (computers.relay_id)
        self.via_relay = False  # its last exchange came through ``relay`` (memory only)
        # Its inventory report could not be applied: replies ask for the whole one
        # (memory only: after a restart, the next delta that does not apply asks again).
        self.inventory_full = False
        # Its identity nonces (server/identity.py); None: not read from its row yet.
        self.identity: Nonces | None = None

    def check_secret(self, secret: str) -> bool:
        digest = hashlib.sha256(secret.encode()).digest()
        return hmac.compare_digest(digest, self.secret_hash)

    def wake(self) -> None:
        self.has_work = True
        if self.waiter is not None:
            self.waiter.set()
        if self.relay is not None:
            self.relay.wake()


class RelayState:
    """One relay in memory: what its exchange needs without the database."""

    def __init__(
        self,
        id: int,
        tenant_id: int,
        name: str,
        secret_hash: str,
        generation: int,
        *,
        address: str | None = None,
        tickle_port: int | None = None,
        last_seen: float | None = None,
        revoked: bool = False,
        url: str | None = None,
    ) -> None:
        self.id = id
        self.tenant_id = tenant_id
        self.name = name
        self.url = url  # what it advertises to its agents (None: nothing)
        self._reply_field = relay_field(url)
        self.secret_hash = bytes.fromhex(secret_hash)
        self.generation = generation
        self.address = address
        self.tickle_port = tickle_port
        self.last_seen = last_seen
        self.revoked = revoked
        self.computers: dict[int, ComputerState] = {}  # those behind it
        # Computers may have messages for it (work, a cancel, a reply cut short):
        # its next exchange looks at each of its computers. Unknown at load.
        self.has_work = True
        self.waiter: asyncio.Event | None = None  # set while a long poll is held
        # computer id -> the highest server message the relay was sent or said it
        # holds (a hint: forgotten on resync and at restart, then all is resent).
        self.have: dict[int, int] = {}
        self.stats: dict[str, Any] = {}  # what the relay last reported (relay show)
        # Computers assigned away from it whose agents still talk to it: woken directly
        # once it has its new roster (then it answers them 503 and they fail over).
        self.moved_out: set[int] = set()
        self.dirty = False  # last_seen/address changed since the last flush
        self.served_at = 0.0  # when this process last answered its exchange (memory only)
        self._version: str | None = None

    def check_secret(self, secret: str) -> bool:
        digest = hashlib.sha256(secret.encode()).digest()
        return hmac.compare_digest(digest, self.secret_hash)

    def wake(self) -> None:
        self.has_work = True
        if self.waiter is not None:
            self.waiter.set()

    @property
    def reply_field(self) -> bytes:
        """What a direct reply to one of its computers adds: ``,"relay":URL`` (the
        agent moves behind it), or nothing (no URL; revoked: it would be refused)."""
        return b"" if self.revoked else self._reply_field

    @property
    def roster_version(self) -> str:
        """A digest of the roster (ids, generations, secret hashes, identity flags):
        equal rosters have equal versions, across restarts too, so a relay never keeps
        a stale one."""
        if self._version is None:
            digest = hashlib.sha256(b"%d|%d" % (self.id, self.generation))
            for cid in sorted(self.computers):
                cs = self.computers[cid]
                digest.update(b"|%d:%d:" % (cid, cs.generation) + cs.secret_hash)
                if cs.identity is not None and cs.identity.conflict_at is not None:
                    digest.update(b"!")  # flagged (server/identity.py): the relay refuses it
            self._version = digest.hexdigest()[:32]
        return self._version

    def roster_changed(self) -> None:
        self._version = None
        self.wake()  # its next exchange (a tickle, a long poll) brings the new roster


class Fleet:
    def __init__(self) -> None:
        self.computers: dict[int, ComputerState] = {}
        self.relays: dict[int, RelayState] = {}
        # Told the ids ``mark_work`` is given (PostgreSQL: the has-work hint to the
        # other server processes, server/hints.py); None: one process, nobody to tell.
        self.on_work: Callable[[list[int]], None] | None = None
        # Told a computer whose wake-ups now go elsewhere (``reach``; PostgreSQL: the
        # ``reach`` hint, so the leader, which tickles, knows); None: nobody to tell.
        self.on_reach: Callable[[ComputerState | RelayState], None] | None = None

    def get(self, computer_id: int) -> ComputerState | None:
        return self.computers.get(computer_id)

    def put(self, state: ComputerState, relay_id: int | None = None) -> None:
        """A computer enrolled (again): behind relay ``relay_id`` if one is given."""
        old = self.computers.get(state.id)
        if old is not None and old.relay is not None:
            old.relay.computers.pop(old.id, None)
            old.relay.have.pop(old.id, None)
            old.relay.roster_changed()
        self.computers[state.id] = state
        if old is not None and old.waiter is not None:
            old.waiter.set()
        self.link(state, relay_id)

    def link(self, cs: ComputerState, relay_id: int | None) -> None:
        """Put ``cs`` behind relay ``relay_id`` (None: behind none)."""
        rs = None if relay_id is None else self.relays.get(relay_id)
        if cs.relay is rs:
            return
        if cs.relay is not None:
            cs.relay.computers.pop(cs.id, None)
            cs.relay.have.pop(cs.id, None)
            cs.relay.roster_changed()
        cs.relay = rs
        # Its agent talks to its relay, as far as the server knows, until it
        # exchanges directly (then its wake-ups go to it directly).
        cs.via_relay = rs is not None
        if rs is not None:
            rs.computers[cs.id] = cs
            rs.roster_changed()

    def assign(
        self, computer_ids: Iterable[int], relay_id: int
    ) -> tuple[list[ComputerState], list[RelayState]]:
        """Computers put behind relay ``relay_id`` (``relay assign``). Until its agent
        exchanges through the new relay, a moved computer is woken directly. Returns
        the computers to wake now (direct ones: their next exchange's reply names the
        relay) and the relays whose rosters changed (to wake: they fetch them now); the
        agents behind an old relay go in its ``moved_out``."""
        direct: list[ComputerState] = []
        changed: dict[int, RelayState] = {}
        for cid in computer_ids:
            cs = self.computers.get(cid)
            if cs is None or (cs.relay is not None and cs.relay.id == relay_id):
                continue
            old = cs.relay
            self.link(cs, relay_id)
            if cs.relay is None:
                continue
            changed[relay_id] = cs.relay
            cs.via_relay = False
            cs.relay.moved_out.discard(cid)  # moved back before it heard
            if old is None:
                direct.append(cs)
            else:
                changed[old.id] = old
                old.moved_out.add(cid)
        return direct, list(changed.values())

    def take_moved_out(self, rs: RelayState) -> list[ComputerState]:
        """The computers moved away from ``rs`` (its new roster is on its way to it)."""
        out = [self.computers[c] for c in rs.moved_out if c in self.computers]
        rs.moved_out.clear()
        return out

    def remove(self, computer_id: int) -> None:
        """A removed computer: its exchanges get 401 from now on; a held long poll ends."""
        cs = self.computers.pop(computer_id, None)
        if cs is not None and cs.waiter is not None:
            cs.waiter.set()
        if cs is not None:
            self.link(cs, None)

    def put_relay(self, rs: RelayState) -> None:
        """A relay enrolled (again): its computers stay behind it."""
        old = self.relays.get(rs.id)
        self.relays[rs.id] = rs
        if old is not None:
            rs.stats = old.stats
            for cs in list(old.computers.values()):
                cs.relay = None
                self.link(cs, rs.id)
            if old.waiter is not None:
                old.waiter.set()
        rs.roster_changed()

    def revoke_relays(self, relay_ids: Iterable[int]) -> None:
        """Revoked relays: refused from now on (401); their computers are woken directly."""
        for rid in relay_ids:
            rs = self.relays.get(rid)
            if rs is None:
                continue
            rs.revoked = True
            for cs in rs.computers.values():
                cs.via_relay = False
            if rs.waiter is not None:
                rs.waiter.set()

    def mark_work(self, computer_ids: Iterable[int], *, hint: bool = True) -> list[ComputerState]:
        """After a commit that gave these computers work: wake them here (the ones
        known), and (``hint``) tell the other server processes (``on_work``)."""
        ids = list(computer_ids)
        if hint and self.on_work is not None:
            self.on_work(ids)
        woken = []
        for cid in ids:
            cs = self.computers.get(cid)
            if cs is not None:
                cs.wake()
                woken.append(cs)
        return woken

    def reach(
        self,
        cs: ComputerState,
        address: str | None,
        tickle_port: int | None,
        via_relay: bool,
        *,
        tell: bool = True,
    ) -> None:
        """Where ``cs``'s wake-ups go, as an exchange (or, not ``tell``, another server
        process's ``reach`` hint) just showed: its address, its agent's tickle port,
        and whether its agent speaks through its relay. A change is told
        (``on_reach``); the same values again cost nothing."""
        via = via_relay and cs.relay is not None
        if cs.address == address and cs.tickle_port == tickle_port and cs.via_relay == via:
            return
        cs.address, cs.tickle_port, cs.via_relay = address, tickle_port, via
        if tell and self.on_reach is not None:
            self.on_reach(cs)

    def reach_relay(self, rs: RelayState, address: str | None, *, tell: bool = True) -> None:
        """``reach`` for a relay: the address its exchange came from."""
        if rs.address != address:
            rs.address = address
            if tell and self.on_reach is not None:
                self.on_reach(rs)

    def served_since(self, states: Iterable[ComputerState], since: float) -> list[ComputerState]:
        """Those whose last exchange (or their relay's, if they speak through it) this
        process answered after ``since``."""
        out = []
        for cs in states:
            via = cs.relay if cs.via_relay else None
            if (via.served_at if via is not None else cs.served_at) > since:
                out.append(cs)
        return out

    def reached(self, entries: list[Any]) -> None:
        """Another server process's ``reach`` hint (``reach_entry`` each): applied to
        the computers and relays known here at that generation; a malformed entry is
        skipped."""
        for e in entries:
            if isinstance(e, list) and len(e) == 4 and e[0] == "relay":
                _, rid, gen, address = e
                rs = self.relays.get(rid) if type(rid) is int else None
                if rs is not None and rs.generation == gen and isinstance(address, str):
                    self.reach_relay(rs, address, tell=False)
                continue
            if not (isinstance(e, list) and len(e) == 5):
                continue
            cid, gen, address, port, via = e
            cs = self.computers.get(cid) if type(cid) is int else None
            if (
                cs is not None
                and cs.generation == gen
                and isinstance(via, bool)
                and (address is None or isinstance(address, str))
                and (port is None or (type(port) is int and 0 < port < 65536))
            ):
                self.reach(cs, address, port, via, tell=False)

    def look_all(self) -> None:
        """Every computer and relay looks once at its next exchange, and long polls end
        now (hints may have been missed: the catch-up after the listener reconnects)."""
        for cs in self.computers.values():
            cs.has_work = True
            if cs.waiter is not None:
                cs.waiter.set()
        for rs in self.relays.values():
            rs.wake()

    def take_dirty(self) -> list[ComputerState]:
        out = [cs for cs in self.computers.values() if cs.dirty]
        for cs in out:
            cs.dirty = False
        return out

    def take_dirty_relays(self) -> list[RelayState]:
        out = [rs for rs in self.relays.values() if rs.dirty]
        for rs in out:
            rs.dirty = False
        return out
