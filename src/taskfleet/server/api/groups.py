"""Groups: create, delete, members, maintenance window."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Response
from pydantic import BaseModel, Field

from taskfleet.server import inventory
from taskfleet.server import lifecycle as lc
from taskfleet.server.api.deps import (
    Admin,
    Id,
    Operator,
    Rt,
    Viewer,
    read,
    router_for,
)

log = logging.getLogger("taskfleet.server")
router = router_for()


class GroupIn(BaseModel):
    name: str


class MembersIn(BaseModel):
    computer_ids: list[Id]


class WindowIn(BaseModel):
    window: str = Field(..., description="HH:MM-HH:MM in the group's local time")
    utc_offset: str = Field("+00:00", description="the group's local offset, e.g. +02:00")


@router.get("/api/v1/groups", tags=["groups"])
async def list_groups(rt: Rt, p: Viewer) -> list[dict[str, Any]]:
    return await read(rt, lambda c: inventory.list_groups(c, p))


@router.post("/api/v1/groups", status_code=201, tags=["groups"])
async def create_group(rt: Rt, body: GroupIn, p: Operator) -> dict[str, Any]:
    return await rt.writer.run(lambda c: inventory.create_group(c, p, body.name, rt.now()))


@router.delete("/api/v1/groups/{name}", status_code=204, tags=["groups"])
async def delete_group(rt: Rt, name: str, p: Operator) -> Response:
    await rt.writer.run(lambda c: inventory.delete_group(c, p, name, rt.now()))
    await rt.lifecycle_engine.reload_windows()
    return Response(status_code=204)


@router.post("/api/v1/groups/{name}/members", tags=["groups"])
async def add_members(rt: Rt, name: str, body: MembersIn, p: Operator) -> dict[str, Any]:
    await rt.writer.run(
        lambda c: inventory.set_members(c, p, name, body.computer_ids, True, rt.now())
    )
    await rt.lifecycle_engine.reload_windows()
    return {"group": name, "added": body.computer_ids}


@router.post("/api/v1/groups/{name}/members/remove", tags=["groups"])
async def remove_members(rt: Rt, name: str, body: MembersIn, p: Operator) -> dict[str, Any]:
    await rt.writer.run(
        lambda c: inventory.set_members(c, p, name, body.computer_ids, False, rt.now())
    )
    await rt.lifecycle_engine.reload_windows()
    return {"group": name, "removed": body.computer_ids}


@router.put("/api/v1/groups/{name}/window", tags=["groups"])
async def set_window(rt: Rt, name: str, body: WindowIn, p: Admin) -> dict[str, Any]:
    out = await rt.writer.run(
        lambda c: lc.set_window(c, p, rt.now(), name, body.window, body.utc_offset)
    )
    await rt.lifecycle_engine.reload_windows()
    return out


@router.delete("/api/v1/groups/{name}/window", tags=["groups"])
async def clear_window(rt: Rt, name: str, p: Admin) -> dict[str, Any]:
    out = await rt.writer.run(lambda c: lc.set_window(c, p, rt.now(), name, None))
    await rt.lifecycle_engine.reload_windows()
    return out
