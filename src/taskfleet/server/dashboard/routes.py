"""The web dashboard's pages and actions under ``/ui/`` (docs/dashboard.md).

Contract: every page needs a session (``/ui/login`` opens one with a user name
and password or an API token, ``/ui/login/link`` with a one-time code,
``login_accounts.py``; the cookie holds only a random session id,
``sessions.py``, kept in memory or, with several server processes on PostgreSQL, in
the database so that every process sees it, ``session_stores.py``); the session's
token or account and its tenant are checked again on every request, so a revoked
token, a disabled account or tenant ends its sessions at once, in every process.
Every POST carries the session's CSRF token or is refused (403) before anything is
read or written. Pages read through the service layer (``server/inventory.py``,
``server/requests.py``, ...); actions call the API's own route functions with the
session's caller, after the role check those routes make (``deps.needed_role``), so
the dashboard allows, refuses and does exactly what the API does, and shows only the
buttons its caller may use. A request's page follows its activity events over
server-sent events (the event id is the activity event's id: a reconnect resumes from
Last-Event-ID) and falls back to polling every ``DASHBOARD_POLL_EVERY`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shlex
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qs

import jinja2
from fastapi import APIRouter, FastAPI, Request
from pydantic import ValidationError
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from taskfleet.server import activities, inventory, requests
from taskfleet.server import lifecycle as lc
from taskfleet.server.abuse import FailureLimiter, Failures, LocalFailures, SharedFailures
from taskfleet.server.api import approvals as api_approvals
from taskfleet.server.api import audit as api_audit
from taskfleet.server.api import requests as api_requests
from taskfleet.server.api.deps import live, mark, needed_role, read, require, seen
from taskfleet.server.dashboard import login_accounts
from taskfleet.server.dashboard.session_stores import (
    LocalSessions,
    Sessions,
    SharedSessions,
)
from taskfleet.server.dashboard.sessions import Session, SessionStore, csrf_ok
from taskfleet.server.kernel import ApiError, Principal, audit
from taskfleet.server.runtime import Runtime
from taskfleet.settings import (
    DASHBOARD_LOGIN_LIMIT,
    DASHBOARD_LOGIN_WINDOW,
    DASHBOARD_OFFLINE_AFTER,
    DASHBOARD_POLL_EVERY,
    DASHBOARD_ROWS,
    DASHBOARD_SESSION_TTL,
    DASHBOARD_SSE_MAX_AGE,
    DASHBOARD_SSE_POLL,
    MAX_ID,
)

PREFIX = "/ui"
SESSION_COOKIE = "tf_session"
LOGIN_COOKIE = "tf_login"  # the login form's CSRF token (no session exists yet)
# Scripts only from our own files (no inline script can run), no framing.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# Each action is the API route it calls: the role it needs is that route's.
ACTIONS: dict[str, Callable[..., Any]] = {
    "run": api_requests.create_request,
    "cancel": api_requests.cancel_request,
    "rerun": api_requests.rerun_failed,
    "approve": api_approvals.approve,
    "reject": api_approvals.reject,
    "audit": api_audit.list_audit,  # the audit page (dashboard/audit.py)
}
NEEDS = {name: needed_role(fn) for name, fn in ACTIONS.items()}

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("taskfleet.server.dashboard", "templates"),
    autoescape=True,  # every value shown is escaped, whatever the template's name
    undefined=jinja2.StrictUndefined,
)
_env.filters["when"] = lambda ts: (
    "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))
)

router = APIRouter(include_in_schema=False)


class Dashboard:
    """The dashboard's sessions and login limiter: in this process's memory on
    ``clock``, or shared through the database of the runtime ``rt`` (PostgreSQL,
    several server processes: ``session_stores.py``, ``server/abuse.py``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, rt: Any = None) -> None:
        self.sessions: Sessions
        self.logins: Failures
        if rt is None:
            self.sessions = LocalSessions(SessionStore(clock, DASHBOARD_SESSION_TTL))
            self.logins = LocalFailures(
                FailureLimiter(clock, DASHBOARD_LOGIN_LIMIT, DASHBOARD_LOGIN_WINDOW)
            )
        else:
            self.sessions = SharedSessions(rt, DASHBOARD_SESSION_TTL)
            self.logins = SharedFailures(rt, "login", DASHBOARD_LOGIN_LIMIT, DASHBOARD_LOGIN_WINDOW)


