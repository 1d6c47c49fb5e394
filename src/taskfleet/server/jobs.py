"""Jobs (SPEC 6, issue 12): create, terminate, the termination deadline, read.

Contract: a job is a request of type ``job`` (``domain.jobs.JOB``) plus its ``jobs``
row, created by ``requests.create_request`` in one writer transaction (so a
schedule's run and a re-run create the row too); its id is the request's id.
Every function takes an open connection and the caller's tenant and touches only
that tenant's rows; those that write run in the single writer.

* :func:`terminate`: activities not delivered yet (Queued, Scheduled, Waiting,
  Blocked) are Canceled at once ("job terminated before this computer started",
  with who and why); each In Progress one gets a signed ``terminate`` order in its
  computer's outbox (``orders.terminate_body``) and stays In Progress until the
  agent's result says how it ended. The job records who, when, why and the
  deadline (``settings.JOB_TERMINATE_WAIT``, or the call's ``wait``); a job run by
  a schedule cancels the schedule, so no later run starts. Terminating again
  changes nothing and sends nothing (an audit entry says it was already
  terminating); a finished job is a 409 naming its state. Audited ``job.terminate``.
* :func:`reap_terminations` (the server's periodic reaper): activities of a
  terminating job still In Progress past its deadline are Canceled, "unreachable at
  termination"; a terminating job whose activities are all final gets its
  ``terminated_at`` (the last one's end). Reads derive it before the reaper stores it.
* :func:`send_windows`: computers whose maintenance windows changed (a group's
  window set or cleared, a computer joining or leaving a group) get, for each job
  activity they run (In Progress), a signed ``windows`` order with the whole new list
  (``orders.windows_body``): a job waiting for its window goes by the new one. Those
  not handed out yet get the windows of the moment they are.
* Reads (:func:`list_jobs`, :func:`get_job`) cost one query per table, whatever the
  number of computers; the state is ``domain.jobs.job_state``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.jobs import JOB, job_state, validate_job_spec
from taskfleet.domain.results import result_line
from taskfleet.domain.states import (
    FINAL_STATES,
    ActivityKind,
    Cause,
    State,
    transition,
)
from taskfleet.protocol.exchange import terminate_message, windows_message
from taskfleet.protocol.orders import terminate_body, windows_body
from taskfleet.protocol.signing import Signer
from taskfleet.server import requests
from taskfleet.server.kernel import ApiError, Principal, audit
from taskfleet.server.lifecycle import Options, iso
from taskfleet.server.outbox import Outbox
from taskfleet.settings import JOB_TERMINATE_WAIT, MAX_AHEAD
from taskfleet.store.activities import Change, apply_changes
from taskfleet.store.schema import activities, computers, job_steps, jobs, schedules
from taskfleet.store.schema import requests as requests_t

_CLIENT = ActivityKind.CLIENT
_FINAL = [s.value for s in FINAL_STATES]
NOT_STARTED = (State.QUEUED, State.SCHEDULED, State.WAITING, State.BLOCKED)
NOT_STARTED_LINE = result_line(
    "Pending", "Canceled", "Job terminated before this computer started", None
)
UNREACHABLE = "unreachable at termination"
UNREACHABLE_LINE = result_line("Running", "Canceled", "Unreachable at termination", None)
MAX_REASON_CHARS = 2000


async def create_job(
    conn: AsyncConnection,
    p: Principal,
    now: float,
    *,
    params: dict[str, Any],
    target: str,
    timeout: float | None,
    expires_in: float | None = None,
    options: Options | None = None,
) -> requests.Created:
    """A job on ``target`` (``requests.create_request`` with type job: params completed
    and checked, the policy of every target asked, the ``jobs`` row written)."""
    return await requests.create_request(
        conn,
        p,
        now,
        type=JOB,
        target=target,
        params=params,
        timeout=timeout,
        expires_in=expires_in,
        options=options,
    )


# -- windows changed after hand-out ----------------------------------------------


async def send_windows(
    conn: AsyncConnection,
    now: float,
    seq_of: Callable[[int], int],
    signer: Signer,
    windows_of: Callable[[int], list[dict[str, Any]] | None],
    computer_ids: set[int],
) -> dict[int, int]:
    """Queue a ``windows`` order for every In Progress job activity of ``computer_ids``
    (module docstring); computer id -> the last seq used, for the caller to apply to
    the in-memory fleet after the commit (``runtime.queued_orders``) and to tickle."""
    if not computer_ids:
        return {}
    rows = await conn.execute(
        sa.select(
            activities.c.id,
            activities.c.computer_id,
            activities.c.tenant_id,
            computers.c.generation,
        )
        .join_from(activities, computers, computers.c.id == activities.c.computer_id)
        .where(
            activities.c.computer_id.in_(sorted(computer_ids)),
            activities.c.type == JOB,
            activities.c.state == State.IN_PROGRESS.value,
        )
        .order_by(activities.c.id)
    )
    found = list(rows)
    box = Outbox(seq_of)
    # PostgreSQL: number from the stored counters, locked (server/outbox.py).
    await box.lock(conn, (r.computer_id for r in found))
    for r in found:
        op, cid = r.id, r.computer_id
        body = windows_body(
            computer=cid,
            generation=r.generation,
            op=op,
            windows=windows_of(cid) or [],
            issued_at=now,
        )
        sig = signer.sign(body)
        box.append(cid, r.tenant_id, lambda seq: windows_message(seq, op, body, sig))  # noqa: B023
    await box.write(conn, counters=True)
    return box.last()


# -- terminate -----------------------------------------------------------------


@dataclass
class Terminated:
    job_id: int
    already: bool
    canceled: list[int] = field(default_factory=list)  # activities Canceled at once
    ordered: list[int] = field(default_factory=list)  # activities sent a terminate order
    notify: dict[int, int] = field(default_factory=dict)  # computer id -> last seq appended


async def terminate(
    conn: AsyncConnection,
    p: Principal,
    now: float,
    seq_of: Callable[[int], int],
    signer: Signer,
    job_id: int,
    *,
    reason: str = "",
    wait: float | None = None,
) -> Terminated:
    """Terminate job ``job_id`` (module docstring). ``seq_of(computer_id)`` is the last
    server seq used; the caller applies ``notify`` to the in-memory fleet after the
    commit and tickles those computers."""
    if len(reason) > MAX_REASON_CHARS:
        raise ApiError(400, f"reason is longer than {MAX_REASON_CHARS} characters")
    if wait is not None and not 0 < wait <= MAX_AHEAD:
        raise ApiError(400, "wait must be a number of seconds in (0, 366 days]")
    job = await _job_row(conn, p, job_id)
    rows = list(
        await conn.execute(
            sa.select(
                activities.c.id,
                activities.c.state,
                activities.c.computer_id,
                activities.c.tenant_id,
                computers.c.generation,
            )
            .join_from(
                activities, computers, computers.c.id == activities.c.computer_id, isouter=True
            )
            .where(activities.c.request_id == job_id)
            .order_by(activities.c.id)
        )
    )
    why = reason or "no reason given"
    if job.terminate_at is not None:
        await audit(
            conn,
            p,
            "job.terminate",
            now,
            id=job_id,
            reason=why,
            already=f"already terminating since {iso(job.terminate_at)} "
            f"(by {job.terminate_by}: {job.terminate_reason})",
        )
        return Terminated(job_id, already=True)
    state = job_state([State(r.state) for r in rows], terminate_asked=False)
    if all(State(r.state) in FINAL_STATES for r in rows):
        raise ApiError(
            409, f"job {job_id} has finished ({state.label}): there is nothing to terminate"
        )
    out = Terminated(job_id, already=False)
    changes: list[Change] = []
    box = Outbox(seq_of)
    # PostgreSQL: number from the stored counters, locked (server/outbox.py).
    await box.lock(conn, (r.computer_id for r in rows if r.computer_id is not None))
    for r in rows:
        current = State(r.state)
        if current in NOT_STARTED:
            t = transition(
                _CLIENT,
                current,
                State.CANCELED,
                cause=Cause.ADMIN,
                actor=p.actor,
                at=now,
                reason=f"job terminated before this computer started (by {p.actor}: {why})",
            )
            changes.append(
                Change(r.id, r.tenant_id, t, {"finished_at": now, "result_line": NOT_STARTED_LINE})
            )
            out.canceled.append(r.id)
        elif current is State.IN_PROGRESS:
            op, cid = r.id, r.computer_id
            body = terminate_body(computer=cid, generation=r.generation, op=op)
            sig = signer.sign(body)
            box.append(cid, r.tenant_id, lambda seq: terminate_message(seq, op, body, sig))  # noqa: B023
            out.ordered.append(op)
    await conn.run_sync(apply_changes, changes)
    await box.write(conn, counters=True)
    out.notify = box.last()
    deadline = now + (JOB_TERMINATE_WAIT if wait is None else wait)
    await conn.execute(
        jobs.update()
        .where(jobs.c.request_id == job_id)
        .values(
            terminate_by=p.actor,
            terminate_at=now,
            terminate_reason=why,
            terminate_deadline=deadline,
            # Nothing was running: every computer has stopped already.
            terminated_at=None if out.ordered else now,
        )
    )
    if job.schedule_id is not None:
        await _end_schedule(conn, p, now, job.schedule_id, job_id)
    await audit(
        conn,
        p,
        "job.terminate",
        now,
        id=job_id,
        reason=why,
        state=state.value,
        canceled=len(out.canceled),
        ordered=len(out.ordered),
        deadline=deadline,
    )
    return out


async def _end_schedule(
    conn: AsyncConnection, p: Principal, now: float, sid: int, job_id: int
) -> None:
    """SPEC 6: terminating a scheduled or recurring job cancels its future runs."""
    result = await conn.execute(
        schedules.update()
        .where(schedules.c.id == sid, schedules.c.canceled_at.is_(None))
        .values(canceled_at=now, next_at=None)
    )
    if result.rowcount:
        await audit(conn, p, "schedule.cancel", now, id=sid, reason=f"job {job_id} terminated")


# -- the deadline --------------------------------------------------------------


async def reap_terminations(conn: AsyncConnection, now: float, limit: int = 5000) -> list[int]:
    """The periodic part of termination (module docstring); the activities Canceled."""
    rows = list(
        await conn.execute(
            sa.select(activities.c.id, activities.c.tenant_id)
            .join(jobs, jobs.c.request_id == activities.c.request_id)
            .where(
                jobs.c.terminate_deadline <= now,
                jobs.c.terminated_at.is_(None),
                activities.c.state == State.IN_PROGRESS.value,
            )
            .order_by(activities.c.id)
            .limit(limit)
        )
    )
    changes = [
        Change(
            r.id,
            r.tenant_id,
            transition(
                _CLIENT,
                State.IN_PROGRESS,
                State.CANCELED,
                cause=Cause.TIMEOUT,
                actor="server",
                at=now,
                reason=UNREACHABLE,
            ),
            {"finished_at": now, "result_line": UNREACHABLE_LINE, "deadline_at": None},
        )
        for r in rows
    ]
    await conn.run_sync(apply_changes, changes)
    for job_id, ended in await conn.execute(_stopped_jobs()):
        await conn.execute(
            jobs.update()
            .where(jobs.c.request_id == job_id)
            .values(terminated_at=ended if ended is not None else now)
        )
    return [r.id for r in rows]


def _stopped_jobs() -> sa.Select[Any]:
    """(job id, when its last activity ended) of terminating jobs now all final."""
    open_ = sa.func.sum(sa.case((activities.c.state.notin_(_FINAL), 1), else_=0))
    return (
        sa.select(jobs.c.request_id, sa.func.max(activities.c.finished_at))
        .join(activities, activities.c.request_id == jobs.c.request_id)
        .where(jobs.c.terminate_at.is_not(None), jobs.c.terminated_at.is_(None))
        .group_by(jobs.c.request_id)
        .having(open_ == 0)
    )


# -- reads -----------------------------------------------------------------------


_JOB_COLUMNS = (
    jobs.c.request_id.label("id"),
    jobs.c.name,
    jobs.c.terminate_by,
    jobs.c.terminate_at,
    jobs.c.terminate_reason,
    jobs.c.terminate_deadline,
    jobs.c.terminated_at,
    requests_t.c.target,
    requests_t.c.created_at,
    requests_t.c.created_by,
    requests_t.c.schedule_id,
    requests_t.c.timeout,
    requests_t.c.total,
)


async def _job_row(conn: AsyncConnection, p: Principal, job_id: int, *extra: Any) -> Any:
    row = (
        await conn.execute(
            sa.select(*_JOB_COLUMNS, *extra)
            .join(requests_t, requests_t.c.id == jobs.c.request_id)
            .where(jobs.c.request_id == job_id, jobs.c.tenant_id == p.tenant_id)
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no job {job_id}")
    return row


def _summary(row: Any, counts: dict[State, int], last_end: float | None) -> dict[str, Any]:
    states = [s for s, n in counts.items() if n]
    asked = row.terminate_at is not None
    state = job_state(states, terminate_asked=asked)
    terminate = None
    if asked:
        ended = row.terminated_at
        if ended is None and state.value == "terminated":
            ended = last_end  # every computer stopped; the reaper has not stored it yet
        terminate = {
            "by": row.terminate_by,
            "at": row.terminate_at,
            "reason": row.terminate_reason,
            "deadline": row.terminate_deadline,
            "terminated_at": ended,
        }
    return {
        "id": row.id,
        "name": row.name,
        "state": state.value,
        "target": row.target,
        "created_at": row.created_at,
        "created_by": row.created_by,
        "schedule_id": row.schedule_id,
        "timeout": row.timeout,
        "total": row.total,
        "counts": {s.value: n for s, n in sorted(counts.items()) if n},
        "terminate": terminate,
    }


async def list_jobs(conn: AsyncConnection, p: Principal, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` jobs: one query for the page, one for all their counts."""
    rows = (
        await conn.execute(
            sa.select(*_JOB_COLUMNS)
            .join(requests_t, requests_t.c.id == jobs.c.request_id)
            .where(jobs.c.tenant_id == p.tenant_id)
            .order_by(jobs.c.request_id.desc())
            .limit(limit)
        )
    ).all()
    counts: dict[int, dict[State, int]] = {r.id: {} for r in rows}
    ends: dict[int, float | None] = {}
    if rows:
        for c in await conn.execute(
            sa.select(
                activities.c.request_id,
                activities.c.state,
                sa.func.count().label("n"),
                sa.func.max(activities.c.finished_at).label("end"),
            )
            .where(activities.c.request_id.in_(list(counts)))
            .group_by(activities.c.request_id, activities.c.state)
        ):
            counts[c.request_id][State(c.state)] = c.n
            if c.end is not None:
                ends[c.request_id] = max(ends.get(c.request_id) or 0.0, c.end)
    return [_summary(r, counts[r.id], ends.get(r.id)) for r in rows]


