"""The dashboard's audit page: the log with filters, paged, and its CSV and JSON-lines
exports (docs/audit.md, docs/dashboard.md).

Contract: the page and the exports need the role the API's ``GET /audit`` needs
(``routes.NEEDS["audit"]``): anyone else gets 403 and no link in the header. The filters are
the API's, checked by the API's own ``audit_filter`` (a bad one is a 400 page
saying which); rows come from ``server/audit.py``, newest first,
``DASHBOARD_AUDIT_ROWS`` a page ("Older" pages back by id); the export links carry
the same filters and stream every matching entry.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from starlette.responses import Response, StreamingResponse

from taskfleet.server import audit
from taskfleet.server.api import audit as api_audit
from taskfleet.server.api.deps import read, require
from taskfleet.server.dashboard.routes import NEEDS, Ctx, page, route
from taskfleet.server.kernel import ApiError
from taskfleet.settings import DASHBOARD_AUDIT_ROWS, MAX_ID

_FIELDS = ("actor", "action", "object", "since", "until", "outcome")


def _filter(request: Request) -> tuple[audit.AuditFilter, dict[str, str]]:
    q = request.query_params
    form = {name: q.get(name, "").strip() for name in _FIELDS}
    raw_before = q.get("before_id", "")
    if raw_before and not (raw_before.isdigit() and 1 <= int(raw_before) <= MAX_ID):
        raise ApiError(400, "before_id: an entry id (1 or more)")
    f = api_audit.audit_filter(
        form["actor"] or None,
        form["action"] or None,
        form["object"] or None,
        form["since"] or None,
        form["until"] or None,
        form["outcome"] or None,
        int(raw_before) if raw_before else None,
    )
    return f, form


def _query(form: dict[str, str], **more: Any) -> str:
    return urlencode({**{k: v for k, v in form.items() if v}, **more})


@route("/audit")
async def audit_page(request: Request, ctx: Ctx) -> Response:
    require(ctx.p, NEEDS["audit"])
    f, form = _filter(request)
    rows = await read(ctx.rt, lambda c: audit.list_audit(c, ctx.p, f, DASHBOARD_AUDIT_ROWS + 1))
    more = len(rows) > DASHBOARD_AUDIT_ROWS
    rows = rows[:DASHBOARD_AUDIT_ROWS]
    for e in rows:  # shown as text (the template escapes it)
        e["detail_text"] = json.dumps(e["detail"], ensure_ascii=False, sort_keys=True)
    return await page(
        ctx,
        "audit.html",
        rows=rows,
        form=form,
        outcomes=("ok", "refused", "failed"),
        older=_query(form, before_id=rows[-1]["id"]) if more else None,
        newest=_query(form) if f.before_id else None,
        export_csv=_query(form, format="csv"),
        export_jsonl=_query(form, format="jsonl"),
    )


@route("/audit/export")
async def audit_export(request: Request, ctx: Ctx) -> Response:
    require(ctx.p, NEEDS["audit"])
    f, _form = _filter(request)
    fmt = request.query_params.get("format", "csv")
    if fmt not in ("csv", "jsonl"):
        raise ApiError(400, f"format: csv or jsonl, got {fmt[:50]!r}")
    media = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson; charset=utf-8"}
    return StreamingResponse(
        audit.export(lambda fn: read(ctx.rt, fn), ctx.p, f, fmt),
        media_type=media[fmt],
        headers={
            "Content-Disposition": f'attachment; filename="audit.{fmt}"',
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        },
    )
