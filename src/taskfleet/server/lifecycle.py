"""The lifecycle engine: Scheduled, Waiting and Blocked client activities (SPEC 2.1, 7, 9).

Contract:
* :func:`parse_options` turns what an administrator asked for (a time, a
  dependency, an approval, a rollout) into :class:`Options`, or raises
  ``ApiError(400)`` with the reason; :func:`check_options` checks them against
  the store (the dependency exists in the caller's tenant and can still be met).
* The pure rules live in ``domain/lifecycle.py``; every state change goes
  through ``domain.states.transition`` and ``store.activities.apply_changes``.
* :class:`Lifecycle` keeps small in-memory indexes (who waits on what, open
  rollouts, a timer heap, maintenance windows per computer) so that a pass
  costs what changed: an activity finishing looks only at the requests
  waiting on its request; time passing pops only the timers that are due. It
  never sleeps past a timer and reads the time from an injectable clock.
* Approvals, rejections, resumes, windows and cron schedules are functions
  run by the single writer, each audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.lifecycle import (
    Approval,
    Dependency,
    RolloutPolicy,
    RuleError,
    approval_refusal,
    dependency_doomed,
    dependency_met,
    find_cycle,
    next_cron,
    next_window_open,
    rollout_step,
    validate_cron,
    validate_window,
    window_allows,
)
from taskfleet.domain.policy import RunWindow
from taskfleet.domain.progress import Progress, progress
from taskfleet.domain.states import FINAL_STATES, ActivityKind, Cause, State, transition
from taskfleet.server.service import ApiError, Principal, audit, state_counts
from taskfleet.store.activities import Change, apply_changes
from taskfleet.store.schema import activities, group_members, groups, requests, schedules

log = logging.getLogger("taskfleet.lifecycle")

_CLIENT = ActivityKind.CLIENT
MAX_AHEAD = 366 * 86400.0  # a schedule or approval expiry further out is a typo
_FINAL = [s.value for s in FINAL_STATES]


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class After:
    """Wait for request or activity ``on`` to reach ``percent`` of ``metric``."""

    kind: str  # "request" | "activity"
    on: int
    metric: str = "finished"
    percent: float = 100.0

    def rule(self) -> Dependency:
        return Dependency(self.on, self.metric, self.percent)

    def describe(self) -> str:
        what = "finished" if self.metric == "finished" else "succeeded"
        return f"{self.kind} {self.on} {self.percent:g}% {what}"

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "on": self.on, "metric": self.metric, "percent": self.percent}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> After:
        return cls(d["kind"], int(d["on"]), d["metric"], float(d["percent"]))


@dataclass(frozen=True)
class Options:
    not_before: float | None = None
    after: After | None = None
    approval: dict[str, Any] | None = None  # {"separation": bool, "expires_at": float|None}
    rollout: RolloutPolicy | None = None

    @property
    def empty(self) -> bool:
        return (
            self.not_before is None
            and self.after is None
            and self.approval is None
            and self.rollout is None
        )


def _time(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ApiError(400, f"{what} must be a time in epoch seconds, got {value!r}")
    return float(value)


def parse_options(
    now: float,
    *,
    at: Any = None,
    after: Any = None,
    approval: Any = None,
    rollout: Any = None,
) -> Options:
    """Validate the lifecycle part of a request; ApiError(400) names what is wrong."""
    try:
        not_before = None
        if at is not None:
            not_before = _time(at, "at")
            if not_before > now + MAX_AHEAD:
                raise ApiError(400, f"at {iso(not_before)} is more than a year ahead")
        dep = None
        if after is not None:
            if not isinstance(after, dict):
                raise ApiError(400, "after must be an object: {request|activity: ID, ...}")
            kinds = [k for k in ("request", "activity") if after.get(k) is not None]
            unknown = set(after) - {"request", "activity", "metric", "percent"}
            if unknown:
                raise ApiError(400, f"after: unknown field(s) {', '.join(sorted(unknown))}")
            if len(kinds) != 1:
                raise ApiError(400, "after needs exactly one of request or activity")
            on = after[kinds[0]]
            if isinstance(on, bool) or not isinstance(on, int) or on < 1:
                raise ApiError(400, f"after.{kinds[0]} must be an id, got {on!r}")
            dep = After(kinds[0], on, after.get("metric", "finished"), after.get("percent", 100.0))
            dep.rule()  # validates metric and threshold
        appr = None
        if approval is not None:
            if not isinstance(approval, dict):
                raise ApiError(400, "approval must be an object: {separation, expires_in}")
            unknown = set(approval) - {"separation", "expires_in"}
            if unknown:
                raise ApiError(400, f"approval: unknown field(s) {', '.join(sorted(unknown))}")
            expires_in = approval.get("expires_in")
            expires_at = None
            if expires_in is not None:
                seconds = _time(expires_in, "approval.expires_in")
                if not 0 < seconds <= MAX_AHEAD:
                    raise ApiError(400, "approval.expires_in must be in (0, 366 days] seconds")
                expires_at = now + seconds
            appr = {"separation": bool(approval.get("separation", False)), "expires_at": expires_at}
        plan = None
        if rollout is not None:
            if not isinstance(rollout, dict):
                raise ApiError(400, "rollout must be an object: {canary, size|share, ...}")
            unknown = set(rollout) - {"canary", "size", "share", "success", "max_failures"}
            if unknown:
                raise ApiError(400, f"rollout: unknown field(s) {', '.join(sorted(unknown))}")
            plan = RolloutPolicy(
                canary=rollout.get("canary", 0),
                size=rollout.get("size"),
                share=rollout.get("share"),
                success=rollout.get("success", 100.0),
                max_failures=rollout.get("max_failures", 100.0),
            )
            if (plan.size is None) == (plan.share is None):
                raise ApiError(400, "rollout needs exactly one of size or share")
    except RuleError as exc:
        raise ApiError(400, str(exc)) from None
    return Options(not_before, dep, appr, plan)


async def dependency_progress(conn: AsyncConnection, tenant_id: int, after: After) -> Progress:
    """Progress of what ``after`` names; 404 if it is not in this tenant."""
    col = activities.c.request_id if after.kind == "request" else activities.c.id
    if after.kind == "request":
        exists = (
            await conn.execute(
                sa.select(requests.c.id).where(
                    requests.c.id == after.on, requests.c.tenant_id == tenant_id
                )
            )
        ).first()
        if exists is None:
            raise ApiError(404, f"dependency: no request {after.on} in this tenant")
    counts = await state_counts(conn, col == after.on, activities.c.tenant_id == tenant_id)
    if after.kind == "activity" and not counts:
        raise ApiError(404, f"dependency: no activity {after.on} in this tenant")
    return progress(counts)


async def check_options(conn: AsyncConnection, p: Principal, opts: Options) -> bool | None:
    """Check options against the store; True/False: the dependency is met now, None: none."""
    if opts.after is None:
        return None
    prog = await dependency_progress(conn, p.tenant_id, opts.after)
    rule = opts.after.rule()
    if dependency_met(rule, prog):
        return True
    if dependency_doomed(rule, prog):
        raise ApiError(
            409,
            f"dependency can never be met: {opts.after.describe()} is impossible "
            f"({prog.succeeded} succeeded, {prog.finished} finished of {prog.total})",
        )
    return False


# --------------------------------------------------------------------------- state changes


async def _move(
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
    await apply_changes(conn, changes)
    return [c.activity_id for c in changes]


async def _open_rows(
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


async def _move_state(
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
    rows = await _open_rows(conn, request_id, [state], wave)
    await _move(conn, rows, target, cause=cause, actor=actor, now=now, reason=reason)
    return rows


@dataclass
class Moved:
    """What a lifecycle write did; applied to memory after the commit."""

    queued_computers: list[int] = field(default_factory=list)  # to wake
    watch: list[dict[str, Any]] = field(default_factory=list)  # requests to (re)index
    done: list[int] = field(default_factory=list)  # no longer waiting on a dependency
    over: list[int] = field(default_factory=list)  # nothing left for the engine to do
    count: int = 0


async def _request_row(conn: AsyncConnection, tenant_id: int | None, request_id: int) -> Any:
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
    rows = await _move_state(
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
    row = await _request_row(conn, None, request_id)
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
            rows = await _move_state(
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
        rows = await _move_state(
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


async def _wave_counts(conn: AsyncConnection, request_id: int) -> tuple[list[Progress], list[int]]:
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
    row = await _request_row(conn, None, request_id)
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
        waves, waiting = await _wave_counts(conn, request_id)
        if waiting and waiting[0]:
            break  # the first wave starts on approval or its dependency, not here
        base = (int(state.get("base_finished", 0)), int(state.get("base_succeeded", 0)))
        step = rollout_step(policy, waves, waiting, baseline=base, override=override)
        override = False  # one release at most on a resume's say-so
        if step.pause:
            rows = await _move_state(
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
        rows = await _move_state(
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
    waves, waiting = await _wave_counts(conn, request_id)
    if all(w == 0 for w in waiting) and all(p.done for p in waves):
        moved.over.append(request_id)
    return moved


# --------------------------------------------------------------------------- approvals


async def _decide(
    conn: AsyncConnection,
    request_id: int,
    approval: dict[str, Any],
    decision: str,
    actor: str,
    now: float,
) -> dict[str, Any]:
    """Record the decision on a request's approval (approved, rejected, expired)."""
    decided = {**approval, "decision": decision, "decided_by": actor, "decided_at": now}
    await conn.execute(
        requests.update().where(requests.c.id == request_id).values(approval=decided)
    )
    return decided


