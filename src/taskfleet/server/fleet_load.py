"""The in-memory fleet (``server/fleet.py``) loaded from the database.

Contract:
* ``load_all`` puts every relay and every computer not removed into memory (at start).
* On PostgreSQL several server processes share one database, so a computer or relay
  enrolled, enrolled again, removed or revoked through another process is not in
  this one's memory, or is there as it was. A :class:`FleetLoader` brings memory in
  step with the rows: ``computers(ids)``/``relays(ids)`` reload those rows (a removed
  computer leaves memory, a new generation or secret replaces the old state, a
  revoked relay is marked so; one unchanged is left as it is, with its has-work and
  long poll). The exchange calls it on a miss (an unknown id or a wrong secret:
  ``miss``, at most once per ``FLEET_RELOAD_MIN_INTERVAL`` per id, so a stream of
  bad credentials costs little database time), a relay exchange for the computers
  of its entries not behind it here (``misses``); the has-work hints
  (``server/hints.py``) call it when another process says a computer or relay changed.
* A reloaded computer is marked has-work (its first exchange looks once, as at load).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from taskfleet.server import identity, metrics
from taskfleet.server.fleet import ComputerState, Fleet, RelayState
from taskfleet.settings import FLEET_RELOAD_MIN_INTERVAL
from taskfleet.store.schema import computers, relays

_MISSES_KEPT = 10_000  # ids remembered for the miss throttle (then forgotten at once)


def computer_state(row: Any) -> ComputerState:
    cs = ComputerState(
        row.id,
        row.tenant_id,
        row.secret_hash,
        row.generation,
        row.in_acked,
        row.out_seq,
        row.out_acked,
        row.address,
        row.tickle_port,
        row.last_seen_at,
    )
    _flag(cs, row)
    return cs


def _flag(cs: ComputerState, row: Any) -> None:
    """A flagged identity (``server/identity.py``) is known from load: it gets no work,
    even through a relay, before its agents speak. A flag cleared in the database (an
    administrator's reset on another process) clears memory's; otherwise the identity
    state is read at the computer's first direct exchange."""
    if row.identity_conflict_at is not None:
        cs.identity = identity.from_row(row)
    elif cs.identity is not None and cs.identity.conflict_at is not None:
        cs.identity = None


def relay_state(row: Any) -> RelayState:
    return RelayState(
        row.id,
        row.tenant_id,
        row.name,
        row.secret_hash,
        row.generation,
        address=row.address,
        tickle_port=row.tickle_port,
        last_seen=row.last_seen_at,
        revoked=row.revoked_at is not None,
        url=row.url,
    )


async def load_all(conn: AsyncConnection, fleet: Fleet) -> None:
    """Every relay (revoked ones too: their computers stay behind them), then every
    computer not removed, into memory."""
    for row in await conn.execute(sa.select(relays)):
        fleet.put_relay(relay_state(row))
    for row in await conn.execute(sa.select(computers).where(computers.c.removed_at.is_(None))):
        fleet.put(computer_state(row), row.relay_id)


def _update_metrics(fleet: Fleet) -> None:
    metrics.COMPUTERS.set(len(fleet.computers))
    metrics.RELAYS.set(sum(1 for rs in fleet.relays.values() if not rs.revoked))


class FleetLoader:
    """Brings memory in step with the database for some computers or relays
    (PostgreSQL: changed by another server process)."""

    def __init__(
        self, engine: AsyncEngine, fleet: Fleet, *, min_interval: float = FLEET_RELOAD_MIN_INTERVAL
    ) -> None:
        self.engine, self.fleet, self.min_interval = engine, fleet, min_interval
        self._missed: dict[tuple[str, int], float] = {}  # (kind, id) -> last reload on a miss

    async def miss(self, kind: str, id: int) -> bool:
        """An exchange from computer (``kind`` "computer") or relay ``id`` that memory
        refused: reload it, unless that was done less than ``min_interval`` ago.
        Whether it was reloaded (then authenticate again)."""
        return bool(await self.misses(kind, [id]))

    async def misses(self, kind: str, ids: Iterable[int]) -> list[int]:
        """``miss`` for several ids at once (one query): those reloaded."""
        now = time.monotonic()
        due = [i for i in set(ids) if now - self._missed.get((kind, i), -1e9) >= self.min_interval]
        if not due:
            return []
        if len(self._missed) + len(due) >= _MISSES_KEPT:
            self._missed.clear()
        for i in due:
            self._missed[(kind, i)] = now
        if kind == "computer":
            await self.computers(due)
        else:
            await self.relays(due)
        return due

    async def computers(self, ids: Iterable[int]) -> None:
        wanted = sorted(set(ids))
        if not wanted:
            return
        async with self.engine.connect() as conn:
            rows = {
                r.id: r
                for r in await conn.execute(sa.select(computers).where(computers.c.id.in_(wanted)))
            }
            unknown_relays = {
                r.relay_id
                for r in rows.values()
                if r.relay_id is not None and r.relay_id not in self.fleet.relays
            }
            if unknown_relays:
                for rrow in await conn.execute(
                    sa.select(relays).where(relays.c.id.in_(unknown_relays))
                ):
                    self.fleet.put_relay(relay_state(rrow))
        for cid in wanted:
            row = rows.get(cid)
            old = self.fleet.get(cid)
            if row is None or row.removed_at is not None:
                if old is not None:
                    self.fleet.remove(cid)
                continue
            if (
                old is not None
                and old.generation == row.generation
                and old.secret_hash.hex() == row.secret_hash
            ):
                self.fleet.link(old, row.relay_id)  # assigned to another relay meanwhile
                _flag(old, row)  # flagged or reset on another process
                # Where its agent listens, as the process that served it last stored it.
                old.tickle_port, old.address = row.tickle_port, row.address
                continue
            self.fleet.put(computer_state(row), row.relay_id)
        _update_metrics(self.fleet)

    async def relays(self, ids: Iterable[int]) -> None:
        wanted = sorted(set(ids))
        if not wanted:
            return
        async with self.engine.connect() as conn:
            rows = {
                r.id: r
                for r in await conn.execute(sa.select(relays).where(relays.c.id.in_(wanted)))
            }
            for rid in wanted:
                row = rows.get(rid)
                old = self.fleet.relays.get(rid)
                if row is None:
                    continue
                if old is not None and old.generation == row.generation:
                    if row.revoked_at is not None and not old.revoked:
                        self.fleet.revoke_relays([rid])
                    continue
                self.fleet.put_relay(relay_state(row))
                # Its computers enrolled through another process: behind it here too.
                for crow in await conn.execute(
                    sa.select(computers).where(
                        computers.c.relay_id == rid, computers.c.removed_at.is_(None)
                    )
                ):
                    if crow.id not in self.fleet.computers:
                        self.fleet.put(computer_state(crow), rid)
        _update_metrics(self.fleet)
