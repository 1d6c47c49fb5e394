"""Approvals (approve, reject, expire, list) and resuming a paused rollout.

Run by the single writer; each write is audited and returns a :class:`Moved`.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.lifecycle import Approval, approval_refusal
from taskfleet.domain.states import Cause, State
from taskfleet.server.kernel import ApiError, Principal, audit
from taskfleet.server.lifecycle.moves import (
    Moved,
    evaluate_rollout,
    move,
    move_state,
    open_rows,
    request_row,
    summary,
    wave_counts,
)
from taskfleet.server.lifecycle.options import After, Options, check_options, iso
from taskfleet.store.schema import requests
from taskfleet.store.tasks import holds


async def _decide(
    conn: AsyncConnection,
    request_id: int,
    approval: dict[str, Any],
    decision: str,
    actor: str,
    now: float,
) -> dict[str, Any]:
    """Record the decision on a request's approval (approved, rejected, expired)."""
    decided = {**approval, "decision": decision, "decided_by": actor, "decided_at": now}
    await conn.execute(
        requests.update().where(requests.c.id == request_id).values(approval=decided)
    )
    return decided


def _approval(row: Any) -> Approval:
    a = row.approval
    return Approval(row.created_by, row.created_at, a.get("expires_at"), bool(a.get("separation")))


async def approve(conn: AsyncConnection, p: Principal, now: float, request_id: int) -> Moved:
    """Blocked -> Queued (or Waiting while its dependency or an earlier wave is pending)."""
    row = await request_row(conn, p.tenant_id, request_id)
    if row.approval is None:
        raise ApiError(409, f"request {request_id} does not need approval")
    decision = row.approval.get("decision")
    if decision is not None:
        raise ApiError(409, f"request {request_id} is not awaiting approval (already {decision})")
    rows = await open_rows(conn, request_id, [State.BLOCKED])
    if not rows:
        raise ApiError(409, f"request {request_id} has nothing Blocked to approve")
    why = approval_refusal(_approval(row), p.actor, now)
    if why:
        raise ApiError(403 if "separation" in why else 409, why)
    met = True
    if row.depends_on is not None:
        met = bool(await check_options(conn, p, Options(after=After.from_json(row.depends_on))))
    moved = Moved()
    queued = [r for r in rows if met and not r.wave]
    waiting = [r for r in rows if r not in queued]
    moved.count += len(
        await move(
            conn,
            queued,
            State.QUEUED,
            cause=Cause.ADMIN,
            actor=p.actor,
            now=now,
            reason=f"approved by {p.actor}",
        )
    )
    moved.count += len(
        await move(
            conn,
            waiting,
            State.WAITING,
            cause=Cause.ADMIN,
            actor=p.actor,
            now=now,
            reason=f"approved by {p.actor}; waits for "
            + ("an earlier rollout wave" if met else After.from_json(row.depends_on).describe()),
        )
    )
    moved.queued_computers = [r.computer_id for r in queued]
    await _decide(conn, request_id, row.approval, "approved", p.actor, now)
    await audit(conn, p, "request.approve", now, id=request_id, activities=moved.count)
    moved.watch.append(await summary(conn, request_id))
    return moved


async def reject(
    conn: AsyncConnection, p: Principal, now: float, request_id: int, reason: str
) -> Moved:
    row = await request_row(conn, p.tenant_id, request_id)
    if row.approval is None or row.approval.get("decision") is not None:
        raise ApiError(409, f"request {request_id} is not awaiting approval")
    why = f"rejected by {p.actor}" + (f": {reason}" if reason else "")
    rows = await move_state(
        conn,
        request_id,
        State.BLOCKED,
        State.CANCELED,
        cause=Cause.ADMIN,
        actor=p.actor,
        now=now,
        reason=why,
    )
    await _decide(conn, request_id, row.approval, "rejected", p.actor, now)
    await audit(conn, p, "request.reject", now, id=request_id, reason=reason, activities=len(rows))
    return Moved(count=len(rows), over=[request_id])


async def expire_approval(conn: AsyncConnection, now: float, request_id: int) -> Moved:
    row = await request_row(conn, None, request_id)
    a = row.approval
    if a is None or a.get("decision") is not None or a.get("expires_at") is None:
        return Moved()
    if now < a["expires_at"]:
        return Moved()
    rows = await move_state(
        conn,
        request_id,
        State.BLOCKED,
        State.CANCELED,
        cause=Cause.TIMEOUT,
        actor="server",
        now=now,
        reason=f"approval expired at {iso(a['expires_at'])}",
    )
    await _decide(conn, request_id, a, "expired", "server", now)
    sys = Principal(0, row.tenant_id, "admin", "server", via="server")
    await audit(conn, sys, "request.approval-expired", now, id=request_id, activities=len(rows))
    return Moved(count=len(rows), over=[request_id])


async def list_approvals(conn: AsyncConnection, p: Principal) -> list[dict[str, Any]]:
    """Requests awaiting a decision, oldest first, with who asked and until when."""
    out = []
    for row in await conn.execute(
        sa.select(requests)
        .where(requests.c.tenant_id == p.tenant_id, requests.c.approval.is_not(None))
        .order_by(requests.c.id)
    ):
        a = row.approval
        if a.get("decision") is not None:
            continue
        out.append(
            {
                "request_id": row.id,
                "type": row.type,
                "target": row.target,
                "total": row.total,
                "requested_by": row.created_by,
                "requested_at": row.created_at,
                "expires_at": a.get("expires_at"),
                "separation": bool(a.get("separation")),
                "kind": "request",
            }
        )
    for row in await holds.held(conn):
        a = (row.hold or {}).get("approval")
        if row.tenant_id != p.tenant_id or row.state != State.BLOCKED.value or not a:
            continue
        if a.get("decision") is not None:
            continue
        out.append(
            {
                "task_id": row.id,
                "type": row.type,
                "target": row.group_name or "server",
                "total": 1,
                "requested_by": a["requested_by"],
                "requested_at": a["requested_at"],
                "expires_at": a.get("expires_at"),
                "separation": bool(a.get("separation")),
                "kind": "task",
            }
        )
    return out


async def resume(conn: AsyncConnection, p: Principal, now: float, request_id: int) -> Moved:
    """A person resumes a paused rollout: held work is Queued again, the failure count restarts."""
    row = await request_row(conn, p.tenant_id, request_id)
    state = dict(row.rollout or {})
    if not state:
        raise ApiError(409, f"request {request_id} is not a rollout")
    if not state.get("paused"):
        raise ApiError(409, f"the rollout of request {request_id} is not paused")
    rows = await move_state(
        conn,
        request_id,
        State.BLOCKED,
        State.QUEUED,
        cause=Cause.ADMIN,
        actor=p.actor,
        now=now,
        reason=f"rollout resumed by {p.actor}",
    )
    waves, _ = await wave_counts(conn, request_id)
    state.update(
        paused=False,
        base_finished=sum(w.finished for w in waves),
        base_succeeded=sum(w.succeeded for w in waves),
        resumed_by=p.actor,
        resumed_at=now,
    )
    await conn.execute(requests.update().where(requests.c.id == request_id).values(rollout=state))
    await audit(conn, p, "rollout.resume", now, id=request_id, activities=len(rows))
    moved = await evaluate_rollout(conn, now, request_id, override=True)
    moved.queued_computers += [r.computer_id for r in rows]
    moved.count += len(rows)
    moved.watch.append(await summary(conn, request_id))
    return moved
