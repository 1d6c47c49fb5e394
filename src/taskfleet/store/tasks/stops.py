"""Canceling server tasks, and stopping those that were running.

Contract: a task canceled while In Progress is Canceled at once and *held*
(``stop_requested_at`` set, ``stopped_at`` not): it still counts against its type's
limits until its worker's report arrives (``running.complete_many`` records it as what
really happened: stopped, or finished on its own; the state stays Canceled) or its worker
is gone (``release_lost_stops``). What happens after the cancel is a history entry
(``canceled_note``), never a state change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.states import FINAL_STATES, Cause, State, Transition, transition
from taskfleet.store.activities import Change, apply_changes, insert_events
from taskfleet.store.schema import activities, server_tasks, workers
from taskfleet.store.tasks import SERVER
from taskfleet.store.tasks.heartbeats import HEARTBEAT_LOST
from taskfleet.store.tasks.reads import states_of


def stop_pending() -> sa.ColumnElement[bool]:
    """Canceled while running and its worker has not confirmed the stop yet."""
    return sa.and_(
        server_tasks.c.stop_requested_at.is_not(None), server_tasks.c.stopped_at.is_(None)
    )


def canceled_note(
    task_id: int, tenant_id: int, cause: Cause, actor: str, now: float, reason: str
) -> tuple[int, int, Transition]:
    """A history entry for a Canceled task that records what happened after the cancel
    (no state change: Canceled is final for a server task)."""
    return task_id, tenant_id, Transition(State.CANCELED, State.CANCELED, cause, actor, now, reason)


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
    await conn.run_sync(apply_changes, [Change(task_id, tenant_id, t, values)])
    if running:
        await conn.execute(
            server_tasks.update()
            .where(server_tasks.c.activity_id == task_id)
            .values(stop_requested_at=now)
        )
    return Canceled(State(row.state), row.claimed_by if running else None)


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
                stop_pending(),
            )
        )
    ).first()
    if row is None:
        return False
    await conn.execute(
        activities.update().where(activities.c.id == task_id).values(reason=note, updated_at=now)
    )
    await conn.run_sync(
        insert_events,
        [
            canceled_note(
                task_id, row.tenant_id, Cause.AGENT_REPORT, f"worker:{worker_id}", now, note
            )
        ],
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
                    stop_pending(),
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
            .where(stop_pending(), workers.c.status.in_(["lost", "stopped"]))
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
    await conn.run_sync(
        insert_events,
        [
            canceled_note(tid, tenants[tid], Cause.TIMEOUT, "reaper", now, text)
            for tid, text in notes
        ],
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
                    server_tasks.c.activity_id.in_(canceled), stop_pending()
                )
            )
        ).scalars()
    )
    return [tid for tid in done if tid not in held]
