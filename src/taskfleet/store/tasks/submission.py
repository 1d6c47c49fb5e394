"""Submitting server tasks (SPEC 4.1, 4.2): one or a batch, and their duplicates.

Contract: a submission equal (type, scope, parameters) to a task of the same tenant that
is not yet dispatched is a duplicate: nothing is stored and the existing task is named.
A new task is stored Queued, Scheduled (a not-before time ahead) or held (Blocked or
Waiting), with its creation in its history.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.states import State, creation
from taskfleet.protocol.exchange import canonical
from taskfleet.store.activities import insert_activities, insert_events
from taskfleet.store.schema import activities, server_tasks
from taskfleet.store.tasks import SERVER

# SPEC 4.2: a submission equal to a task in any of these states (and not yet
# dispatched) is a duplicate. "Submitted" covers work held for a time, for
# another task or for an approval, not only work on its way to the queue.
AWAITING_DISPATCH = [s.value for s in (State.QUEUED, State.SCHEDULED, State.WAITING, State.BLOCKED)]


def dedupe_key(type_: str, tenant: int | None, group: str | None, params: dict[str, Any]) -> str:
    text = canonical({"type": type_, "tenant": tenant, "group": group, "params": params})
    return hashlib.sha256(text.encode()).hexdigest()


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
    await conn.run_sync(
        insert_events,
        [(task_id, owner_tenant, creation(state, actor=actor, at=now, reason=reason))],
    )
    return Submitted(task_id, None, state)


@dataclass(frozen=True)
class NewTask:
    type: str
    scope_tenant: int | None
    group: str | None
    params: dict[str, Any]
    not_before: float | None


def submit_many(
    conn: sa.Connection, *, owner_tenant: int, actor: str, items: list[NewTask], now: float
) -> list[Submitted]:
    """``submit`` for many tasks with a handful of statements (a batch from the API).

    A task equal to one not yet dispatched, or to an earlier one in the same
    batch, is a duplicate and names that task. Synchronous (a ``Connection``): the
    API's batch runs whole as one function on the writer (``Writer.run_sync``)."""
    keys = [dedupe_key(t.type, t.scope_tenant, t.group, t.params) for t in items]
    known: dict[str, tuple[int, State]] = {}
    for start in range(0, len(keys), 500):
        rows = conn.execute(
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
    ids = insert_activities(
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
        conn.execute(
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
        insert_events(
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
