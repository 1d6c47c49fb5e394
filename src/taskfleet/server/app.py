"""The server's HTTP application: the admin API (``/api/v1``), agent endpoints, metrics.

Contract: ``create_app(config)`` returns an ASGI app whose lifespan starts and
stops the server (``server/runtime.py``). Its routes are the routers of
``server/api/``, one per noun; here is only the edge they share: every error
is ``{"error": ...}`` with the status the server means (400 for invalid input,
never 422), bodies are bounded (413), and the OpenAPI document tells that
truth. The exchange is the hot path: ``_App`` answers it before FastAPI's
middleware and router, from memory whenever there is nothing to do.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskfleet import __version__
from taskfleet.domain.actions import ACTION_TYPES
from taskfleet.protocol.exchange import ENROLL_PATH, EXCHANGE_PATH, MAX_BODY_BYTES
from taskfleet.protocol.relay import (
    MAX_RELAY_BODY_BYTES,
    RELAY_ENROLL_COMPUTER_PATH,
    RELAY_ENROLL_PATH,
    RELAY_EXCHANGE_PATH,
)
from taskfleet.server.abuse import Guards
from taskfleet.server.api import (
    accounts,
    activities,
    agent,
    approvals,
    audit,
    computers,
    content,
    groups,
    health,
    jobs,
    relay_exchange,
    relays,
    requests,
    schedules,
    servers,
    tasks,
    tenants,
    tokens,
    workers,
)
from taskfleet.server.api.audit import AuditRefusals
from taskfleet.server.api.deps import ERROR_RESPONSES, JsonRoute, mark, unauthenticated
from taskfleet.server.dashboard import routes as dashboard
from taskfleet.server.kernel import ApiError
from taskfleet.server.runtime import ServerConfig, start, stop
from taskfleet.settings import (
    API_BODY_MAX,
    CONTENT_MAX_BYTES,
    ENROLL_BODY_MAX,
    MAX_ID,
    UNAVAILABLE_RETRY_AFTER,
)
from taskfleet.store import db
from taskfleet.store.unavailable import unavailable

log = logging.getLogger("taskfleet.server")

# The routers, in the order their routes are matched and documented.
ROUTERS = (
    tokens,
    tenants,
    accounts,
    computers,
    groups,
    requests,
    jobs,
    approvals,
    schedules,
    activities,
    audit,
    content,
    tasks,
    workers,
    servers,
    relays,
    agent,
    relay_exchange,
    health,
)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _App(FastAPI):
    """FastAPI that answers agent exchanges before its middleware stack and router.

    The exchange is the hot path: profiled, about 70% of an idle exchange's CPU
    went to the dozen layers around the handler; answering it here halves the
    server CPU per exchange (benchmarks/README.md)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in _HOT
            and getattr(self.state, "rt", None) is not None
        ):
            response = await _HOT[scope["path"]](self.state.rt, Request(scope, receive))
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = finish_openapi(super().openapi())
        return self.openapi_schema


# The hot paths: the agent exchange and the relay exchange, answered before the stack.
_HOT = {EXCHANGE_PATH: agent.exchange, RELAY_EXCHANGE_PATH: relay_exchange.exchange}
# Routes that answer callers without an API token get only what an enrollment needs.
_ENROLL_PATHS = frozenset({ENROLL_PATH, RELAY_ENROLL_PATH, RELAY_ENROLL_COMPUTER_PATH})


def body_limit(path: str) -> int:
    """The most bytes a request body to ``path`` may have (settings.py says why)."""
    if path == content.UPLOAD_PATH:
        return CONTENT_MAX_BYTES
    return ENROLL_BODY_MAX if path in _ENROLL_PATHS else API_BODY_MAX