def _approval(row: Any) -> Approval:
    a = row.approval
    return Approval(row.created_by, row.created_at, a.get("expires_at"), bool(a.get("separation")))


async def approve(conn: AsyncConnection, p: Principal, now: float, request_id: int) -> Moved:
    """Blocked -> Queued (or Waiting while its dependency or an earlier wave is pending)."""
    row = await _request_row(conn, p.tenant_id, request_id)
    if row.approval is None:
        raise ApiError(409, f"request {request_id} does not need approval")
    decision = row.approval.get("decision")
    if decision is not None:
        raise ApiError(409, f"request {request_id} is not awaiting approval (already {decision})")
    rows = await _open_rows(conn, request_id, [State.BLOCKED])
    if not rows:
        raise ApiError(409, f"request {request_id} has nothing Blocked to approve")
    why = approval_refusal(_approval(row), p.actor, now)
    if why:
        raise ApiError(403 if "separation" in why else 409, why)
    met = True
    if row.depends_on is not None:
        met = bool(await check_options(conn, p, Options(after=After.from_json(row.depends_on))))
    moved = Moved()
    queued = [r for r in rows if met and not r.wave]
    waiting = [r for r in rows if r not in queued]
    moved.count += len(
        await _move(
            conn,
            queued,
            State.QUEUED,
            cause=Cause.ADMIN,
            actor=p.actor,
            now=now,
            reason=f"approved by {p.actor}",
        )
    )
    moved.count += len(
        await _move(
            conn,
            waiting,
            State.WAITING,
            cause=Cause.ADMIN,
            actor=p.actor,
            now=now,
            reason=f"approved by {p.actor}; waits for "
            + ("an earlier rollout wave" if met else After.from_json(row.depends_on).describe()),
        )
    )
    moved.queued_computers = [r.computer_id for r in queued]
    await _decide(conn, request_id, row.approval, "approved", p.actor, now)
    await audit(conn, p, "request.approve", now, id=request_id, activities=moved.count)
    moved.watch.append(await _summary(conn, request_id))
    return moved


