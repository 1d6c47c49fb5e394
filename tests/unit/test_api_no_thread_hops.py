"""Every route of the API, and every dependency it has, runs on the event loop.

FastAPI runs a plain ``def`` route or dependency in a worker thread: a thread hop
on every request. One sync dependency (the runtime) once made enrollment three
times slower; this keeps it from coming back."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from taskfleet.server.app import create_app
from taskfleet.server.runtime import ServerConfig


def _runs_on_the_loop(call: Any) -> bool:
    if inspect.iscoroutinefunction(call):
        return True
    # A callable instance (fastapi.security.HTTPBearer) with an async __call__.
    return inspect.iscoroutinefunction(type(call).__call__)


def _sync_calls(dependant: Dependant, where: str) -> list[str]:
    found = []
    if dependant.call is not None and not _runs_on_the_loop(dependant.call):
        found.append(f"{where}: {getattr(dependant.call, '__qualname__', dependant.call)}")
    for sub in dependant.dependencies:
        found += _sync_calls(sub, where)
    return found


def _api_routes(routes: list[Any]) -> list[APIRoute]:
    out: list[APIRoute] = []
    for r in routes:
        if isinstance(r, APIRoute):
            out.append(r)
        elif hasattr(r, "original_router"):  # an included router (FastAPI >= 0.16x)
            out += _api_routes(r.original_router.routes)
    return out


def test_no_route_or_dependency_runs_in_a_worker_thread(tmp_path: Path) -> None:
    app = create_app(ServerConfig(database_url="sqlite://", data_dir=tmp_path))
    routes = _api_routes(app.routes)
    assert len(routes) > 30  # the whole API, not an empty app
    sync = [c for r in routes for c in _sync_calls(r.dependant, f"{r.methods} {r.path}")]
    assert sync == []