class _BodyLimit:
    """Reads each request body, up to its limit, before the routes see it: 413 beyond,
    whether the size is declared (Content-Length) or not (chunked). Without it any
    caller, even one without a token, could make the server read and parse any amount.
    (The exchange never gets here: _App answers it first, with its own limit.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            scope["path"] == content.UPLOAD_PATH and scope["method"] == "POST"
        ):
            # A content upload streams its body to disk as it comes, counting it against
            # its own limit (api/content.py): buffering it here would hold it in memory.
            await self.app(scope, receive, send)
            return
        limit = body_limit(scope["path"])
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _too_large(limit)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(limit)(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _too_large(limit: int) -> JSONResponse:
    return _error(413, f"request body over {limit} bytes")


def _where(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(x) for x in loc]
    if parts and parts[0] == "body":
        return ".".join(parts[1:]) or "request body"
    if parts and parts[0] in ("query", "header", "cookie"):
        return f"{parts[0]} parameter " + ".".join(parts[1:])
    return ".".join(parts)


def _validation_message(errors: Any) -> str:
    """What was wrong, from pydantic's errors (never their input values: those may be
    anything, and an error must always serialize)."""
    out = []
    for e in list(errors)[:5]:
        if e.get("type") == "json_invalid":
            out.append(f"invalid JSON: {(e.get('ctx') or {}).get('error', 'cannot parse')}")
        else:
            out.append(f"{_where(e.get('loc', ()))}: {e.get('msg', 'invalid')}")
    more = len(errors) - len(out)
    return "; ".join(out) + (f" (and {more} more)" if more > 0 else "")


def _install_unavailable_handlers(app: FastAPI) -> None:
    """A database that is full or down (store/unavailable.py) is answered 503."""

    async def _database_error(req: Request, exc: Exception) -> JSONResponse:
        # Handled here (inside the stack) a refusal is answered without the traceback
        # Starlette logs for what reaches the catch-all.
        answer = _refused(req, exc)
        if answer is None:
            raise exc
        return answer

    for kind in (sa.exc.DBAPIError, sqlite3.Error, OSError):
        app.add_exception_handler(kind, _database_error)


def _refused(req: Request, exc: Exception) -> JSONResponse | None:
    problem = unavailable(exc)
    if problem is None:
        return None
    # The database is full or down: nothing was written, the caller retries; not a
    # crash, so one line, no traceback.
    log.warning("%s %s refused: %s (%s)", req.method, req.url.path, problem, exc)
    mark(req, message=problem)
    return _error(503, problem, {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)})


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is {"error": "..."} (docs/guide.md), whatever raised it."""

    @app.exception_handler(ApiError)
    async def _api_error(req: Request, exc: ApiError) -> JSONResponse:
        mark(req, message=exc.message)
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        for e in errors:
            loc = e.get("loc", ())
            if len(loc) == 2 and loc[0] == "path":
                # An id that cannot exist (not a number, 0, beyond 64 bits) names nothing.
                name = str(loc[1])
                raw = request.path_params.get(name, "")
                message = f"no {name.removesuffix('_id')} {raw!r}: {e.get('msg')}"
                mark(request, message=message)
                return _error(404, message)
        mark(request, message=_validation_message(errors))
        return _error(400, _validation_message(errors))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such route: {request.url.path}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            # Starlette names only the first route that matched the path; list them all.
            allowed: set[str] = set()
            for route in _routes(request.app.router.routes):
                if route.matches(request.scope)[0] is Match.PARTIAL:
                    allowed |= getattr(route, "methods", None) or set()
            if allowed:
                headers["Allow"] = ", ".join(sorted(allowed))
        mark(request, message=message)
        return _error(exc.status_code, message, headers)

    _install_unavailable_handlers(app)

    @app.exception_handler(Exception)
    async def _crash(req: Request, exc: Exception) -> JSONResponse:
        answer = _refused(req, exc)  # e.g. a driver's own error, not wrapped
        if answer is not None:
            return answer
        # Starlette logs the traceback after this answers.
        return _error(500, f"internal server error ({type(exc).__name__}); see the server log")


def _routes(routes: list[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, the routers' included ones too (FastAPI keeps an included router
    as one entry; ours have no prefix, so their routes match the same paths)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes)
        else:
            yield route


_ERR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ApiErrorBody"}}}


def _exchange_doc() -> dict[str, Any]:
    """The agent exchange, as documentation only: _App answers it before the router."""
    message = {"type": "object", "additionalProperties": True}
    return {
        "post": {
            "tags": ["agent"],
            "summary": "Agent exchange",
            "operationId": "agent_exchange",
            "description": "One round trip of the exchange protocol (docs/protocol.md): "
            "the agent's messages and acknowledgement in, the server's out. Authenticated "
            "by the computer id and the secret it got at enrollment. "
            f"Body at most {MAX_BODY_BYTES} bytes.",
            "security": [{"ComputerSecret": []}],
            "parameters": [
                {
                    "name": "X-Taskfleet-Computer",
                    "in": "header",
                    "required": True,
                    "description": "the computer id from enrollment",
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["ack"],
                            "properties": {
                                "ack": {"type": "integer", "minimum": 0},
                                "messages": {"type": "array", "items": message},
                                "agent": {"type": "object", "additionalProperties": True},
                                "wait": {"type": "number", "minimum": 0},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "the server's messages",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["ack", "messages", "server_time", "settings"],
                                "properties": {
                                    "ack": {"type": "integer"},
                                    "messages": {"type": "array", "items": message},
                                    "server_time": {"type": "number"},
                                    "settings": {"type": "object", "additionalProperties": True},
                                },
                            }
                        }
                    },
                },
                "400": {
                    "description": "malformed or invalid: nothing applied",
                    "content": _ERR_JSON,
                },
                "401": {"description": "unknown computer or wrong secret", "content": _ERR_JSON},
                "413": {"description": "body too large", "content": _ERR_JSON},
            },
        }
    }


