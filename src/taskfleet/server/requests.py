"""Requests: create (from a target or a schedule), re-run the failed, cancel, read.

A job (``domain/jobs.py``) is a request of type ``job``: created here like any other
(``server/job_specs.py`` checks its params), so a schedule's run or a re-run of the
failed creates its ``jobs`` row too; what only a job has is in ``server/jobs.py``.

Contract: every function takes an open connection and the caller's tenant and
touches only that tenant's rows; functions that write are run by the single
writer (``Writer.run``). Bad input raises :class:`ApiError` with an HTTP status
and a message that says what is wrong, before anything is written. Cancel
moves activities through ``transition`` + ``apply_changes`` and tells agents
running them to stop (an outbox message each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.actions import ACTION_TYPES, action_refusal, validate_action
from taskfleet.domain.jobs import JOB, validate_job_spec
from taskfleet.domain.lifecycle import RuleError, initial_state, plan_waves
from taskfleet.domain.policy import validate_policy
from taskfleet.domain.progress import progress
from taskfleet.domain.scripts import (
    EXECUTE_SCRIPT,
    policy_refusal,
    validate_script_params,
    validate_timeout,
)
from taskfleet.domain.states import (
    ActivityKind,
    Cause,
    IllegalTransition,
    State,
    creation,
    transition,
)
from taskfleet.domain.targets import (
    TargetError,
    parse_target,
)
from taskfleet.protocol.exchange import cancel_message
from taskfleet.protocol.orders import cancel_body
from taskfleet.protocol.signing import Signer
from taskfleet.server import job_specs
from taskfleet.server.inventory import group_id, resolve_target
from taskfleet.server.kernel import (
    ApiError,
    Principal,
    audit,
    state_counts,
)
from taskfleet.server.lifecycle import Options, check_options, iso
from taskfleet.server.outbox import Outbox
from taskfleet.settings import MAX_AHEAD, OUTPUT_CAP, OUTPUT_CAP_MAX, SCRIPT_TIMEOUT
from taskfleet.store.activities import Change, apply_changes, insert_activities, insert_events
from taskfleet.store.schema import (
    activities,
    computers,
    group_members,
    groups,
    requests,
)


@dataclass
class Created:
    request: dict[str, Any]
    computer_ids: list[int]


async def create_request(
    conn: AsyncConnection,
    p: Principal,
    now: float,
    *,
    type: str,
    target: str,
    params: Any,
    timeout: Any,
    policy: Any = None,
    expires_in: float | None = None,
    options: Options | None = None,
    schedule_id: int | None = None,
) -> Created:
    """A request of ``type`` (execute-script or job) on ``target``: checked whole, then
    stored with one activity per target computer. A job's params are completed from
    the tenant's content first (``server/job_specs.py``) and its ``jobs`` row is
    written in the same transaction; its ``timeout`` may be None (its longest step)."""
    _known_type(type)
    try:
        parsed = parse_target(target)
        run_policy = validate_policy(policy)
        if expires_in is not None and not 0 < expires_in <= MAX_AHEAD:
            raise ValueError("expires_in must be a number of seconds in (0, 366 days]")
        if type == EXECUTE_SCRIPT:
            clean = validate_script_params(params, default_cap=OUTPUT_CAP, max_cap=OUTPUT_CAP_MAX)
            limit = validate_timeout(SCRIPT_TIMEOUT if timeout is None else timeout)
        elif type in ACTION_TYPES:
            clean, limit = _action_params(type, params, timeout)
    except (TargetError, ValueError) as exc:
        raise ApiError(400, str(exc)) from None
    if type == JOB:
        _job_policy(run_policy)
        clean = await job_specs.complete_params(conn, p.tenant_id, params)
        limit = _job_timeout(clean, timeout)
    ids = await resolve_target(conn, p.tenant_id, parsed)
    expires_at = None if expires_in is None else now + expires_in
    return await _create(
        conn,
        p,
        now,
        type,
        str(parsed),
        clean,
        limit,
        run_policy,
        ids,
        expires_at,
        options,
        schedule_id,
    )


def _known_type(type: str) -> None:
    if type not in (EXECUTE_SCRIPT, JOB) and type not in ACTION_TYPES:
        known = ", ".join([EXECUTE_SCRIPT, JOB, *ACTION_TYPES])
        raise ApiError(400, f"unknown activity type {type!r} (known: {known})"[:1000])


def _action_params(type: str, params: Any, timeout: Any) -> tuple[dict[str, Any], float]:
    """A typed activity's parameters (``domain/actions``) and time limit; ValueError."""
    try:
        clean = validate_action(type, params)
    except ValueError as exc:
        raise ValueError(f"{type}: {exc}") from None
    return clean, validate_timeout(
        ACTION_TYPES[type].default_timeout if timeout is None else timeout
    )


