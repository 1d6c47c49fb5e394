"""What every router of the admin API shares: the types of ids, times and durations it
accepts, authentication and roles, the runtime, the strict JSON body parser.

Contract: a route gets the caller as ``Viewer``, ``Operator`` or ``Admin`` (a
bearer token with at least that role; every refusal is a 401 or 403 of its
own) and the server as ``Rt``; routers made by ``router_for`` parse JSON bodies
like an exchange (``loads_body``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Annotated, Any, TypeVar, get_type_hints

from fastapi import APIRouter, Depends, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.types import Scope

from taskfleet.protocol.exchange import loads_body
from taskfleet.server import lifecycle as lc
from taskfleet.server import tenants, tokens
from taskfleet.server.abuse import Guards
from taskfleet.server.kernel import ApiError, Principal
from taskfleet.server.runtime import Runtime
from taskfleet.settings import DURATION_MAX, MAX_ID, TENANT_HEADER, TIME_MAX, TIME_MIN

T = TypeVar("T")

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


class CancelIn(BaseModel):
    reason: str = ""


# Declared for the OpenAPI document (securitySchemes); _role reads the header itself so
# that every refusal is one of its own 401s.
_bearer = HTTPBearer(auto_error=False, description="an API token (tfa_...), see docs/guide.md")


def role(needed: str) -> Callable[..., Awaitable[Principal]]:
    async def dep(
        request: Request,
        _declared: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> Principal:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing bearer token (Authorization: Bearer TOKEN)")
        rt: Runtime = request.app.state.rt
        guards: Guards = request.app.state.guards
        address = client_address(request.scope) or "unknown"
        await guards.check("token", address)
        async with rt.read.connect() as conn:
            p = await tokens.resolve_token(conn, token.strip(), rt.now())
            if p is None:
                await guards.failed("token", address)
                raise ApiError(401, "invalid, expired or revoked token")
            # A disabled tenant's tokens are refused; a super-admin may act in another.
            p = await tenants.admit(conn, p, request.headers.get(TENANT_HEADER))
        return require(seen(request, p), needed)

    dep.needed = needed  # type: ignore[attr-defined]  # the dashboard reads a route's role
    return dep


async def guarded(guards: Guards, kind: str, address: str, fn: Awaitable[T]) -> T:
    """``await fn``, counting a 401 or 403 it raises as a failed attempt of ``address``;
    429 at once while the address is refused (server/abuse.py)."""
    try:
        await guards.check(kind, address)
    except ApiError:
        if isinstance(fn, Coroutine):
            fn.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    try:
        return await fn
    except ApiError as exc:
        if exc.status in (401, 403):
            await guards.failed(kind, address)
        raise


def require(p: Principal, needed: str) -> Principal:
    """``p`` if its role allows ``needed``; else the API's 403 (the dashboard's too)."""
    if not p.allows(needed):
        raise ApiError(403, f"this needs the {needed} role; the token has {p.role}")
    return p


# What the audit of a refused call (api/audit.py) reads from the request's state.
PRINCIPAL = "audit_principal"
MESSAGE = "audit_message"


def mark(request: Request, p: Principal | None = None, message: str | None = None) -> None:
    """Tell the audit of a refused call who called (``p``) and what was wrong."""
    if p is not None:
        setattr(request.state, PRINCIPAL, p)
    if message is not None:
        setattr(request.state, MESSAGE, message)


def seen(request: Request, p: Principal) -> Principal:
    """``p`` with the caller's address (every entry it audits records it), marked as the
    caller of this request for the audit of a refusal."""
    p = replace(p, address=client_address(request.scope))
    mark(request, p)
    return p


def header_id(request: Request, name: str) -> int | None:
    """The id an agent's or relay's ``X-Taskfleet-...`` header names: 1..MAX_ID, or None
    (absent, not a number, out of range: a 401, never a number the database refuses)."""
    raw = request.headers.get(name, "")
    # ASCII digits only: no sign, spaces or "1_0", and no "²" (a digit to isdigit).
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        return None
    value = int(raw)
    return value if 1 <= value <= MAX_ID else None


def client_address(scope: Scope) -> str | None:
    """The caller's address as the ASGI server saw it (docs/audit.md: proxies)."""
    client = scope.get("client")
    return str(client[0]) if client else None


def needed_role(route: Callable[..., Any]) -> str:
    """The role an API route function asks of its caller (its ``Viewer``, ``Operator``
    or ``Admin`` parameter), so the dashboard shows and allows exactly what the API does."""
    for hint in get_type_hints(route, include_extras=True).values():
        for meta in getattr(hint, "__metadata__", ()):
            needed = getattr(getattr(meta, "dependency", None), "needed", None)
            if isinstance(needed, str):
                return needed
    raise ValueError(f"{route.__qualname__} takes no Viewer, Operator or Admin")


