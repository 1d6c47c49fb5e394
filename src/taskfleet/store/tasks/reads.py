"""Reading server tasks: states, listings and one task for the API.

Contract: read only. ``states_of`` is on the scheduler's path (every running task, twice a
second): one array parameter on PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.states import State
from taskfleet.store.bulk import id_in
from taskfleet.store.schema import activities, server_tasks, workers
from taskfleet.store.tasks import SERVER


async def states_of(conn: AsyncConnection, ids: list[int]) -> dict[int, State]:
    if not ids:
        return {}
    # One array parameter on PostgreSQL (``bulk.id_in``): the server asks this about
    # every running task twice a second, and an IN list of thousands of parameters
    # costs far more to build and parse than the lookup itself.
    match = id_in(conn, activities.c.id, ids)
    rows = await conn.execute(sa.select(activities.c.id, activities.c.state).where(match))
    return {r.id: State(r.state) for r in rows}


_TASK_COLUMNS = (
    activities.c.id,
    activities.c.type,
    activities.c.state,
    activities.c.created_at,
    activities.c.updated_at,
    activities.c.delivered_at,
    activities.c.finished_at,
    activities.c.exit_code,
    activities.c.result_line,
    activities.c.reason,
    server_tasks.c.scope_tenant,
    server_tasks.c.group_name,
    server_tasks.c.params,
    server_tasks.c.not_before,
    server_tasks.c.dispatched_at,
    server_tasks.c.claimed_by,
    server_tasks.c.retry_of,
    server_tasks.c.command_line,
    server_tasks.c.submitted_by,
    server_tasks.c.stop_requested_at,
    server_tasks.c.stopped_at,
)


async def list_tasks(
    conn: AsyncConnection, tenant_id: int, *, state: str | None, type_: str | None, limit: int
) -> list[dict[str, Any]]:
    q = (
        sa.select(*_TASK_COLUMNS)
        .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
        .where(activities.c.tenant_id == tenant_id, activities.c.kind == SERVER.value)
    )
    if state is not None:
        q = q.where(activities.c.state == State(state).value)
    if type_ is not None:
        q = q.where(server_tasks.c.type == type_)
    rows = await conn.execute(q.order_by(activities.c.id.desc()).limit(limit))
    return [dict(r._mapping) for r in rows]


async def count_tasks(
    conn: AsyncConnection, tenant_id: int, *, type_: str | None = None
) -> dict[str, int]:
    """The tenant's server tasks per state (of one type, or all)."""
    q = (
        sa.select(activities.c.state, sa.func.count().label("n"))
        .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
        .where(activities.c.tenant_id == tenant_id, activities.c.kind == SERVER.value)
    )
    if type_ is not None:
        q = q.where(server_tasks.c.type == type_)
    rows = await conn.execute(q.group_by(activities.c.state))
    return {r.state: int(r.n) for r in rows}


async def list_workers(conn: AsyncConnection) -> list[dict[str, Any]]:
    """Every worker that ran server tasks, oldest first (their heartbeats, status)."""
    rows = await conn.execute(sa.select(workers).order_by(workers.c.started_at))
    return [dict(r._mapping) for r in rows]


async def get_task(conn: AsyncConnection, tenant_id: int, task_id: int) -> dict[str, Any] | None:
    row = (
        await conn.execute(
            sa.select(*_TASK_COLUMNS, activities.c.stdout, activities.c.agent_report)
            .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
            .where(
                activities.c.id == task_id,
                activities.c.tenant_id == tenant_id,
                activities.c.kind == SERVER.value,
            )
        )
    ).first()
    return None if row is None else dict(row._mapping)
