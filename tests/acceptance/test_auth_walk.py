"""Deny by default (issue 15): every route of a running server, walked.

The route table comes from the server's own app (``create_app``), so a route added
tomorrow is walked too: without credentials and with a wrong token every API route
answers 401 (before it reads its body or ids), a viewer gets 403 from every route that
needs more, and every dashboard page wants a session. The few routes that answer
without an API token are ``api/deps.PUBLIC``, each with what authenticates it instead;
the server refuses to start with any other (tests/unit/test_deny_by_default.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from taskfleet.server.api.deps import PUBLIC, needed_role
from taskfleet.server.app import create_app
from taskfleet.server.kernel import ROLES
from taskfleet.server.runtime import ServerConfig
from tests.conftest import Server


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    # The walk guesses hundreds of tokens from one address: above the brute-force limit
    # (tests/acceptance/test_auth_limits.py), which would answer 429 instead of 401.
    return start_server("--auth-failure-limit", "1000000")


# Routes only the super-admin may use, whatever the role (docs/tenants.md).
SUPER_ADMIN = ("/api/v1/tenants", "/api/v1/workers", "/api/v1/servers")
_SAMPLE = {"sha256": "0" * 64, "name": "web", "key": "env"}


def _routes(tmp_path: Path) -> list[tuple[str, str, Any]]:
    app = create_app(ServerConfig(database_url="sqlite://", data_dir=tmp_path))
    out = []
    for route in app.router.routes:
        for method in sorted(set(getattr(route, "methods", None) or ()) - {"HEAD"}):
            out.append((method, route.path, route))
    return out


def _url(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: _SAMPLE.get(m.group(1), "1"), path)


def _call(client: httpx.Client, method: str, path: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
    return client.request(method, _url(path), headers=headers, **body)


def test_every_api_route_refuses_a_caller_without_a_valid_token(
    server: Server, tmp_path: Path
) -> None:
    walked = 0
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path, route in _routes(tmp_path):
            if f"{method} {path}" in PUBLIC or not isinstance(route, APIRoute):
                continue
            if path.startswith("/ui/"):
                continue  # the dashboard: below
            for token in (None, "tfa_" + "x" * 43, "not a token"):
                r = _call(client, method, path, token)
                assert r.status_code == 401, (method, path, token, r.status_code, r.text)
            walked += 1
    assert walked >= 55  # the whole admin API, not a few routes


def test_a_viewer_is_refused_every_route_that_needs_more(server: Server, tmp_path: Path) -> None:
    with server.api() as api:
        r = api.post("/tokens", json={"kind": "admin", "name": "viewer", "role": "viewer"})
        assert r.status_code == 201, r.text
        viewer = r.json()["token"]
    refused = 0
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path, route in _routes(tmp_path):
            if not isinstance(route, APIRoute) or f"{method} {path}" in PUBLIC:
                continue
            if path.startswith("/ui/"):
                continue
            needed = needed_role(route.endpoint)
            r = _call(client, method, path, viewer)
            if ROLES.index(needed) > ROLES.index("viewer") or path.startswith(SUPER_ADMIN):
                assert r.status_code == 403, (method, path, r.status_code, r.text)
                refused += 1
            else:
                assert r.status_code not in (401, 403), (method, path, r.status_code, r.text)
    assert refused >= 25


def test_every_dashboard_page_wants_a_session(server: Server, tmp_path: Path) -> None:
    walked = 0
    forged = {"tf_session": "forged"}
    with httpx.Client(base_url=server.url, timeout=30, cookies=forged) as client:
        for method, path, _route in _routes(tmp_path):
            if not path.startswith("/ui/") or f"{method} {path}" in PUBLIC:
                continue
            r = client.request(method, _url(path))
            if method == "GET":
                assert r.status_code == 303 and r.headers["location"] == "/ui/login", (path, r)
            else:
                assert r.status_code == 403, (method, path, r.status_code)
            walked += 1
    assert walked >= 15
