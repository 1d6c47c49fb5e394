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

* Leading gates the **duties** (second slice): each is registered with ``duty(name,
  run)``, a coroutine function started as a task when this process gains the lead
  (after the epoch is stamped) and canceled when it loses it. A duty that fails is
  logged and started again a beat later. On SQLite the one process gains the lead in
  ``start`` and keeps it, so its duties run from start as before.
* **Epoch fencing**: ``fence(conn)``, called inside a leader's write transaction,
  updates the leadership row only where ``holder`` is this process and ``epoch`` is
  this process's epoch; any other outcome raises :class:`Deposed`, which rolls the
  write back. A duty that meets ``Deposed`` (or a beat that finds the row no longer
  ours) steps down: its duties are canceled, the lock connection is closed at the
  next beat, and the refused write is logged. So a deposed leader's late write never
  lands: a cron schedule never fires twice across a handover.

The duties (``server/runtime.py``): the tickler, the lifecycle engine's timers, the
server-task scheduler and the reaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from taskfleet import __version__
from taskfleet.server.writer import Writer
from taskfleet.settings import (
    LEADER_LOCK_KEY,
    SERVER_GONE_AFTER_BEATS,
    SERVER_HEARTBEAT,
    SERVER_LOST_AFTER_BEATS,
    SERVER_PROCESS_KEEP,
)
from taskfleet.store.schema import leadership, server_processes
from taskfleet.store.unavailable import log_failure

log = logging.getLogger("taskfleet.server")
LEADER = "leader"
STOPPING = "it stops"  # a clean stop gives up the lead: not worth a warning

# A duty: called with ``ready``, which it calls once it has loaded its state.
Duty = Callable[[Callable[[], None]], Coroutine[Any, Any, None]]


class Deposed(Exception):
    """This process no longer leads (by the database): its fenced write was refused."""


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
        self.epoch: int | None = None  # the epoch this process leads in, while it leads
        self._lock_conn: AsyncConnection | None = None
        self._lock_stale = False  # stepped down: close the lock connection at the next beat
        self._duties: dict[str, Duty] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self.refused = 0  # fenced writes refused (a deposed leader's late writes)

    # -- duties ----------------------------------------------------------------------

    def duty(self, name: str, run: Duty) -> None:
        """Run ``run(ready)`` as a task while this process leads (from now, if it leads)."""
        self._duties[name] = run
        if self.is_leader:
            self._start_duty(name)

    @property
    def duties_running(self) -> list[str]:
        return sorted(n for n, t in self._running.items() if not t.done())

    def _start_duty(self, name: str) -> None:
        self._ready[name] = asyncio.Event()
        self._running[name] = asyncio.get_running_loop().create_task(
            self._run_duty(name), name=f"duty:{name}"
        )

    async def _run_duty(self, name: str) -> None:
        while True:
            try:
                await self._duties[name](self._ready[name].set)
                return
            except asyncio.CancelledError:
                raise
            except Deposed as exc:
                self.step_down(str(exc))
                return
            except Exception:
                log.exception("leader duty %s failed; starting it again", name)
                await asyncio.sleep(self.heartbeat)

    def _gain(self, epoch: int) -> None:
        self.is_leader, self.epoch = True, epoch
        log.info("server %s leads (epoch %s): starting %s", self.id, epoch, sorted(self._duties))
        for name in self._duties:
            self._start_duty(name)

    def _lose(self, why: str) -> None:
        if not self.is_leader:
            return
        level = logging.INFO if why == STOPPING else logging.WARNING
        log.log(level, "server %s no longer leads (%s): its duties stop", self.id, why)
        self.is_leader, self.epoch = False, None
        running, self._running = self._running, {}
        for task in running.values():
            task.cancel()  # not awaited: the caller may be one of them

    def step_down(self, why: str) -> None:
        """The database says another process leads: stop the duties, drop the lock."""
        self._lose(why)
        self._lock_stale = True

    def fenced(self, run: Callable[..., Any]) -> Callable[..., Any]:
        """``Writer.run`` whose every write is fenced (the lifecycle engine's)."""

        async def fenced_run(fn: Callable[[AsyncConnection], Any], **kw: Any) -> Any:
            async def inner(conn: AsyncConnection) -> Any:
                await self.fence(conn)
                return await fn(conn)

            return await run(inner, **kw)

        return fenced_run

    async def fence(self, conn: AsyncConnection) -> None:
        """Inside a leader's write transaction: raise :class:`Deposed` (the write rolls
        back) unless the leadership row still names this process at its epoch."""
        if self.is_leader and self.epoch is not None:
            res = await conn.execute(
                leadership.update()
                .where(
                    leadership.c.name == LEADER,
                    leadership.c.holder == self.id,
                    leadership.c.epoch == self.epoch,
                )
                .values(epoch=self.epoch)
            )
            if res.rowcount == 1:
                return
        self.refused += 1
        log.warning(
            "server %s: a leader's write refused: it does not lead at epoch %s",
            self.id,
            self.epoch,
        )
        raise Deposed(f"not the leader at epoch {self.epoch}")

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
        # Leading from start (always on SQLite): the duties have loaded their state
        # before the server answers, as when there was one process only.
        for name, task in list(self._running.items()):
            ready = asyncio.ensure_future(self._ready[name].wait())
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()

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
        if self._lock_stale:
            self._lock_stale = False
            await self._drop_lock_conn()
        leading = await self._hold_lock()
        if self.is_leader and not leading:
            self._lose("its lock connection failed")
        gained = leading and not self.is_leader
        epoch = self.epoch
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
            res = await conn.execute(
                leadership.update()
                .where(
                    leadership.c.name == LEADER,
                    leadership.c.holder == self.id,
                    leadership.c.epoch == epoch,
                )
                .values(heartbeat_at=now)
            )
            if res.rowcount != 1:
                return -1  # the row names another leader: we were deposed
            await conn.execute(  # the leader keeps the list short
                server_processes.delete().where(
                    server_processes.c.heartbeat_at < now - SERVER_PROCESS_KEEP
                )
            )
            return None

        try:
            stamped = await self.writer.run(write)
        except Exception:
            if gained:  # the lead is not ours until the row says so: try again next beat
                await self._drop_lock_conn()
            raise
        if stamped == -1:
            self.step_down("the leadership row names another process")
        elif gained and stamped is not None:
            self._gain(stamped)

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
                # Invalidate, not just close: a pooled session would keep the lock.
                await conn.invalidate()
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
        running = list(self._running.values())
        self._lose(STOPPING)
        for task in running:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._drop_lock_conn()  # closing the session releases the lock
        if self.lock_engine is not None:
            await self.lock_engine.dispose()

    async def alive(self, conn: AsyncConnection) -> set[str]:
        """The ids of the server processes still running: not stopped, and heard from
        within ``SERVER_GONE_AFTER_BEATS`` beats. On SQLite only this one (one process
        uses the file: any other recorded there has ended)."""
        if self.lock_engine is None:
            return {self.id}
        since = self.clock() - SERVER_GONE_AFTER_BEATS * self.heartbeat
        rows = await conn.execute(
            sa.select(server_processes.c.id).where(
                server_processes.c.stopped_at.is_(None), server_processes.c.heartbeat_at >= since
            )
        )
        return {str(r) for r in rows.scalars()} | {self.id}

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
        return {"processes": processes, "leader": leader, "duties": self.duties_running}


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