def install(app: FastAPI) -> None:
    """Add the dashboard's routes and static files to the server's app."""
    app.state.dashboard = Dashboard()
    app.router.routes.extend(router.routes)
    app.mount(
        f"{PREFIX}/static",
        StaticFiles(packages=[("taskfleet.server.dashboard", "static")]),
        name="dashboard-static",
    )


@dataclass
class Ctx:
    """One dashboard request: who asks, their session, the form they sent."""

    rt: Runtime
    p: Principal
    session: Session
    form: dict[str, str] = field(default_factory=dict)

    def can(self, action: str) -> bool:
        return self.p.allows(NEEDS[action])


class _LoginNeeded(Exception):
    pass


def _render(name: str, status: int = 200, ctx: Ctx | None = None, **values: Any) -> HTMLResponse:
    common: dict[str, Any] = {"prefix": PREFIX, "me": None, "csrf": "", "approvals_count": 0}
    if ctx is not None:
        common.update(me=ctx.p, csrf=ctx.session.csrf, can=ctx.can)
    html = _env.get_template(name).render({**common, **values})
    return HTMLResponse(html, status_code=status, headers=_HEADERS)


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the only kind our forms send), first value of each."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return {}
    try:
        parsed = parse_qs((await request.body()).decode(), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[0] for k, v in parsed.items()}


async def _caller(request: Request) -> tuple[Principal, Session]:
    ui: Dashboard = request.app.state.dashboard
    rt: Runtime = request.app.state.rt
    s = await ui.sessions.get(request.cookies.get(SESSION_COOKIE))
    if s is None:
        raise _LoginNeeded
    p = await login_accounts.session_caller(rt, s)
    if p is None:  # token revoked or expired, account or tenant disabled since login
        await ui.sessions.close(s.id)
        raise _LoginNeeded
    return seen(request, p), s


Handler = Callable[[Request, Ctx], Awaitable[Response]]


