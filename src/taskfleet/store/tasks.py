"""Server tasks in the store (SPEC 4): submit, dispatch, claim, complete, heartbeats, reaping.

Contract: every function runs in the caller's transaction and moves states only
through ``domain.states.transition`` and ``store.activities.apply_changes``.
``claim_many`` is the guard that makes a redelivered task never run twice at
the same time: only a Queued, unclaimed task can be claimed, by one worker.

A task canceled while In Progress is Canceled at once and *held*
(``stop_requested_at`` set, ``stopped_at`` not): it still counts against its
type's limits until its worker's report arrives (``complete_many`` records it
as what really happened: stopped, or finished on its own; the state stays
Canceled) or its worker is gone (``release_lost_stops``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.states import (
    FINAL_STATES,
    ActivityKind,
    Cause,
    IllegalTransition,
    State,
    Transition,
    creation,
    transition,
)
from taskfleet.protocol.exchange import canonical
from taskfleet.store.activities import Change, apply_changes, insert_activities, insert_events
from taskfleet.store.schema import activities, server_tasks, workers

SERVER = ActivityKind.SERVER
HEARTBEAT_LOST = "worker heartbeat lost"
# SPEC 4.2: a submission equal to a task in any of these states (and not yet
# dispatched) is a duplicate. "Submitted" covers work held for a time, for
# another task or for an approval, not only work on its way to the queue.
AWAITING_DISPATCH = [s.value for s in (State.QUEUED, State.SCHEDULED, State.WAITING, State.BLOCKED)]


def dedupe_key(type_: str, tenant: int | None, group: str | None, params: dict[str, Any]) -> str:
    text = canonical({"type": type_, "tenant": tenant, "group": group, "params": params})
    return hashlib.sha256(text.encode()).hexdigest()


def label(type_: str, task_id: int) -> str:
    """SPEC 4.7: how logs name a task."""
    return f"{type_}[{task_id}]"


@dataclass(frozen=True)
class Submitted:
    id: int
    duplicate_of: int | None  # set: nothing was queued, this is the existing task
    state: State


async def submit(
    conn: AsyncConnection,
    *,
    owner_tenant: int,
    actor: str,
    type_: str,
    scope_tenant: int | None,
    group: str | None,
    params: dict[str, Any],
    not_before: float | None,
    now: float,
    retry_of: int | None = None,
    hold: tuple[State, str, dict[str, Any]] | None = None,  # Blocked|Waiting, why, details
) -> Submitted:
    key = dedupe_key(type_, scope_tenant, group, params)
    query = (
        sa.select(server_tasks.c.activity_id, activities.c.state)
        .join(activities, activities.c.id == server_tasks.c.activity_id)
        .where(
            server_tasks.c.dedupe_key == key,
            server_tasks.c.tenant_id == owner_tenant,
            server_tasks.c.dispatched_at.is_(None),
            activities.c.state.in_(AWAITING_DISPATCH),
        )
        .order_by(server_tasks.c.activity_id)
        .limit(1)
    )
    awaited = (hold[2].get("after") or {}).get("task") if hold is not None else None
    if awaited is not None:
        # "Run it again after that one" is never a duplicate of that one.
        query = query.where(server_tasks.c.activity_id != awaited)
    existing = (await conn.execute(query)).first()
    if existing is not None and retry_of is None:
        return Submitted(existing.activity_id, existing.activity_id, State(existing.state))
    state = State.SCHEDULED if not_before is not None and not_before > now else State.QUEUED
    if hold is not None:
        state = hold[0]
    task_id = (
        await conn.execute(
            activities.insert()
            .values(
                tenant_id=owner_tenant,
                kind=SERVER.value,
                type=type_,
                state=state.value,
                created_at=now,
                updated_at=now,
                reason=hold[1] if hold else "" if retry_of is None else f"retry of {retry_of}",
            )
            .returning(activities.c.id)
        )
    ).scalar_one()
    await conn.execute(
        server_tasks.insert().values(
            activity_id=task_id,
            tenant_id=owner_tenant,
            type=type_,
            scope_tenant=scope_tenant,
            group_name=group,
            params=params,
            dedupe_key=key,
            not_before=not_before,
            retry_of=retry_of,
            submitted_by=actor,
            hold=hold[2] if hold else None,
        )
    )
    reason = "submitted" if retry_of is None else f"retry of {retry_of} (retry-safe type)"
    if hold is not None:
        reason = f"submitted; {hold[1]}"
    await insert_events(
        conn, [(task_id, owner_tenant, creation(state, actor=actor, at=now, reason=reason))]
    )
    return Submitted(task_id, None, state)


@dataclass(frozen=True)
class NewTask:
    type: str
    scope_tenant: int | None
    group: str | None
    params: dict[str, Any]
    not_before: float | None


async def submit_many(
    conn: AsyncConnection, *, owner_tenant: int, actor: str, items: list[NewTask], now: float
) -> list[Submitted]:
    """``submit`` for many tasks with a handful of statements (a batch from the API).

    A task equal to one not yet dispatched, or to an earlier one in the same
    batch, is a duplicate and names that task."""
    keys = [dedupe_key(t.type, t.scope_tenant, t.group, t.params) for t in items]
    known: dict[str, tuple[int, State]] = {}
    for start in range(0, len(keys), 500):
        rows = await conn.execute(
            sa.select(server_tasks.c.dedupe_key, server_tasks.c.activity_id, activities.c.state)
            .join(activities, activities.c.id == server_tasks.c.activity_id)
            .where(
                server_tasks.c.dedupe_key.in_(set(keys[start : start + 500])),
                server_tasks.c.tenant_id == owner_tenant,
                server_tasks.c.dispatched_at.is_(None),
                activities.c.state.in_(AWAITING_DISPATCH),
            )
            .order_by(server_tasks.c.activity_id)
        )
        for key, tid, state in rows:
            known.setdefault(key, (tid, State(state)))
    fresh: list[tuple[int, NewTask, str, State]] = []
    for i, (t, key) in enumerate(zip(items, keys, strict=True)):
        if key not in known:
            state = (
                State.SCHEDULED
                if t.not_before is not None and t.not_before > now
                else (State.QUEUED)
            )
            known[key] = (-1 - i, state)  # placeholder until the id exists
            fresh.append((i, t, key, state))
    ids = await insert_activities(
        conn,
        [
            {
                "tenant_id": owner_tenant,
                "kind": SERVER.value,
                "type": t.type,
                "state": state.value,
                "created_at": now,
                "updated_at": now,
                "reason": "",
            }
            for _, t, _, state in fresh
        ],
    )
    new_id: dict[int, int] = {}
    for (i, _t, key, state), tid in zip(fresh, ids, strict=True):
        new_id[i] = tid
        known[key] = (tid, state)
    if fresh:
        await conn.execute(
            server_tasks.insert(),
            [
                {
                    "activity_id": new_id[i],
                    "tenant_id": owner_tenant,
                    "type": t.type,
                    "scope_tenant": t.scope_tenant,
                    "group_name": t.group,
                    "params": t.params,
                    "dedupe_key": key,
                    "not_before": t.not_before,
                    "retry_of": None,
                    "submitted_by": actor,
                }
                for i, t, key, _ in fresh
            ],
        )
        await insert_events(
            conn,
            [
                (new_id[i], owner_tenant, creation(state, actor=actor, at=now, reason="submitted"))
                for i, _, _, state in fresh
            ],
        )
    out = []
    for i, key in enumerate(keys):
        if i in new_id:
            out.append(Submitted(new_id[i], None, known[key][1]))
        else:
            tid, state = known[key]
            out.append(Submitted(tid, tid, state))
    return out


@dataclass(frozen=True)
class OpenTask:
    id: int
    type: str
    tenant: int | None
    group: str | None
    not_before: float | None
    state: State
    dispatched: bool


def _held() -> sa.ColumnElement[bool]:
    """Canceled while running and its worker has not confirmed the stop yet."""
    return sa.and_(
        server_tasks.c.stop_requested_at.is_not(None), server_tasks.c.stopped_at.is_(None)
    )


async def load_open(conn: AsyncConnection) -> list[OpenTask]:
    """Every task not finished (pending ones, those dispatched or running), and every
    canceled task still held by its worker (it counts as running)."""
    rows = await conn.execute(
        sa.select(
            activities.c.id,
            activities.c.state,
            server_tasks.c.type,
            server_tasks.c.scope_tenant,
            server_tasks.c.group_name,
            server_tasks.c.not_before,
            server_tasks.c.dispatched_at,
        )
        .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
        .where(activities.c.kind == SERVER.value)
        .where(sa.or_(activities.c.state.notin_([s.value for s in FINAL_STATES]), _held()))
        .order_by(activities.c.id)
    )
    return [
        OpenTask(
            r.id,
            r.type,
            r.scope_tenant,
            r.group_name,
            r.not_before,
            State(r.state),
            r.dispatched_at is not None,
        )
        for r in rows
    ]


async def mark_dispatched(conn: AsyncConnection, ids: list[int], now: float) -> None:
    """Persist "dispatched" before the queue sees it; a due Scheduled task becomes Queued."""
    if not ids:
        return
    rows = (
        await conn.execute(
            sa.select(activities.c.id, activities.c.tenant_id, activities.c.state).where(
                activities.c.id.in_(ids)
            )
        )
    ).all()
    changes = [
        Change(
            r.id,
            r.tenant_id,
            transition(
                SERVER,
                State.SCHEDULED,
                State.QUEUED,
                cause=Cause.SYSTEM,
                actor="scheduler",
                at=now,
                reason="its not-before time came",
            ),
        )
        for r in rows
        if r.state == State.SCHEDULED.value
    ]
    await apply_changes(conn, changes)
    await conn.execute(
        server_tasks.update().where(server_tasks.c.activity_id.in_(ids)).values(dispatched_at=now)
    )


async def undispatch(conn: AsyncConnection, ids: list[int]) -> list[int]:
    """The queue did not confirm them: those not yet claimed are pending again (nothing
    lost). Returns them; the others already reached a worker through the queue."""
    unclaimed = list(
        (
            await conn.execute(
                sa.select(server_tasks.c.activity_id).where(
                    server_tasks.c.activity_id.in_(ids), server_tasks.c.claimed_by.is_(None)
                )
            )
        ).scalars()
    )
    if unclaimed:
        await conn.execute(
            server_tasks.update()
            .where(server_tasks.c.activity_id.in_(unclaimed))
            .values(dispatched_at=None)
        )
    return unclaimed


@dataclass(frozen=True)
class Claimed:
    id: int
    type: str
    params: dict[str, Any]
    tenant: int | None
    group: str | None


@dataclass(frozen=True)
class Canceled:
    previous: State
    worker: str | None  # set: it was running there, and is held until that worker stops it


async def cancel(
    conn: AsyncConnection, tenant_id: int, task_id: int, actor: str, now: float, reason: str
) -> Canceled:
    q = (
        sa.select(activities.c.state, server_tasks.c.claimed_by)
        .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
        .where(
            activities.c.id == task_id,
            activities.c.tenant_id == tenant_id,
            activities.c.kind == SERVER.value,
        )
    )
    if conn.dialect.name == "postgresql":
        q = q.with_for_update(of=activities)  # a remote worker's report waits for this
    row = (await conn.execute(q)).first()
    if row is None:
        raise LookupError(f"no task {task_id}")
    why = reason or "canceled by administrator"
    t = transition(
        SERVER,
        State(row.state),
        State.CANCELED,
        cause=Cause.ADMIN,
        actor=actor,
        at=now,
        reason=why,
    )
    running = State(row.state) is State.IN_PROGRESS
    values: dict[str, Any] = {"finished_at": now}
    if running:
        # SPEC 2.1 "stopped before completion": the worker is told to stop it, and
        # until it says it did, the task keeps its slot (seed 003's limit).
        values["reason"] = (
            f"{why}; stop requested from worker {row.claimed_by}: "
            "its slot stays held until the worker confirms the handler stopped"
        )
    await apply_changes(conn, [Change(task_id, tenant_id, t, values)])
    if running:
        await conn.execute(
            server_tasks.update()
            .where(server_tasks.c.activity_id == task_id)
            .values(stop_requested_at=now)
        )
    return Canceled(State(row.state), row.claimed_by if running else None)


def _note(
    task_id: int, tenant_id: int, cause: Cause, actor: str, now: float, reason: str
) -> tuple[int, int, Transition]:
    """A history entry for a Canceled task that records what happened after the cancel
    (no state change: Canceled is final for a server task)."""
    return task_id, tenant_id, Transition(State.CANCELED, State.CANCELED, cause, actor, now, reason)


async def note_stop(
    conn: AsyncConnection, task_id: int, worker_id: str, now: float, note: str
) -> bool:
    """The worker says a held task's handler goes on (it cannot be interrupted)."""
    row = (
        await conn.execute(
            sa.select(activities.c.tenant_id)
            .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
            .where(
                activities.c.id == task_id,
                activities.c.state == State.CANCELED.value,
                server_tasks.c.claimed_by == worker_id,
                _held(),
            )
        )
    ).first()
    if row is None:
        return False
    await conn.execute(
        activities.update().where(activities.c.id == task_id).values(reason=note, updated_at=now)
    )
    await insert_events(
        conn, [_note(task_id, row.tenant_id, Cause.AGENT_REPORT, f"worker:{worker_id}", now, note)]
    )
    return True


