"""The dashboard's operations pages (docs/dashboard.md): server tasks and workers, jobs
with Terminate, schedules and maintenance windows, relays.

Contract: as ``routes.py``. Pages read through the service layer (``server/tasks.py``,
``server/jobs.py``, ``server/schedules.py``, ``server/lifecycle/windows.py``,
``server/relays.py``); each action calls the API's own route function after the role
check that route declares (its entry in ``ACTIONS``), so a button is shown exactly when
the API would allow it, and a forged POST is refused (403) the same way. Built on
``routes.py`` (its session, CSRF and error handling); the dashboard package imports this
module, so its routes join ``routes.router`` before ``install`` adds them to the app.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from taskfleet.domain.jobs import JobState
from taskfleet.domain.states import FINAL_STATES, State
from taskfleet.server import jobs, relays, schedules, tenants
from taskfleet.server import lifecycle as lc
from taskfleet.server.api import groups as api_groups
from taskfleet.server.api import jobs as api_jobs
from taskfleet.server.api import schedules as api_schedules
from taskfleet.server.api import tasks as api_tasks
from taskfleet.server.api.deps import CancelIn, needed_role, read, require
from taskfleet.server.dashboard.routes import Ctx, page, path_id, render, route, see_other
from taskfleet.server.kernel import ApiError
from taskfleet.settings import DASHBOARD_POLL_EVERY, DASHBOARD_ROWS
from taskfleet.store.tasks import reads as task_reads

# Each action is the API route it calls: the role it needs is that route's.
ACTIONS: dict[str, Callable[..., Any]] = {
    "task_cancel": api_tasks.cancel_task,
    "job_terminate": api_jobs.terminate_job,
    "schedule_cancel": api_schedules.cancel_schedule,
    "window_set": api_groups.set_window,
    "window_clear": api_groups.clear_window,
}
NEEDS = {name: needed_role(fn) for name, fn in ACTIONS.items()}
_FINAL = {s.value for s in FINAL_STATES}
# A job in one of these no longer changes: its page stops refreshing, and a job that
# is neither these nor Terminating offers Terminate.
_ENDED = {s.value for s in JobState} - {JobState.PENDING, JobState.RUNNING, JobState.TERMINATING}


def _age(now: float, ts: float | None) -> str:
    """Seconds ago, rounded for a person: 4s, 3m 10s, 2h 5m, 3d 4h."""
    if ts is None:
        return "-"
    s = max(0, int(now - ts))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


async def _show(ctx: Ctx, name: str, **values: Any) -> Response:
    """A full page; its buttons follow this module's actions (``can``)."""
    return await page(ctx, name, can=partial(_can, ctx), **values)


def _fragment(ctx: Ctx, name: str, **values: Any) -> Response:
    """The refreshed part of a page (htmx), its buttons as on the page."""
    return render(name, ctx=ctx, can=partial(_can, ctx), **values)


def _can(ctx: Ctx, action: str) -> bool:
    # This module's actions, else the shared ones (the header's links use those too).
    return ctx.p.allows(NEEDS[action]) if action in NEEDS else ctx.can(action)


def _filter(request: Request, name: str) -> str | None:
    value = request.query_params.get(name, "").strip()
    return value or None


# -- server tasks and workers -----------------------------------------------------------


@route("/tasks")
async def tasks_page(request: Request, ctx: Ctx) -> Response:
    tm = ctx.rt.task_manager
    state, type_ = _filter(request, "state"), _filter(request, "type")
    rows = await tm.list_tasks(ctx.p, state, type_, DASHBOARD_ROWS)
    counts = await tm.count_tasks(ctx.p, type_)
    now = ctx.rt.now()
    shown = tenants.sees_infrastructure(ctx.p)
    workers = await read(ctx.rt, task_reads.list_workers) if shown else []
    for w in workers:
        w["age"] = _age(now, w["heartbeat_at"])
        # The workers table's own status: lost once the reaper declared it so.
        w["alive"] = w["status"] not in ("lost", "stopped")
    # The server processes on this database and the leader (GET /servers's answer).
    servers = await ctx.rt.cluster.status() if shown and ctx.rt.cluster is not None else None
    for sp in (servers or {}).get("processes", []):
        sp["age"] = _age(now, sp["heartbeat_at"])
    return await _show(
        ctx,
        "tasks.html",
        rows=rows,
        counts=counts,
        states=[s.value for s in State],
        types=sorted(tm.specs),
        state=state or "",
        type=type_ or "",
        workers=workers,
        workers_shown=shown,
        servers=servers,
        final=_FINAL,
        rows_max=DASHBOARD_ROWS,
    )