async def reject(
    conn: AsyncConnection, p: Principal, now: float, request_id: int, reason: str
) -> Moved:
    row = await _request_row(conn, p.tenant_id, request_id)
    if row.approval is None or row.approval.get("decision") is not None:
        raise ApiError(409, f"request {request_id} is not awaiting approval")
    why = f"rejected by {p.actor}" + (f": {reason}" if reason else "")
    rows = await _move_state(
        conn,
        request_id,
        State.BLOCKED,
        State.CANCELED,
        cause=Cause.ADMIN,
        actor=p.actor,
        now=now,
        reason=why,
    )
    await _decide(conn, request_id, row.approval, "rejected", p.actor, now)
    await audit(conn, p, "request.reject", now, id=request_id, reason=reason, activities=len(rows))
    return Moved(count=len(rows), over=[request_id])


async def expire_approval(conn: AsyncConnection, now: float, request_id: int) -> Moved:
    row = await _request_row(conn, None, request_id)
    a = row.approval
    if a is None or a.get("decision") is not None or a.get("expires_at") is None:
        return Moved()
    if now < a["expires_at"]:
        return Moved()
    rows = await _move_state(
        conn,
        request_id,
        State.BLOCKED,
        State.CANCELED,
        cause=Cause.TIMEOUT,
        actor="server",
        now=now,
        reason=f"approval expired at {iso(a['expires_at'])}",
    )
    await _decide(conn, request_id, a, "expired", "server", now)
    sys = Principal(0, row.tenant_id, "admin", "server", via="server")
    await audit(conn, sys, "request.approval-expired", now, id=request_id, activities=len(rows))
    return Moved(count=len(rows), over=[request_id])