async def stops_for(conn: AsyncConnection, worker_id: str, ids: list[int]) -> list[int]:
    """Which of ``ids`` (the tasks ``worker_id`` runs) are held: canceled, not yet
    confirmed stopped."""
    if not ids:
        return []
    return list(
        (
            await conn.execute(
                sa.select(server_tasks.c.activity_id).where(
                    server_tasks.c.activity_id.in_(ids),
                    server_tasks.c.claimed_by == worker_id,
                    _held(),
                )
            )
        ).scalars()
    )


@dataclass(frozen=True)
class Released:
    task_id: int
    type: str
    worker_id: str


async def release_lost_stops(conn: AsyncConnection, now: float) -> list[Released]:
    """Held tasks whose worker is gone (heartbeat lost, or stopped): their handler died
    with it, so the slot is free. Run after ``reap_workers`` in the same transaction."""
    rows = (
        await conn.execute(
            sa.select(
                activities.c.id,
                activities.c.tenant_id,
                server_tasks.c.type,
                server_tasks.c.claimed_by,
                workers.c.status,
            )
            .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
            .join(workers, workers.c.id == server_tasks.c.claimed_by)
            .where(_held(), workers.c.status.in_(["lost", "stopped"]))
        )
    ).all()
    if not rows:
        return []
    notes = []
    for r in rows:
        why = (
            HEARTBEAT_LOST
            if r.status == "lost"
            else "the worker stopped (its handlers end with it)"
        )
        text = f"canceled; {why} before it confirmed the stop: slot freed"
        notes.append((r.id, text))
        await conn.execute(
            activities.update()
            .where(activities.c.id == r.id)
            .values(reason=text, result_line=text, updated_at=now)
        )
    await conn.execute(
        server_tasks.update()
        .where(server_tasks.c.activity_id.in_([r.id for r in rows]))
        .values(stopped_at=now)
    )
    tenants = {r.id: r.tenant_id for r in rows}
    await insert_events(
        conn, [_note(tid, tenants[tid], Cause.TIMEOUT, "reaper", now, text) for tid, text in notes]
    )
    return [Released(r.id, r.type, r.claimed_by) for r in rows]


