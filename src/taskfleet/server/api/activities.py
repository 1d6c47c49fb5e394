"""Activities: list, show (with why it is held), cancel one or in bulk."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

from taskfleet.domain.jobs import JOB
from taskfleet.server import activities, requests
from taskfleet.server.api.deps import (
    Age,
    CancelIn,
    Id,
    Operator,
    Rt,
    Viewer,
    read,
    router_for,
)
from taskfleet.server.api.requests import cancel

log = logging.getLogger("taskfleet.server")
router = router_for()


class BulkCancelIn(BaseModel):
    state: str | None = Field(None, description="queued, scheduled, waiting, blocked, in_progress")
    type: str | None = None
    group: str | None = None
    older_than: Age | None = Field(None, description="created more than this many seconds ago")
    request_id: Id | None = None
    reason: str = ""
    dry_run: bool = Field(False, description="only count what would be canceled")


@router.post("/api/v1/activities/cancel", tags=["activities"])
async def cancel_bulk(rt: Rt, body: BulkCancelIn, p: Operator) -> dict[str, Any]:
    f = requests.BulkFilter(body.state, body.type, body.group, body.older_than, body.request_id)
    async with rt.read.connect() as conn:
        await requests.check_bulk(conn, p, f)
        if body.dry_run:
            ids = [r.id for r in await conn.execute(requests.bulk_query(p, f, rt.now()))]
            return {"count": len(ids), "dry_run": True, "ids": ids[:1000]}
    ids = await cancel(rt, p, bulk=f, reason=body.reason or "bulk cancel")
    return {"count": len(ids), "dry_run": False, "ids": ids[:1000]}


@router.get("/api/v1/activities", tags=["activities"])
async def list_activities(
    rt: Rt,
    p: Viewer,
    request_id: Id | None = None,
    computer_id: Id | None = None,
    state: str | None = None,
    limit: int = 100,
    output: bool = False,
) -> list[dict[str, Any]]:
    return await read(
        rt,
        lambda c: activities.list_activities(
            c,
            p,
            request_id=request_id,
            computer_id=computer_id,
            state=state,
            limit=min(max(limit, 1), 100_000),
            with_output=output,
        ),
    )


@router.get("/api/v1/activities/{activity_id}", tags=["activities"])
async def get_activity(rt: Rt, activity_id: Id, p: Viewer) -> dict[str, Any]:
    out = await read(rt, lambda c: activities.get_activity(c, p, activity_id))
    # A job is not held by a closed window: its computer runs Analyze and Download.
    held = out["state"] in ("queued", "scheduled") and out["type"] != JOB
    if held and out["computer_id"] is not None:
        out["held"] = rt.lifecycle_engine.why_held(out["computer_id"], rt.now())
    return out


@router.post("/api/v1/activities/{activity_id}/cancel", tags=["activities"])
async def cancel_activity(
    rt: Rt, activity_id: Id, p: Operator, body: CancelIn | None = None
) -> dict[str, Any]:
    await cancel(rt, p, activity_id=activity_id, reason=body.reason if body else "")
    return await read(rt, lambda c: activities.get_activity(c, p, activity_id))