async def list_approvals(conn: AsyncConnection, p: Principal) -> list[dict[str, Any]]:
    """Requests awaiting a decision, oldest first, with who asked and until when."""
    out = []
    for row in await conn.execute(
        sa.select(requests)
        .where(requests.c.tenant_id == p.tenant_id, requests.c.approval.is_not(None))
        .order_by(requests.c.id)
    ):
        a = row.approval
        if a.get("decision") is not None:
            continue
        out.append(
            {
                "request_id": row.id,
                "type": row.type,
                "target": row.target,
                "total": row.total,
                "requested_by": row.created_by,
                "requested_at": row.created_at,
                "expires_at": a.get("expires_at"),
                "separation": bool(a.get("separation")),
                "kind": "request",
            }
        )
    from taskfleet.store import tasks as task_store

    for row in await task_store.held(conn):
        a = (row.hold or {}).get("approval")
        if row.tenant_id != p.tenant_id or row.state != State.BLOCKED.value or not a:
            continue
        if a.get("decision") is not None:
            continue
        out.append(
            {
                "task_id": row.id,
                "type": row.type,
                "target": row.group_name or "server",
                "total": 1,
                "requested_by": a["requested_by"],
                "requested_at": a["requested_at"],
                "expires_at": a.get("expires_at"),
                "separation": bool(a.get("separation")),
                "kind": "task",
            }
        )
    return out


async def resume(conn: AsyncConnection, p: Principal, now: float, request_id: int) -> Moved:
    """A person resumes a paused rollout: held work is Queued again, the failure count restarts."""
    row = await _request_row(conn, p.tenant_id, request_id)
    state = dict(row.rollout or {})
    if not state:
        raise ApiError(409, f"request {request_id} is not a rollout")
    if not state.get("paused"):
        raise ApiError(409, f"the rollout of request {request_id} is not paused")
    rows = await _move_state(
        conn,
        request_id,
        State.BLOCKED,
        State.QUEUED,
        cause=Cause.ADMIN,
        actor=p.actor,
        now=now,
        reason=f"rollout resumed by {p.actor}",
    )
    waves, _ = await _wave_counts(conn, request_id)
    state.update(
        paused=False,
        base_finished=sum(w.finished for w in waves),
        base_succeeded=sum(w.succeeded for w in waves),
        resumed_by=p.actor,
        resumed_at=now,
    )
    await conn.execute(requests.update().where(requests.c.id == request_id).values(rollout=state))
    await audit(conn, p, "rollout.resume", now, id=request_id, activities=len(rows))
    moved = await evaluate_rollout(conn, now, request_id, override=True)
    moved.queued_computers += [r.computer_id for r in rows]
    moved.count += len(rows)
    moved.watch.append(await _summary(conn, request_id))
    return moved


# --------------------------------------------------------------------------- windows


