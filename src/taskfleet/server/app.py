"""The server process: admin API (``/api/v1``), agent endpoints, metrics.

Contract: ``create_app(config)`` returns an ASGI app whose lifespan migrates
the database, bootstraps the default tenant, keys and first admin token,
loads the fleet into memory and starts the single writer, the tickler, the
lost-activity reaper and the last-seen flusher. Admin routes authenticate a
bearer token and enforce its role; every query is scoped to its tenant. The
exchange endpoint is a plain Starlette route: it is the hot path and answers
from memory whenever there is nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import generate_latest
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskfleet import __version__
from taskfleet.dispatch import open_queue
from taskfleet.protocol.exchange import (
    ENROLL_PATH,
    EXCHANGE_PATH,
    MAX_BODY_BYTES,
    ProtocolError,
    loads_body,
    parse_agent_request,
)
from taskfleet.protocol.signing import Signer
from taskfleet.protocol.tickle import derive_tickle_key
from taskfleet.server import (
    activities,
    enrollment,
    inventory,
    kernel,
    metrics,
    requests,
    schedules,
    tokens,
)
from taskfleet.server import lifecycle as lc
from taskfleet.server.exchange import Exchange, ExchangeJob
from taskfleet.server.fleet import ComputerState, Fleet
from taskfleet.server.kernel import ApiError, Principal, token_hash
from taskfleet.server.lifecycle import Lifecycle
from taskfleet.server.tasks import TaskManager
from taskfleet.server.tickler import Tickler
from taskfleet.server.timeouts import reap_expired, reap_lost
from taskfleet.server.writer import Writer
from taskfleet.settings import (
    API_BODY_MAX,
    DURATION_MAX,
    ENROLL_BODY_MAX,
    LAST_SEEN_FLUSH,
    LOST_GRACE,
    MAX_ID,
    POLL_INTERVAL,
    REAPER_INTERVAL,
    SCRIPT_TIMEOUT,
    TICKLE_MIN_INTERVAL,
    TICKLE_RATE,
    TIME_MAX,
    TIME_MIN,
)
from taskfleet.store import db
from taskfleet.store.schema import api_tokens, computers
from taskfleet.store.schema import workers as workers_table
from taskfleet.worker.builtin import BUILTINS
from taskfleet.worker.handlers import load_task_types
from taskfleet.worker.runner import Worker

log = logging.getLogger("taskfleet.server")
T = TypeVar("T")


@dataclass
class ServerConfig:
    database_url: str
    data_dir: Path
    tickle_rate: float = TICKLE_RATE
    tickle_min_interval: float = TICKLE_MIN_INTERVAL
    lost_grace: float = LOST_GRACE
    poll_interval: float = POLL_INTERVAL
    reaper_interval: float = REAPER_INTERVAL
    public_url: str = ""  # shown to humans; set by the CLI
    tickles: bool = True  # off: agents rely on their polls (benchmarks compare both)
    task_types: Path | None = None  # TOML declarations of server task types (SPEC 4)
    queue: str = "embedded"  # or amqp://... (workers then run as `taskfleet worker`)
    workers: int = 4  # embedded: tasks run at once by the in-process worker
    heartbeat_timeout: float = 5 * 3600.0  # SPEC 4.6: a silent worker's tasks fail after this
    worker_heartbeat: float = 10.0
    # Every time-driven rule (schedules, expiry, approvals, windows) reads this;
    # tests inject a fake clock and move it instead of sleeping.
    clock: Callable[[], float] = time.time
    lifecycle_interval: float = 1.0  # seconds between lifecycle passes at most


@dataclass
class Runtime:
    config: ServerConfig
    read: Any
    writer: Writer
    exchange: Exchange
    fleet: Fleet
    tickler: Tickler
    signer: Signer
    tickle_master: bytes
    settings_json: bytes
    manager: TaskManager | None = None
    lifecycle: Lifecycle | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


# The server's clock; _start sets it from ServerConfig.clock (one server per process).
_clock: Callable[[], float] = time.time


def _now() -> float:
    return _clock()


class _Err(BaseModel):
    error: str


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# -- the types of every id, time and duration the API accepts -------------------
# One place for each: a route or model field that takes one uses these, so nothing
# out of range (an id beyond the 64-bit columns, NaN, 1e20 as a time) reaches the
# service or the database. Path ids out of range answer 404, everything else 400.

Id = Annotated[int, Field(ge=1, le=MAX_ID)]
# Any finite number (its range is checked where its meaning is, with its own message).
Finite = Annotated[float, Field(allow_inf_nan=False)]
EpochTime = Annotated[
    float,
    Field(ge=TIME_MIN, le=TIME_MAX, allow_inf_nan=False, description="epoch seconds (UTC)"),
]
Duration = Annotated[float, Field(gt=0, le=DURATION_MAX, allow_inf_nan=False)]
Age = Annotated[float, Field(ge=0, le=DURATION_MAX, allow_inf_nan=False)]


# -- request bodies (these make the OpenAPI document) --------------------------


class TokenIn(BaseModel):
    kind: str = Field("admin", description="admin (API access) or enroll (agent enrollment)")
    name: str
    role: str | None = Field(None, description="viewer, operator or admin (admin tokens)")
    expires_in: Duration | None = Field(None, description="seconds until the token expires")
    max_uses: Id | None = Field(None, description="enrollments allowed (enroll tokens)")
    group: str | None = Field(None, description="group that enrolled computers join")


class GroupIn(BaseModel):
    name: str


class MembersIn(BaseModel):
    computer_ids: list[Id]


class TagIn(BaseModel):
    key: str
    value: str


class RequestIn(BaseModel):
    type: str = "execute-script"
    target: str = Field(..., description="all | group:NAME | tag:KEY=VALUE | computer:ID[,ID]")
    params: dict[str, Any] = Field(
        ..., description="argv | script (+interpreter), env, cwd, user, output_cap"
    )
    timeout: Finite = SCRIPT_TIMEOUT
    expires_in: Finite | None = Field(
        None, description="seconds: queued work not handed out by then is Canceled (expired)"
    )
    policy: dict[str, Any] | None = Field(
        None,
        description="mode required|optional (optional work waits for the agent's run window), "
        "interval once|recurring, every (seconds, recurring)",
    )
    at: EpochTime | None = Field(None, description="epoch seconds: Scheduled, not earlier than")
    after: dict[str, Any] | None = Field(
        None,
        description="Waiting: {request: ID} or {activity: ID}, metric finished|succeeded "
        "(default finished), percent (0, 100] (default 100)",
    )
    approval: dict[str, Any] | None = Field(
        None,
        description="Blocked until approved: {separation: bool (requester may not approve), "
        "expires_in: seconds}",
    )
    rollout: dict[str, Any] | None = Field(
        None,
        description="waves: {canary: N, size: N | share: percent, success: percent a wave "
        "must reach before the next, max_failures: percent of finished that pauses it}",
    )


class AfterIn(BaseModel):
    after: dict[str, Any]


class WindowIn(BaseModel):
    window: str = Field(..., description="HH:MM-HH:MM in the group's local time")
    utc_offset: str = Field("+00:00", description="the group's local offset, e.g. +02:00")


class ScheduleIn(BaseModel):
    cron: str = Field(..., description="5 fields, UTC: minute hour day month weekday")
    request: RequestIn


class BulkCancelIn(BaseModel):
    state: str | None = Field(None, description="queued, scheduled, waiting, blocked, in_progress")
    type: str | None = None
    group: str | None = None
    older_than: Age | None = Field(None, description="created more than this many seconds ago")
    request_id: Id | None = None
    reason: str = ""
    dry_run: bool = Field(False, description="only count what would be canceled")


class TaskIn(BaseModel):
    type: str
    tenant: str | None = Field(None, description="tenant-scoped types (single-tenant: omit)")
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


class CancelIn(BaseModel):
    reason: str = ""


class EnrollIn(BaseModel):
    token: str
    hostname: str
    machine_id: str
    tickle_port: int | None = None
    version: str = ""
    policy: dict[str, Any] = {}


# Declared for the OpenAPI document (securitySchemes); _role reads the header itself so
# that every refusal is one of its own 401s.
_bearer = HTTPBearer(auto_error=False, description="an API token (tfa_...), see docs/guide.md")


def _role(needed: str) -> Callable[..., Awaitable[Principal]]:
    async def dep(
        request: Request,
        _declared: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> Principal:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing bearer token (Authorization: Bearer TOKEN)")
        rt: Runtime = request.app.state.rt
        async with rt.read.connect() as conn:
            p = await tokens.resolve_token(conn, token.strip(), _now())
        if p is None:
            raise ApiError(401, "invalid, expired or revoked token")
        if not p.allows(needed):
            raise ApiError(403, f"this needs the {needed} role; the token has {p.role}")
        return p

    return dep


Viewer = Annotated[Principal, Depends(_role("viewer"))]
Operator = Annotated[Principal, Depends(_role("operator"))]
Admin = Annotated[Principal, Depends(_role("admin"))]


class _App(FastAPI):
    """FastAPI that answers agent exchanges before its middleware stack and router.

    The exchange is the hot path: profiled, about 70% of an idle exchange's CPU
    went to the dozen layers around the handler; answering it here halves the
    server CPU per exchange (benchmarks/README.md)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == EXCHANGE_PATH
            and scope["method"] == "POST"
            and getattr(self.state, "rt", None) is not None
        ):
            response = await _exchange(self.state.rt, Request(scope, receive))
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = finish_openapi(super().openapi())
        return self.openapi_schema


