"""Tenants: create, list, disable, enable (``server/tenants.py``); super-admin only."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from taskfleet.server import tenants
from taskfleet.server.api.deps import Admin, Rt, read, router_for

router = router_for()


class TenantIn(BaseModel):
    name: str


@router.post("/api/v1/tenants", status_code=201, tags=["tenants"])
async def create_tenant(rt: Rt, body: TenantIn, p: Admin) -> dict[str, Any]:
    """A new tenant and its first admin token (shown once)."""
    return await rt.writer.run(lambda c: tenants.create_tenant(c, p, rt.now(), body.name))


@router.get("/api/v1/tenants", tags=["tenants"])
async def list_tenants(rt: Rt, p: Admin) -> list[dict[str, Any]]:
    return await read(rt, lambda c: tenants.list_tenants(c, p))


@router.post("/api/v1/tenants/{name}/disable", tags=["tenants"])
async def disable_tenant(rt: Rt, name: str, p: Admin) -> dict[str, Any]:
    """Its tokens, accounts, sessions and enrollments are refused from now on."""
    return await rt.writer.run(lambda c: tenants.set_disabled(c, p, rt.now(), name, True))


@router.post("/api/v1/tenants/{name}/enable", tags=["tenants"])
async def enable_tenant(rt: Rt, name: str, p: Admin) -> dict[str, Any]:
    return await rt.writer.run(lambda c: tenants.set_disabled(c, p, rt.now(), name, False))
