"""The batch scheduler on the server (SPEC 4): submit, assess, dispatch, reap.

Contract: ``submit`` validates type and scope (refusing with the reason, and
logging it), drops duplicates of a not-yet-dispatched task (naming it),
persists before it answers, and wakes the scheduler. A scheduler pass asks the
pure ``domain.scheduling.Scheduler`` which pending tasks may start (oldest
first, under type limits, exclusions, per-tenant limits and not-before times:
conflicting work waits), marks them dispatched in the database, then publishes
them; a publish that fails un-marks them so they are dispatched again. Its cost
follows what changed. The reaper fails tasks held by workers whose heartbeats
stopped, and resubmits them when their type says a retry is safe. In the
embedded default the workers run in this process, on the in-process queue.

Cancel of a running task (issue 9): it is Canceled at once and the worker is
told over the dispatch port to stop it, but it keeps counting as running (its
type's limit and exclusions) until the worker's report says it stopped (or it
had finished), or the reaper finds its worker gone. The worker's report never
changes the Canceled state; it is recorded on the task.

Only the leader schedules (issue 16): ``start`` connects the dispatch port in every
process (so every process accepts submissions and cancels, persisted before they
answer); ``lead()`` is the cluster duty: it loads the open tasks, then runs the
scheduler, the worker reaper and ``catch_up()`` every ``catch_up_every`` seconds
(tasks other processes submitted or canceled). Its dispatch and reap writes go
through ``fence`` (the cluster's epoch check).

Why one module of about 700 lines: submit, cancel, dispatch, the reapers and the
catch-up all move the same in-memory scheduler state after the same commits; the
rules are in ``domain/scheduling.py``, the SQL in ``store/tasks/``, holds
(approvals, dependencies) in ``server/task_holds.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from taskfleet.aio import wait_set
from taskfleet.dispatch import DispatchQueue
from taskfleet.domain.scheduling import Pending, Scheduler, TaskType, from_specs
from taskfleet.domain.states import State
from taskfleet.domain.task_types import TaskTypeSpec, validate_params
from taskfleet.server.cluster import Deposed
from taskfleet.server.kernel import ApiError, Principal
from taskfleet.server.task_holds import TaskHolds, parse_hold
from taskfleet.server.writer import Writer
from taskfleet.settings import LEADER_CATCH_UP, LEADER_HINT_GAP
from taskfleet.store import tasks as store
from taskfleet.store.schema import groups, tenants
from taskfleet.store.tasks import dispatching, heartbeats, holds, reads, stops, submission
from taskfleet.store.unavailable import log_failure

log = logging.getLogger("taskfleet.scheduler")


@dataclass
class TaskManager(TaskHolds):
    writer: Writer
    read: Any  # engine for reads
    specs: dict[str, TaskTypeSpec]
    queue: DispatchQueue
    heartbeat_timeout: float
    reap_interval: float = 5.0
    watch_remote: bool = True  # workers in other processes: learn their results by polling
    clock: Callable[[], float] = time.time
    # The cluster's epoch check inside a leader's write (server/cluster.py); None: none.
    fence: Callable[[Any], Awaitable[None]] | None = None
    # The server processes still running (Cluster.alive): the embedded workers of the
    # others died with them. None: no cluster (every earlier embedded worker is gone).
    alive: Callable[[Any], Awaitable[set[str]]] | None = None
    # Tell the other server processes of a running task's cancel (PostgreSQL hints):
    # with the embedded queue the worker that runs it is in the leader, which may be
    # another process than the one the cancel reached.
    tell_cancel: Callable[[list[int]], None] = lambda ids: None
    # Tell the leader that tasks were submitted here (PostgreSQL hints): it catches up
    # at once instead of at its next catch_up_every (a burst through a process that
    # does not lead waited up to a second to start: benchmarks/bench_scale_out.py),
    # reading only those tasks.
    tell_leader: Callable[[list[int]], None] = lambda ids: None
    catch_up_every: float = LEADER_CATCH_UP
    leading: bool = field(init=False, default=False)
    # This process's embedded worker runs (set by the runtime once the lead is settled).
    embedded_started: bool = field(init=False, default=False)
    scheduler: Scheduler = field(init=False)
    _seen: set[int] = field(init=False, default_factory=set)  # ids the scheduler was given
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)
    _types: dict[str, TaskType] = field(init=False)
    _task_waiters: dict[int, set[int]] = field(init=False, default_factory=dict)
    _new_holds: dict[int, dict[str, Any]] = field(init=False, default_factory=dict)
    _settling: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    _catch_up_now: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _hinted: set[int] | None = field(init=False, default_factory=set)  # None: scan all

    def __post_init__(self) -> None:
        self._types = from_specs(self.specs)
        self.scheduler = Scheduler(self._types)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Every process: connect the dispatch port (scheduling waits for the lead)."""
        await self.queue.connect()

    async def lead(self, ready: Callable[[], None] = lambda: None) -> None:
        """The leader's duty: load the open tasks (then ``ready()``), then schedule,
        reap and catch up until canceled (the lead is lost) or deposed."""
        self.scheduler = Scheduler(self._types)
        self._task_waiters.clear()
        self._seen.clear()
        self.leading = True
        try:
            await self._load()
            ready()
            loops = [self._loop(), self._reaper(), self._catch_up_loop()]
            if self.watch_remote:
                loops.append(self._watch_finished())
            self._wake.set()
            tasks = [asyncio.create_task(loop) for loop in loops]
            try:  # one failing (Deposed, say) ends them all: none may outlive the lead
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.leading = False

    async def _fenced(self, conn: Any) -> None:
        if self.fence is not None:
            await self.fence(conn)

    async def _load(self) -> None:
        async with self.read.connect() as conn:
            open_tasks = await dispatching.load_open(conn)
        republish = []
        for t in open_tasks:
            if t.type not in self._types:
                log.warning(
                    "%s: type is no longer declared; it waits until it is",
                    store.label(t.type, t.id),
                )
                continue
            p = Pending(t.id, t.type, t.tenant, t.group, t.not_before)
            if t.state in (State.BLOCKED, State.WAITING):
                continue  # held: enters the scheduler when released
            self._seen.add(t.id)
            if t.state is State.IN_PROGRESS or t.dispatched:
                self.scheduler.restore_running(p)
                if t.state is State.QUEUED:
                    republish.append(t.id)  # dispatched before a restart, not yet claimed
            else:
                self.scheduler.add(p)
        async with self.read.connect() as conn:
            for row in await holds.held(conn):
                self.track(row.id, State(row.state), row.hold)
        # A dependency may have ended while the server was down.
        self.dependency_finished(list(self._task_waiters))
        # Embedded: the workers of server processes that are gone died with them (a
        # dead leader's above all): their tasks fail now, not after the heartbeat timeout.
        if not self.watch_remote:
            now = self.clock()

            async def reap(c: Any) -> list[heartbeats.Reaped]:
                await self._fenced(c)
                return await heartbeats.reap_workers(
                    c, self.heartbeat_timeout, now, servers_alive=await self._alive(c)
                )

            gone = await self.writer.run(reap)
            await self._reaped(gone, "its server process ended")
        if republish:
            # The embedded queue died with the process; RabbitMQ may hold them
            # already, and a second delivery is dropped at the claim.
            await self.queue.publish(republish)
            log.info("republished %d dispatched-but-unclaimed tasks", len(republish))
        log.info(
            "scheduler ready: %d pending, %d running",
            self.scheduler.pending_count,
            self.scheduler.running_count,
        )

    async def catch_up(self, ids: list[int] | None = None) -> None:
        """Tasks other processes submitted (new to this scheduler) or canceled (still
        pending here), in one short scan (``ids``: of those tasks only). Read and
        applied in the writer's order, so a submission of this process is never taken
        for one canceled elsewhere. The leader calls it on a hint too."""

        async def read(conn: Any) -> tuple[list[dispatching.OpenTask], list[Any]]:
            return await dispatching.load_open(conn, ids), list(await holds.held(conn, ids=ids))

        await self.writer.run(read, after=lambda found: self._caught_up(found, ids))

    def _caught_up(
        self, found: tuple[list[dispatching.OpenTask], list[Any]], ids: list[int] | None
    ) -> None:
        open_tasks, held = found
        open_ids = {t.id for t in open_tasks}
        pending = self.scheduler.pending_ids() if ids is None else ids
        # Pending here, no longer open there: canceled elsewhere.
        gone = [tid for tid in pending if tid not in open_ids and self.scheduler.cancel(tid)]
        added = 0
        for t in open_tasks:
            if t.id in self._seen or self.scheduler.knows(t.id) or t.type not in self._types:
                continue
            if t.state in (State.BLOCKED, State.WAITING):
                continue  # held: the leader's catch-up adds it once released
            self._seen.add(t.id)
            p = Pending(t.id, t.type, t.tenant, t.group, t.not_before)
            if t.state is State.IN_PROGRESS or t.dispatched:
                self.scheduler.restore_running(p)
            else:
                self.scheduler.add(p)
                added += 1
        for row in held:
            self.track(row.id, State(row.state), row.hold)
        if added or gone:
            log.info("caught up: %d tasks submitted, %d canceled elsewhere", added, len(gone))
            self._wake.set()

    def hinted(self, ids: list[int] | None) -> None:
        """Another process submitted these tasks (None: too many to name): the leader
        catches up with them now (coalesced: hints that come during a catch-up make
        one more)."""
        if ids is None or self._hinted is None:
            self._hinted = None
        else:
            self._hinted.update(ids)
        self._catch_up_now.set()

    async def _catch_up_loop(self) -> None:
        last_scan = time.monotonic()
        while True:
            await wait_set(self._catch_up_now, self.catch_up_every)
            self._catch_up_now.clear()
            hinted, self._hinted = self._hinted, set()
            # The whole scan every catch_up_every even while hints keep coming: a hint
            # may be lost, and cancels and releases elsewhere send none.
            scan = hinted is None or time.monotonic() - last_scan >= self.catch_up_every
            if scan:
                last_scan = time.monotonic()
            try:
                await self.catch_up(None if scan or hinted is None else sorted(hinted))
            except Exception:
                log.exception("scheduler catch-up failed; the next one scans everything")
                last_scan = -self.catch_up_every
            # A burst of hints makes a scan at most every LEADER_HINT_GAP, not one each.
            await asyncio.sleep(LEADER_HINT_GAP)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.queue.close()

    # -- submit and cancel ---------------------------------------------------------

    @staticmethod
    def _tenant_name(conn: sa.Connection, tenant_id: int) -> str | None:
        name = conn.execute(sa.select(tenants.c.name).where(tenants.c.id == tenant_id)).scalar()
        return None if name is None else str(name)

    def _check(
        self,
        type_: str,
        tenant: str | None,
        group: str | None,
        params: dict[str, Any],
        not_before: float | None,
    ) -> dict[str, Any]:
        """SPEC 4.1: refuse a bad type, scope or parameters with the reason (and log it)."""
        spec = self.specs.get(type_)
        try:
            if spec is None:
                known = ", ".join(sorted(self.specs)) or "none"
                raise ApiError(400, f"unknown task type {type_!r} (declared: {known})")
            if spec.scope == "group" and (group is None or tenant is not None):
                raise ApiError(400, f"{type_} is group-scoped: give a group and no tenant")
            if spec.scope == "tenant" and group is not None:
                raise ApiError(400, f"{type_} is tenant-scoped: give a tenant, not a group")
            if spec.scope == "none" and (group is not None or tenant is not None):
                raise ApiError(400, f"{type_} takes neither a tenant nor a group")
            if not_before is not None and not_before != not_before:  # NaN
                raise ApiError(400, "not_before must be a time")
            try:
                return validate_params(spec, params)
            except ValueError as exc:
                raise ApiError(400, f"{type_}: {exc}") from None
        except ApiError as exc:
            log.warning("task submission refused: %s", exc.message)
            raise

    async def _insert(
        self,
        conn: Any,
        p: Principal,
        now: float,
        type_: str,
        tenant: str | None,
        group: str | None,
        clean: dict[str, Any],
        not_before: float | None,
        hold: dict[str, Any] | None = None,
    ) -> tuple[submission.Submitted, Pending]:
        scope_tenant, group = await conn.run_sync(self._scope, p, type_, tenant, group)
        held = await self.hold_for(conn, p, hold)
        sub = await submission.submit(
            conn,
            owner_tenant=p.tenant_id,
            actor=p.actor,
            type_=type_,
            scope_tenant=scope_tenant,
            group=group,
            params=clean,
            not_before=not_before,
            now=now,
            hold=held,
        )
        if held is not None:
            self._new_holds[sub.id] = held[2]
        return sub, Pending(sub.id, type_, scope_tenant, group, not_before)

    def _scope(
        self, conn: sa.Connection, p: Principal, type_: str, tenant: str | None, group: str | None
    ) -> tuple[int | None, str | None]:
        scope_tenant = None
        if self.specs[type_].scope == "tenant":
            # The submitter's own tenant: naming another is refused alike whether it
            # exists or not (a tenant's existence is not for others to learn).
            scope_tenant = p.tenant_id
            if tenant is not None and tenant != self._tenant_name(conn, p.tenant_id):
                raise ApiError(403, "a token may only submit tasks for its own tenant")
        if group is not None:
            found = conn.execute(
                sa.select(groups.c.id).where(
                    groups.c.tenant_id == p.tenant_id, groups.c.name == group
                )
            ).scalar()
            if found is None:
                raise ApiError(404, f"unknown group {group!r}")
        return scope_tenant, group

    def _accepted(self, results: list[tuple[submission.Submitted, Pending]]) -> None:
        told: list[int] = []
        for sub, pending in results:
            hold = self._new_holds.pop(sub.id, None)
            if sub.duplicate_of is not None:
                continue
            if not self.leading:
                # The leader's catch-up finds it in the database; told, at once.
                told.append(sub.id)
                continue
            self._seen.add(sub.id)
            if sub.state in (State.BLOCKED, State.WAITING):
                self.track(sub.id, sub.state, hold)
            else:
                self.scheduler.add(pending)
        if told:
            self.tell_leader(told)
        self._wake.set()

    def _log_submitted(self, p: Principal, type_: str, sub: submission.Submitted) -> None:
        name = store.label(type_, sub.id)
        if sub.duplicate_of is not None:
            log.info("%s submission is a duplicate of a task not yet dispatched: not queued", name)
        else:
            log.info("%s submitted by %s (%s)", name, p.actor, sub.state.label)

    async def submit(
        self,
        p: Principal,
        *,
        type_: str,
        tenant: str | None,
        group: str | None,
        params: dict[str, Any],
        not_before: float | None,
        approval: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        clean = self._check(type_, tenant, group, params, not_before)
        now = self.clock()
        hold = parse_hold(now, p.actor, approval, after)

        async def fn(conn: Any) -> list[tuple[submission.Submitted, Pending]]:
            return [await self._insert(conn, p, now, type_, tenant, group, clean, not_before, hold)]

        try:
            [(sub, _)] = await self.writer.run(fn, after=self._accepted)
        except ApiError as exc:
            log.warning("task submission refused: %s", exc.message)
            raise
        self._log_submitted(p, type_, sub)
        async with self.read.connect() as conn:
            task = await reads.get_task(conn, p.tenant_id, sub.id)
        assert task is not None
        return {"task": self._describe(task), "duplicate_of": sub.duplicate_of}

    async def submit_many(self, p: Principal, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Submit several tasks at once: all are checked first, then persisted together
        (one transaction); a bad one refuses the whole batch, naming it."""
        checked = []
        for i, item in enumerate(items):
            if item.get("approval") is not None or item.get("after") is not None:
                raise ApiError(
                    400, f"task {i}: approval and after are for one task at a time (POST /tasks)"
                )
            try:
                checked.append(
                    (
                        item,
                        self._check(
                            item["type"],
                            item.get("tenant"),
                            item.get("group"),
                            item.get("params", {}),
                            item.get("not_before"),
                        ),
                    )
                )
            except ApiError as exc:
                raise ApiError(exc.status, f"task {i}: {exc.message}") from None
        now = self.clock()

        def fn(conn: sa.Connection) -> list[tuple[submission.Submitted, Pending]]:
            news = []
            for i, (item, clean) in enumerate(checked):
                try:
                    scope_tenant, group = self._scope(
                        conn, p, item["type"], item.get("tenant"), item.get("group")
                    )
                except ApiError as exc:
                    raise ApiError(exc.status, f"task {i}: {exc.message}") from None
                news.append(
                    submission.NewTask(
                        item["type"], scope_tenant, group, clean, item.get("not_before")
                    )
                )
            subs = submission.submit_many(
                conn, owner_tenant=p.tenant_id, actor=p.actor, items=news, now=now
            )
            return [
                (sub, Pending(sub.id, t.type, t.scope_tenant, t.group, t.not_before))
                for sub, t in zip(subs, news, strict=True)
            ]

        results = await self.writer.run_sync(fn, after=self._accepted)
        for (item, _), (sub, _) in zip(checked, results, strict=True):
            self._log_submitted(p, item["type"], sub)
        return [
            {
                "id": sub.id,
                "name": store.label(pend.type, sub.id),
                "state": sub.state.value,
                "duplicate_of": sub.duplicate_of,
            }
            for sub, pend in results
        ]

    async def cancel(self, p: Principal, task_id: int, reason: str) -> dict[str, Any]:
        now = self.clock()

        async def fn(conn: Any) -> stops.Canceled:
            try:
                return await stops.cancel(conn, p.tenant_id, task_id, p.actor, now, reason)
            except LookupError as exc:
                raise ApiError(404, str(exc)) from None
            except ValueError as exc:  # IllegalTransition
                raise ApiError(409, str(exc)) from None

        def after(res: stops.Canceled) -> None:
            # A running task keeps its slot: the worker's confirmation (or the reaper)
            # frees it. One dispatched but not claimed never starts: free at once.
            if res.worker is None and not self.scheduler.cancel(task_id):
                self.scheduler.finished(task_id)
            self.dependency_finished([task_id])
            self._wake.set()

        res = await self.writer.run(fn, after=after)
        if res.worker is not None:
            log.info(
                "task[%d] canceled while running on worker %s: stop requested; "
                "its slot is held until the worker confirms",
                task_id,
                res.worker,
            )
            # In the background: a broker that is away must not hold up the answer.
            sending = asyncio.get_running_loop().create_task(self._send_cancel(task_id))
            self._settling.add(sending)
            sending.add_done_callback(self._settling.discard)
        return await self.get(p, task_id)

    async def _send_cancel(self, task_id: int) -> None:
        self.tell_cancel([task_id])
        try:
            await self.queue.cancel([task_id])
        except Exception as exc:
            # The database holds the request: the worker reads it at its next heartbeat.
            log.warning(
                "task[%d]: the cancel message was not sent (%r); the worker learns it "
                "at its next heartbeat",
                task_id,
                exc,
            )

    async def get(self, p: Principal, task_id: int) -> dict[str, Any]:
        async with self.read.connect() as conn:
            task = await reads.get_task(conn, p.tenant_id, task_id)
        if task is None:
            raise ApiError(404, f"no task {task_id}")
        return self._describe(task)

    async def list_tasks(
        self, p: Principal, state: str | None, type_: str | None, limit: int
    ) -> list[dict[str, Any]]:
        if state is not None and state not in {s.value for s in State}:
            raise ApiError(400, f"unknown state {state!r}")
        async with self.read.connect() as conn:
            rows = await reads.list_tasks(conn, p.tenant_id, state=state, type_=type_, limit=limit)
        return [self._describe(r) for r in rows]

    async def count_tasks(self, p: Principal, type_: str | None = None) -> dict[str, int]:
        """The caller's tenant's server tasks per state."""
        async with self.read.connect() as conn:
            return await reads.count_tasks(conn, p.tenant_id, type_=type_)

    def _describe(self, task: dict[str, Any]) -> dict[str, Any]:
        task = dict(task)
        task["name"] = store.label(task["type"], task["id"])
        state = State(task["state"])
        if state in (State.QUEUED, State.SCHEDULED) and task["dispatched_at"] is None:
            wait = self.scheduler.why_waiting(task["id"], self.clock())
            task["waiting_for"] = wait.reason if wait else None
        # Canceled while running and not yet confirmed stopped: still takes its slot.
        task["stopping"] = task.get("stop_requested_at") is not None and task["stopped_at"] is None
        return task

    def finished(self, task_id: int) -> None:
        self.scheduler.finished(task_id)
        self.dependency_finished([task_id])
        self._wake.set()

    # -- the pass ----------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            wakeup = self.scheduler.next_wakeup()
            timeout = None if wakeup is None else max(0.0, wakeup - self.clock())
            await wait_set(self._wake, timeout)
            self._wake.clear()
            try:
                await self._pass()
            except Deposed:
                raise
            except Exception as exc:
                log_failure(log, exc, "scheduler pass failed; retrying")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _pass(self) -> None:
        batch = self.scheduler.dispatch(self.clock(), limit=5000)
        if not batch:
            return
        ids = [t.id for t in batch]

        async def mark(c: Any) -> None:
            await self._fenced(c)
            await dispatching.mark_dispatched(c, ids, self.clock())

        await self.writer.run(mark)
        try:
            await self.queue.publish(ids)
        except Exception as exc:
            log.warning("publishing %d tasks failed (%r); they stay pending", len(ids), exc)
            again = set(await self.writer.run(lambda c: dispatching.undispatch(c, ids)))
            for t in batch:
                if t.id in again:
                    self.scheduler.finished(t.id)
                    self.scheduler.add(t)
            await asyncio.sleep(1.0)
            self._wake.set()
            return
        for t in batch:
            log.info("%s dispatched", store.label(t.type, t.id))
        if len(batch) == 5000:
            self._wake.set()

    async def _watch_finished(self) -> None:
        # Workers in other processes (RabbitMQ) finish tasks the scheduler must
        # hear of; it asks only about what it believes is running.
        while True:
            await asyncio.sleep(0.5)
            running = self.scheduler.running_ids()
            if not running:
                continue
            try:
                async with self.read.connect() as conn:
                    done = await stops.over(conn, running)
            except Exception as exc:
                log.warning("could not read task states: %s", exc)
                continue
            for tid in done:
                self.scheduler.finished(tid)
            self.dependency_finished(done)
            if done:
                self._wake.set()

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            try:
                reaped, released = await self.writer.run(self._reap_once)
                expired = await self.writer.run(self._expire_approvals_fenced)
            except Deposed:
                raise
            except Exception as exc:
                log_failure(log, exc, "worker reaper failed")
                continue
            for rel in released:
                log.warning(
                    "%s: worker %s is gone before it confirmed the stop; slot freed",
                    store.label(rel.type, rel.task_id),
                    rel.worker_id,
                )
                self.scheduler.finished(rel.task_id)
            if released:
                self._wake.set()
            for tid in expired:
                log.info("task[%d]: approval expired; Canceled", tid)
            self.dependency_finished(expired)
            await self._reaped(reaped, "silent")

    async def _reaped(self, reaped: list[heartbeats.Reaped], why: str) -> None:
        """After a reap: the scheduler frees the slots, retry-safe tasks run again."""
        self.dependency_finished([r.task_id for r in reaped])
        for r in reaped:
            name = store.label(r.type, r.task_id)
            log.warning(
                "%s failed: %s (worker %s %s)", name, heartbeats.HEARTBEAT_LOST, r.worker_id, why
            )
            self.scheduler.finished(r.task_id)
            spec = self.specs.get(r.type)
            if spec is not None and spec.retry_safe:
                await self._retry(r)
        if reaped:
            self._wake.set()

    async def _expire_approvals_fenced(self, conn: Any) -> list[int]:
        await self._fenced(conn)
        return await self.expire_approvals(conn)

    async def _reap_once(self, conn: Any) -> tuple[list[heartbeats.Reaped], list[stops.Released]]:
        await self._fenced(conn)
        now = self.clock()
        alive = await self.alive(conn) if self.alive is not None else None
        reaped = await heartbeats.reap_workers(
            conn, self.heartbeat_timeout, now, servers_alive=alive
        )
        return reaped, await stops.release_lost_stops(conn, now)

    async def _alive(self, conn: Any) -> set[str] | None:
        """At the lead's start: the live server processes. Without a cluster: none
        before this process's own worker starts (every recorded one is an earlier
        process's), and no embedded reap after."""
        if self.alive is not None:
            return await self.alive(conn)
        return None if self.embedded_started else set()

    async def _retry(self, r: heartbeats.Reaped) -> None:
        now = self.clock()

        async def fn(conn: Any) -> submission.Submitted:
            return await submission.submit(
                conn,
                owner_tenant=r.tenant_id,
                actor="reaper",
                type_=r.type,
                scope_tenant=r.scope_tenant,
                group=r.group,
                params=r.params,
                not_before=None,
                now=now,
                retry_of=r.task_id,
            )

        def after(s: submission.Submitted) -> None:
            self._seen.add(s.id)
            self.scheduler.add(Pending(s.id, r.type, r.scope_tenant, r.group))

        sub = await self.writer.run(fn, after=after)
        log.info(
            "%s submitted again as %s: its type is retry-safe",
            store.label(r.type, r.task_id),
            store.label(r.type, sub.id),
        )
