"""Held server tasks: Blocked (awaiting approval) and Waiting (for another task or a time).

Contract: ``held`` lists them with what holds them; ``move_held`` moves one on (approved,
released, rejected, expired) through ``transition``, updating its hold when given.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.states import FINAL_STATES, Cause, State, transition
from taskfleet.store.activities import Change, apply_changes
from taskfleet.store.bulk import id_in
from taskfleet.store.schema import activities, server_tasks
from taskfleet.store.tasks import SERVER


async def held(
    conn: AsyncConnection, task_id: int | None = None, *, ids: list[int] | None = None
) -> list[Any]:
    """Blocked and Waiting tasks with what holds them (all, one, or those among ``ids``)."""
    q = (
        sa.select(
            activities.c.id,
            activities.c.tenant_id,
            activities.c.state,
            server_tasks.c.type,
            server_tasks.c.scope_tenant,
            server_tasks.c.group_name,
            server_tasks.c.not_before,
            server_tasks.c.hold,
            server_tasks.c.submitted_by,
            activities.c.created_at,
        )
        .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
        .where(activities.c.state.in_([State.BLOCKED.value, State.WAITING.value]))
    )
    if task_id is not None:
        q = q.where(activities.c.id == task_id)
    if ids is not None:
        q = q.where(id_in(conn, activities.c.id, ids))
    return list(await conn.execute(q.order_by(activities.c.id)))


async def move_held(
    conn: AsyncConnection,
    row: Any,
    target: State,
    *,
    actor: str,
    now: float,
    reason: str,
    cause: Cause = Cause.ADMIN,
    hold: dict[str, Any] | None = None,
) -> None:
    """A held task moves on (approved, released, rejected, expired); ``hold`` updates it."""
    t = transition(
        SERVER, State(row.state), target, cause=cause, actor=actor, at=now, reason=reason
    )
    values = {"finished_at": now} if target in FINAL_STATES else {}
    await conn.run_sync(apply_changes, [Change(row.id, row.tenant_id, t, values)])
    if hold is not None:
        await conn.execute(
            server_tasks.update().where(server_tasks.c.activity_id == row.id).values(hold=hold)
        )