def _route(path: str, method: str = "GET") -> Callable[[Handler], Handler]:
    """A dashboard route: a session (else the login page, or 403 for a POST), the CSRF
    token on a POST (else 403, before anything else), ApiError as an HTML page."""

    def deco(fn: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                p, s = await _caller(request)
            except _LoginNeeded:
                if method == "POST":
                    mark(request, message="log in first")
                    return _render("error.html", 403, message="log in first")
                if request.headers.get("hx-request"):  # htmx: the whole page goes to login
                    return Response(status_code=204, headers={"HX-Redirect": f"{PREFIX}/login"})
                return RedirectResponse(f"{PREFIX}/login", 303)
            ctx = Ctx(request.app.state.rt, p, s)
            if method == "POST":
                ctx.form = await _form(request)
                if not csrf_ok(s.csrf, ctx.form.get("csrf")):
                    mark(request, message="CSRF token missing or wrong")
                    return _render(
                        "error.html",
                        403,
                        ctx,
                        message="this form is stale or was not sent by this page "
                        "(CSRF token missing or wrong): reload the page and try again",
                    )
            try:
                return await fn(request, ctx)
            except ApiError as exc:
                mark(request, message=exc.message)
                return _render("error.html", exc.status, ctx, message=exc.message)

        endpoint.__name__ = f"ui_{fn.__name__}"
        endpoint.session_required = True  # type: ignore[attr-defined]  # api/deps.PUBLIC
        router.add_api_route(PREFIX + path, endpoint, methods=[method], include_in_schema=False)
        return fn

    return deco


def _id(request: Request, name: str) -> int:
    raw = str(request.path_params.get(name, ""))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_ID:
        raise ApiError(404, f"no {name.removesuffix('_id')} {raw!r}")
    return int(raw)


async def _approvals(ctx: Ctx) -> list[dict[str, Any]]:
    return await read(ctx.rt, lambda c: lc.list_approvals(c, ctx.p))


async def _page(ctx: Ctx, name: str, status: int = 200, **values: Any) -> HTMLResponse:
    """A full page: its header counts the approvals waiting."""
    waiting = values.get("approvals")
    if waiting is None:
        waiting = await _approvals(ctx)
    return _render(name, status, ctx, approvals_count=len(waiting), **values)


def _see_other(path: str) -> RedirectResponse:
    return RedirectResponse(PREFIX + path, 303)


# -- login, logout ----------------------------------------------------------------------


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _login_page(
    request: Request, status: int = 200, error: str = "", link_code: str = ""
) -> HTMLResponse:
    # A fresh token for the login form, also set as a cookie only /ui/login (and
    # /ui/login/link, below it) gets back.
    nonce = secrets.token_urlsafe(32)
    resp = _render("login.html", status, login_csrf=nonce, error=error, link_code=link_code)
    resp.set_cookie(
        LOGIN_COOKIE,
        nonce,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=f"{PREFIX}/login",
    )
    return resp


@router.get(f"{PREFIX}/login", include_in_schema=False)
async def login_form(request: Request) -> Response:
    try:
        await _caller(request)
        return _see_other("/fleet")
    except _LoginNeeded:
        return _login_page(request)


@router.post(f"{PREFIX}/login", include_in_schema=False, name="dashboard.login")
async def login(request: Request) -> Response:
    """Open a session; a refused login is audited by api/audit.py (actor unknown, the
    address, never the token), an accepted one here."""
    ui: Dashboard = request.app.state.dashboard
    rt: Runtime = request.app.state.rt
    form = await _form(request)
    if not csrf_ok(request.cookies.get(LOGIN_COOKIE), form.get("csrf")):
        mark(request, message="stale login form (CSRF)")
        return _login_page(request, 403, "the login form was stale: try again")
    address = _client(request)
    standing = await ui.logins.standing(address)
    if standing.wait:
        mark(request, message="too many failed logins from this address")
        return _login_page(
            request, 429, "too many failed logins from your address: wait a few minutes"
        )
    who = await login_accounts.authenticate(rt, form)
    if who is None:
        await ui.logins.failed(address)
        mark(request, message="wrong user name, password or token")
        # One answer for a wrong password, an unknown name, a wrong, revoked or expired
        # token, a disabled account or tenant: nothing to learn.
        return _login_page(request, 401, "wrong user name, password or token")
    if standing.failures:  # no write for an address that never failed
        await ui.logins.succeeded(address)
    return await open_session(request, who, address)


async def open_session(
    request: Request, who: login_accounts.LoggedIn, address: str
) -> RedirectResponse:
    """A new session for ``who``, its cookie set, on to the fleet page."""
    ui: Dashboard = request.app.state.dashboard
    s = await ui.sessions.open(who.token_hash, who.account_id, who.p.tenant_id)
    await login_accounts.logged_in(request.app.state.rt, who, address)
    resp = _see_other("/fleet")
    resp.set_cookie(
        SESSION_COOKIE,
        s.id,
        max_age=int(DASHBOARD_SESSION_TTL),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=PREFIX,
    )
    resp.delete_cookie(LOGIN_COOKIE, path=f"{PREFIX}/login")
    return resp


@router.get(f"{PREFIX}/login/link", include_in_schema=False)
async def login_link_form(request: Request) -> Response:
    """The one-time link's page: a button that spends it. A GET spends nothing, so a mail
    scanner or a chat's link preview that fetches the link cannot use it up."""
    code = request.query_params.get("code", "")
    if not code:
        return _login_page(request, 400, "this login link has no code")
    return _login_page(request, link_code=code[:512])


@router.post(f"{PREFIX}/login/link", include_in_schema=False)
async def login_link(request: Request) -> Response:
    """Open a session with a one-time code (``taskfleet login-link``, the demo's link)."""
    ui: Dashboard = request.app.state.dashboard
    form = await _form(request)
    if not csrf_ok(request.cookies.get(LOGIN_COOKIE), form.get("csrf")):
        mark(request, message="stale login form (CSRF)")
        return _login_page(request, 403, "the login form was stale: open the link again")
    address = _client(request)
    standing = await ui.logins.standing(address)
    if standing.wait:
        mark(request, message="too many failed logins from this address")
        return _login_page(
            request, 429, "too many failed logins from your address: wait a few minutes"
        )
    who = await login_accounts.redeem_link(request.app.state.rt, form.get("code", ""))
    if who is None:
        await ui.logins.failed(address)
        mark(request, message="login link not valid")
        return _login_page(
            request, 401, "this login link is not valid: it was used, has expired or is unknown"
        )
    if standing.failures:  # no write for an address that never failed
        await ui.logins.succeeded(address)
    return await open_session(request, who, address)


@_route("/logout", "POST")
async def logout(request: Request, ctx: Ctx) -> Response:
    await request.app.state.dashboard.sessions.close(ctx.session.id)
    await ctx.rt.writer.run(
        lambda c: audit(c, ctx.p, "dashboard.logout", ctx.rt.now(), ctx.p.actor)
    )
    resp = _see_other("/login")
    resp.delete_cookie(SESSION_COOKIE, path=PREFIX)
    return resp


@router.get(f"{PREFIX}/", include_in_schema=False)
async def home() -> Response:
    return _see_other("/fleet")


# -- pages ------------------------------------------------------------------------------


def _computer_row(rt: Runtime, c: dict[str, Any]) -> dict[str, Any]:
    c = live(rt, c)
    cs = rt.fleet.get(c["id"])
    seen = c["last_seen_at"]
    c["online"] = (cs is not None and cs.waiter is not None) or (
        seen is not None and rt.now() - seen < DASHBOARD_OFFLINE_AFTER
    )
    c["relay"] = cs.relay.name if cs is not None and cs.relay is not None else None
    return c


@_route("/fleet")
async def fleet(request: Request, ctx: Ctx) -> Response:
    rt = ctx.rt
    rows = await read(rt, lambda c: inventory.list_computers(c, ctx.p))
    groups = await read(rt, lambda c: inventory.list_groups(c, ctx.p))
    return await _page(
        ctx,
        "fleet.html",
        computers=[_computer_row(rt, c) for c in rows],
        groups=groups,
        offline_after=DASHBOARD_OFFLINE_AFTER,
    )


@_route("/computers/{computer_id}")
async def computer(request: Request, ctx: Ctx) -> Response:
    cid = _id(request, "computer_id")
    c = await read(ctx.rt, lambda conn: inventory.get_computer(conn, ctx.p, cid))
    return await _page(ctx, "computer.html", c=_computer_row(ctx.rt, c))


@_route("/requests")
async def request_list(request: Request, ctx: Ctx) -> Response:
    rows = await read(ctx.rt, lambda c: requests.list_requests(c, ctx.p, 100))
    if request.headers.get("hx-request"):  # the 5 s refresh of the table alone
        return _render("requests_table.html", ctx=ctx, rows=rows, poll=DASHBOARD_POLL_EVERY)
    return await _page(ctx, "requests.html", rows=rows, poll=DASHBOARD_POLL_EVERY)


async def _live_values(ctx: Ctx, rid: int) -> dict[str, Any]:
    req = await read(ctx.rt, lambda c: requests.get_request(c, ctx.p, rid))
    acts = await read(
        ctx.rt,
        lambda c: activities.list_activities(
            c,
            ctx.p,
            request_id=rid,
            computer_id=None,
            state=None,
            limit=DASHBOARD_ROWS,
            with_output=True,
        ),
    )
    approvals = await _approvals(ctx)
    return {
        "req": req,
        "approvals": approvals,
        "awaiting_approval": any(a.get("request_id") == rid for a in approvals),
        "acts": sorted(acts, key=lambda a: a["computer_id"] or 0),
        "poll": DASHBOARD_POLL_EVERY,
        "rows_max": DASHBOARD_ROWS,
    }


@_route("/requests/{request_id}")
async def request_page(request: Request, ctx: Ctx) -> Response:
    rid = _id(request, "request_id")
    # The stream starts after the last event this page shows: no gap between the two.
    after = await read(ctx.rt, lambda c: activities.last_request_event(c, ctx.p, rid))
    return await _page(ctx, "request.html", after=after, **await _live_values(ctx, rid))


@_route("/requests/{request_id}/live")
async def request_live(request: Request, ctx: Ctx) -> Response:
    rid = _id(request, "request_id")
    return _render("request_live.html", ctx=ctx, **await _live_values(ctx, rid))


@_route("/requests/{request_id}/events")
async def request_events(request: Request, ctx: Ctx) -> Response:
    """Server-sent events: one per activity event of the request, its id the event id."""
    rid = _id(request, "request_id")
    await read(ctx.rt, lambda c: requests.get_request(c, ctx.p, rid))  # 404 if not ours
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    after = int(raw) if raw.isdigit() and int(raw) <= MAX_ID else 0
    return StreamingResponse(
        _event_stream(request, ctx, rid, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _event_stream(request: Request, ctx: Ctx, rid: int, after: int) -> AsyncIterator[str]:
    rt, p = ctx.rt, ctx.p
    sessions: Sessions = request.app.state.dashboard.sessions
    started = time.monotonic()
    idle_since = started
    yield "retry: 2000\n\n"
    # The stream ends with its session (logout, expiry): the reconnect must log in again.
    while time.monotonic() - started < DASHBOARD_SSE_MAX_AGE and await sessions.get(ctx.session.id):
        rows = await read(
            rt, partial(activities.request_events, p=p, request_id=rid, after=after, limit=500)
        )
        for e in rows:
            after = e["id"]
            yield f"id: {after}\nevent: change\ndata: {json.dumps(e, default=str)}\n\n"
        if rows:
            idle_since = time.monotonic()
            continue
        req = await read(rt, lambda c: requests.get_request(c, p, rid))
        if req["progress"]["done"]:
            yield "event: done\ndata: {}\n\n"
            return
        if time.monotonic() - idle_since > 15:
            yield ": idle\n\n"  # keeps proxies from closing a quiet stream
            idle_since = time.monotonic()
        if await request.is_disconnected():
            return
        if await login_accounts.session_caller(rt, ctx.session) is None:
            return  # its token, account or tenant is no longer valid
        await asyncio.sleep(DASHBOARD_SSE_POLL)


@_route("/approvals")
async def approvals_page(request: Request, ctx: Ctx) -> Response:
    return await _page(ctx, "approvals.html", approvals=await _approvals(ctx))


# -- actions ----------------------------------------------------------------------------


def _script_params(form: dict[str, str]) -> dict[str, Any]:
    if form.get("mode", "argv") == "script":
        return {"script": form.get("script", "").replace("\r\n", "\n")}
    try:
        argv = shlex.split(form.get("command", ""))
    except ValueError as exc:
        raise ApiError(400, f"command: {exc}") from None
    return {"argv": argv}


@_route("/run", "POST")
async def run(request: Request, ctx: Ctx) -> Response:
    require(ctx.p, NEEDS["run"])
    timeout = ctx.form.get("timeout", "").strip()
    try:
        body = api_requests.RequestIn.model_validate(
            {
                "type": "execute-script",
                "target": ctx.form.get("target", "").strip(),
                "params": _script_params(ctx.form),
                "timeout": float(timeout) if timeout else None,
                "approval": {} if ctx.form.get("approval") else None,
            }
        )
    except (ValidationError, ValueError) as exc:
        raise ApiError(400, f"invalid form: {exc}") from None
    created = await api_requests.create_request(ctx.rt, body, ctx.p)
    return _see_other(f"/requests/{created['id']}")


@_route("/requests/{request_id}/cancel", "POST")
async def cancel(request: Request, ctx: Ctx) -> Response:
    rid = _id(request, "request_id")
    require(ctx.p, NEEDS["cancel"])
    await api_requests.cancel_request(ctx.rt, rid, ctx.p, None)
    return _see_other(f"/requests/{rid}")


@_route("/requests/{request_id}/rerun", "POST")
async def rerun(request: Request, ctx: Ctx) -> Response:
    rid = _id(request, "request_id")
    require(ctx.p, NEEDS["rerun"])
    created = await api_requests.rerun_failed(ctx.rt, rid, ctx.p)
    return _see_other(f"/requests/{created['id']}")


@_route("/requests/{request_id}/approve", "POST")
async def approve(request: Request, ctx: Ctx) -> Response:
    rid = _id(request, "request_id")
    require(ctx.p, NEEDS["approve"])
    await api_approvals.approve(ctx.rt, rid, ctx.p)
    return _see_other(f"/requests/{rid}")


@_route("/requests/{request_id}/reject", "POST")
async def reject(request: Request, ctx: Ctx) -> Response:
    rid = _id(request, "request_id")
    require(ctx.p, NEEDS["reject"])
    await api_approvals.reject(ctx.rt, rid, ctx.p, None)
    return _see_other(f"/requests/{rid}")


# -- what the pages in modules of their own (ops.py, ...) build on ------------------------
# (public names: no module imports another's ``_`` names; the package imports those pages)
route, render, page, path_id, see_other = _route, _render, _page, _id, _see_other