def parse_offset(text: Any) -> int:
    """``+02:00`` / ``-05:30`` / ``0`` -> minutes east of UTC."""
    if isinstance(text, int) and not isinstance(text, bool):
        minutes = text
    else:
        s = str(text).strip()
        sign = -1 if s.startswith("-") else 1
        body = s.lstrip("+-")
        hh, _, mm = body.partition(":")
        if not hh.isdigit() or (mm and not mm.isdigit()):
            raise ApiError(400, f"invalid UTC offset {text!r}: expected +HH:MM")
        minutes = sign * (int(hh) * 60 + int(mm or 0))
    if not -12 * 60 <= minutes <= 14 * 60:
        raise ApiError(400, f"UTC offset {text!r} is out of range (-12:00 .. +14:00)")
    return minutes


async def set_window(
    conn: AsyncConnection,
    p: Principal,
    now: float,
    group: str,
    window: str | None,
    utc_offset: Any = 0,
) -> dict[str, Any]:
    """Set (or clear, with None) a group's maintenance window."""
    gid = (
        await conn.execute(
            sa.select(groups.c.id).where(groups.c.tenant_id == p.tenant_id, groups.c.name == group)
        )
    ).scalar()
    if gid is None:
        raise ApiError(404, f"unknown group {group!r}")
    text = offset = None
    if window is not None:
        try:
            text = str(validate_window(window))
        except RuleError as exc:
            raise ApiError(400, f"maintenance window: {exc}") from None
        offset = parse_offset(utc_offset)
    await conn.execute(
        groups.update().where(groups.c.id == gid).values(window=text, utc_offset=offset)
    )
    await audit(conn, p, "group.window", now, name=group, window=text, utc_offset=offset)
    return {"group": group, "window": text, "utc_offset": offset}


async def load_windows(conn: AsyncConnection) -> dict[int, list[tuple[RunWindow, int, int]]]:
    """computer id -> [(window, utc offset minutes, group id)] for windowed groups."""
    out: dict[int, list[tuple[RunWindow, int, int]]] = {}
    for r in await conn.execute(
        sa.select(group_members.c.computer_id, groups.c.id, groups.c.window, groups.c.utc_offset)
        .join(groups, groups.c.id == group_members.c.group_id)
        .where(groups.c.window.is_not(None))
    ):
        out.setdefault(r.computer_id, []).append(
            (RunWindow.parse(r.window), int(r.utc_offset or 0), int(r.id))
        )
    return out


def closed_windows(
    windows: list[tuple[RunWindow, int, int]], now: float
) -> list[tuple[RunWindow, int, int]]:
    return [w for w in windows if not window_allows(w[0], ((now + w[1] * 60) % 86400) / 60.0)]


# --------------------------------------------------------------------------- schedules


async def create_schedule(
    conn: AsyncConnection, p: Principal, now: float, cron: str, template: dict[str, Any]
) -> dict[str, Any]:
    try:
        normal = validate_cron(cron)
    except RuleError as exc:
        raise ApiError(400, str(exc)) from None
    for key in ("at", "after"):
        if template.get(key) is not None:
            raise ApiError(400, f"a cron schedule cannot also have {key!r}: each run starts then")
    first = next_cron(normal, now)
    sid = (
        await conn.execute(
            schedules.insert()
            .values(
                tenant_id=p.tenant_id,
                cron=normal,
                template=template,
                created_by=p.actor,
                created_at=now,
                next_at=first,
                runs=0,
            )
            .returning(schedules.c.id)
        )
    ).scalar_one()
    await audit(conn, p, "schedule.create", now, id=sid, cron=normal, target=template["target"])
    return await get_schedule(conn, p, sid)


