"""Server tasks: submit (one or a batch), list, show, cancel; task types."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Response
from pydantic import BaseModel, Field

from taskfleet.server.api.deps import (
    CancelIn,
    EpochTime,
    Id,
    Operator,
    Rt,
    Viewer,
    router_for,
)

log = logging.getLogger("taskfleet.server")
router = router_for()


class TaskIn(BaseModel):
    type: str
    tenant: str | None = Field(None, description="tenant-scoped types: the caller's own (omit)")
    group: str | None = Field(None, description="group-scoped types")
    params: dict[str, Any] = {}
    not_before: EpochTime | None = Field(None, description="epoch seconds: not earlier than")
    approval: dict[str, Any] | None = Field(
        None, description="Blocked until approved: {separation: bool, expires_in: seconds}"
    )
    after: dict[str, Any] | None = Field(
        None, description="Waiting: {task: ID, metric: finished|succeeded}"
    )


class TaskBatchIn(BaseModel):
    tasks: list[TaskIn] = Field(..., min_length=1, max_length=5000)


@router.post(
    "/api/v1/tasks",
    status_code=201,
    tags=["tasks"],
    responses={200: {"description": "a duplicate of a submitted task: nothing new queued"}},
)
async def submit_task(rt: Rt, body: TaskIn, p: Operator, response: Response) -> dict[str, Any]:
    out = await rt.task_manager.submit(
        p,
        type_=body.type,
        tenant=body.tenant,
        group=body.group,
        params=body.params,
        not_before=body.not_before,
        approval=body.approval,
        after=body.after,
    )
    if out["duplicate_of"] is not None:
        response.status_code = 200  # nothing new was queued
    return out


@router.post("/api/v1/tasks/batch", status_code=201, tags=["tasks"])
async def submit_tasks(rt: Rt, body: TaskBatchIn, p: Operator) -> list[dict[str, Any]]:
    return await rt.task_manager.submit_many(p, [t.model_dump() for t in body.tasks])


@router.get("/api/v1/tasks", tags=["tasks"])
async def list_tasks(
    rt: Rt, p: Viewer, state: str | None = None, type: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    return await rt.task_manager.list_tasks(p, state, type, min(max(limit, 1), 10_000))


@router.get("/api/v1/tasks/{task_id}", tags=["tasks"])
async def get_task(rt: Rt, task_id: Id, p: Viewer) -> dict[str, Any]:
    return await rt.task_manager.get(p, task_id)


@router.post("/api/v1/tasks/{task_id}/cancel", tags=["tasks"])
async def cancel_task(
    rt: Rt, task_id: Id, p: Operator, body: CancelIn | None = None
) -> dict[str, Any]:
    return await rt.task_manager.cancel(p, task_id, body.reason if body else "")


@router.get("/api/v1/task-types", tags=["tasks"])
async def task_types(rt: Rt, p: Viewer) -> list[dict[str, Any]]:
    return [
        {
            "name": s.name,
            "scope": s.scope,
            "kind": s.kind,
            "time_limit": s.time_limit,
            "concurrency": s.concurrency,
            "per_tenant": s.per_tenant,
            "excludes": list(s.excludes),
            "retry_safe": s.retry_safe,
            "params": s.params,
            "defaults": s.defaults,
            "ranges": {k: list(v) for k, v in s.ranges.items()},
            "description": s.description,
        }
        for s in rt.task_manager.specs.values()
    ]
