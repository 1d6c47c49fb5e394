"""Blocked and Waiting server tasks (SPEC 2.1, server column; issue 5).

Contract: a task submitted with ``approval`` starts Blocked until an admin
approves it (then Queued, or Waiting while its dependency is pending) or
rejects it (Canceled); an approval may expire (Canceled, "approval expired")
and may be required to come from someone other than the submitter. A task
submitted with ``after`` (another task's id, metric ``finished`` or
``succeeded``) starts Waiting and is Queued the moment that task ends as
required, or Canceled when it ended otherwise. Only Queued and Scheduled tasks
are ever in the batch scheduler; a released task is added to it then. The
waiter index maps a task to the tasks waiting on it, so a finished task costs
a dict lookup when nobody waits.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from taskfleet.domain.lifecycle import Approval, approval_refusal
from taskfleet.domain.scheduling import Pending
from taskfleet.domain.states import FINAL_STATES, Cause, State
from taskfleet.server.kernel import ApiError, Principal, audit
from taskfleet.settings import MAX_AHEAD, MAX_ID
from taskfleet.store import tasks as store
from taskfleet.store.tasks import holds, reads

log = logging.getLogger("taskfleet.scheduler")


def parse_hold(now: float, actor: str, approval: Any, after: Any) -> dict[str, Any] | None:
    """Validate the hold options of a submission (ApiError 400 says what is wrong)."""
    hold: dict[str, Any] = {}
    if approval is not None:
        if not isinstance(approval, dict) or set(approval) - {"separation", "expires_in"}:
            raise ApiError(400, "approval must be {separation: bool, expires_in: seconds}")
        expires_in = approval.get("expires_in")
        if expires_in is not None and (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, int | float)
            or not 0 < expires_in <= MAX_AHEAD
        ):
            raise ApiError(400, "approval.expires_in must be in (0, 366 days] seconds")
        hold["approval"] = {
            "separation": bool(approval.get("separation", False)),
            "expires_at": None if expires_in is None else now + float(expires_in),
            "requested_by": actor,
            "requested_at": now,
            "decision": None,
        }
    if after is not None:
        if not isinstance(after, dict) or set(after) - {"task", "metric"}:
            raise ApiError(400, "after must be {task: ID, metric: finished|succeeded}")
        tid = after.get("task")
        if isinstance(tid, bool) or not isinstance(tid, int) or not 1 <= tid <= MAX_ID:
            raise ApiError(400, f"after.task must be a task id, got {tid!r}")
        metric = after.get("metric", "finished")
        if metric not in ("finished", "succeeded"):
            raise ApiError(400, f"after.metric must be finished or succeeded, got {metric!r}")
        hold["after"] = {"task": tid, "metric": metric}
    return hold or None


def _dep_outcome(after: dict[str, Any], state: State) -> bool | None:
    """True: met; False: can never be met; None: not yet."""
    if state not in FINAL_STATES:
        return None
    if after["metric"] == "finished":
        return True
    return state is State.SUCCEEDED


def _describe(after: dict[str, Any]) -> str:
    return f"task {after['task']} " + ("finished" if after["metric"] == "finished" else "succeeded")


class TaskHolds:
    """Mixed into TaskManager: needs writer, read, scheduler, clock, _wake."""

    writer: Any
    read: Any
    scheduler: Any
    clock: Any
    _wake: Any
    _task_waiters: dict[int, set[int]]
    _settling: set[asyncio.Task[None]]

    async def hold_for(
        self, conn: Any, p: Principal, hold: dict[str, Any] | None
    ) -> tuple[State, str, dict[str, Any]] | None:
        """The state a held submission starts in; refuses a dependency that cannot be met."""
        if hold is None:
            return None
        after = hold.get("after")
        if after is not None:
            dep = await reads.get_task(conn, p.tenant_id, after["task"])
            if dep is None:
                raise ApiError(404, f"dependency: no task {after['task']} in this tenant")
            outcome = _dep_outcome(after, State(dep["state"]))
            if outcome is False:
                raise ApiError(
                    409,
                    f"dependency can never be met: {_describe(after)} "
                    f"(it ended {State(dep['state']).label})",
                )
            if outcome is True:
                hold = {k: v for k, v in hold.items() if k != "after"} or None
                if hold is None:
                    return None
        if hold.get("approval") is not None:
            return State.BLOCKED, "needs approval", hold
        return State.WAITING, f"waits for {_describe(hold['after'])}", hold

    def track(self, task_id: int, state: State, hold: dict[str, Any] | None) -> None:
        """After commit: index a Waiting task under the task it waits on."""
        if state is State.WAITING and hold and hold.get("after"):
            self._task_waiters.setdefault(hold["after"]["task"], set()).add(task_id)

    def dependency_finished(self, task_ids: list[int]) -> None:
        """Tasks ended: release or cancel the tasks waiting on them (in the background)."""
        waiting = [w for t in task_ids for w in self._task_waiters.pop(t, ())]
        if waiting:
            # Held here until done: the loop keeps only a weak reference to a task.
            task = asyncio.get_running_loop().create_task(self._settle_waiters(waiting))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle_waiters(self, waiting: list[int]) -> None:
        for tid in waiting:
            try:
                await self.writer.run(lambda c, tid=tid: self._settle(c, tid), after=self._released)
            except Exception:
                log.exception("task[%d]: releasing it after its dependency failed", tid)

    async def _settle(self, conn: Any, tid: int) -> Pending | None:
        rows = await holds.held(conn, tid)
        if not rows or State(rows[0].state) is not State.WAITING:
            return None
        row = rows[0]
        after = row.hold["after"]
        dep = await reads.get_task(conn, row.tenant_id, after["task"])
        outcome = None if dep is None else _dep_outcome(after, State(dep["state"]))
        if dep is None:
            outcome = False
        if outcome is None:  # not yet (a restart's check): keep waiting on it
            self._task_waiters.setdefault(after["task"], set()).add(tid)
            return None
        now = self.clock()
        if outcome:
            await holds.move_held(
                conn,
                row,
                State.QUEUED,
                actor="server",
                now=now,
                cause=Cause.SYSTEM,
                reason=f"dependency met: {_describe(after)}",
            )
            return Pending(row.id, row.type, row.scope_tenant, row.group_name, row.not_before)
        await holds.move_held(
            conn,
            row,
            State.CANCELED,
            actor="server",
            now=now,
            cause=Cause.SYSTEM,
            reason=f"dependency can no longer be met: {_describe(after)}",
        )
        return None

    def _released(self, pending: Pending | None) -> None:
        if pending is not None:
            self.scheduler.add(pending)
            self._wake.set()
            log.info("%s released: Queued", store.label(pending.type, pending.id))

    async def approve_task(self, p: Principal, task_id: int) -> None:
        now = self.clock()

        async def fn(conn: Any) -> tuple[Pending | None, int | None, dict[str, Any]]:
            rows = await holds.held(conn, task_id)
            row = rows[0] if rows and rows[0].tenant_id == p.tenant_id else None
            if (
                row is None
                or State(row.state) is not State.BLOCKED
                or not row.hold
                or (row.hold.get("approval") is None)
            ):
                if await reads.get_task(conn, p.tenant_id, task_id) is None:
                    raise ApiError(404, f"no task {task_id}")
                raise ApiError(409, f"task {task_id} is not Blocked awaiting approval")
            a = row.hold["approval"]
            why = approval_refusal(
                Approval(a["requested_by"], a["requested_at"], a["expires_at"], a["separation"]),
                p.actor,
                now,
            )
            if why:
                raise ApiError(403 if "separation" in why else 409, why)
            hold = {**row.hold, "approval": {**a, "decision": "approved", "decided_by": p.actor}}
            after = row.hold.get("after")
            pending_dep = False
            if after is not None:
                dep = await reads.get_task(conn, p.tenant_id, after["task"])
                outcome = None if dep is None else _dep_outcome(after, State(dep["state"]))
                if outcome is False or dep is None:
                    raise ApiError(409, f"dependency can never be met: {_describe(after)}")
                pending_dep = outcome is None
            target = State.WAITING if pending_dep else State.QUEUED
            await holds.move_held(
                conn,
                row,
                target,
                actor=p.actor,
                now=now,
                hold=hold,
                reason=f"approved by {p.actor}"
                + (f"; waits for {_describe(after)}" if pending_dep and after else ""),
            )
            await audit(conn, p, "task.approve", now, id=task_id)
            pend = (
                None
                if pending_dep
                else Pending(row.id, row.type, row.scope_tenant, row.group_name, row.not_before)
            )
            return pend, (row.id if pending_dep else None), hold

        def after(res: tuple[Pending | None, int | None, dict[str, Any]]) -> None:
            pend, waiting, hold = res
            if waiting is not None:
                self.track(waiting, State.WAITING, hold)
            self._released(pend)

        await self.writer.run(fn, after=after)

    async def reject_task(self, p: Principal, task_id: int, reason: str) -> None:
        now = self.clock()

        async def fn(conn: Any) -> None:
            rows = await holds.held(conn, task_id)
            row = rows[0] if rows and rows[0].tenant_id == p.tenant_id else None
            if row is None or State(row.state) is not State.BLOCKED:
                if await reads.get_task(conn, p.tenant_id, task_id) is None:
                    raise ApiError(404, f"no task {task_id}")
                raise ApiError(409, f"task {task_id} is not Blocked awaiting approval")
            hold = {**row.hold, "approval": {**row.hold["approval"], "decision": "rejected"}}
            await holds.move_held(
                conn,
                row,
                State.CANCELED,
                actor=p.actor,
                now=now,
                hold=hold,
                reason=f"rejected by {p.actor}" + (f": {reason}" if reason else ""),
            )
            await audit(conn, p, "task.reject", now, id=task_id, reason=reason)

        await self.writer.run(fn, after=lambda _r: self.dependency_finished([task_id]))

    async def expire_approvals(self, conn: Any) -> list[int]:
        """Cancel Blocked tasks whose approval expired (run by the reaper)."""
        now = self.clock()
        out = []
        for row in await holds.held(conn):
            a = (row.hold or {}).get("approval")
            if (
                State(row.state) is State.BLOCKED
                and a
                and a.get("decision") is None
                and a.get("expires_at") is not None
                and now >= a["expires_at"]
            ):
                await holds.move_held(
                    conn,
                    row,
                    State.CANCELED,
                    actor="server",
                    now=now,
                    cause=Cause.TIMEOUT,
                    hold={**row.hold, "approval": {**a, "decision": "expired"}},
                    reason="approval expired",
                )
                out.append(row.id)
        return out