def _job_policy(run_policy: dict[str, Any]) -> None:
    if run_policy.get("interval") == "recurring":
        raise ApiError(
            400, "a job runs once on each computer: repeat it with a cron schedule instead"
        )


def _job_timeout(clean: dict[str, Any], timeout: Any) -> float:
    try:
        limit = None if timeout is None else validate_timeout(timeout)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return job_specs.job_timeout(validate_job_spec(clean), limit)


def check_template(
    *, type: str, target: str, params: Any, timeout: Any, policy: Any, expires_in: Any
) -> None:
    """What create_request checks before touching the store, for a schedule's template
    (a job's content references are looked up at each run, and by the caller)."""
    _known_type(type)
    try:
        parse_target(target)
        run_policy = validate_policy(policy)
        if expires_in is not None and not 0 < expires_in <= MAX_AHEAD:
            raise ValueError("expires_in must be a number of seconds in (0, 366 days]")
        if type == EXECUTE_SCRIPT:
            validate_script_params(params, default_cap=OUTPUT_CAP, max_cap=OUTPUT_CAP_MAX)
            validate_timeout(SCRIPT_TIMEOUT if timeout is None else timeout)
        elif type in ACTION_TYPES:
            _action_params(type, params, timeout)
    except (TargetError, ValueError) as exc:
        raise ApiError(400, str(exc)) from None
    if type == JOB:
        _job_policy(run_policy)
        spec = job_specs.check_shape(params)
        _job_timeout(spec.as_json(), timeout)


async def rerun_failed(conn: AsyncConnection, p: Principal, now: float, request_id: int) -> Created:
    """SPEC 9: a new request, same work, aimed only at the computers that failed."""
    old = await get_request(conn, p, request_id)
    ids = sorted(
        int(i)
        for i in (
            await conn.execute(
                sa.select(activities.c.computer_id)
                .join(computers, computers.c.id == activities.c.computer_id)
                .where(
                    activities.c.request_id == request_id,
                    activities.c.state == State.FAILED.value,
                    computers.c.removed_at.is_(None),  # a removed computer gets no new work
                )
            )
        ).scalars()
    )
    if not ids:
        raise ApiError(409, f"no computer failed in request {request_id}: nothing to re-run")
    return await _create(
        conn,
        p,
        now,
        old["type"],
        f"failed of request {request_id}",
        old["params"],
        old["timeout"],
        old["policy"] or validate_policy(None),
        ids,
    )


