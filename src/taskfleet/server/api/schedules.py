"""Cron schedules: create, list, show, cancel (``server/schedules.py``)."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

from taskfleet.domain.jobs import JOB
from taskfleet.server import job_specs, requests, schedules
from taskfleet.server import lifecycle as lc
from taskfleet.server.api.deps import (
    Id,
    Operator,
    Rt,
    Viewer,
    read,
    router_for,
)
from taskfleet.server.api.requests import RequestIn

log = logging.getLogger("taskfleet.server")
router = router_for()


class ScheduleIn(BaseModel):
    cron: str = Field(..., description="5 fields, UTC: minute hour day month weekday")
    request: RequestIn


@router.post("/api/v1/schedules", status_code=201, tags=["schedules"])
async def create_schedule(rt: Rt, body: ScheduleIn, p: Operator) -> dict[str, Any]:
    template = body.request.model_dump()
    if body.request.type == JOB:
        # Stored complete: each run names the same bytes (a run still fails, recorded
        # on the schedule, if the content was removed since).
        template["params"] = await read(
            rt, lambda c: job_specs.complete_params(c, p.tenant_id, body.request.params)
        )
    # Checked now, so a schedule never fires something that cannot be created
    # (only what can change by then, like an emptied group, fails at a run).
    requests.check_template(
        type=body.request.type,
        target=body.request.target,
        params=template["params"],
        timeout=body.request.timeout,
        policy=body.request.policy,
        expires_in=body.request.expires_in,
    )
    lc.parse_options(rt.now(), approval=template["approval"], rollout=template["rollout"])
    out = await rt.writer.run(
        lambda c: schedules.create_schedule(c, p, rt.now(), body.cron, template)
    )
    rt.lifecycle_engine.add_schedule(out["id"], out["next_at"])
    return out


@router.get("/api/v1/schedules", tags=["schedules"])
async def list_schedules(rt: Rt, p: Viewer) -> list[dict[str, Any]]:
    return await read(rt, lambda c: schedules.list_schedules(c, p))


@router.get("/api/v1/schedules/{schedule_id}", tags=["schedules"])
async def get_schedule(rt: Rt, schedule_id: Id, p: Viewer) -> dict[str, Any]:
    return await read(rt, lambda c: schedules.get_schedule(c, p, schedule_id))


@router.post("/api/v1/schedules/{schedule_id}/cancel", tags=["schedules"])
async def cancel_schedule(rt: Rt, schedule_id: Id, p: Operator) -> dict[str, Any]:
    return await rt.writer.run(lambda c: schedules.cancel_schedule(c, p, rt.now(), schedule_id))