async def over(conn: AsyncConnection, ids: list[int]) -> list[int]:
    """Which of ``ids`` no longer take a slot: final, and not held by a worker."""
    if not ids:
        return []
    states = await states_of(conn, ids)
    done = [tid for tid, st in states.items() if st in FINAL_STATES]
    canceled = [tid for tid in done if states[tid] is State.CANCELED]
    if not canceled:
        return done
    held = set(
        (
            await conn.execute(
                sa.select(server_tasks.c.activity_id).where(
                    server_tasks.c.activity_id.in_(canceled), _held()
                )
            )
        ).scalars()
    )
    return [tid for tid in done if tid not in held]


async def heartbeat(
    conn: AsyncConnection,
    *,
    worker_id: str,
    name: str,
    queue: str,
    pid: int | None,
    status: str,
    running: list[int],
    now: float,
) -> None:
    updated = await conn.execute(
        workers.update()
        .where(workers.c.id == worker_id)
        .values(heartbeat_at=now, status=status, running=running)
    )
    if updated.rowcount == 0:
        await conn.execute(
            workers.insert().values(
                id=worker_id,
                name=name,
                queue=queue,
                pid=pid,
                started_at=now,
                heartbeat_at=now,
                status=status,
                running=running,
            )
        )


@dataclass(frozen=True)
class Reaped:
    worker_id: str
    task_id: int
    type: str
    tenant_id: int
    scope_tenant: int | None
    group: str | None
    params: dict[str, Any]


