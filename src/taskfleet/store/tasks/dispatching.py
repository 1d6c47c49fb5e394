"""Dispatching server tasks: what the scheduler reads, and marking tasks dispatched.

Contract: ``load_open`` is every task not finished plus every canceled task still held by
its worker (it counts as running). ``mark_dispatched`` persists "dispatched" before the
queue sees the task; ``undispatch`` makes those the queue did not confirm pending again.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.states import FINAL_STATES, Cause, State, transition
from taskfleet.store.activities import Change, apply_changes
from taskfleet.store.bulk import id_in
from taskfleet.store.schema import activities, server_tasks
from taskfleet.store.tasks import SERVER
from taskfleet.store.tasks.stops import stop_pending


@dataclass(frozen=True)
class OpenTask:
    id: int
    type: str
    tenant: int | None
    group: str | None
    not_before: float | None
    state: State
    dispatched: bool


async def load_open(conn: AsyncConnection, ids: list[int] | None = None) -> list[OpenTask]:
    """Every task not finished (pending ones, those dispatched or running), and every
    canceled task still held by its worker (it counts as running); or only those of
    them among ``ids``."""
    q = (
        sa.select(
            activities.c.id,
            activities.c.state,
            server_tasks.c.type,
            server_tasks.c.scope_tenant,
            server_tasks.c.group_name,
            server_tasks.c.not_before,
            server_tasks.c.dispatched_at,
        )
        .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
        .where(activities.c.kind == SERVER.value)
        .where(sa.or_(activities.c.state.notin_([s.value for s in FINAL_STATES]), stop_pending()))
        .order_by(activities.c.id)
    )
    if ids is not None:
        q = q.where(id_in(conn, activities.c.id, ids))
    rows = await conn.execute(q)
    return [
        OpenTask(
            r.id,
            r.type,
            r.scope_tenant,
            r.group_name,
            r.not_before,
            State(r.state),
            r.dispatched_at is not None,
        )
        for r in rows
    ]


async def mark_dispatched(conn: AsyncConnection, ids: list[int], now: float) -> None:
    """Persist "dispatched" before the queue sees it; a due Scheduled task becomes Queued."""
    if not ids:
        return
    rows = (
        await conn.execute(
            sa.select(activities.c.id, activities.c.tenant_id, activities.c.state).where(
                id_in(conn, activities.c.id, ids)
            )
        )
    ).all()
    changes = [
        Change(
            r.id,
            r.tenant_id,
            transition(
                SERVER,
                State.SCHEDULED,
                State.QUEUED,
                cause=Cause.SYSTEM,
                actor="scheduler",
                at=now,
                reason="its not-before time came",
            ),
        )
        for r in rows
        if r.state == State.SCHEDULED.value
    ]
    await conn.run_sync(apply_changes, changes)
    await conn.execute(
        server_tasks.update()
        .where(id_in(conn, server_tasks.c.activity_id, ids))
        .values(dispatched_at=now)
    )


async def undispatch(conn: AsyncConnection, ids: list[int]) -> list[int]:
    """The queue did not confirm them: those not yet claimed are pending again (nothing
    lost). Returns them; the others already reached a worker through the queue."""
    unclaimed = list(
        (
            await conn.execute(
                sa.select(server_tasks.c.activity_id).where(
                    id_in(conn, server_tasks.c.activity_id, ids),
                    server_tasks.c.claimed_by.is_(None),
                )
            )
        ).scalars()
    )
    if unclaimed:
        await conn.execute(
            server_tasks.update()
            .where(id_in(conn, server_tasks.c.activity_id, unclaimed))
            .values(dispatched_at=None)
        )
    return unclaimed
