"""Lifecycle state changes: moving a request's client activities between states.

Every move goes through ``domain.states.transition`` and ``apply_changes``; each
write returns a :class:`Moved`, applied to the engine's memory after the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.lifecycle import (
    RolloutPolicy,
    dependency_doomed,
    dependency_met,
    find_cycle,
    rollout_step,
)
from taskfleet.domain.progress import Progress, progress
from taskfleet.domain.states import FINAL_STATES, ActivityKind, Cause, State, transition
from taskfleet.server.kernel import ApiError, Principal, audit, state_counts
from taskfleet.server.lifecycle.options import After, Options, check_options, dependency_progress
from taskfleet.store.activities import Change, apply_changes
from taskfleet.store.schema import activities, requests

log = logging.getLogger("taskfleet.lifecycle")

_CLIENT = ActivityKind.CLIENT
_FINAL = [s.value for s in FINAL_STATES]


async def move(
    conn: AsyncConnection,
    rows: Iterable[Any],
    target: State,
    *,
    cause: Cause,
    actor: str,
    now: float,
    reason: str,
    values: dict[str, Any] | None = None,
) -> list[int]:
    # A final state records when the activity finished.
    extra = {"finished_at": now, **(values or {})} if target in FINAL_STATES else dict(values or {})
    changes = [
        Change(
            r.id,
            r.tenant_id,
            transition(
                _CLIENT, State(r.state), target, cause=cause, actor=actor, at=now, reason=reason
            ),
            dict(extra),
        )
        for r in rows
    ]
    await conn.run_sync(apply_changes, changes)
    return [c.activity_id for c in changes]


async def open_rows(
    conn: AsyncConnection, request_id: int, states: Iterable[State], wave: int | None = None
) -> list[Any]:
    q = sa.select(
        activities.c.id,
        activities.c.tenant_id,
        activities.c.state,
        activities.c.computer_id,
        activities.c.wave,
    ).where(
        activities.c.request_id == request_id,
        activities.c.state.in_([s.value for s in states]),
    )
    if wave is not None:
        q = q.where(activities.c.wave == wave)
    return list(await conn.execute(q.order_by(activities.c.id)))


async def move_state(
    conn: AsyncConnection,
    request_id: int,
    state: State,
    target: State,
    *,
    cause: Cause,
    actor: str,
    now: float,
    reason: str,
    wave: int | None = None,
) -> list[Any]:
    """Move every activity of a request (or of one wave) in ``state`` to ``target``."""
    rows = await open_rows(conn, request_id, [state], wave)
    await move(conn, rows, target, cause=cause, actor=actor, now=now, reason=reason)
    return rows


@dataclass
class Moved:
    """What a lifecycle write did; applied to memory after the commit."""

    queued_computers: list[int] = field(default_factory=list)  # to wake
    watch: list[dict[str, Any]] = field(default_factory=list)  # requests to (re)index
    done: list[int] = field(default_factory=list)  # no longer waiting on a dependency
    over: list[int] = field(default_factory=list)  # nothing left for the engine to do
    count: int = 0


async def request_row(conn: AsyncConnection, tenant_id: int | None, request_id: int) -> Any:
    q = sa.select(requests).where(requests.c.id == request_id)
    if tenant_id is not None:
        q = q.where(requests.c.tenant_id == tenant_id)
    row = (await conn.execute(q)).first()
    if row is None:
        raise ApiError(404, f"no request {request_id}")
    return row


async def release_waiting(
    conn: AsyncConnection, now: float, request_id: int, *, reason: str, actor: str = "server"
) -> Moved:
    """Waiting -> Queued for a request whose dependency is met (rollouts: per wave)."""
    rows = await move_state(
        conn,
        request_id,
        State.WAITING,
        State.QUEUED,
        cause=Cause.SYSTEM,
        actor=actor,
        now=now,
        reason=reason,
    )
    return Moved([r.computer_id for r in rows], count=len(rows), done=[request_id])


async def evaluate_waiter(conn: AsyncConnection, now: float, request_id: int) -> Moved:
    """Release or cancel a request Waiting on its dependency, if the rule says so now."""
    row = await request_row(conn, None, request_id)
    if row.depends_on is None:
        return Moved(done=[request_id])
    after = After.from_json(row.depends_on)
    try:
        prog = await dependency_progress(conn, row.tenant_id, after)
    except ApiError:  # the dependency vanished (purged): it can never be met
        prog = progress({})
    rule = after.rule()
    if dependency_met(rule, prog):
        if row.rollout:  # the first wave starts; the rollout's rules take the rest
            rows = await move_state(
                conn,
                request_id,
                State.WAITING,
                State.QUEUED,
                cause=Cause.SYSTEM,
                actor="server",
                now=now,
                reason=f"dependency met: {after.describe()}",
                wave=0,
            )
            return Moved([r.computer_id for r in rows], count=len(rows), done=[request_id])
        return await release_waiting(
            conn, now, request_id, reason=f"dependency met: {after.describe()}"
        )
    if dependency_doomed(rule, prog):
        rows = await move_state(
            conn,
            request_id,
            State.WAITING,
            State.CANCELED,
            cause=Cause.SYSTEM,
            actor="server",
            now=now,
            reason=f"dependency can no longer be met: {after.describe()}",
        )
        return Moved(count=len(rows), done=[request_id])
    return Moved()


async def wave_counts(conn: AsyncConnection, request_id: int) -> tuple[list[Progress], list[int]]:
    per: dict[int, dict[State, int]] = {}
    for r in await conn.execute(
        sa.select(activities.c.wave, activities.c.state, sa.func.count().label("n"))
        .where(activities.c.request_id == request_id)
        .group_by(activities.c.wave, activities.c.state)
    ):
        per.setdefault(int(r.wave or 0), {})[State(r.state)] = r.n
    n = max(per) + 1 if per else 0
    waves = [progress(per.get(k, {})) for k in range(n)]
    waiting = [per.get(k, {}).get(State.WAITING, 0) for k in range(n)]
    return waves, waiting


async def evaluate_rollout(
    conn: AsyncConnection, now: float, request_id: int, *, override: bool = False
) -> Moved:
    """Apply the rollout rules once: pause on failures, or release the next wave."""
    row = await request_row(conn, None, request_id)
    state = dict(row.rollout or {})
    if not state or state.get("paused"):
        return Moved()
    if row.approval is not None and row.approval.get("decision") != "approved":
        return Moved()  # nothing runs before the approval
    policy = RolloutPolicy(
        canary=state["canary"],
        size=state.get("size"),
        share=state.get("share"),
        success=state["success"],
        max_failures=state["max_failures"],
    )
    moved = Moved()
    for _ in range(int(state.get("waves", 1)) + 1):
        waves, waiting = await wave_counts(conn, request_id)
        if waiting and waiting[0]:
            break  # the first wave starts on approval or its dependency, not here
        base = (int(state.get("base_finished", 0)), int(state.get("base_succeeded", 0)))
        step = rollout_step(policy, waves, waiting, baseline=base, override=override)
        override = False  # one release at most on a resume's say-so
        if step.pause:
            rows = await move_state(
                conn,
                request_id,
                State.QUEUED,
                State.BLOCKED,
                cause=Cause.SYSTEM,
                actor="server",
                now=now,
                reason=step.reason,
            )
            state.update(paused=True, pause_reason=step.reason, paused_at=now)
            await conn.execute(
                requests.update().where(requests.c.id == request_id).values(rollout=state)
            )
            log.warning("request %d: %s (%d activities held)", request_id, step.reason, len(rows))
            moved.count += len(rows)
            return moved
        if step.release is None:
            break
        rows = await move_state(
            conn,
            request_id,
            State.WAITING,
            State.QUEUED,
            cause=Cause.SYSTEM,
            actor="server",
            now=now,
            reason=f"rollout wave {step.release} released: {step.reason}",
            wave=step.release,
        )
        log.info("request %d: wave %d released (%s)", request_id, step.release, step.reason)
        moved.queued_computers += [r.computer_id for r in rows]
        moved.count += len(rows)
    waves, waiting = await wave_counts(conn, request_id)
    if all(w == 0 for w in waiting) and all(p.done for p in waves):
        moved.over.append(request_id)
    return moved


async def set_after(
    conn: AsyncConnection, p: Principal, now: float, request_id: int, after: After
) -> Moved:
    """Make a Blocked or Waiting request wait for ``after`` (replacing its dependency).

    Refused: a request already Queued, Scheduled or running (the state table
    has no way back to Waiting), and any dependency that would close a cycle.
    """
    row = await request_row(conn, p.tenant_id, request_id)
    counts = await state_counts(conn, activities.c.request_id == request_id)
    open_states = {s for s, n in counts.items() if n and s not in FINAL_STATES}
    if not open_states:
        raise ApiError(409, f"request {request_id} has finished: nothing left to wait")
    moving = open_states - {State.BLOCKED, State.WAITING}
    if moving:
        shown = ", ".join(sorted(s.label for s in moving))
        raise ApiError(
            409,
            f"request {request_id} has {shown} activities; only Blocked or Waiting work "
            "can be made to wait",
        )
    if row.rollout:
        raise ApiError(409, "a rollout's waves wait on each other; its dependency is fixed")
    target = await _dependency_request(conn, p.tenant_id, after)
    assert target is not None  # without missing_ok, a missing one raised 404
    edges: dict[int, list[int]] = {}
    open_ids = sa.select(activities.c.request_id).where(
        activities.c.state.in_([State.WAITING.value, State.BLOCKED.value])
    )
    for r in await conn.execute(
        sa.select(requests.c.id, requests.c.depends_on).where(
            requests.c.tenant_id == p.tenant_id,
            requests.c.depends_on.is_not(None),
            requests.c.id.in_(open_ids),
        )
    ):
        dep = After.from_json(r.depends_on)
        on = await _dependency_request(conn, p.tenant_id, dep, missing_ok=True)
        if on is not None:
            edges[r.id] = [on]
    edges[request_id] = [target]
    cycle = find_cycle(edges)
    if cycle is not None:
        raise ApiError(409, "dependency cycle: " + " -> ".join(f"request {i}" for i in cycle))
    met = await check_options(conn, p, Options(after=after))
    await conn.execute(
        requests.update().where(requests.c.id == request_id).values(depends_on=after.as_json())
    )
    await audit(conn, p, "request.after", now, id=request_id, after=after.as_json())
    moved = Moved(done=[request_id])  # drop the old dependency from the index
    if met and State.WAITING in open_states:
        moved = await release_waiting(
            conn, now, request_id, reason=f"dependency met: {after.describe()}", actor=p.actor
        )
    else:
        moved.watch.append(await summary(conn, request_id))
    return moved


async def _dependency_request(
    conn: AsyncConnection, tenant_id: int, after: After, *, missing_ok: bool = False
) -> int | None:
    """The request a dependency points at (an activity's own request)."""
    if after.kind == "request":
        q = sa.select(requests.c.id).where(
            requests.c.id == after.on, requests.c.tenant_id == tenant_id
        )
    else:
        q = sa.select(activities.c.request_id).where(
            activities.c.id == after.on, activities.c.tenant_id == tenant_id
        )
    rid = (await conn.execute(q)).scalar()
    if rid is None and not missing_ok:
        raise ApiError(404, f"dependency: no {after.kind} {after.on} in this tenant")
    return None if rid is None else int(rid)


async def summary(conn: AsyncConnection, request_id: int) -> dict[str, Any]:
    row = await request_row(conn, None, request_id)
    return {
        "id": row.id,
        "not_before": row.not_before,
        "depends_on": row.depends_on,
        "approval": row.approval,
        "rollout": row.rollout,
    }