async def _create(
    conn: AsyncConnection,
    p: Principal,
    now: float,
    type: str,
    target: str,
    clean: dict[str, Any],
    limit: float,
    run_policy: dict[str, Any],
    ids: list[int],
    expires_at: float | None = None,
    options: Options | None = None,
    schedule_id: int | None = None,
) -> Created:
    opts = options or Options()
    met = await check_options(conn, p, opts)
    if opts.rollout is not None:
        r = opts.rollout
        try:
            waves = plan_waves(ids, canary=r.canary, size=r.size, share=r.share)
        except RuleError as exc:
            raise ApiError(400, f"rollout: {exc}") from None
    else:
        waves = [ids]
    wave_of = {cid: k for k, wave in enumerate(waves) for cid in wave}
    spec = validate_job_spec(clean) if type == JOB else None
    refusals = []
    for row in await conn.execute(
        sa.select(computers.c.id, computers.c.hostname, computers.c.policy).where(
            computers.c.id.in_(ids)
        )
    ):
        if spec is not None:
            why = job_specs.refusal(row.policy, spec)
        elif type in ACTION_TYPES:
            why = action_refusal(row.policy, type)
        else:
            why = policy_refusal(row.policy, clean)
        if why:
            refusals.append(f"{row.id} ({row.hostname}): {why}")
    if refusals:
        shown = "; ".join(refusals[:10]) + (" ..." if len(refusals) > 10 else "")
        what = "job" if spec is not None else "script" if type == EXECUTE_SCRIPT else type
        raise ApiError(
            409,
            f"{len(refusals)} of {len(ids)} target computers would refuse this {what}: {shown}",
        )
    request_id = (
        await conn.execute(
            requests.insert()
            .values(
                tenant_id=p.tenant_id,
                type=type,
                params=clean,
                target=target,
                created_by=p.actor,
                created_at=now,
                timeout=limit,
                total=len(ids),
                policy=run_policy,
                not_before=opts.not_before,
                depends_on=opts.after.as_json() if opts.after else None,
                approval=opts.approval,
                rollout=_rollout_json(opts, len(waves)),
                schedule_id=schedule_id,
            )
            .returning(requests.c.id)
        )
    ).scalar_one()
    if spec is not None:
        await job_specs.insert_job_row(conn, request_id, p.tenant_id, clean)
    states: dict[int, tuple[State, str]] = {}
    for cid in ids:
        wave = wave_of[cid] if opts.rollout is not None else None
        state = initial_state(
            approval=opts.approval is not None,
            waits=met is False or bool(wave),
            not_before=opts.not_before,
            now=now,
        )
        states[cid] = (state, _why(state, opts, request_id, wave))
    rows = await conn.run_sync(
        insert_activities,
        [
            {
                "tenant_id": p.tenant_id,
                "request_id": request_id,
                "computer_id": cid,
                "kind": ActivityKind.CLIENT.value,
                "type": type,
                "state": states[cid][0].value,
                "created_at": now,
                "updated_at": now,
                "reason": states[cid][1],
                "expires_at": expires_at,
                "not_before": opts.not_before,
                "wave": wave_of[cid] if opts.rollout is not None else None,
            }
            for cid in ids
        ],
    )
    await conn.run_sync(
        insert_events,
        [
            (
                aid,
                p.tenant_id,
                creation(states[cid][0], actor=p.actor, at=now, reason=states[cid][1]),
            )
            for aid, cid in zip(rows, ids, strict=True)
        ],
    )
    await audit(
        conn,
        p,
        "job.create" if spec is not None else "request.create",
        now,
        id=request_id,
        type=type,
        **({"name": clean["name"]} if spec is not None else {}),
        target=target,
        computers=len(ids),
        **({} if opts.empty else {"options": _options_json(opts)}),
    )
    ready = [cid for cid in ids if states[cid][0] in (State.QUEUED, State.SCHEDULED)]
    return Created(await get_request(conn, p, request_id), ready)


def _rollout_json(opts: Options, waves: int) -> dict[str, Any] | None:
    r = opts.rollout
    if r is None:
        return None
    return {
        "canary": r.canary,
        "size": r.size,
        "share": r.share,
        "success": r.success,
        "max_failures": r.max_failures,
        "waves": waves,
        "paused": False,
    }


def _options_json(opts: Options) -> dict[str, Any]:
    return {
        "not_before": opts.not_before,
        "after": opts.after.as_json() if opts.after else None,
        "approval": opts.approval,
        "rollout": _rollout_json(opts, 0),
    }


