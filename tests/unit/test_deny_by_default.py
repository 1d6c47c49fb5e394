"""api/deps.unauthenticated: the server refuses to start with a route that checks no
caller and is not in the PUBLIC allow-list (issue 15)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import APIRouter

from taskfleet.server import app as server_app
from taskfleet.server.api import health
from taskfleet.server.api.deps import PUBLIC, Viewer, unauthenticated
from taskfleet.server.runtime import ServerConfig


def _router() -> APIRouter:
    router = APIRouter()

    @router.get("/api/v1/open")
    async def open_route() -> dict[str, str]:
        return {}

    @router.post("/api/v1/guarded")
    async def guarded(p: Viewer) -> dict[str, str]:
        return {"who": p.name}

    return router


def test_a_route_without_a_caller_is_found_and_one_with_a_role_is_not() -> None:
    assert unauthenticated(_router().routes) == ["GET /api/v1/open"]


def test_public_routes_are_listed_with_what_authenticates_them() -> None:
    assert all(reason.strip() for reason in PUBLIC.values())
    assert "GET /healthz" in PUBLIC and "GET /api/v1/whoami" not in PUBLIC


def test_the_server_app_refuses_to_build_with_an_open_route(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = ServerConfig(database_url="sqlite://", data_dir=tmp_path)
    server_app.create_app(config)  # today's routes: every one checked or listed
    monkeypatch.setattr(health, "router", _router())
    with pytest.raises(RuntimeError, match="GET /api/v1/open"):
        server_app.create_app(config)