# -- the edge of the admin API: bodies, JSON, errors, the OpenAPI document ----------


class _JsonRequest(Request):
    """A request whose JSON body is parsed like an exchange's (``loads_body``): standard
    JSON only, so NaN, Infinity and numbers beyond a double are refused (400), as are
    bodies that are not UTF-8; a lone surrogate escape (an agent's stdlib encoder can
    write one in a hostname) is taken, and cleaned where the text is stored."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_body(await self.body())
        return self._json


class _Route(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_JsonRequest(request.scope, request.receive))

        return strict


def body_limit(path: str) -> int:
    """The most bytes a request body to ``path`` may have (settings.py says why)."""
    return ENROLL_BODY_MAX if path == ENROLL_PATH else API_BODY_MAX


class _BodyLimit:
    """Reads each request body, up to its limit, before the routes see it: 413 beyond,
    whether the size is declared (Content-Length) or not (chunked). Without it any
    caller, even one without a token, could make the server read and parse any amount.
    (The exchange never gets here: _App answers it first, with its own limit.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
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


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is {"error": "..."} (docs/guide.md), whatever raised it."""

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        for e in errors:
            loc = e.get("loc", ())
            if len(loc) == 2 and loc[0] == "path":
                # An id that cannot exist (not a number, 0, beyond 64 bits) names nothing.
                name = str(loc[1])
                raw = request.path_params.get(name, "")
                return _error(404, f"no {name.removesuffix('_id')} {raw!r}: {e.get('msg')}")
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
            for route in request.app.router.routes:
                if route.matches(request.scope)[0] is Match.PARTIAL:
                    allowed |= getattr(route, "methods", None) or set()
            if allowed:
                headers["Allow"] = ", ".join(sorted(allowed))
        return _error(exc.status_code, message, headers)

    @app.exception_handler(Exception)
    async def _crash(_req: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answers.
        return _error(500, f"internal server error ({type(exc).__name__}); see the server log")


_ERR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/_Err"}}}


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
    schema["paths"][EXCHANGE_PATH] = _exchange_doc()
    _integral_bounds(schema)
    return schema


def create_app(config: ServerConfig) -> FastAPI:
    rt: Runtime | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal rt
        rt = await _start(config)
        app.state.rt = rt
        try:
            yield
        finally:
            await _stop(rt)

    app = _App(
        title="taskfleet",
        version=__version__,
        description="Run work on a fleet of managed computers; see docs/guide.md.",
        lifespan=lifespan,
        responses={
            400: {"model": _Err},
            401: {"model": _Err},
            403: {"model": _Err},
            404: {"model": _Err},
            409: {"model": _Err},
        },
    )
    # Before any route is added: every route parses its JSON with orjson.
    app.router.route_class = _Route
    app.add_middleware(_BodyLimit)
    _install_error_handlers(app)

    def runtime() -> Runtime:
        assert rt is not None
        return rt

    async def read(fn: Callable[[Any], Awaitable[T]]) -> T:
        async with runtime().read.connect() as conn:
            return await fn(conn)

    # -- admin API -------------------------------------------------------------

    @app.get("/api/v1/whoami", tags=["auth"])
    async def whoami(p: Viewer) -> dict[str, Any]:
        return {"token_id": p.token_id, "name": p.name, "role": p.role, "tenant_id": p.tenant_id}

    @app.post("/api/v1/tokens", status_code=201, tags=["auth"])
    async def create_token(body: TokenIn, p: Admin) -> dict[str, Any]:
        return await runtime().writer.run(
            lambda c: tokens.create_token(
                c,
                p,
                _now(),
                kind=body.kind,
                name=body.name,
                role=body.role,
                expires_in=body.expires_in,
                max_uses=body.max_uses,
                group=body.group,
            )
        )

    @app.get("/api/v1/tokens", tags=["auth"])
    async def list_tokens(p: Admin) -> list[dict[str, Any]]:
        return await read(lambda c: tokens.list_tokens(c, p))

    @app.delete("/api/v1/tokens/{token_id}", status_code=204, tags=["auth"])
    async def revoke_token(token_id: Id, p: Admin) -> Response:
        await runtime().writer.run(lambda c: tokens.revoke_token(c, p, token_id, _now()))
        return Response(status_code=204)

    @app.get("/api/v1/computers", tags=["computers"])
    async def list_computers(p: Viewer) -> list[dict[str, Any]]:
        out = await read(lambda c: inventory.list_computers(c, p))
        return [_live(runtime(), c) for c in out]

    @app.get("/api/v1/computers/{computer_id}", tags=["computers"])
    async def get_computer(computer_id: Id, p: Viewer) -> dict[str, Any]:
        return _live(runtime(), await read(lambda c: inventory.get_computer(c, p, computer_id)))

    @app.delete("/api/v1/computers/{computer_id}", tags=["computers"])
    async def remove_computer(computer_id: Id, p: Admin) -> dict[str, Any]:
        # Admin, not operator: SPEC 7 gives operators the work (create, cancel,
        # terminate); removing a computer revokes its credentials, like a token.
        r = runtime()

        def after(res: inventory.Removed) -> None:
            r.fleet.remove(res.computer_id)
            metrics.COMPUTERS.set(len(r.fleet.computers))

        res = await r.writer.run(
            lambda c: inventory.remove_computer(c, p, computer_id, _now()), after=after
        )
        await _lifecycle(r).reload_windows()  # it left its groups
        log.info(
            "computer %d (%s) removed, %d open activities canceled",
            res.computer_id,
            res.hostname,
            len(res.canceled),
        )
        return {
            "id": res.computer_id,
            "hostname": res.hostname,
            "removed_at": res.removed_at,
            "canceled": res.canceled,
        }

    @app.put("/api/v1/computers/{computer_id}/tags", tags=["computers"])
    async def set_tag(computer_id: Id, body: TagIn, p: Operator) -> dict[str, Any]:
        await runtime().writer.run(
            lambda c: inventory.set_tag(c, p, computer_id, body.key, body.value, _now())
        )
        return {"computer_id": computer_id, "key": body.key, "value": body.value}

    @app.delete("/api/v1/computers/{computer_id}/tags/{key}", status_code=204, tags=["computers"])
    async def remove_tag(computer_id: Id, key: str, p: Operator) -> Response:
        await runtime().writer.run(
            lambda c: inventory.set_tag(c, p, computer_id, key, None, _now())
        )
        return Response(status_code=204)

    @app.get("/api/v1/groups", tags=["groups"])
    async def list_groups(p: Viewer) -> list[dict[str, Any]]:
        return await read(lambda c: inventory.list_groups(c, p))

    @app.post("/api/v1/groups", status_code=201, tags=["groups"])
    async def create_group(body: GroupIn, p: Operator) -> dict[str, Any]:
        return await runtime().writer.run(lambda c: inventory.create_group(c, p, body.name, _now()))

    @app.delete("/api/v1/groups/{name}", status_code=204, tags=["groups"])
    async def delete_group(name: str, p: Operator) -> Response:
        await runtime().writer.run(lambda c: inventory.delete_group(c, p, name, _now()))
        await _lifecycle(runtime()).reload_windows()
        return Response(status_code=204)

    @app.post("/api/v1/groups/{name}/members", tags=["groups"])
    async def add_members(name: str, body: MembersIn, p: Operator) -> dict[str, Any]:
        await runtime().writer.run(
            lambda c: inventory.set_members(c, p, name, body.computer_ids, True, _now())
        )
        await _lifecycle(runtime()).reload_windows()
        return {"group": name, "added": body.computer_ids}

    @app.post("/api/v1/groups/{name}/members/remove", tags=["groups"])
    async def remove_members(name: str, body: MembersIn, p: Operator) -> dict[str, Any]:
        await runtime().writer.run(
            lambda c: inventory.set_members(c, p, name, body.computer_ids, False, _now())
        )
        await _lifecycle(runtime()).reload_windows()
        return {"group": name, "removed": body.computer_ids}

    @app.post("/api/v1/requests", status_code=201, tags=["requests"])
    async def create_request(body: RequestIn, p: Operator) -> dict[str, Any]:
        r = runtime()
        opts = lc.parse_options(
            _now(), at=body.at, after=body.after, approval=body.approval, rollout=body.rollout
        )
        created = await r.writer.run(
            lambda c: requests.create_request(
                c,
                p,
                _now(),
                type=body.type,
                target=body.target,
                params=body.params,
                timeout=body.timeout,
                policy=body.policy,
                expires_in=body.expires_in,
                options=opts,
            ),
            after=lambda res: _wake_targets(r, res),
        )
        metrics.REQUESTS.inc()
        log.info(
            "request %d created: %s on %s (%d computers)",
            created.request["id"],
            body.type,
            created.request["target"],
            len(created.computer_ids),
        )
        return created.request

    @app.get("/api/v1/requests", tags=["requests"])
    async def list_requests(p: Viewer, limit: int = 50) -> list[dict[str, Any]]:
        return await read(lambda c: requests.list_requests(c, p, min(max(limit, 1), 1000)))

    @app.get("/api/v1/requests/{request_id}", tags=["requests"])
    async def get_request(request_id: Id, p: Viewer) -> dict[str, Any]:
        return await read(lambda c: requests.get_request(c, p, request_id))

    @app.post("/api/v1/requests/{request_id}/cancel", tags=["requests"])
    async def cancel_request(
        request_id: Id, p: Operator, body: CancelIn | None = None
    ) -> dict[str, Any]:
        ids = await _cancel(runtime(), p, request_id=request_id, reason=body.reason if body else "")
        return {"request_id": request_id, "canceled": ids}

    @app.post("/api/v1/requests/{request_id}/rerun-failed", status_code=201, tags=["requests"])
    async def rerun_failed(request_id: Id, p: Operator) -> dict[str, Any]:
        r = runtime()
        created = await r.writer.run(
            lambda c: requests.rerun_failed(c, p, _now(), request_id),
            after=lambda res: _wake_targets(r, res),
        )
        log.info(
            "request %d re-runs the %d failed computers of request %d",
            created.request["id"],
            len(created.computer_ids),
            request_id,
        )
        return created.request

    async def _lifecycle_write(fn: Callable[[Any], Awaitable[lc.Moved]]) -> lc.Moved:
        r = runtime()
        return await r.writer.run(fn, after=_lifecycle(r).apply)

    @app.post("/api/v1/requests/{request_id}/approve", tags=["approvals"])
    async def approve(request_id: Id, p: Admin) -> dict[str, Any]:
        await _lifecycle_write(lambda c: lc.approve(c, p, _now(), request_id))
        return await read(lambda c: requests.get_request(c, p, request_id))

    @app.post("/api/v1/requests/{request_id}/reject", tags=["approvals"])
    async def reject(request_id: Id, p: Admin, body: CancelIn | None = None) -> dict[str, Any]:
        reason = body.reason if body else ""
        await _lifecycle_write(lambda c: lc.reject(c, p, _now(), request_id, reason))
        return await read(lambda c: requests.get_request(c, p, request_id))

    @app.get("/api/v1/approvals", tags=["approvals"])
    async def approvals(p: Viewer) -> list[dict[str, Any]]:
        return await read(lambda c: lc.list_approvals(c, p))

    @app.post("/api/v1/requests/{request_id}/resume", tags=["requests"])
    async def resume(request_id: Id, p: Admin) -> dict[str, Any]:
        await _lifecycle_write(lambda c: lc.resume(c, p, _now(), request_id))
        return await read(lambda c: requests.get_request(c, p, request_id))

    @app.put("/api/v1/requests/{request_id}/after", tags=["requests"])
    async def set_after(request_id: Id, body: AfterIn, p: Operator) -> dict[str, Any]:
        opts = lc.parse_options(_now(), after=body.after)
        assert opts.after is not None
        after = opts.after
        await _lifecycle_write(lambda c: lc.set_after(c, p, _now(), request_id, after))
        return await read(lambda c: requests.get_request(c, p, request_id))

    @app.put("/api/v1/groups/{name}/window", tags=["groups"])
    async def set_window(name: str, body: WindowIn, p: Admin) -> dict[str, Any]:
        out = await runtime().writer.run(
            lambda c: lc.set_window(c, p, _now(), name, body.window, body.utc_offset)
        )
        await _lifecycle(runtime()).reload_windows()
        return out

    @app.delete("/api/v1/groups/{name}/window", tags=["groups"])
    async def clear_window(name: str, p: Admin) -> dict[str, Any]:
        out = await runtime().writer.run(lambda c: lc.set_window(c, p, _now(), name, None))
        await _lifecycle(runtime()).reload_windows()
        return out

    @app.post("/api/v1/schedules", status_code=201, tags=["schedules"])
    async def create_schedule(body: ScheduleIn, p: Operator) -> dict[str, Any]:
        template = body.request.model_dump()
        # Checked now, so a schedule never fires something that cannot be created
        # (only what can change by then, like an emptied group, fails at a run).
        requests.check_template(
            type=body.request.type,
            target=body.request.target,
            params=body.request.params,
            timeout=body.request.timeout,
            policy=body.request.policy,
            expires_in=body.request.expires_in,
        )
        lc.parse_options(_now(), approval=template["approval"], rollout=template["rollout"])
        out = await runtime().writer.run(
            lambda c: schedules.create_schedule(c, p, _now(), body.cron, template)
        )
        _lifecycle(runtime()).add_schedule(out["id"], out["next_at"])
        return out

    @app.get("/api/v1/schedules", tags=["schedules"])
    async def list_schedules(p: Viewer) -> list[dict[str, Any]]:
        return await read(lambda c: schedules.list_schedules(c, p))

    @app.get("/api/v1/schedules/{schedule_id}", tags=["schedules"])
    async def get_schedule(schedule_id: Id, p: Viewer) -> dict[str, Any]:
        return await read(lambda c: schedules.get_schedule(c, p, schedule_id))

    @app.post("/api/v1/schedules/{schedule_id}/cancel", tags=["schedules"])
    async def cancel_schedule(schedule_id: Id, p: Operator) -> dict[str, Any]:
        return await runtime().writer.run(
            lambda c: schedules.cancel_schedule(c, p, _now(), schedule_id)
        )

    @app.post("/api/v1/activities/cancel", tags=["activities"])
    async def cancel_bulk(body: BulkCancelIn, p: Operator) -> dict[str, Any]:
        f = requests.BulkFilter(body.state, body.type, body.group, body.older_than, body.request_id)
        async with runtime().read.connect() as conn:
            await requests.check_bulk(conn, p, f)
            if body.dry_run:
                ids = [r.id for r in await conn.execute(requests.bulk_query(p, f, _now()))]
                return {"count": len(ids), "dry_run": True, "ids": ids[:1000]}
        ids = await _cancel(runtime(), p, bulk=f, reason=body.reason or "bulk cancel")
        return {"count": len(ids), "dry_run": False, "ids": ids[:1000]}

    @app.get("/api/v1/activities", tags=["activities"])
    async def list_activities(
        p: Viewer,
        request_id: Id | None = None,
        computer_id: Id | None = None,
        state: str | None = None,
        limit: int = 100,
        output: bool = False,
    ) -> list[dict[str, Any]]:
        return await read(
            lambda c: activities.list_activities(
                c,
                p,
                request_id=request_id,
                computer_id=computer_id,
                state=state,
                limit=min(max(limit, 1), 100_000),
                with_output=output,
            )
        )

    @app.get("/api/v1/activities/{activity_id}", tags=["activities"])
    async def get_activity(activity_id: Id, p: Viewer) -> dict[str, Any]:
        out = await read(lambda c: activities.get_activity(c, p, activity_id))
        if out["state"] in ("queued", "scheduled") and out["computer_id"] is not None:
            out["held"] = _lifecycle(runtime()).why_held(out["computer_id"], _now())
        return out

    @app.post("/api/v1/activities/{activity_id}/cancel", tags=["activities"])
    async def cancel_activity(
        activity_id: Id, p: Operator, body: CancelIn | None = None
    ) -> dict[str, Any]:
        await _cancel(runtime(), p, activity_id=activity_id, reason=body.reason if body else "")
        return await read(lambda c: activities.get_activity(c, p, activity_id))

    @app.get("/api/v1/audit", tags=["audit"])
    async def list_audit(p: Admin, limit: int = 100) -> list[dict[str, Any]]:
        return await read(lambda c: kernel.list_audit(c, p, min(max(limit, 1), 10_000)))

    @app.post(
        "/api/v1/tasks",
        status_code=201,
        tags=["tasks"],
        responses={200: {"description": "a duplicate of a submitted task: nothing new queued"}},
    )
    async def submit_task(body: TaskIn, p: Operator, response: Response) -> dict[str, Any]:
        out = await _manager(runtime()).submit(
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

    @app.post("/api/v1/tasks/batch", status_code=201, tags=["tasks"])
    async def submit_tasks(body: TaskBatchIn, p: Operator) -> list[dict[str, Any]]:
        return await _manager(runtime()).submit_many(p, [t.model_dump() for t in body.tasks])

    @app.get("/api/v1/tasks", tags=["tasks"])
    async def list_tasks(
        p: Viewer, state: str | None = None, type: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        return await _manager(runtime()).list_tasks(p, state, type, min(max(limit, 1), 10_000))

    @app.get("/api/v1/tasks/{task_id}", tags=["tasks"])
    async def get_task(task_id: Id, p: Viewer) -> dict[str, Any]:
        return await _manager(runtime()).get(p, task_id)

    @app.post("/api/v1/tasks/{task_id}/cancel", tags=["tasks"])
    async def cancel_task(task_id: Id, p: Operator, body: CancelIn | None = None) -> dict[str, Any]:
        return await _manager(runtime()).cancel(p, task_id, body.reason if body else "")

    @app.post("/api/v1/tasks/{task_id}/approve", tags=["approvals"])
    async def approve_task(task_id: Id, p: Admin) -> dict[str, Any]:
        await _manager(runtime()).approve_task(p, task_id)
        return await _manager(runtime()).get(p, task_id)

    @app.post("/api/v1/tasks/{task_id}/reject", tags=["approvals"])
    async def reject_task(task_id: Id, p: Admin, body: CancelIn | None = None) -> dict[str, Any]:
        await _manager(runtime()).reject_task(p, task_id, body.reason if body else "")
        return await _manager(runtime()).get(p, task_id)

    @app.get("/api/v1/task-types", tags=["tasks"])
    async def task_types(p: Viewer) -> list[dict[str, Any]]:
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
            for s in _manager(runtime()).specs.values()
        ]

    @app.get("/api/v1/workers", tags=["tasks"])
    async def list_workers(p: Viewer) -> list[dict[str, Any]]:
        async with runtime().read.connect() as conn:
            rows = await conn.execute(sa.select(workers_table).order_by(workers_table.c.started_at))
            return [dict(r._mapping) for r in rows]

    # -- agents, metrics, health -----------------------------------------------

    @app.post(ENROLL_PATH, tags=["agent"], status_code=201)
    async def enroll(body: EnrollIn, request: Request) -> dict[str, Any]:
        r = runtime()
        address = request.client.host if request.client else None

        def after(res: enrollment.Enrolled) -> None:
            r.fleet.put(res.state)
            metrics.COMPUTERS.set(len(r.fleet.computers))
            if _lifecycle(r).has_windows:  # it may have joined a windowed group
                asyncio.get_running_loop().create_task(_lifecycle(r).reload_windows())

        res = await r.writer.run(
            lambda c: enrollment.enroll(
                c,
                _now(),
                token=body.token,
                hostname=body.hostname,
                machine_id=body.machine_id,
                tickle_port=body.tickle_port,
                version=body.version,
                policy=body.policy,
                address=address,
            ),
            after=after,
        )
        log.info(
            "computer %d %s (%s)%s",
            res.state.id,
            "re-enrolled" if res.reenrolled else "enrolled",
            body.hostname,
            f", {res.canceled} open activities canceled" if res.canceled else "",
        )
        return {
            "computer_id": res.state.id,
            "secret": res.secret,
            "generation": res.state.generation,
            "tickle_key": derive_tickle_key(
                r.tickle_master, res.state.id, res.state.generation
            ).hex(),
            "server_public_key": r.signer.public_key_hex,
            "settings": orjson.loads(r.settings_json),
            "reenrolled": res.reenrolled,
        }

    async def exchange(request: Request) -> Response:
        return await _exchange(runtime(), request)

    # Also routed normally (for tools that walk the router); _App answers it first.
    app.router.add_route(EXCHANGE_PATH, exchange, methods=["POST"], include_in_schema=False)

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text exposition format"}},
    )
    async def prom() -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type="text/plain; version=0.0.4")

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "version": __version__, "computers": len(runtime().fleet.computers)}

    return app


def _wake_targets(rt: Runtime, created: requests.Created) -> None:
    """After a request commits: its computers have work; tickle them."""
    rt.tickler.wake(rt.fleet.mark_work(created.computer_ids))
    _lifecycle(rt).watch(created.request)


def _lifecycle(rt: Runtime) -> Lifecycle:
    assert rt.lifecycle is not None
    return rt.lifecycle


def _manager(rt: Runtime) -> TaskManager:
    assert rt.manager is not None
    return rt.manager


def _live(rt: Runtime, c: dict[str, Any]) -> dict[str, Any]:
    cs = rt.fleet.get(c["id"])
    if cs is not None and cs.last_seen and (c["last_seen_at"] or 0) < cs.last_seen:
        c["last_seen_at"] = cs.last_seen
    return c


async def _cancel(
    rt: Runtime,
    p: Principal,
    *,
    activity_id: int | None = None,
    request_id: int | None = None,
    bulk: requests.BulkFilter | None = None,
    reason: str = "",
) -> list[int]:
    def after(res: requests.Canceled) -> None:
        for cid, n in res.notify.items():
            cs = rt.fleet.get(cid)
            if cs is not None:
                cs.out_seq += n
        rt.tickler.wake(rt.fleet.mark_work(res.notify))

    async def fn(conn: Any) -> requests.Canceled:
        def seq_of(cid: int) -> int:
            cs = rt.fleet.get(cid)
            return cs.out_seq if cs is not None else 0

        return await requests.cancel(
            conn,
            p,
            _now(),
            seq_of,
            activity_id=activity_id,
            request_id=request_id,
            bulk=bulk,
            reason=reason,
        )

    res = await rt.writer.run(fn, after=after)
    return res.ids


# -- the exchange hot path ------------------------------------------------------


async def _exchange(rt: Runtime, request: Request) -> Response:
    try:
        computer_id = int(request.headers.get("x-taskfleet-computer", ""))
    except ValueError:
        return _refuse("auth", 401, "missing or malformed X-Taskfleet-Computer header")
    auth = request.headers.get("authorization", "")
    cs = rt.fleet.get(computer_id)
    if cs is None or not auth.startswith("Bearer ") or not cs.check_secret(auth[7:]):
        return _refuse("auth", 401, "unknown computer or wrong secret")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        return _refuse("too-large", 413, f"exchange body over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return _refuse("too-large", 413, f"exchange body over {MAX_BODY_BYTES} bytes")
    try:
        req = parse_agent_request(loads_body(bytes(body)))
        if req.ack > cs.out_seq:
            raise ProtocolError(f"ack {req.ack} is beyond the last message sent ({cs.out_seq})")
    except (orjson.JSONDecodeError, ProtocolError) as exc:
        kind = "malformed" if isinstance(exc, orjson.JSONDecodeError) else "invalid"
        return _refuse(kind, 400, f"bad exchange: {exc}")
    address = request.client.host if request.client else None
    now = rt.config.clock()
    cs.last_seen = now
    cs.dirty = True
    if req.agent is None:
        cs.address = address  # the agent's info exchange updates it in the database

    def quiet() -> bool:
        return (
            not cs.has_work
            and req.ack >= cs.out_seq
            and req.agent is None
            and req.max_seq <= cs.in_acked
        )

    if quiet() and req.wait > 0:
        cs.waiter = asyncio.Event()
        try:
            await asyncio.wait_for(cs.waiter.wait(), req.wait)
        except TimeoutError:
            pass
        finally:
            cs.waiter = None
        if rt.fleet.get(computer_id) is not cs:  # removed (or re-enrolled) while it waited
            return _refuse("auth", 401, "unknown computer or wrong secret")
    if quiet():
        metrics.FAST_EXCHANGES.inc()
        return Response(
            b'{"ack":%d,"messages":[],"server_time":%.3f,"settings":%s}'
            % (cs.in_acked, rt.config.clock(), rt.settings_json),
            media_type="application/json",
        )
    metrics.SLOW_EXCHANGES.inc()
    try:
        out = await rt.exchange.exchange(ExchangeJob(cs, req, address))
    except ProtocolError as exc:
        return _refuse("invalid", 400, f"bad exchange: {exc}")
    except Exception:
        # The writer already failed this exchange alone (the others of its batch
        # went on); nothing of it was applied, the agent retries it.
        log.exception("exchange of computer %d failed", cs.id)
        return _refuse("server", 500, "the server could not apply this exchange; retry later")
    return Response(
        b'{"ack":%d,"messages":[%s],"server_time":%.3f,"settings":%s%s}'
        % (
            out["ack"],
            ",".join(out["messages"]).encode(),
            out["server_time"],
            rt.settings_json,
            b',"more":true' if out.get("more") else b"",
        ),
        media_type="application/json",
    )


def _refuse(reason: str, status: int, message: str) -> Response:
    metrics.EXCHANGE_ERRORS.labels(reason).inc()
    return Response(
        orjson.dumps({"error": message}), status_code=status, media_type="application/json"
    )


# -- lifecycle ------------------------------------------------------------------


async def _start(config: ServerConfig) -> Runtime:
    global _clock
    _clock = config.clock
    db.secure_data_dir(config.data_dir)
    db.prepare_sqlite(config.database_url)  # raises InsecureFileError: refuse to start
    await db.upgrade(config.database_url)
    write_engine = db.create_engine(config.database_url, writer=True)
    read_engine = (
        write_engine
        if not db.is_sqlite(config.database_url)
        else db.create_engine(config.database_url)
    )
    async with write_engine.begin() as conn:
        keys, token = await tokens.bootstrap(conn, _now())
    if token is not None:
        path = write_token_file(config.data_dir, token)
        log.warning("bootstrap admin token written to %s (readable by this user only)", path)
    fleet = Fleet()
    async with read_engine.connect() as conn:
        for row in await conn.execute(sa.select(computers).where(computers.c.removed_at.is_(None))):
            fleet.put(
                ComputerState(
                    row.id,
                    row.tenant_id,
                    row.secret_hash,
                    row.generation,
                    row.in_acked,
                    row.out_seq,
                    row.out_acked,
                    row.address,
                    row.tickle_port,
                    row.last_seen_at,
                )
            )
    metrics.COMPUTERS.set(len(fleet.computers))
    signer = Signer(keys["signing_seed"])
    writer = Writer(write_engine)
    exchange = Exchange(writer, fleet, signer, lost_grace=config.lost_grace, clock=config.clock)
    writer.start()
    tickler = Tickler(
        keys["tickle_master"],
        rate=config.tickle_rate,
        min_interval=config.tickle_min_interval,
        enabled=config.tickles,
    )
    tickler.start()
    rt = Runtime(
        config=config,
        read=read_engine,
        writer=writer,
        exchange=exchange,
        fleet=fleet,
        tickler=tickler,
        signer=signer,
        tickle_master=keys["tickle_master"],
        settings_json=orjson.dumps({"poll_interval": config.poll_interval}),
    )
    rt.lifecycle = Lifecycle(
        writer.run,
        read_engine,
        lambda cids: tickler.wake(fleet.mark_work(cids)),
        clock=config.clock,
        interval=config.lifecycle_interval,
        fire=lambda sid: _fire_schedule(rt, sid),
    )
    writer.on_finished = rt.lifecycle.on_finished
    exchange.window_closed = rt.lifecycle.window_closed
    await rt.lifecycle.load()
    rt.lifecycle.start()
    rt.tasks.append(asyncio.create_task(_reaper(rt), name="reaper"))
    rt.tasks.append(asyncio.create_task(_flush_seen(rt), name="last-seen"))
    await _start_tasks(rt, config)
    log.info(
        "server ready: %d computers, database %s",
        len(fleet.computers),
        db.database_url(config.database_url).split("@")[-1],
    )
    return rt


def write_token_file(data_dir: Path, token: str) -> Path:
    """Write ``DATA_DIR/admin-token`` readable by this user only (even if it existed wider)."""
    path = data_dir / "admin-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


async def mint_admin_token(
    data_dir: Path, database_url: str, *, tenant: str, actor: str
) -> tuple[int, Path]:
    """Mint a new admin token straight in the database and write it to the data folder.

    The way back in when every admin token is lost or revoked: it needs the
    server's data folder and database, not the API, and works whether or not the
    server runs (a running server reads tokens from the database on each call).
    """
    db.secure_data_dir(data_dir)
    db.prepare_sqlite(database_url)
    await db.upgrade(database_url)
    engine = db.create_engine(database_url, writer=True)
    try:
        async with engine.begin() as conn:
            now = time.time()
            _, unseen = await tokens.bootstrap(conn, now)  # a fresh database: tenant, keys
            if unseen is not None:  # nobody will ever see this one: the minted token replaces it
                await conn.execute(
                    api_tokens.update()
                    .where(api_tokens.c.token_hash == token_hash(unseen))
                    .values(revoked=True)
                )
            token_id, token = await tokens.mint_admin_token(conn, now, tenant=tenant, actor=actor)
    finally:
        await engine.dispose()
    return token_id, write_token_file(data_dir, token)


async def _start_tasks(rt: Runtime, config: ServerConfig) -> None:
    specs = load_task_types(config.task_types, builtins=BUILTINS)
    queue = open_queue(config.queue)
    pg = not db.is_sqlite(config.database_url)
    rt.manager = TaskManager(
        rt.writer,
        rt.read,
        specs,
        queue,
        config.heartbeat_timeout,
        reap_interval=min(5.0, max(0.2, config.heartbeat_timeout / 4)),
        # In-process workers report through on_finished; only remote ones need watching.
        watch_remote=config.queue != "embedded",
        clock=config.clock,
    )
    await rt.manager.start()
    if config.queue == "embedded" and config.workers > 0:
        worker = Worker(
            queue=queue,
            types=specs,
            run_tx=rt.writer.run,
            pg=pg,
            concurrency=config.workers,
            heartbeat_interval=config.worker_heartbeat,
            on_finished=rt.manager.finished,
            context={"run_tx": rt.writer.run},
            name="embedded",
        )
        rt.tasks.append(asyncio.create_task(worker.run(), name="embedded-worker"))


async def _stop(rt: Runtime) -> None:
    for task in rt.tasks:
        task.cancel()
    for task in rt.tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # Each part stops on its own: one failing to stop must not leave the writer running.
    parts = [rt.tickler.stop]
    if rt.lifecycle is not None:
        parts.append(rt.lifecycle.stop)
    if rt.manager is not None:
        parts.append(rt.manager.stop)
    for stop in parts:
        try:
            await stop()
        except Exception:
            log.exception("stopping %s failed", getattr(stop, "__qualname__", stop))
    await rt.writer.stop()
    with contextlib.suppress(Exception):
        await _flush_once(rt)
    await rt.writer.engine.dispose()
    if rt.read is not rt.writer.engine:
        await rt.read.dispose()


async def _fire_schedule(rt: Runtime, sid: int) -> float | None:
    """A cron schedule is due: create its run (a request of its own); the next time or None."""

    async def fn(conn: Any) -> tuple[requests.Created | None, float | None]:
        return await schedules.fire_schedule(conn, _now(), sid)

    def after(res: tuple[requests.Created | None, float | None]) -> None:
        if res[0] is not None:
            _wake_targets(rt, res[0])

    created, next_at = await rt.writer.run(fn, after=after)
    if created is not None:
        metrics.REQUESTS.inc()
        log.info("schedule %d fired: request %d", sid, created.request["id"])
    return next_at


async def reap_once(rt: Runtime) -> None:
    """One pass of the timeout reaper: lost activities fail, expired work is canceled."""
    lost = await rt.writer.run(lambda c: reap_lost(c, _now()))
    expired = await rt.writer.run(lambda c: reap_expired(c, _now()))
    if lost:
        metrics.LOST.inc(len(lost))
        log.warning("%d activities failed as lost: %s", len(lost), lost[:20])
    if expired:
        log.info("%d queued activities expired: %s", len(expired), expired[:20])


async def _reaper(rt: Runtime) -> None:
    while True:
        await asyncio.sleep(rt.config.reaper_interval)
        try:
            await reap_once(rt)
        except Exception:
            log.exception("lost-activity reaper failed; retrying next interval")


async def _flush_once(rt: Runtime) -> None:
    dirty = rt.fleet.take_dirty()
    if not dirty:
        return

    async def fn(conn: Any) -> None:
        await conn.execute(
            computers.update()
            .where(computers.c.id == sa.bindparam("b_id"))
            .values(last_seen_at=sa.bindparam("seen"), address=sa.bindparam("addr")),
            [{"b_id": cs.id, "seen": cs.last_seen, "addr": cs.address} for cs in dirty],
        )

    if rt.writer.running:
        await rt.writer.run(fn)
    else:
        async with rt.writer.engine.begin() as conn:
            await fn(conn)


async def _flush_seen(rt: Runtime) -> None:
    # Last-seen times live in memory and reach the database in one batch per
    # interval, so idle exchanges stay off the database.
    while True:
        await asyncio.sleep(LAST_SEEN_FLUSH)
        try:
            await _flush_once(rt)
        except Exception:
            log.exception("last-seen flush failed")