async def reap_workers(
    conn: AsyncConnection, timeout: float, now: float, *, embedded_gone: bool = False
) -> list[Reaped]:
    """SPEC 4.6: fail every task a silent worker holds, with reason "worker heartbeat lost".

    ``embedded_gone``: reap every embedded worker still recorded as running,
    whatever its last heartbeat. Embedded workers live inside their server's
    process, so when a server starts, those recorded before it died with an
    earlier process: waiting out the heartbeat timeout would list them as idle
    and leave their tasks In Progress for hours."""
    silent_when = (
        workers.c.queue == "embedded" if embedded_gone else workers.c.heartbeat_at < now - timeout
    )
    silent = list(
        (
            await conn.execute(
                sa.select(workers.c.id).where(silent_when, workers.c.status.in_(["idle", "busy"]))
            )
        ).scalars()
    )
    if not silent:
        return []
    rows = (
        await conn.execute(
            sa.select(
                activities.c.id,
                activities.c.tenant_id,
                server_tasks.c.claimed_by,
                server_tasks.c.type,
                server_tasks.c.scope_tenant,
                server_tasks.c.group_name,
                server_tasks.c.params,
            )
            .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
            .where(
                server_tasks.c.claimed_by.in_(silent),
                activities.c.state == State.IN_PROGRESS.value,
            )
        )
    ).all()
    changes = []
    for r in rows:
        try:
            t = transition(
                SERVER,
                State.IN_PROGRESS,
                State.FAILED,
                cause=Cause.TIMEOUT,
                actor="reaper",
                at=now,
                reason=HEARTBEAT_LOST,
            )
        except IllegalTransition:  # pragma: no cover - the query selected In Progress only
            continue
        changes.append(
            Change(r.id, r.tenant_id, t, {"finished_at": now, "result_line": HEARTBEAT_LOST})
        )
    await apply_changes(conn, changes)
    await conn.execute(
        workers.update().where(workers.c.id.in_(silent)).values(status="lost", running=[])
    )
    return [
        Reaped(r.claimed_by, r.id, r.type, r.tenant_id, r.scope_tenant, r.group_name, r.params)
        for r in rows
    ]