async def get_job(conn: AsyncConnection, p: Principal, job_id: int) -> dict[str, Any]:
    """One job: its summary, phases and items, and per computer its activity, its
    current step and every step as reported; while Terminating, whom it waits for."""
    row = await _job_row(conn, p, job_id, requests_t.c.params)
    spec = validate_job_spec(row.params)
    acts = list(
        await conn.execute(
            sa.select(
                activities.c.id,
                activities.c.computer_id,
                activities.c.state,
                activities.c.reason,
                activities.c.result_line,
                activities.c.delivered_at,
                activities.c.finished_at,
                computers.c.hostname,
            )
            .join_from(
                activities, computers, computers.c.id == activities.c.computer_id, isouter=True
            )
            .where(activities.c.request_id == job_id)
            .order_by(activities.c.computer_id)
        )
    )
    steps: dict[int, list[dict[str, Any]]] = {a.id: [] for a in acts}
    for s in await conn.execute(
        sa.select(
            job_steps.c.activity_id,
            job_steps.c.phase,
            job_steps.c.item,
            job_steps.c.status,
            job_steps.c.detail,
            job_steps.c.at,
        )
        .where(job_steps.c.request_id == job_id)
        .order_by(job_steps.c.activity_id, job_steps.c.at)
    ):
        if s.activity_id in steps and 0 <= s.item < len(spec.items):
            steps[s.activity_id].append(
                {
                    "phase": s.phase,
                    "item": s.item,
                    "item_name": spec.items[s.item].name,
                    "status": s.status,
                    "detail": s.detail,
                    "at": s.at,
                }
            )
    counts: dict[State, int] = {}
    for a in acts:
        counts[State(a.state)] = counts.get(State(a.state), 0) + 1
    ends = [a.finished_at for a in acts if a.finished_at is not None]
    out = _summary(row, counts, max(ends) if ends else None)
    out["phases"] = list(spec.phases)
    out["items"] = [
        {
            "index": i,
            "name": it.name,
            "content": [{"sha256": c.sha256, "size": c.size, "name": c.name} for c in it.content],
        }
        for i, it in enumerate(spec.items)
    ]
    out["computers"] = [_computer(a, steps[a.id]) for a in acts]
    out["waiting_for"] = (
        [
            {"computer_id": a.computer_id, "hostname": a.hostname}
            for a in acts
            if State(a.state) not in FINAL_STATES
        ]
        if out["state"] == "terminating"
        else []
    )
    return out


def _computer(a: Any, steps: list[dict[str, Any]]) -> dict[str, Any]:
    running = [s for s in steps if s["status"] == "started"]
    current = running[-1] if running else (steps[-1] if steps else None)
    return {
        "computer_id": a.computer_id,
        "hostname": a.hostname,
        "activity_id": a.id,
        "state": a.state,
        "reason": a.reason,
        "result_line": a.result_line,
        "delivered_at": a.delivered_at,
        "finished_at": a.finished_at,
        "phase": current["phase"] if current else None,
        "step": current,
        "steps": steps,
    }
