"""The audit log (admin): filtered pages and exports; and the entries of refused calls.

Contract: ``GET /api/v1/audit`` takes its filters (actor, action, object, since,
until, outcome, before_id) and limit, each checked here (400 with what is wrong);
``format=csv|jsonl`` (or ``Accept: text/csv`` / ``application/x-ndjson``) streams
every matching entry, not one page. :class:`AuditRefusals` is the one place that
audits refused (4xx) and failed (5xx) administrative calls: every POST, PUT, PATCH
and DELETE under ``/api/v1/`` and ``/ui/`` except the agent and relay exchanges,
enrollment and the dashboard's login form (which audits itself, never its token).
It reads the caller and the message from the request's state (``deps.mark``), set by
the role check and the error handlers, and writes before the answer is sent, so a
caller that sees the refusal finds it in the log.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Query, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskfleet.domain.audit import OUTCOMES, filter_text, parse_when
from taskfleet.server import audit
from taskfleet.server.api.deps import (
    MESSAGE,
    PRINCIPAL,
    Admin,
    Rt,
    client_address,
    read,
    router_for,
)
from taskfleet.server.kernel import ApiError
from taskfleet.server.runtime import Runtime
from taskfleet.settings import (
    AUDIT_FILTER_MAX,
    AUDIT_PAGE_DEFAULT,
    AUDIT_PAGE_MAX,
    MAX_ID,
    TIME_MAX,
    TIME_MIN,
)
from taskfleet.store.unavailable import log_failure

log = logging.getLogger("taskfleet.server")
router = router_for()

_MEDIA = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson; charset=utf-8"}


def audit_filter(
    actor: str | None,
    action: str | None,
    object: str | None,  # the filter's name in the API
    since: str | None,
    until: str | None,
    outcome: str | None,
    before_id: int | None = None,
) -> audit.AuditFilter:
    """The filter from its query parameters, or a 400 saying which is wrong."""
    try:
        texts = {
            name: filter_text(name, value, AUDIT_FILTER_MAX) if value else None
            for name, value in (("actor", actor), ("action", action), ("object", object))
        }
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    times: dict[str, float | None] = {}
    for name, value in (("since", since), ("until", until)):
        try:
            times[name] = parse_when(value, TIME_MIN, TIME_MAX) if value else None
        except ValueError as exc:
            raise ApiError(400, f"{name}: {exc}") from None
    if outcome and outcome not in OUTCOMES:
        raise ApiError(400, f"outcome: one of {', '.join(OUTCOMES)}, got {outcome[:50]!r}")
    if before_id is not None and not 1 <= before_id <= MAX_ID:
        raise ApiError(400, "before_id: an entry id (1 or more)")
    return audit.AuditFilter(
        actor=texts["actor"],
        action=texts["action"],
        object=texts["object"],
        since=times["since"],
        until=times["until"],
        outcome=outcome or None,
        before_id=before_id,
    )


def _format(fmt: str | None, accept: str) -> str:
    if fmt:
        if fmt not in ("json", "csv", "jsonl"):
            raise ApiError(400, f"format: json, csv or jsonl, got {fmt[:50]!r}")
        return fmt
    if "text/csv" in accept:
        return "csv"
    if "application/x-ndjson" in accept or "application/jsonl" in accept:
        return "jsonl"
    return "json"


@router.get("/api/v1/audit", tags=["audit"], response_model=None)
async def list_audit(
    request: Request,
    rt: Rt,
    p: Admin,
    actor: Annotated[str | None, Query(description="exact, or a prefix ending in *")] = None,
    action: Annotated[str | None, Query(description="exact, or a prefix ending in *")] = None,
    object: Annotated[
        str | None, Query(description='what it acted on ("request:12"), or a prefix*')
    ] = None,
    since: Annotated[str | None, Query(description="epoch seconds or ISO 8601 (UTC)")] = None,
    until: Annotated[str | None, Query(description="epoch seconds or ISO 8601 (UTC)")] = None,
    outcome: Annotated[str | None, Query(description="ok, refused or failed")] = None,
    before_id: Annotated[int | None, Query(description="entries older than this id")] = None,
    limit: Annotated[int, Query(ge=1, le=AUDIT_PAGE_MAX)] = AUDIT_PAGE_DEFAULT,
    format: Annotated[
        str | None, Query(description="json (a page), csv or jsonl (every match)")
    ] = None,
) -> list[dict[str, Any]] | Response:
    """The tenant's audit entries, newest first; ``format=csv|jsonl`` exports them all."""
    f = audit_filter(actor, action, object, since, until, outcome, before_id)
    fmt = _format(format, request.headers.get("accept", ""))
    if fmt == "json":
        return await read(rt, lambda c: audit.list_audit(c, p, f, limit))
    return StreamingResponse(
        audit.export(lambda fn: read(rt, fn), p, f, fmt),
        media_type=_MEDIA[fmt],
        headers={"Content-Disposition": f'attachment; filename="audit.{fmt}"'},
    )


# -- refused and failed calls ----------------------------------------------------------

_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_PREFIXES = ("/api/v1/", "/ui/")


def _object(scope: Scope) -> str | None:
    """What the call named: its route's first path parameter (``request:12``)."""
    route = scope.get("route")
    params = scope.get("path_params") or {}
    fmt = getattr(route, "path_format", None) or getattr(route, "path", None) or ""
    for segment_before, name in _params_in(str(fmt)):
        if name in params:
            noun = name[:-3] if name.endswith("_id") else segment_before.removesuffix("s")
            return f"{noun}:{params[name]}"
    return None


def _params_in(path: str) -> list[tuple[str, str]]:
    out = []
    parts = path.strip("/").split("/")
    for i, part in enumerate(parts):
        if part.startswith("{") and part.endswith("}"):
            out.append((parts[i - 1] if i else "", part[1:-1].split(":")[0]))
    return out


class AuditRefusals:
    """Audits each refused or failed administrative call, once (module docstring)."""

    def __init__(self, app: ASGIApp, exempt: frozenset[str]) -> None:
        self.app = app
        self.exempt = exempt
        self.recorder = audit.Recorder()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _MUTATING
            or not scope["path"].startswith(_PREFIXES)
            or scope["path"] in self.exempt
        ):
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    await self._record(scope, message["status"], None)
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if not started:
                await self._record(scope, 500, f"internal server error ({type(exc).__name__})")
            raise

    async def _record(self, scope: Scope, status: int, message: str | None) -> None:
        state: dict[str, Any] = scope.get("state") or {}
        route = scope.get("route")
        refusal = audit.Refusal(
            action=getattr(route, "name", None) or "no-route",
            status=status,
            message=message or str(state.get(MESSAGE) or f"HTTP {status}"),
            method=scope["method"],
            path=scope["path"],
            address=client_address(scope),
            obj=_object(scope),
        )
        rt: Runtime | None = getattr(scope.get("app"), "state", None) and getattr(
            scope["app"].state, "rt", None
        )
        if rt is None:
            return
        entry = self.recorder.entry(state.get(PRINCIPAL), refusal, rt.now())
        if entry is None:
            return
        try:
            await rt.writer.run(lambda c: self.recorder.write(c, entry))
        except Exception as exc:  # the answer goes out anyway; the log says what was lost
            log_failure(
                log, exc, "could not audit the refused call %s %s", scope["method"], scope["path"]
            )
