"""API tokens: who am I, create, list, revoke (``server/tokens.py``)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Response
from pydantic import BaseModel, Field

from taskfleet.server import metrics, tokens
from taskfleet.server.api.deps import (
    Admin,
    Duration,
    Id,
    Rt,
    Viewer,
    read,
    router_for,
)
from taskfleet.server.runtime import fleet_changed

log = logging.getLogger("taskfleet.server")
router = router_for()


class TokenIn(BaseModel):
    kind: str = Field(
        "admin",
        description="admin (API access), enroll (agent enrollment) or relay (relay enrollment)",
    )
    name: str
    role: str | None = Field(None, description="viewer, operator or admin (admin tokens)")
    expires_in: Duration | None = Field(None, description="seconds until the token expires")
    max_uses: Id | None = Field(None, description="enrollments allowed (enroll tokens)")
    group: str | None = Field(None, description="group that enrolled computers join")


@router.get("/api/v1/whoami", tags=["auth"])
async def whoami(p: Viewer) -> dict[str, Any]:
    return {
        "token_id": p.token_id,
        "name": p.name,
        "role": p.role,
        "tenant_id": p.tenant_id,
        "super_admin": p.super_admin,
        "acting_as": p.via,  # "superadmin:ID" while the super-admin acts in a tenant
    }


@router.post("/api/v1/tokens", status_code=201, tags=["auth"])
async def create_token(rt: Rt, body: TokenIn, p: Admin) -> dict[str, Any]:
    return await rt.writer.run(
        lambda c: tokens.create_token(
            c,
            p,
            rt.now(),
            kind=body.kind,
            name=body.name,
            role=body.role,
            expires_in=body.expires_in,
            max_uses=body.max_uses,
            group=body.group,
        )
    )


@router.get("/api/v1/tokens", tags=["auth"])
async def list_tokens(rt: Rt, p: Admin) -> list[dict[str, Any]]:
    return await read(rt, lambda c: tokens.list_tokens(c, p))


@router.delete("/api/v1/tokens/{token_id}", status_code=204, tags=["auth"])
async def revoke_token(rt: Rt, token_id: Id, p: Admin) -> Response:
    # A relay token's relays are refused from the commit on (their agents fail over).
    def revoked_relays(ids: list[int]) -> None:
        rt.fleet.revoke_relays(ids)
        fleet_changed(rt, relay_ids=ids)

    revoked = await rt.writer.run(
        lambda c: tokens.revoke_token(c, p, token_id, rt.now()), after=revoked_relays
    )
    if revoked:
        metrics.RELAYS.set(sum(1 for rs in rt.fleet.relays.values() if not rs.revoked))
        log.info("token %d revoked with its relays %s", token_id, revoked)
        # Woken one last time: each exchanges, is refused, and answers its agents 503.
        rt.tickler.wake_relays(rt.fleet.relays[r] for r in revoked if r in rt.fleet.relays)
    return Response(status_code=204)
