"""Workers' heartbeats, and reaping the tasks of silent workers (SPEC 4.6).

Contract: ``heartbeat`` records (or first registers) a worker. ``reap_workers`` fails
every task In Progress on a worker silent for longer than the timeout (or, at a server's
start, on an embedded worker of an earlier process) with reason ``HEARTBEAT_LOST`` and
marks the worker lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.states import Cause, IllegalTransition, State, transition
from taskfleet.store.activities import Change, apply_changes
from taskfleet.store.schema import activities, server_tasks, workers
from taskfleet.store.tasks import SERVER

HEARTBEAT_LOST = "worker heartbeat lost"


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
    conn: AsyncConnection, timeout: float, now: float, *, embedded_gone: bool = False
) -> list[Reaped]:
    """SPEC 4.6: fail every task a silent worker holds, with reason "worker heartbeat lost".

    ``embedded_gone``: reap every embedded worker still recorded as running,
    whatever its last heartbeat. Embedded workers live inside their server's
    process, so when a server starts, those recorded before it died with an
    earlier process: waiting out the heartbeat timeout would list them as idle
    and leave their tasks In Progress for hours."""
    silent_when = (
        workers.c.queue == "embedded" if embedded_gone else workers.c.heartbeat_at < now - timeout
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
    await apply_changes(conn, changes)
    await conn.execute(
        workers.update().where(workers.c.id.in_(silent)).values(status="lost", running=[])
    )
    return [
        Reaped(r.claimed_by, r.id, r.type, r.tenant_id, r.scope_tenant, r.group_name, r.params)
        for r in rows
    ]
