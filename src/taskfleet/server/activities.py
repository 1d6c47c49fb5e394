"""Activity reads: list (with filters) and one activity with its history.

Contract: read-only, scoped to the caller's tenant. Its own module because
both requests and computers show activities (the computer page lists its
latest), and neither should import the other.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.states import State
from taskfleet.server.kernel import ApiError, Principal
from taskfleet.store.schema import activities, activity_events, computers

_LIST_COLUMNS = (
    activities.c.id,
    activities.c.request_id,
    activities.c.computer_id,
    activities.c.type,
    activities.c.state,
    activities.c.created_at,
    activities.c.updated_at,
    activities.c.delivered_at,
    activities.c.finished_at,
    activities.c.exit_code,
    activities.c.result_line,
    activities.c.agent_started_at,
    activities.c.agent_ended_at,
    activities.c.reason,
)


async def list_activities(
    conn: AsyncConnection,
    p: Principal,
    *,
    request_id: int | None,
    computer_id: int | None,
    state: str | None,
    limit: int,
    with_output: bool = False,
) -> list[dict[str, Any]]:
    cols = [*list(_LIST_COLUMNS), computers.c.hostname]
    if with_output:
        cols += [activities.c.stdout, activities.c.stderr]
    q = (
        sa.select(*cols)
        .select_from(activities.outerjoin(computers, computers.c.id == activities.c.computer_id))
        .where(activities.c.tenant_id == p.tenant_id)
    )
    if request_id is not None:
        q = q.where(activities.c.request_id == request_id)
    if computer_id is not None:
        q = q.where(activities.c.computer_id == computer_id)
    if state is not None:
        try:
            q = q.where(activities.c.state == State(state).value)
        except ValueError:
            raise ApiError(400, f"unknown state {state!r}") from None
    rows = await conn.execute(q.order_by(activities.c.id.desc()).limit(limit))
    return [dict(r._mapping) for r in rows]


async def get_activity(conn: AsyncConnection, p: Principal, activity_id: int) -> dict[str, Any]:
    row = (
        await conn.execute(
            sa.select(activities, computers.c.hostname)
            .select_from(
                activities.outerjoin(computers, computers.c.id == activities.c.computer_id)
            )
            .where(activities.c.id == activity_id, activities.c.tenant_id == p.tenant_id)
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no activity {activity_id}")
    out = dict(row._mapping)
    out.pop("tenant_id")
    out["history"] = [
        dict(e._mapping)
        for e in await conn.execute(
            sa.select(
                activity_events.c.from_state,
                activity_events.c.to_state,
                activity_events.c.cause,
                activity_events.c.actor,
                activity_events.c.at,
                activity_events.c.reason,
            )
            .where(activity_events.c.activity_id == activity_id)
            .order_by(activity_events.c.id)
        )
    ]
    return out


async def request_events(
    conn: AsyncConnection, p: Principal, request_id: int, after: int, limit: int
) -> list[dict[str, Any]]:
    """The state changes of a request's activities with an event id above ``after``, in
    id order: what the dashboard's event stream sends, the event id as its sequence.
    The single writer commits events in id order, so a reader that saw id N has seen
    every id below it: resuming above N misses nothing and repeats nothing."""
    e = activity_events.c
    rows = await conn.execute(
        sa.select(
            e.id,
            e.activity_id,
            activities.c.computer_id,
            e.from_state,
            e.to_state,
            e.cause,
            e.at,
            e.reason,
        )
        .join(activities, activities.c.id == e.activity_id)
        .where(
            activities.c.request_id == request_id,
            activities.c.tenant_id == p.tenant_id,
            e.id > after,
        )
        .order_by(e.id)
        .limit(limit)
    )
    return [dict(r._mapping) for r in rows]


async def last_request_event(conn: AsyncConnection, p: Principal, request_id: int) -> int:
    """The highest event id of the request's activities (0: none yet)."""
    e = activity_events.c
    found = (
        await conn.execute(
            sa.select(sa.func.max(e.id))
            .join(activities, activities.c.id == e.activity_id)
            .where(activities.c.request_id == request_id, activities.c.tenant_id == p.tenant_id)
        )
    ).scalar()
    return int(found or 0)
