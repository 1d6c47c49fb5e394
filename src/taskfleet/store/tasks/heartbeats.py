"""Workers' heartbeats, and reaping the tasks of silent workers (SPEC 4.6).

Contract: ``heartbeat`` records (or first registers) a worker. ``reap_workers`` fails
every task In Progress on a worker silent for longer than the timeout, or on an
embedded worker whose server process is gone (its id is ``embedded_id(server id)``,
and that server is not among ``servers_alive``), with reason ``HEARTBEAT_LOST`` and
marks the worker lost.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.states import Cause, IllegalTransition, State, transition
from taskfleet.store.activities import Change, apply_changes
from taskfleet.store.schema import activities, server_tasks, workers
from taskfleet.store.tasks import SERVER

HEARTBEAT_LOST = "worker heartbeat lost"
EMBEDDED = "embedded"  # the queue name of the worker inside a server process


def embedded_id(server_id: str) -> str:
    """The worker id of the embedded worker of server process ``server_id``."""
    return f"{EMBEDDED}-{server_id}"


async def heartbeat(
    conn: AsyncConnection,
    *,
    worker_id: str,
    name: str,
    queue: str,
    pid: int | None,
    status: str,
    running: list[int],
    now: float,
) -> None:
    updated = await conn.execute(
        workers.update()
        .where(workers.c.id == worker_id)
        .values(heartbeat_at=now, status=status, running=running)
    )
    if updated.rowcount == 0:
        await conn.execute(
            workers.insert().values(
                id=worker_id,
                name=name,
                queue=queue,
                pid=pid,
                started_at=now,
                heartbeat_at=now,
                status=status,
                running=running,
            )
        )


@dataclass(frozen=True)
class Reaped:
    worker_id: str
    task_id: int
    type: str
    tenant_id: int
    scope_tenant: int | None
    group: str | None
    params: dict[str, Any]


async def reap_workers(
    conn: AsyncConnection,
    timeout: float,
    now: float,
    *,
    servers_alive: Collection[str] | None = None,
) -> list[Reaped]:
    """SPEC 4.6: fail every task a silent worker holds, with reason "worker heartbeat lost".

    ``servers_alive``: the server processes still running. An embedded worker lives
    inside its server's process and dies with it, so one whose process is not among
    them is reaped whatever its last heartbeat: waiting out the heartbeat timeout
    (hours) would leave its tasks In Progress long after the process is gone."""
    silent_when = workers.c.heartbeat_at < now - timeout
    if servers_alive is not None:
        silent_when = sa.or_(
            silent_when,
            sa.and_(
                workers.c.queue == EMBEDDED,
                workers.c.id.notin_([embedded_id(s) for s in servers_alive]),
            ),
        )
    silent = list(
        (
            await conn.execute(
                sa.select(workers.c.id).where(silent_when, workers.c.status.in_(["idle", "busy"]))
            )
        ).scalars()
    )
    if not silent:
        return []
    rows = (
        await conn.execute(
            sa.select(
                activities.c.id,
                activities.c.tenant_id,
                server_tasks.c.claimed_by,
                server_tasks.c.type,
                server_tasks.c.scope_tenant,
                server_tasks.c.group_name,
                server_tasks.c.params,
            )
            .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
            .where(
                server_tasks.c.claimed_by.in_(silent),
                activities.c.state == State.IN_PROGRESS.value,
            )
        )
    ).all()
    changes = []
    for r in rows:
        try:
            t = transition(
                SERVER,
                State.IN_PROGRESS,
                State.FAILED,
                cause=Cause.TIMEOUT,
                actor="reaper",
                at=now,
                reason=HEARTBEAT_LOST,
            )
        except IllegalTransition:  # pragma: no cover - the query selected In Progress only
            continue
        changes.append(
            Change(r.id, r.tenant_id, t, {"finished_at": now, "result_line": HEARTBEAT_LOST})
        )
    await conn.run_sync(apply_changes, changes)
    await conn.execute(
        workers.update().where(workers.c.id.in_(silent)).values(status="lost", running=[])
    )
    return [
        Reaped(r.claimed_by, r.id, r.type, r.tenant_id, r.scope_tenant, r.group_name, r.params)
        for r in rows
    ]