def _why(state: State, opts: Options, request_id: int, wave: int | None) -> str:
    """The creation event's reason: why the activity starts in ``state``."""
    head = f"request {request_id}" + ("" if wave is None else f", rollout wave {wave}")
    if state is State.BLOCKED:
        return f"{head}; needs approval"
    if state is State.WAITING:
        if opts.after is not None and not wave:
            return f"{head}; waits for {opts.after.describe()}"
        return (
            f"{head}; waits for wave {(wave or 1) - 1} to reach {opts.rollout.success:g}% succeeded"
            if opts.rollout
            else head
        )
    if state is State.SCHEDULED and opts.not_before is not None:
        return f"{head}; not earlier than {iso(opts.not_before)}"
    return head


@dataclass(frozen=True)
class BulkFilter:
    """Which unfinished client activities a bulk cancel takes (all given filters apply)."""

    state: str | None = None
    type: str | None = None
    group: str | None = None
    older_than: float | None = None  # seconds since creation
    request_id: int | None = None


async def check_bulk(conn: AsyncConnection, p: Principal, f: BulkFilter) -> None:
    final = {s.value for s in (State.FAILED, State.SUCCEEDED, State.CANCELED)}
    if f.state is not None:
        if f.state not in {s.value for s in State}:
            raise ApiError(400, f"unknown state {f.state!r}")
        if f.state in final:
            raise ApiError(
                400, f"{State(f.state).label} activities are finished: nothing to cancel"
            )
    if f.older_than is not None and f.older_than < 0:
        raise ApiError(400, "older_than must be a number of seconds >= 0")
    if f.group is not None:
        await group_id(conn, p.tenant_id, f.group)
    if f.request_id is not None:
        await get_request(conn, p, f.request_id)


def bulk_query(p: Principal, f: BulkFilter, now: float) -> sa.Select[Any]:
    final = [s.value for s in (State.FAILED, State.SUCCEEDED, State.CANCELED)]
    q = sa.select(activities.c.id, activities.c.state, activities.c.computer_id).where(
        activities.c.tenant_id == p.tenant_id,
        activities.c.kind == ActivityKind.CLIENT.value,
        activities.c.state.notin_(final),
    )
    if f.state is not None:
        q = q.where(activities.c.state == f.state)
    if f.type is not None:
        q = q.where(activities.c.type == f.type)
    if f.older_than is not None:
        q = q.where(activities.c.created_at < now - f.older_than)
    if f.request_id is not None:
        q = q.where(activities.c.request_id == f.request_id)
    if f.group is not None:
        q = q.join(group_members, group_members.c.computer_id == activities.c.computer_id).join(
            groups,
            (groups.c.id == group_members.c.group_id)
            & (groups.c.name == f.group)
            & (groups.c.tenant_id == p.tenant_id),
        )
    return q.order_by(activities.c.id)


@dataclass
class Canceled:
    ids: list[int]
    # computer id -> the last seq of the cancel messages appended for it (already in
    # the outbox); memory takes it after the commit
    notify: dict[int, int]