def _relay_exchange_doc() -> dict[str, Any]:
    """The relay exchange, as documentation only: _App answers it before the router."""
    obj = {"type": "object", "additionalProperties": True}
    return {
        "post": {
            "tags": ["relay"],
            "summary": "Relay exchange",
            "operationId": "relay_exchange",
            "description": "One relay exchange (protocol/relay.py, docs/relays.md): the "
            "agent exchanges of the relay's computers in, the server's messages for them, "
            "per-entry refusals and the roster (when stale) out. Authenticated by the relay "
            f"id and its secret. Body at most {MAX_RELAY_BODY_BYTES} bytes.",
            "security": [{"RelaySecret": []}],
            "parameters": [
                {
                    "name": "X-Taskfleet-Relay",
                    "in": "header",
                    "required": True,
                    "description": "the relay id from relay enrollment",
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "roster": {"type": "string"},
                                "resync": {"type": "boolean"},
                                "wait": {"type": "number", "minimum": 0},
                                "stats": obj,
                                "computers": {"type": "array", "items": obj},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "per computer: the server's ack and messages; refusals",
                    "content": {"application/json": {"schema": obj}},
                },
                "400": {
                    "description": "malformed or invalid as a whole: nothing applied",
                    "content": _ERR_JSON,
                },
                "401": {
                    "description": "unknown relay, wrong secret or revoked",
                    "content": _ERR_JSON,
                },
                "413": {"description": "body too large", "content": _ERR_JSON},
            },
        }
    }


def _integral_bounds(node: Any) -> None:
    """FastAPI writes every bound as a float: give integer schemas their exact bounds
    back (2^63 - 1 printed as 9.223372036854776e18 would allow 2^63)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum"):
                if isinstance(node.get(key), float):
                    node[key] = min(int(node[key]), MAX_ID)
        for value in node.values():
            _integral_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _integral_bounds(value)


def finish_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """The document FastAPI makes, told the truth: errors are {"error": ...} with the
    statuses the server answers (400 for invalid input, never 422; 413 for bodies),
    the exchange route is in it, and integer bounds are exact."""
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", {"description": "invalid input"})
            if "requestBody" in operation:
                responses["413"] = {"description": f"body over {body_limit(path)} bytes"}
            for status, response in responses.items():
                if status.startswith("4"):  # JSON, whatever the route's own media type
                    response["content"] = _ERR_JSON
    comps = schema.setdefault("components", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        comps.get("schemas", {}).pop(unused, None)
    comps.setdefault("securitySchemes", {})["ComputerSecret"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "a computer's secret (tfc_...) from enrollment",
    }
    comps["securitySchemes"]["RelaySecret"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "a relay's secret (tfrs_...) from relay enrollment",
    }
    for action in ACTION_TYPES.values():  # each typed activity's parameters (GET /activity-types)
        comps.setdefault("schemas", {})[f"ActivityParams.{action.name}"] = {
            **action.schema,
            "title": f"{action.title} ({action.name})",
            "description": action.description,
        }
    schema["paths"][EXCHANGE_PATH] = _exchange_doc()
    schema["paths"][RELAY_EXCHANGE_PATH] = _relay_exchange_doc()
    _integral_bounds(schema)
    return schema


def create_app(config: ServerConfig) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = await start(config)
        app.state.rt = rt
        if not db.is_sqlite(config.database_url):
            # Several server processes may share this database: their failure counts
            # and dashboard sessions live in it (docs/scale-out.md).
            app.state.guards = Guards(config.auth_failure_limit, config.enroll_failure_limit, rt=rt)
            app.state.dashboard = dashboard.Dashboard(rt=rt)
        try:
            yield
        finally:
            await stop(rt)

    app = _App(
        title="taskfleet",
        version=__version__,
        description="Run work on a fleet of managed computers; see docs/guide.md.",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    # Before any route is added: every route parses its JSON with orjson.
    app.router.route_class = JsonRoute
    app.add_middleware(_BodyLimit)
    # Outside the body limit: a refused oversized body (413) is audited too.
    app.add_middleware(AuditRefusals, exempt=_ENROLL_PATHS)
    _install_error_handlers(app)
    for module in ROUTERS:
        # The routes themselves, not ``include_router``: FastAPI (0.16x) keeps an
        # included router as one entry whose matching walks every route again with
        # its own scope bookkeeping, which cost ~60 us per API request here. Ours
        # have no prefix, tags or dependencies at router level, so nothing is lost.
        app.router.routes.extend(module.router.routes)
    # Failed credentials per address (server/abuse.py); in memory on SQLite (one
    # process), replaced by the database's at start on PostgreSQL (lifespan above).
    app.state.guards = Guards(config.auth_failure_limit, config.enroll_failure_limit)
    dashboard.install(app)  # /ui/: the web dashboard (docs/dashboard.md), not in OpenAPI
    if open_routes := unauthenticated(app.router.routes):
        raise RuntimeError(
            "routes without authentication (add a Viewer/Operator/Admin caller, or list "
            f"them in api/deps.PUBLIC with what authenticates them): {open_routes}"
        )
    return app
