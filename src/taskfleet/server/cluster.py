"""The server processes on one database, and which one leads (issue 16, first slice).

Contract:

* Every server process registers at start (``server_processes``: a random id, host,
  pid, URL, version, start time) and beats every ``heartbeat`` seconds
  (``SERVER_HEARTBEAT``); a clean stop marks it stopped. A process silent for
  ``SERVER_LOST_AFTER_BEATS`` beats is shown as lost.
* Exactly one process leads. On PostgreSQL it is the holder of a session advisory
  lock (``LEADER_LOCK_KEY``) on a connection of its own: the database drops a dead
  process's lock with its session, so another process takes the lead at its next
  beat. On SQLite the one process there is leads. A process that gains the lead
  stamps the ``leadership`` row (holder, epoch + 1, since), and believes it leads
  only once that is committed (else it gains it again at its next beat); the
  leader refreshes its heartbeat there at each beat. A leader whose lock
  connection fails stops leading at once and tries again at its next beat.
* ``is_leader`` is what this process believes now; ``status`` what the database says
  (``GET /api/v1/servers``, ``taskfleet server status``).

Not yet (the next slice of issue 16): what leading gates. Today every process still
runs the batch scheduler, the lifecycle timers, the reaper and the tickler, so several
server processes on one database are not supported yet (docs/scale-out.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from taskfleet import __version__
from taskfleet.server.writer import Writer
from taskfleet.settings import (
    LEADER_LOCK_KEY,
    SERVER_HEARTBEAT,
    SERVER_LOST_AFTER_BEATS,
    SERVER_PROCESS_KEEP,
)
from taskfleet.store.schema import leadership, server_processes
from taskfleet.store.unavailable import log_failure

log = logging.getLogger("taskfleet.server")
LEADER = "leader"


class Cluster:
    def __init__(
        self,
        writer: Writer,
        read: AsyncEngine,
        lock_engine: AsyncEngine | None,
        *,
        url: str,
        clock: Callable[[], float],
        heartbeat: float = SERVER_HEARTBEAT,
    ) -> None:
        self.id = secrets.token_hex(8)
        self.writer, self.read = writer, read
        self.lock_engine = lock_engine  # None: SQLite, one process, always the leader
        self.url, self.clock, self.heartbeat = url, clock, heartbeat
        self.is_leader = False
        self._lock_conn: AsyncConnection | None = None

    async def start(self) -> None:
        now = self.clock()
        row = {
            "id": self.id,
            "host": socket.gethostname()[:255],
            "pid": os.getpid(),
            "url": self.url[:2048],
            "version": __version__[:64],
            "started_at": now,
            "heartbeat_at": now,
            "stopped_at": None,
        }

        async def register(conn: AsyncConnection) -> None:
            await conn.execute(server_processes.insert().values(**row))

        await self.writer.run(register)
        await self.beat()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log_failure(log, exc, "server heartbeat failed; trying again")

    async def beat(self) -> None:
        """One heartbeat: try to lead (or keep leading), then write down that we live."""
        leading = await self._hold_lock()
        gained = leading and not self.is_leader
        if self.is_leader and not leading:
            log.warning("server %s no longer leads (its lock connection failed)", self.id)
            self.is_leader = False  # at once: another process may take the lead now
        now = self.clock()

        async def write(conn: AsyncConnection) -> int | None:
            await conn.execute(
                server_processes.update()
                .where(server_processes.c.id == self.id)
                .values(heartbeat_at=now)
            )
            if not leading:
                return None
            if gained:
                return await _take_lead(conn, self.id, now)
            await conn.execute(
                leadership.update()
                .where(leadership.c.name == LEADER, leadership.c.holder == self.id)
                .values(heartbeat_at=now)
            )
            await conn.execute(  # the leader keeps the list short
                server_processes.delete().where(
                    server_processes.c.heartbeat_at < now - SERVER_PROCESS_KEEP
                )
            )
            return None

        epoch = await self.writer.run(write)
        # Only once the database says so: a lead gained in a beat whose write failed
        # is gained again (and stamped) at the next beat.
        self.is_leader = leading
        if gained:
            log.info("server %s leads (epoch %s)", self.id, epoch)

    async def _hold_lock(self) -> bool:
        if self.lock_engine is None:
            return True
        try:
            if self._lock_conn is None:
                self._lock_conn = await self.lock_engine.connect()
                got = await self._lock_conn.scalar(
                    sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": LEADER_LOCK_KEY}
                )
                await self._lock_conn.commit()  # the lock is the session's, not a transaction's
                if not got:
                    await self._drop_lock_conn()
                    return False
                return True
            await self._lock_conn.scalar(sa.text("SELECT 1"))  # still ours, still alive?
            await self._lock_conn.commit()
            return True
        except Exception as exc:  # the connection died: the lock died with it
            log.warning("leader lock connection failed: %s", exc)
            await self._drop_lock_conn()
            return False

    async def _drop_lock_conn(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def stop(self) -> None:
        """Mark this process stopped and give up the lead (another process takes it)."""
        now = self.clock()

        async def write(conn: AsyncConnection) -> None:
            await conn.execute(
                server_processes.update()
                .where(server_processes.c.id == self.id)
                .values(stopped_at=now, heartbeat_at=now)
            )

        with contextlib.suppress(Exception):
            await self.writer.run(write)
        self.is_leader = False
        await self._drop_lock_conn()  # closing the session releases the lock
        if self.lock_engine is not None:
            await self.lock_engine.dispose()

    async def status(self) -> dict[str, Any]:
        """The processes (running, stopped or lost) and the leader, as the database says."""
        now = self.clock()
        lost_before = now - SERVER_LOST_AFTER_BEATS * self.heartbeat
        async with self.read.connect() as conn:
            lead = (
                await conn.execute(sa.select(leadership).where(leadership.c.name == LEADER))
            ).first()
            rows = (
                await conn.execute(
                    sa.select(server_processes).order_by(server_processes.c.started_at)
                )
            ).all()
        holder = lead.holder if lead is not None else None
        processes = []
        for r in rows:
            state = (
                "stopped"
                if r.stopped_at is not None
                else "lost"
                if r.heartbeat_at < lost_before
                else "running"
            )
            processes.append(
                {
                    **dict(r._mapping),
                    "state": state,
                    "leader": r.id == holder,
                    "me": r.id == self.id,
                }
            )
        leader = None
        if lead is not None:
            leader = {
                "id": lead.holder,
                "epoch": lead.epoch,
                "since": lead.since,
                "heartbeat_at": lead.heartbeat_at,
            }
        return {"processes": processes, "leader": leader}


async def _take_lead(conn: AsyncConnection, me: str, now: float) -> int:
    """Stamp the leadership row: this process leads from now, one epoch further."""
    old = (
        await conn.execute(sa.select(leadership.c.epoch).where(leadership.c.name == LEADER))
    ).scalar()
    epoch = int(old or 0) + 1
    values = {"holder": me, "epoch": epoch, "since": now, "heartbeat_at": now}
    if old is None:
        await conn.execute(leadership.insert().values(name=LEADER, **values))
    else:
        await conn.execute(leadership.update().where(leadership.c.name == LEADER).values(**values))
    return epoch