# -- deny by default (issue 15) -------------------------------------------------
# A route answers only a caller with a role (a Viewer/Operator/Admin parameter), or a
# dashboard session (its endpoint is marked ``session_required`` by dashboard/routes.py),
# or it is listed here with what authenticates it instead. The server refuses to start
# with a route that is none of these: a forgotten check cannot ship (Salt's
# CVE-2020-11651 was a method reachable without one).
PUBLIC: dict[str, str] = {
    "GET /healthz": "liveness for load balancers: no data",
    "GET /metrics": "the Prometheus scrape: fleet-wide counters, no names, no tenant's data",
    "GET /openapi.json": "the API's description (public documentation)",
    "GET /docs": "the API's description (public documentation)",
    "GET /docs/oauth2-redirect": "part of the /docs page",
    "GET /redoc": "the API's description (public documentation)",
    "POST /agent/v1/enroll": "authenticated by its enrollment token (uses, expiry, tenant)",
    "POST /agent/v1/exchange": "authenticated by the computer's id and secret",
    "GET /agent/v1/content/{sha256}": "authenticated by the computer's id and secret",
    "POST /relay/v1/enroll": "authenticated by its relay token",
    "POST /relay/v1/enroll-computer": "authenticated by the relay's id and secret",
    "POST /relay/v1/exchange": "authenticated by the relay's id and secret",
    "GET /relay/v1/content/{sha256}": "authenticated by the relay's id and secret",
    "GET /ui/": "redirects to the login page or the fleet",
    "GET /ui/login": "the login form",
    "POST /ui/login": "checks the credentials it is sent (rate limited)",
    "GET /ui/login/link": "the one-time link's page: a button, nothing spent",
    "POST /ui/login/link": "redeems the one-time login code it is sent (hashed, single use)",
    "POST /ui/logout": "ends the session it is sent, if any",
}


def _has_role(dependant: Any) -> bool:
    return any(
        getattr(d.call, "needed", None) is not None or _has_role(d) for d in dependant.dependencies
    )


def unauthenticated(routes: list[Any]) -> list[str]:
    """The routes (``METHOD PATH``) that would answer anyone and are not in ``PUBLIC``."""
    out = []
    for route in routes:
        methods = sorted(set(getattr(route, "methods", None) or ()) - {"HEAD"})
        path = getattr(route, "path", "")
        if not methods or path.startswith("/ui/static"):
            continue  # mounts: the dashboard's CSS and scripts
        if isinstance(route, APIRoute) and _has_role(route.dependant):
            continue
        if getattr(getattr(route, "endpoint", None), "session_required", False):
            continue
        out += [f"{m} {path}" for m in methods if f"{m} {path}" not in PUBLIC]
    return out


Viewer = Annotated[Principal, Depends(role("viewer"))]
Operator = Annotated[Principal, Depends(role("operator"))]
Admin = Annotated[Principal, Depends(role("admin"))]


async def _runtime(request: Request) -> Runtime:
    # async on purpose: FastAPI runs a plain ``def`` dependency in a worker thread,
    # a thread hop on every request (enrollment ran 3x slower with one).
    rt: Runtime = request.app.state.rt
    return rt


Rt = Annotated[Runtime, Depends(_runtime)]


async def read(rt: Runtime, fn: Callable[[Any], Awaitable[T]]) -> T:
    """``fn(conn)`` on a read connection."""
    async with rt.read.connect() as conn:
        return await fn(conn)


async def lifecycle_write(rt: Runtime, fn: Callable[[Any], Awaitable[lc.Moved]]) -> lc.Moved:
    """A lifecycle move through the writer; the engine applies it after the commit."""
    return await rt.writer.run(fn, after=rt.lifecycle_engine.apply)


def live(rt: Runtime, c: dict[str, Any]) -> dict[str, Any]:
    cs = rt.fleet.get(c["id"])
    if cs is not None and cs.last_seen and (c["last_seen_at"] or 0) < cs.last_seen:
        c["last_seen_at"] = cs.last_seen
    return c


class JsonRequest(Request):
    """A request whose JSON body is parsed like an exchange's (``loads_body``): standard
    JSON only, so NaN, Infinity and numbers beyond a double are refused (400), as are
    bodies that are not UTF-8; a lone surrogate escape (an agent's stdlib encoder can
    write one in a hostname) is taken, and cleaned where the text is stored."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_body(await self.body())
        return self._json


class JsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(JsonRequest(request.scope, request.receive))

        return strict


class ApiErrorBody(BaseModel):
    error: str


# Every route may answer these (documented on each route, so the OpenAPI document
# lists them: the app adds the routes themselves, not included routers).
# 429: an address past its limit of failed credentials (server/abuse.py).
# 503: the database is full or unreachable; nothing was written (store/unavailable.py).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ApiErrorBody} for status in (400, 401, 403, 404, 409, 429, 503)
}


def router_for() -> APIRouter:
    """A router whose routes parse JSON bodies with ``loads_body`` and document the
    error answers every route may give."""
    return APIRouter(route_class=JsonRoute, responses=ERROR_RESPONSES)
