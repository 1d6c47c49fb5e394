"""Approvals of requests and server tasks: list, approve, reject."""

from __future__ import annotations

import logging
from typing import Any

from taskfleet.server import lifecycle as lc
from taskfleet.server import requests
from taskfleet.server.api.deps import (
    Admin,
    CancelIn,
    Id,
    Rt,
    Viewer,
    lifecycle_write,
    read,
    router_for,
)

log = logging.getLogger("taskfleet.server")
router = router_for()


@router.post("/api/v1/requests/{request_id}/approve", tags=["approvals"])
async def approve(rt: Rt, request_id: Id, p: Admin) -> dict[str, Any]:
    await lifecycle_write(rt, lambda c: lc.approve(c, p, rt.now(), request_id))
    return await read(rt, lambda c: requests.get_request(c, p, request_id))


@router.post("/api/v1/requests/{request_id}/reject", tags=["approvals"])
async def reject(rt: Rt, request_id: Id, p: Admin, body: CancelIn | None = None) -> dict[str, Any]:
    reason = body.reason if body else ""
    await lifecycle_write(rt, lambda c: lc.reject(c, p, rt.now(), request_id, reason))
    return await read(rt, lambda c: requests.get_request(c, p, request_id))


@router.get("/api/v1/approvals", tags=["approvals"])
async def approvals(rt: Rt, p: Viewer) -> list[dict[str, Any]]:
    return await read(rt, lambda c: lc.list_approvals(c, p))


@router.post("/api/v1/tasks/{task_id}/approve", tags=["approvals"])
async def approve_task(rt: Rt, task_id: Id, p: Admin) -> dict[str, Any]:
    await rt.task_manager.approve_task(p, task_id)
    return await rt.task_manager.get(p, task_id)


@router.post("/api/v1/tasks/{task_id}/reject", tags=["approvals"])
async def reject_task(
    rt: Rt, task_id: Id, p: Admin, body: CancelIn | None = None
) -> dict[str, Any]:
    await rt.task_manager.reject_task(p, task_id, body.reason if body else "")
    return await rt.task_manager.get(p, task_id)