async def states_of(conn: AsyncConnection, ids: list[int]) -> dict[int, State]:
    if not ids:
        return {}
    if conn.dialect.name == "postgresql":
        # One array parameter: the server asks this about every running task twice
        # a second, and an IN list of thousands of parameters costs far more to
        # build and parse than the lookup itself.
        match = activities.c.id == sa.any_(sa.bindparam("ids", ids, type_=ARRAY(sa.BigInteger)))
    else:
        match = activities.c.id.in_(ids)
    rows = await conn.execute(sa.select(activities.c.id, activities.c.state).where(match))
    return {r.id: State(r.state) for r in rows}


_TASK_COLUMNS = (
    activities.c.id,
    activities.c.type,
    activities.c.state,
    activities.c.created_at,
    activities.c.updated_at,
    activities.c.delivered_at,
    activities.c.finished_at,
    activities.c.exit_code,
    activities.c.result_line,
    activities.c.reason,
    server_tasks.c.scope_tenant,
    server_tasks.c.group_name,
    server_tasks.c.params,
    server_tasks.c.not_before,
    server_tasks.c.dispatched_at,
    server_tasks.c.claimed_by,
    server_tasks.c.retry_of,
    server_tasks.c.command_line,
    server_tasks.c.submitted_by,
    server_tasks.c.stop_requested_at,
    server_tasks.c.stopped_at,
)


async def list_tasks(
    conn: AsyncConnection, tenant_id: int, *, state: str | None, type_: str | None, limit: int
) -> list[dict[str, Any]]:
    q = (
        sa.select(*_TASK_COLUMNS)
        .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
        .where(activities.c.tenant_id == tenant_id, activities.c.kind == SERVER.value)
    )
    if state is not None:
        q = q.where(activities.c.state == State(state).value)
    if type_ is not None:
        q = q.where(server_tasks.c.type == type_)
    rows = await conn.execute(q.order_by(activities.c.id.desc()).limit(limit))
    return [dict(r._mapping) for r in rows]


async def get_task(conn: AsyncConnection, tenant_id: int, task_id: int) -> dict[str, Any] | None:
    row = (
        await conn.execute(
            sa.select(*_TASK_COLUMNS, activities.c.stdout, activities.c.agent_report)
            .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
            .where(
                activities.c.id == task_id,
                activities.c.tenant_id == tenant_id,
                activities.c.kind == SERVER.value,
            )
        )
    ).first()
    return None if row is None else dict(row._mapping)