async def get_schedule(conn: AsyncConnection, p: Principal, sid: int) -> dict[str, Any]:
    row = (
        await conn.execute(
            sa.select(schedules).where(schedules.c.id == sid, schedules.c.tenant_id == p.tenant_id)
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no schedule {sid}")
    out = dict(row._mapping)
    out.pop("tenant_id")
    return out


async def list_schedules(conn: AsyncConnection, p: Principal) -> list[dict[str, Any]]:
    ids = (
        await conn.execute(
            sa.select(schedules.c.id)
            .where(schedules.c.tenant_id == p.tenant_id)
            .order_by(schedules.c.id)
        )
    ).scalars()
    return [await get_schedule(conn, p, i) for i in ids]


async def cancel_schedule(
    conn: AsyncConnection, p: Principal, now: float, sid: int
) -> dict[str, Any]:
    sched = await get_schedule(conn, p, sid)
    if sched["canceled_at"] is not None:
        raise ApiError(409, f"schedule {sid} is already canceled")
    await conn.execute(
        schedules.update().where(schedules.c.id == sid).values(canceled_at=now, next_at=None)
    )
    await audit(conn, p, "schedule.cancel", now, id=sid)
    return await get_schedule(conn, p, sid)


async def fire_schedule(
    conn: AsyncConnection, now: float, sid: int
) -> tuple[Any | None, float | None]:
    """Create one run of schedule ``sid``; return (Created or None, the next firing or None).

    A run that cannot be created (its group emptied, say) is recorded on the
    schedule as ``last_error`` and audited; the schedule goes on. After
    downtime a schedule fires once, not once per missed time.
    """
    from taskfleet.server import service

    row = (await conn.execute(sa.select(schedules).where(schedules.c.id == sid))).first()
    if row is None or row.canceled_at is not None or row.next_at is None:
        return None, None
    if now < row.next_at:  # a stale timer (the time moved): not yet
        return None, row.next_at
    creator = row.created_by
    token_id = int(creator.split(":", 1)[1]) if creator.startswith("token:") else 0
    p = Principal(token_id, row.tenant_id, "operator", f"schedule {sid}", via=f"schedule:{sid}")
    t = row.template
    created = None
    error = None
    savepoint = await conn.begin_nested()
    try:
        opts = parse_options(now, approval=t.get("approval"), rollout=t.get("rollout"))
        created = await service.create_request(
            conn,
            p,
            now,
            type=t["type"],
            target=t["target"],
            params=t["params"],
            timeout=t["timeout"],
            policy=t.get("policy"),
            expires_in=t.get("expires_in"),
            options=opts,
            schedule_id=sid,
        )
    except ApiError as exc:
        await savepoint.rollback()
        error = exc.message
        log.warning("schedule %d: run not created: %s", sid, error)
    else:
        await savepoint.commit()
    next_at = next_cron(row.cron, now)
    await conn.execute(
        schedules.update()
        .where(schedules.c.id == sid)
        .values(
            next_at=next_at,
            runs=row.runs + (1 if created else 0),
            last_request_id=created.request["id"] if created else row.last_request_id,
            last_error=error,
        )
    )
    if error is not None:
        await audit(conn, p, "schedule.error", now, id=sid, error=error)
    return created, next_at


async def set_after(
    conn: AsyncConnection, p: Principal, now: float, request_id: int, after: After
) -> Moved:
    """Make a Blocked or Waiting request wait for ``after`` (replacing its dependency).

    Refused: a request already Queued, Scheduled or running (the state table
    has no way back to Waiting), and any dependency that would close a cycle.
    """
    row = await _request_row(conn, p.tenant_id, request_id)
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
        moved.watch.append(await _summary(conn, request_id))
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


async def _summary(conn: AsyncConnection, request_id: int) -> dict[str, Any]:
    row = await _request_row(conn, None, request_id)
    return {
        "id": row.id,
        "not_before": row.not_before,
        "depends_on": row.depends_on,
        "approval": row.approval,
        "rollout": row.rollout,
    }


# --------------------------------------------------------------------------- the engine

Wake = Callable[[Iterable[int]], None]  # computer ids that have work now


class Lifecycle:
    """In-memory indexes and the pass loop; see the module docstring."""

    def __init__(
        self,
        run: Callable[..., Any],  # Writer.run
        read: Any,  # engine for reads
        wake: Wake,
        *,
        clock: Callable[[], float] = time.time,
        interval: float = 1.0,
        fire: Callable[[int], Any] | None = None,  # schedule id -> awaitable (creates a run)
    ) -> None:
        self.run = run
        self.read = read
        self.wake = wake
        self.clock = clock
        self.interval = interval
        self.fire = fire
        # dependency key ("request"|"activity", id) -> requests Waiting on it
        self.waiters: dict[tuple[str, int], set[int]] = {}
        self._waits_on: dict[int, tuple[str, int]] = {}  # the reverse: O(1) forget
        self.rollouts: set[int] = set()
        self.timers: list[tuple[float, str, int]] = []
        self.windows: dict[int, list[tuple[RunWindow, int, int]]] = {}
        self._window_next: dict[int, float] = {}  # group id -> its pending opening timer
        self._finished: set[int] = set()
        self._event = asyncio.Event()
        # One pass at a time: a pass started elsewhere (a test's tick, the loop)
        # waits for the running one, which may have popped the timers it wants.
        self._pass_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.passes = 0

    # -- memory ------------------------------------------------------------------

    def watch(self, req: dict[str, Any]) -> None:
        """Index one request's pending lifecycle (after creation, approval, at start)."""
        now = self.clock()
        rid = int(req["id"])
        if req.get("not_before") is not None and req["not_before"] > now:
            self._at(req["not_before"], "release", rid)
        a = req.get("approval")
        if a and a.get("decision") is None and a.get("expires_at") is not None:
            self._at(a["expires_at"], "approval", rid)
        if req.get("depends_on") is not None:
            d = req["depends_on"]
            key = (d["kind"], int(d["on"]))
            self.waiters.setdefault(key, set()).add(rid)
            self._waits_on[rid] = key
        if req.get("rollout"):
            self.rollouts.add(rid)
        self.poke()

    def _at(self, when: float, kind: str, ident: int) -> None:
        heapq.heappush(self.timers, (when, kind, ident))

    def forget(self, request_ids: Iterable[int], *, rollouts: bool = False) -> None:
        gone = set(request_ids)
        for rid in gone:
            key = self._waits_on.pop(rid, None)
            if key is not None and key in self.waiters:
                self.waiters[key].discard(rid)
                if not self.waiters[key]:
                    del self.waiters[key]
        if rollouts:
            self.rollouts -= gone

    def on_finished(self, activity_ids: set[int]) -> None:
        """Writer hook (after commit): these activities reached a final state."""
        if self.waiters or self.rollouts:
            self._finished |= activity_ids
            self._event.set()

    def poke(self) -> None:
        self._event.set()

    @property
    def has_windows(self) -> bool:
        return bool(self._window_next)

    def window_closed(self, computer_id: int, now: float) -> bool:
        ws = self.windows.get(computer_id)
        return ws is not None and bool(closed_windows(ws, now))

    def why_held(self, computer_id: int, now: float) -> str | None:
        ws = self.windows.get(computer_id)
        closed = closed_windows(ws, now) if ws else []
        if not closed:
            return None
        opens = max(next_window_open(w, now, off) for w, off, _ in closed)
        shown = ", ".join(f"{w} (UTC{off / 60:+g}h)" for w, off, _ in closed)
        return f"waits for the maintenance window {shown}; opens at {iso(opens)}"

    # -- loading -------------------------------------------------------------------

    async def load(self) -> None:
        async with self.read.connect() as conn:
            pending = sa.select(activities.c.request_id).where(
                activities.c.state.in_(
                    [
                        State.SCHEDULED.value,
                        State.WAITING.value,
                        State.BLOCKED.value,
                        State.QUEUED.value,
                        State.IN_PROGRESS.value,
                    ]
                ),
                activities.c.request_id == requests.c.id,
            )
            for row in await conn.execute(
                sa.select(requests).where(
                    sa.or_(
                        requests.c.not_before.is_not(None),
                        requests.c.depends_on.is_not(None),
                        requests.c.approval.is_not(None),
                        requests.c.rollout.is_not(None),
                    ),
                    sa.exists(pending),
                )
            ):
                self.watch(dict(row._mapping))
            for row in await conn.execute(
                sa.select(schedules.c.id, schedules.c.next_at).where(
                    schedules.c.next_at.is_not(None)
                )
            ):
                self._at(row.next_at, "cron", row.id)
        await self.reload_windows()

    async def reload_windows(self) -> None:
        async with self.read.connect() as conn:
            self.windows = await load_windows(conn)
        now = self.clock()
        seen: dict[int, tuple[RunWindow, int]] = {}
        for ws in self.windows.values():
            for w, off, gid in ws:
                seen[gid] = (w, off)
        for gid, (w, off) in seen.items():
            # A changed window gets a new timer; the old one is recognised as stale.
            when = next_window_open(w, now, off)
            if self._window_next.get(gid) != when:
                self._window_next[gid] = when
                self._at(when, "window", gid)
        for gid in set(self._window_next) - set(seen):
            del self._window_next[gid]  # window cleared or group gone: its timer is stale
        self.poke()

    def add_schedule(self, sid: int, next_at: float) -> None:
        self._at(next_at, "cron", sid)
        self.poke()

    # -- the loop ------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="lifecycle")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            timeout = self.interval
            if self.timers:
                timeout = max(0.0, min(timeout, self.timers[0][0] - self.clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
            self._event.clear()
            try:
                await self.run_pass()
            except Exception:
                log.exception("lifecycle pass failed; retrying")
                await asyncio.sleep(self.interval)

    async def run_pass(self) -> None:
        """One pass: the due timers, then what finished since the last pass.
        Passes never overlap; one asked for during another runs after it."""
        async with self._pass_lock:
            await self._pass()

    async def _pass(self) -> None:
        self.passes += 1
        now = self.clock()
        while self.timers and self.timers[0][0] <= now:
            when, kind, ident = heapq.heappop(self.timers)
            await self._timer(kind, ident, now, when)
        if self._finished:
            ids, self._finished = self._finished, set()
            await self._react(ids, now)

    async def _timer(self, kind: str, ident: int, now: float, when: float) -> None:
        if kind == "release":
            async with self.read.connect() as conn:
                cids = (
                    await conn.execute(
                        sa.select(activities.c.computer_id).where(
                            activities.c.request_id == ident,
                            activities.c.state.in_([State.SCHEDULED.value, State.QUEUED.value]),
                        )
                    )
                ).scalars()
                self.wake([int(c) for c in cids])
        elif kind == "approval":
            self.apply(await self.run(lambda c: expire_approval(c, self.clock(), ident)))
        elif kind == "window":
            if self._window_next.get(ident) != when:
                return  # stale: the window changed or was cleared since
            members = [cid for cid, ws in self.windows.items() if any(g == ident for *_, g in ws)]
            self.wake(members)
            for ws in self.windows.values():
                for w, off, gid in ws:
                    if gid == ident:
                        # the next opening after this one (a minute on, so not "now")
                        nxt = next_window_open(w, now + 60, off)
                        self._window_next[gid] = nxt
                        self._at(nxt, "window", gid)
                        return
            self._window_next.pop(ident, None)
        elif kind == "cron" and self.fire is not None:
            nxt = await self.fire(ident)
            if nxt is not None:
                self._at(nxt, "cron", ident)

    async def _react(self, finished: set[int], now: float) -> None:
        async with self.read.connect() as conn:
            rows = list(
                await conn.execute(
                    sa.select(activities.c.id, activities.c.request_id).where(
                        activities.c.id.in_(list(finished))
                    )
                )
            )
        touched_requests = {r.request_id for r in rows if r.request_id is not None}
        waiting: set[int] = set()
        for r in rows:
            waiting |= self.waiters.get(("activity", r.id), set())
        for rid in touched_requests:
            waiting |= self.waiters.get(("request", rid), set())
        for rid in sorted(waiting):
            self.apply(await self.run(lambda c, rid=rid: evaluate_waiter(c, self.clock(), rid)))
        for rid in sorted(touched_requests & self.rollouts):
            self.apply(await self.run(lambda c, rid=rid: evaluate_rollout(c, self.clock(), rid)))

    def apply(self, moved: Moved) -> None:
        """After a lifecycle write committed: wake computers, update the indexes."""
        if moved.done:
            self.forget(moved.done)
        if moved.over:
            self.forget(moved.over, rollouts=True)
        for req in moved.watch:  # after forgetting: a new dependency replaces the old
            self.watch(req)
        if moved.queued_computers:
            self.wake(moved.queued_computers)