async def cancel(
    conn: AsyncConnection,
    p: Principal,
    now: float,
    seq_of: Callable[[int], int],
    signer: Signer,
    *,
    activity_id: int | None = None,
    request_id: int | None = None,
    bulk: BulkFilter | None = None,
    reason: str = "",
) -> Canceled:
    """Cancel one activity (illegal from a final state) or every open child of a request.

    ``seq_of(computer_id)`` gives the last server seq used (memory's; on PostgreSQL
    the stored one is locked and used, ``server/outbox.py``); the caller applies
    ``notify`` (each computer's last seq) to the in-memory fleet after the commit.
    A cancel order to an agent is signed with ``signer`` for the computer's current
    generation (its open work belongs to it: enrolling again cancels the old one's).
    """
    q = _with_generation(
        sa.select(activities.c.id, activities.c.state, activities.c.computer_id).where(
            activities.c.tenant_id == p.tenant_id
        )
    )
    if activity_id is not None:
        rows = (await conn.execute(q.where(activities.c.id == activity_id))).all()
        if not rows:
            raise ApiError(404, f"no activity {activity_id}")
    elif bulk is not None:
        rows = list(await conn.execute(_with_generation(bulk_query(p, bulk, now))))
    else:
        await get_request(conn, p, request_id or 0)  # 404 if not ours
        rows = [
            r
            for r in (await conn.execute(q.where(activities.c.request_id == request_id))).all()
            if State(r.state) not in (State.FAILED, State.SUCCEEDED, State.CANCELED)
        ]
    why = reason or "canceled by administrator"
    changes: list[Change] = []
    box = Outbox(seq_of)
    # PostgreSQL: number from the stored counters, locked (server/outbox.py); a row
    # another process changed since it was read fails the whole cancel (ConcurrentChange).
    await box.lock(conn, (r.computer_id for r in rows if r.computer_id is not None))
    for r in rows:
        try:
            t = transition(
                ActivityKind.CLIENT,
                State(r.state),
                State.CANCELED,
                cause=Cause.ADMIN,
                actor=p.actor,
                at=now,
                reason=why,
            )
        except IllegalTransition as exc:
            raise ApiError(409, str(exc)) from None
        changes.append(Change(r.id, p.tenant_id, t, {"finished_at": now}))
        if State(r.state) is State.IN_PROGRESS:
            # SPEC 2.1: stays Canceled; the agent is told to stop and its report recorded.
            op, cid = r.id, r.computer_id
            body = cancel_body(computer=cid, generation=r.generation, op=op)
            sig = signer.sign(body)
            box.append(cid, p.tenant_id, lambda seq: cancel_message(seq, op, body, sig))  # noqa: B023
    await conn.run_sync(apply_changes, changes)
    await box.write(conn, counters=True)
    await audit(
        conn,
        p,
        "activity.cancel" if activity_id else "bulk.cancel" if bulk else "request.cancel",
        now,
        id=activity_id or request_id,
        canceled=len(changes),
    )
    return Canceled([r.id for r in rows], box.last())


def _with_generation(q: sa.Select[Any]) -> sa.Select[Any]:
    """``q`` over activities, with the generation of each one's computer (a signed
    cancel names it)."""
    return q.add_columns(computers.c.generation).join_from(
        activities, computers, computers.c.id == activities.c.computer_id, isouter=True
    )


# -- reads ---------------------------------------------------------------------


async def get_request(conn: AsyncConnection, p: Principal, request_id: int) -> dict[str, Any]:
    row = (
        await conn.execute(
            sa.select(requests).where(
                requests.c.id == request_id, requests.c.tenant_id == p.tenant_id
            )
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no request {request_id}")
    return _request_json(row, await state_counts(conn, activities.c.request_id == request_id))


async def list_requests(conn: AsyncConnection, p: Principal, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` requests: one query for the page, one for all their counts."""
    rows = (
        await conn.execute(
            sa.select(requests)
            .where(requests.c.tenant_id == p.tenant_id)
            .order_by(requests.c.id.desc())
            .limit(limit)
        )
    ).all()
    counts: dict[int, dict[State, int]] = {r.id: {} for r in rows}
    if rows:
        for c in await conn.execute(
            sa.select(activities.c.request_id, activities.c.state, sa.func.count().label("n"))
            .where(activities.c.request_id.in_(list(counts)))
            .group_by(activities.c.request_id, activities.c.state)
        ):
            counts[c.request_id][State(c.state)] = c.n
    return [_request_json(r, counts[r.id]) for r in rows]


def _request_json(row: Any, counts: dict[State, int]) -> dict[str, Any]:
    prog = progress(counts)
    out = dict(row._mapping)
    out.pop("tenant_id")
    out["progress"] = {
        "counts": {k: v for k, v in prog.counts.items() if v},
        "total": prog.total,
        "finished": prog.finished,
        "succeeded": prog.succeeded,
        "done": prog.done,
    }
    return out
