"""Timeouts (SPEC 9): client activities lost (no result by their deadline) fail; work
not handed out by its expiry is Canceled, "expired". (A terminated job's activities
are not lost: its own deadline ends them, ``server/jobs.py``.)

Contract: run by the reaper through the single writer; each call moves at most
``limit`` activities per state through ``transition`` + ``apply_changes``.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.results import LOST_LINE, result_line
from taskfleet.domain.states import ActivityKind, Cause, State, transition
from taskfleet.store.activities import Change, apply_changes
from taskfleet.store.schema import activities, jobs

_CLIENT = ActivityKind.CLIENT


async def _time_out(
    conn: AsyncConnection,
    now: float,
    *,
    state: State,
    target: State,
    column: sa.Column[Any],
    reason: str,
    line: str,
    limit: int,
    where: tuple[Any, ...] = (),
) -> list[int]:
    """Move client activities in ``state`` whose time ``column`` passed to ``target``."""
    rows = (
        await conn.execute(
            sa.select(activities.c.id, activities.c.tenant_id)
            .where(activities.c.state == state.value)
            .where(activities.c.kind == _CLIENT.value)
            .where(column <= now, *where)
            .order_by(column)
            .limit(limit)
        )
    ).all()
    changes = [
        Change(
            row.id,
            row.tenant_id,
            transition(
                _CLIENT, state, target, cause=Cause.TIMEOUT, actor="server", at=now, reason=reason
            ),
            {"result_line": line, "finished_at": now},
        )
        for row in rows
    ]
    await conn.run_sync(apply_changes, changes)
    return [row.id for row in rows]


async def reap_lost(conn: AsyncConnection, now: float, limit: int = 5000) -> list[int]:
    """SPEC 9: fail client activities whose time limit plus grace passed with no result."""
    return await _time_out(
        conn,
        now,
        state=State.IN_PROGRESS,
        target=State.FAILED,
        column=activities.c.deadline_at,
        reason="lost: no result within the time limit plus grace",
        line=LOST_LINE,
        limit=limit,
        # A terminated job waits for its computers until its own deadline (SPEC 6,
        # server/jobs.py), which records them "unreachable at termination".
        where=(
            ~sa.exists().where(
                jobs.c.request_id == activities.c.request_id, jobs.c.terminate_at.is_not(None)
            ),
        ),
    )


EXPIRED_LINE = result_line("Pending", "Canceled", "Expired before the computer picked it up", None)


async def reap_expired(conn: AsyncConnection, now: float, limit: int = 5000) -> list[int]:
    """SPEC 9: work not handed out by its expiry is Canceled, "expired" (Queued, and
    also Scheduled, Waiting or Blocked: it would reach the computer too late)."""
    out: list[int] = []
    for state in (State.QUEUED, State.SCHEDULED, State.WAITING, State.BLOCKED):
        out += await _time_out(
            conn,
            now,
            state=state,
            target=State.CANCELED,
            column=activities.c.expires_at,
            reason="expired",
            line=EXPIRED_LINE,
            limit=limit,
        )
    return out
