"""Jobs: create, list, show, terminate (``server/jobs.py``; docs/jobs.md).

A job is a request of type ``job``: ``/api/v1/requests/{id}`` shows it as a request
too, and a recurring job is a schedule (``POST /api/v1/schedules`` with a request
of type ``job``).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

from taskfleet.domain.jobs import DEFAULT_PHASES
from taskfleet.server import jobs, metrics
from taskfleet.server import lifecycle as lc
from taskfleet.server.api.deps import (
    Duration,
    EpochTime,
    Finite,
    Id,
    Operator,
    Rt,
    Viewer,
    read,
    router_for,
)
from taskfleet.server.runtime import queued_orders, wake_targets

log = logging.getLogger("taskfleet.server")
router = router_for()


class JobIn(BaseModel):
    name: str = Field(..., description="the job's name (1..128 characters)")
    target: str = Field(..., description="all | group:NAME | tag:KEY=VALUE | computer:ID[,ID]")
    phases: list[str] = Field(
        list(DEFAULT_PHASES),
        description="in order: analyze, download, then one of install|uninstall|remediate",
    )
    items: list[dict[str, Any]] = Field(
        ...,
        description="each: name, detect (a command), content [{sha256, size?, name?}], "
        "install|uninstall|remediate (a command: argv or script, env, cwd, user, "
        "output_cap, timeout); size and name default to the stored content's",
    )
    timeout: Finite | None = Field(
        None,
        description="seconds the server waits between two reports of a computer before it "
        "declares it lost; at least the longest step's timeout (the default)",
    )
    expires_in: Finite | None = Field(
        None, description="seconds: computers that have not started by then are Canceled"
    )
    at: EpochTime | None = Field(None, description="epoch seconds: Scheduled, not earlier than")
    after: dict[str, Any] | None = Field(None, description="as for a request")
    approval: dict[str, Any] | None = Field(None, description="as for a request")
    rollout: dict[str, Any] | None = Field(None, description="as for a request")


class TerminateIn(BaseModel):
    reason: str = Field("", description="why (kept with who and when)")
    wait: Duration | None = Field(
        None,
        description="seconds to wait for computers still running it before they are "
        "recorded unreachable at termination (default: the server's JOB_TERMINATE_WAIT)",
    )


@router.post("/api/v1/jobs", status_code=201, tags=["jobs"])
async def create_job(rt: Rt, body: JobIn, p: Operator) -> dict[str, Any]:
    opts = lc.parse_options(
        rt.now(), at=body.at, after=body.after, approval=body.approval, rollout=body.rollout
    )
    params = {"name": body.name, "phases": body.phases, "items": body.items}
    created = await rt.writer.run(
        lambda c: jobs.create_job(
            c,
            p,
            rt.now(),
            params=params,
            target=body.target,
            timeout=body.timeout,
            expires_in=body.expires_in,
            options=opts,
        ),
        after=lambda res: wake_targets(rt, res),
    )
    metrics.REQUESTS.inc()
    job_id = int(created.request["id"])
    log.info("job %d created: %r on %s", job_id, body.name, created.request["target"])
    return await read(rt, lambda c: jobs.get_job(c, p, job_id))


@router.get("/api/v1/jobs", tags=["jobs"])
async def list_jobs(rt: Rt, p: Viewer, limit: int = 50) -> list[dict[str, Any]]:
    return await read(rt, lambda c: jobs.list_jobs(c, p, min(max(limit, 1), 1000)))


@router.get("/api/v1/jobs/{job_id}", tags=["jobs"])
async def get_job(rt: Rt, job_id: Id, p: Viewer) -> dict[str, Any]:
    return await read(rt, lambda c: jobs.get_job(c, p, job_id))


@router.post("/api/v1/jobs/{job_id}/terminate", tags=["jobs"])
async def terminate_job(
    rt: Rt, job_id: Id, p: Operator, body: TerminateIn | None = None
) -> dict[str, Any]:
    """Terminate a job (SPEC 6): 200 with the job (Terminating or Terminated) and what
    this call did; again: the same, nothing sent; a finished job: 409."""
    reason = body.reason if body else ""
    wait = body.wait if body else None

    def after(res: jobs.Terminated) -> None:
        queued_orders(rt, res.notify)

    async def fn(conn: Any) -> jobs.Terminated:
        def seq_of(cid: int) -> int:
            cs = rt.fleet.get(cid)
            return cs.out_seq if cs is not None else 0

        return await jobs.terminate(
            conn, p, rt.now(), seq_of, rt.signer, job_id, reason=reason, wait=wait
        )

    res = await rt.writer.run(fn, after=after)
    if not res.already:
        log.info(
            "job %d terminated by %s: %d canceled, %d told to stop",
            job_id,
            p.actor,
            len(res.canceled),
            len(res.ordered),
        )
    out = await read(rt, lambda c: jobs.get_job(c, p, job_id))
    out["terminate_call"] = {
        "already_terminating": res.already,
        "canceled": res.canceled,
        "ordered": res.ordered,
    }
    return out