async def claim_many(
    conn: AsyncConnection, task_ids: list[int], worker_id: str, now: float, *, pg: bool
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
        .where(activities.c.id.in_(task_ids), activities.c.kind == SERVER.value)
    )
    if pg:
        q = q.with_for_update(of=activities)
    rows = {r.id: r for r in await conn.execute(q)}
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
        await apply_changes(conn, changes)
        # One statement for the batch: the same values for every claimed row.
        await conn.execute(
            server_tasks.update()
            .where(server_tasks.c.activity_id.in_([ch.activity_id for ch in changes]))
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


async def _confirm_stops(
    conn: AsyncConnection, worker_id: str, now: float, confirmed: list[tuple[Outcome, int]]
) -> None:
    """Held tasks whose worker reported: what really happened is recorded (result,
    output, history); the state stays Canceled and the slot is free."""
    for o, _ in confirmed:
        text = _stop_text(o)
        await conn.execute(
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
    await conn.execute(
        server_tasks.update()
        .where(server_tasks.c.activity_id.in_([o.task_id for o, _ in confirmed]))
        .values(stopped_at=now)
    )
    await insert_events(
        conn,
        [
            _note(o.task_id, tid, Cause.AGENT_REPORT, f"worker:{worker_id}", now, _stop_text(o))
            for o, tid in confirmed
        ],
    )


async def complete_many(
    conn: AsyncConnection, worker_id: str, now: float, outcomes: list[Outcome]
) -> dict[int, bool]:
    """Record workers' results; True where the state moved, False where the task was
    no longer the worker's to finish (canceled meanwhile, or failed as lost): then the
    state stays and what happened is recorded on it. A held task (canceled while it
    ran) is released by its worker's report."""
    ids = [o.task_id for o in outcomes]
    rows = {
        r.id: r
        for r in await conn.execute(
            sa.select(
                activities.c.id,
                activities.c.tenant_id,
                activities.c.state,
                server_tasks.c.claimed_by,
                _held().label("held"),
            )
            .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
            .where(activities.c.id.in_(ids))
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
                    "report": {
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
    await apply_changes(conn, changes)
    if confirmed:
        await _confirm_stops(conn, worker_id, now, confirmed)
    if reports:
        await conn.execute(
            activities.update()
            .where(activities.c.id == sa.bindparam("b_id"))
            .values(agent_report=sa.bindparam("report")),
            reports,
        )
    lines = [{"b_id": o.task_id, "cmd": o.command_line} for o in outcomes if o.command_line]
    if lines:
        await conn.execute(
            server_tasks.update()
            .where(server_tasks.c.activity_id == sa.bindparam("b_id"))
            .values(command_line=sa.bindparam("cmd")),
            lines,
        )
    return done


async def held(conn: AsyncConnection, task_id: int | None = None) -> list[Any]:
    """Blocked and Waiting tasks with what holds them (all, or one)."""
    q = (
        sa.select(
            activities.c.id,
            activities.c.tenant_id,
            activities.c.state,
            server_tasks.c.type,
            server_tasks.c.scope_tenant,
            server_tasks.c.group_name,
            server_tasks.c.not_before,
            server_tasks.c.hold,
            server_tasks.c.submitted_by,
            activities.c.created_at,
        )
        .join(server_tasks, server_tasks.c.activity_id == activities.c.id)
        .where(activities.c.state.in_([State.BLOCKED.value, State.WAITING.value]))
    )
    if task_id is not None:
        q = q.where(activities.c.id == task_id)
    return list(await conn.execute(q.order_by(activities.c.id)))


async def move_held(
    conn: AsyncConnection,
    row: Any,
    target: State,
    *,
    actor: str,
    now: float,
    reason: str,
    cause: Cause = Cause.ADMIN,
    hold: dict[str, Any] | None = None,
) -> None:
    """A held task moves on (approved, released, rejected, expired); ``hold`` updates it."""
    t = transition(
        SERVER, State(row.state), target, cause=cause, actor=actor, at=now, reason=reason
    )
    values = {"finished_at": now} if target in FINAL_STATES else {}
    await apply_changes(conn, [Change(row.id, row.tenant_id, t, values)])
    if hold is not None:
        await conn.execute(
            server_tasks.update().where(server_tasks.c.activity_id == row.id).values(hold=hold)
        )
