"""Running server tasks: a worker claims what it was delivered and reports outcomes.

Contract: ``claim_many`` is the guard that makes a redelivered task never run twice at
the same time: only a Queued, unclaimed task can be claimed, by one worker.
``complete_many`` moves a claimed task to its outcome, records a report it can no longer
act on without moving the state, and releases a held (canceled) task with what really
happened.
Both are synchronous (a ``Connection``): the embedded worker's claim/result transaction
runs whole as one function on the writer (``Writer.run_sync``: on SQLite one hand-over to
the database thread per transaction, not several per statement); other async callers
use ``await conn.run_sync(claim_many, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from taskfleet.domain.states import Cause, State, transition
from taskfleet.store.activities import Change, apply_changes, insert_events
from taskfleet.store.bulk import id_in, update_rows
from taskfleet.store.schema import activities, server_tasks
from taskfleet.store.tasks import SERVER
from taskfleet.store.tasks.stops import canceled_note, stop_pending


@dataclass(frozen=True)
class Claimed:
    id: int
    type: str
    params: dict[str, Any]
    tenant: int | None
    group: str | None


def claim_many(
    conn: sa.Connection, task_ids: list[int], worker_id: str, now: float, *, pg: bool
) -> dict[int, Claimed | str]:
    """Take dispatched tasks for ``worker_id``, or say per task why not (already
    claimed, canceled...). The worker batches the deliveries that arrive together."""
    q = (
        sa.select(
            activities.c.id,
            activities.c.tenant_id,
            activities.c.state,
            server_tasks.c.type,
            server_tasks.c.params,
            server_tasks.c.scope_tenant,
            server_tasks.c.group_name,
            server_tasks.c.claimed_by,
        )
        .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
        .where(id_in(conn, activities.c.id, task_ids), activities.c.kind == SERVER.value)
    )
    if pg:
        q = q.with_for_update(of=activities)
    rows = {r.id: r for r in conn.execute(q)}
    out: dict[int, Claimed | str] = {}
    changes: list[Change] = []
    for tid in task_ids:
        row = rows.get(tid)
        if row is None:
            out[tid] = "no such task"
        elif row.claimed_by is not None or tid in out:
            out.setdefault(tid, f"already claimed by worker {row.claimed_by}")
        elif row.state != State.QUEUED.value:
            out[tid] = f"it is {State(row.state).label}"
        else:
            t = transition(
                SERVER,
                State.QUEUED,
                State.IN_PROGRESS,
                cause=Cause.DELIVERED,
                actor=f"worker:{worker_id}",
                at=now,
                reason=f"taken by worker {worker_id}",
            )
            changes.append(Change(tid, row.tenant_id, t, {"delivered_at": now}))
            out[tid] = Claimed(tid, row.type, row.params, row.scope_tenant, row.group_name)
    if changes:
        apply_changes(conn, changes)
        # One statement for the batch: the same values for every claimed row.
        conn.execute(
            server_tasks.update()
            .where(id_in(conn, server_tasks.c.activity_id, [ch.activity_id for ch in changes]))
            .values(claimed_by=worker_id, claimed_at=now)
        )
    return out


@dataclass(frozen=True)
class Outcome:
    task_id: int
    ok: bool
    return_code: int | None
    output: str
    result_line: str
    command_line: str | None
    stopped: bool = False  # the worker stopped the handler because the task was canceled


def _stop_text(o: Outcome) -> str:
    if o.stopped:
        return f"canceled; stopped before completion by its worker ({o.result_line})"
    status = "Succeeded" if o.ok else "Failed"
    code = "" if o.return_code is None else f", return code {o.return_code}"
    return (
        f"canceled, but the handler was not stopped: it finished on its own "
        f"({status}{code}: {o.result_line})"
    )


def _confirm_stops(
    conn: sa.Connection, worker_id: str, now: float, confirmed: list[tuple[Outcome, int]]
) -> None:
    """Held tasks whose worker reported: what really happened is recorded (result,
    output, history); the state stays Canceled and the slot is free."""
    for o, _ in confirmed:
        text = _stop_text(o)
        conn.execute(
            activities.update()
            .where(activities.c.id == o.task_id)
            .values(
                reason=text,
                result_line=o.result_line,
                exit_code=o.return_code,
                stdout=o.output,
                updated_at=now,
                agent_report={
                    "worker": worker_id,
                    "ok": o.ok,
                    "stopped": o.stopped,
                    "return_code": o.return_code,
                    "result_line": o.result_line,
                    "received_at": now,
                },
            )
        )
    conn.execute(
        server_tasks.update()
        .where(id_in(conn, server_tasks.c.activity_id, [o.task_id for o, _ in confirmed]))
        .values(stopped_at=now)
    )
    insert_events(
        conn,
        [
            canceled_note(
                o.task_id, tid, Cause.AGENT_REPORT, f"worker:{worker_id}", now, _stop_text(o)
            )
            for o, tid in confirmed
        ],
    )


def complete_many(
    conn: sa.Connection, worker_id: str, now: float, outcomes: list[Outcome]
) -> dict[int, bool]:
    """Record workers' results; True where the state moved, False where the task was
    no longer the worker's to finish (canceled meanwhile, or failed as lost): then the
    state stays and what happened is recorded on it. A held task (canceled while it
    ran) is released by its worker's report."""
    ids = [o.task_id for o in outcomes]
    rows = {
        r.id: r
        for r in conn.execute(
            sa.select(
                activities.c.id,
                activities.c.tenant_id,
                activities.c.state,
                server_tasks.c.claimed_by,
                stop_pending().label("held"),
            )
            .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
            .where(id_in(conn, activities.c.id, ids))
        )
    }
    changes: list[Change] = []
    reports: list[dict[str, Any]] = []
    confirmed: list[tuple[Outcome, int]] = []
    done: dict[int, bool] = {}
    for o in outcomes:
        row = rows.get(o.task_id)
        if (
            row is not None
            and row.claimed_by == worker_id
            and row.state == State.CANCELED.value
            and row.held
        ):
            confirmed.append((o, row.tenant_id))
            done[o.task_id] = False
            continue
        if row is None or row.claimed_by != worker_id or row.state != State.IN_PROGRESS.value:
            reports.append(
                {
                    "b_id": o.task_id,
                    "agent_report": {
                        "worker": worker_id,
                        "ok": o.ok,
                        "return_code": o.return_code,
                        "result_line": o.result_line,
                        "received_at": now,
                    },
                }
            )
            done[o.task_id] = False
            continue
        target = State.SUCCEEDED if o.ok else State.FAILED
        t = transition(
            SERVER,
            State.IN_PROGRESS,
            target,
            cause=Cause.AGENT_REPORT,
            actor=f"worker:{worker_id}",
            at=now,
            reason=o.result_line,
        )
        changes.append(
            Change(
                o.task_id,
                row.tenant_id,
                t,
                {
                    "exit_code": o.return_code,
                    "stdout": o.output,
                    "result_line": o.result_line,
                    "finished_at": now,
                },
            )
        )
        done[o.task_id] = True
    apply_changes(conn, changes)
    if confirmed:
        _confirm_stops(conn, worker_id, now, confirmed)
    update_rows(conn, activities, reports, {"b_id": "id"})
    lines = [
        {"b_id": o.task_id, "command_line": o.command_line} for o in outcomes if o.command_line
    ]
    update_rows(conn, server_tasks, lines, {"b_id": "activity_id"})
    return done
