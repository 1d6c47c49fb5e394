"""Metrics (Prometheus), health, and what this server is (``GET /api/v1/server``: its
version and the Ed25519 public key agents pin with ``taskfleet agent --server-key``)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Response
from fastapi.responses import PlainTextResponse
from prometheus_client import generate_latest

from taskfleet import __version__
from taskfleet.server import metrics
from taskfleet.server.api.deps import (
    Rt,
    Viewer,
    router_for,
)

log = logging.getLogger("taskfleet.server")
router = router_for()


@router.get(
    "/metrics",
    tags=["health"],
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text exposition format"}},
)
async def prom() -> Response:
    return Response(generate_latest(metrics.REGISTRY), media_type="text/plain; version=0.0.4")


@router.get("/healthz", tags=["health"])
async def healthz(rt: Rt) -> dict[str, Any]:
    return {"ok": True, "version": __version__, "computers": len(rt.fleet.computers)}


@router.get("/api/v1/server", tags=["health"])
async def about(rt: Rt, p: Viewer) -> dict[str, Any]:
    """This server: its version and the public key its orders are signed with."""
    return {"version": __version__, "public_key": rt.signer.public_key_hex}