@route("/tasks/{task_id}")
async def task_page(request: Request, ctx: Ctx) -> Response:
    tid = path_id(request, "task_id")
    task = await ctx.rt.task_manager.get(ctx.p, tid)
    task["params_json"] = json.dumps(task["params"], indent=2, sort_keys=True, default=str)
    return await _show(ctx, "task.html", t=task, final=_FINAL)


@route("/tasks/{task_id}/cancel", "POST")
async def task_cancel(request: Request, ctx: Ctx) -> Response:
    tid = path_id(request, "task_id")
    require(ctx.p, NEEDS["task_cancel"])
    reason = ctx.form.get("reason", "").strip()
    await api_tasks.cancel_task(ctx.rt, tid, ctx.p, CancelIn(reason=reason))
    return see_other(f"/tasks/{tid}")


# -- jobs -------------------------------------------------------------------------------


def _progress(job: dict[str, Any]) -> dict[str, Any]:
    job["finished"] = sum(n for s, n in job["counts"].items() if s in _FINAL)
    job["ended"] = job["state"] in _ENDED
    job["can_end"] = job["state"] in (JobState.PENDING, JobState.RUNNING)
    return job


@route("/jobs")
async def jobs_page(request: Request, ctx: Ctx) -> Response:
    found = await read(ctx.rt, lambda c: jobs.list_jobs(c, ctx.p, DASHBOARD_ROWS))
    rows = [_progress(j) for j in found]
    if request.headers.get("hx-request"):  # the refresh of the table alone
        return _fragment(ctx, "jobs_table.html", rows=rows, poll=DASHBOARD_POLL_EVERY)
    return await _show(ctx, "jobs.html", rows=rows, poll=DASHBOARD_POLL_EVERY)


@route("/jobs/{job_id}")
async def job_page(request: Request, ctx: Ctx) -> Response:
    jid = path_id(request, "job_id")
    job = _progress(await read(ctx.rt, lambda c: jobs.get_job(c, ctx.p, jid)))
    values: dict[str, Any] = {"job": job, "poll": DASHBOARD_POLL_EVERY}
    if request.headers.get("hx-request"):
        return _fragment(ctx, "job_live.html", **values)
    return await _show(ctx, "job.html", **values)


@route("/jobs/{job_id}/terminate", "POST")
async def job_terminate(request: Request, ctx: Ctx) -> Response:
    jid = path_id(request, "job_id")
    require(ctx.p, NEEDS["job_terminate"])
    body = api_jobs.TerminateIn(reason=ctx.form.get("reason", "").strip(), wait=None)
    await api_jobs.terminate_job(ctx.rt, jid, ctx.p, body)
    return see_other(f"/jobs/{jid}")


# -- schedules and maintenance windows --------------------------------------------------


@route("/schedules")
async def schedules_page(request: Request, ctx: Ctx) -> Response:
    rows = await read(ctx.rt, lambda c: schedules.list_schedules(c, ctx.p))
    windows = await read(ctx.rt, lambda c: lc.list_windows(c, ctx.p, ctx.rt.now()))
    return await _show(ctx, "schedules.html", schedules=rows, windows=windows)


@route("/schedules/{schedule_id}/cancel", "POST")
async def schedule_cancel(request: Request, ctx: Ctx) -> Response:
    sid = path_id(request, "schedule_id")
    require(ctx.p, NEEDS["schedule_cancel"])
    await api_schedules.cancel_schedule(ctx.rt, sid, ctx.p)
    return see_other("/schedules")


@route("/groups/{name}/window", "POST")
async def window_set(request: Request, ctx: Ctx) -> Response:
    name = str(request.path_params["name"])
    require(ctx.p, NEEDS["window_set"])
    try:
        body = api_groups.WindowIn(
            window=ctx.form.get("window", "").strip(),
            utc_offset=ctx.form.get("utc_offset", "").strip() or "+00:00",
        )
    except ValidationError as exc:
        raise ApiError(400, f"invalid form: {exc}") from None
    await api_groups.set_window(ctx.rt, name, body, ctx.p)
    return see_other("/schedules")


@route("/groups/{name}/window/clear", "POST")
async def window_clear(request: Request, ctx: Ctx) -> Response:
    name = str(request.path_params["name"])
    require(ctx.p, NEEDS["window_clear"])
    await api_groups.clear_window(ctx.rt, name, ctx.p)
    return see_other("/schedules")


# -- relays -----------------------------------------------------------------------------


@route("/relays")
async def relays_page(request: Request, ctx: Ctx) -> Response:
    rows = await read(ctx.rt, lambda c: relays.list_relays(c, ctx.p))
    return await _show(ctx, "relays.html", relays=[relays.live(ctx.rt.fleet, r) for r in rows])
