"""Requests: create, list, show, cancel, re-run the failed, resume, depend on another.

``cancel`` is shared with the activities router: the cancel and its wake-ups.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

from taskfleet.domain.actions import ACTION_TYPES
from taskfleet.server import lifecycle as lc
from taskfleet.server import metrics, requests
from taskfleet.server.api.deps import (
    Admin,
    CancelIn,
    EpochTime,
    Finite,
    Id,
    Operator,
    Rt,
    Viewer,
    lifecycle_write,
    read,
    router_for,
)
from taskfleet.server.kernel import Principal
from taskfleet.server.runtime import Runtime, queued_orders, wake_targets
from taskfleet.settings import SCRIPT_TIMEOUT

log = logging.getLogger("taskfleet.server")
router = router_for()


class RequestIn(BaseModel):
    type: str = Field(
        "execute-script",
        description="execute-script, job, or a typed activity: "
        + ", ".join(ACTION_TYPES)
        + " (GET /api/v1/activity-types)",
    )
    target: str = Field(..., description="all | group:NAME | tag:KEY=VALUE | computer:ID[,ID]")
    params: dict[str, Any] = Field(
        ...,
        description="execute-script: argv | script (+interpreter), env, cwd, user, output_cap; "
        "job: docs/jobs.md; a typed activity: its schema, components.schemas "
        "ActivityParams.TYPE",
    )
    timeout: Finite | None = Field(
        None,
        description=f"seconds; default {SCRIPT_TIMEOUT:g} for a script, for a job its longest "
        "step's time limit (the most the server waits between two reports of a computer)",
    )
    expires_in: Finite | None = Field(
        None, description="seconds: queued work not handed out by then is Canceled (expired)"
    )
    policy: dict[str, Any] | None = Field(
        None,
        description="mode required|optional (optional work waits for the agent's run window), "
        "interval once|recurring, every (seconds, recurring)",
    )
    at: EpochTime | None = Field(None, description="epoch seconds: Scheduled, not earlier than")
    after: dict[str, Any] | None = Field(
        None,
        description="Waiting: {request: ID} or {activity: ID}, metric finished|succeeded "
        "(default finished), percent (0, 100] (default 100)",
    )
    approval: dict[str, Any] | None = Field(
        None,
        description="Blocked until approved: {separation: bool (requester may not approve), "
        "expires_in: seconds}",
    )
    rollout: dict[str, Any] | None = Field(
        None,
        description="waves: {canary: N, size: N | share: percent, success: percent a wave "
        "must reach before the next, max_failures: percent of finished that pauses it}",
    )


class AfterIn(BaseModel):
    after: dict[str, Any]


@router.post("/api/v1/requests", status_code=201, tags=["requests"])
async def create_request(rt: Rt, body: RequestIn, p: Operator) -> dict[str, Any]:
    opts = lc.parse_options(
        rt.now(), at=body.at, after=body.after, approval=body.approval, rollout=body.rollout
    )
    created = await rt.writer.run(
        lambda c: requests.create_request(
            c,
            p,
            rt.now(),
            type=body.type,
            target=body.target,
            params=body.params,
            timeout=body.timeout,
            policy=body.policy,
            expires_in=body.expires_in,
            options=opts,
        ),
        after=lambda res: wake_targets(rt, res),
    )
    metrics.REQUESTS.inc()
    log.info(
        "request %d created: %s on %s (%d computers)",
        created.request["id"],
        body.type,
        created.request["target"],
        len(created.computer_ids),
    )
    return created.request


@router.get("/api/v1/activity-types", tags=["requests"])
async def activity_types(p: Viewer) -> list[dict[str, Any]]:
    """Every typed activity a request may name, with its parameter schema; Execute Script
    and Job are documented in docs/guide.md and docs/jobs.md."""
    return [
        {
            "type": a.name,
            "title": a.title,
            "description": a.description,
            "changes_system": a.changes_system,
            "default_timeout": a.default_timeout,
            "params": a.schema,
        }
        for a in ACTION_TYPES.values()
    ]


@router.get("/api/v1/requests", tags=["requests"])
async def list_requests(rt: Rt, p: Viewer, limit: int = 50) -> list[dict[str, Any]]:
    return await read(rt, lambda c: requests.list_requests(c, p, min(max(limit, 1), 1000)))


@router.get("/api/v1/requests/{request_id}", tags=["requests"])
async def get_request(rt: Rt, request_id: Id, p: Viewer) -> dict[str, Any]:
    return await read(rt, lambda c: requests.get_request(c, p, request_id))


@router.post("/api/v1/requests/{request_id}/cancel", tags=["requests"])
async def cancel_request(
    rt: Rt, request_id: Id, p: Operator, body: CancelIn | None = None
) -> dict[str, Any]:
    ids = await cancel(rt, p, request_id=request_id, reason=body.reason if body else "")
    return {"request_id": request_id, "canceled": ids}


@router.post("/api/v1/requests/{request_id}/rerun-failed", status_code=201, tags=["requests"])
async def rerun_failed(rt: Rt, request_id: Id, p: Operator) -> dict[str, Any]:
    created = await rt.writer.run(
        lambda c: requests.rerun_failed(c, p, rt.now(), request_id),
        after=lambda res: wake_targets(rt, res),
    )
    log.info(
        "request %d re-runs the %d failed computers of request %d",
        created.request["id"],
        len(created.computer_ids),
        request_id,
    )
    return created.request


@router.post("/api/v1/requests/{request_id}/resume", tags=["requests"])
async def resume(rt: Rt, request_id: Id, p: Admin) -> dict[str, Any]:
    await lifecycle_write(rt, lambda c: lc.resume(c, p, rt.now(), request_id))
    return await read(rt, lambda c: requests.get_request(c, p, request_id))


@router.put("/api/v1/requests/{request_id}/after", tags=["requests"])
async def set_after(rt: Rt, request_id: Id, body: AfterIn, p: Operator) -> dict[str, Any]:
    opts = lc.parse_options(rt.now(), after=body.after)
    assert opts.after is not None
    after = opts.after
    await lifecycle_write(rt, lambda c: lc.set_after(c, p, rt.now(), request_id, after))
    return await read(rt, lambda c: requests.get_request(c, p, request_id))


async def cancel(
    rt: Runtime,
    p: Principal,
    *,
    activity_id: int | None = None,
    request_id: int | None = None,
    bulk: requests.BulkFilter | None = None,
    reason: str = "",
) -> list[int]:
    def after(res: requests.Canceled) -> None:
        queued_orders(rt, res.notify)

    async def fn(conn: Any) -> requests.Canceled:
        def seq_of(cid: int) -> int:
            cs = rt.fleet.get(cid)
            return cs.out_seq if cs is not None else 0

        return await requests.cancel(
            conn,
            p,
            rt.now(),
            seq_of,
            rt.signer,
            activity_id=activity_id,
            request_id=request_id,
            bulk=bulk,
            reason=reason,
        )

    res = await rt.writer.run(fn, after=after)
    return res.ids
