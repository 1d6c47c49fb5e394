"""The lifecycle engine: :class:`Lifecycle` keeps in-memory indexes (who waits on
what, open rollouts, a timer heap, windows per computer) so a pass costs what
changed: a finished activity looks only at its waiters, time pops only due timers.
It never sleeps past a timer and reads the time from an injectable clock.

Its timers run only in the leader (issue 16): ``lead()`` is the cluster duty. It
clears the indexes, loads them from the database, then runs the pass loop and, every
``catch_up_every`` seconds, ``catch_up()``: requests and schedules other processes
persisted, and activities they finished. Every process keeps the windows (its
exchanges hold work in a closed window) and indexes what its own API creates, which a
non-leader never acts on. A write that meets :class:`Deposed` ends the duty.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import sqlalchemy as sa

from taskfleet.aio import wait_set
from taskfleet.domain.lifecycle import next_window_open
from taskfleet.domain.policy import RunWindow
from taskfleet.domain.states import FINAL_STATES, State
from taskfleet.server.cluster import Deposed
from taskfleet.server.lifecycle.approvals import expire_approval
from taskfleet.server.lifecycle.moves import Moved, evaluate_rollout, evaluate_waiter
from taskfleet.server.lifecycle.options import iso
from taskfleet.server.lifecycle.windows import closed_windows, load_windows
from taskfleet.settings import LEADER_CATCH_UP, LEADER_CATCH_UP_OVERLAP
from taskfleet.store.schema import activities, requests, schedules
from taskfleet.store.unavailable import log_failure

log = logging.getLogger("taskfleet.lifecycle")


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
        catch_up_every: float = LEADER_CATCH_UP,
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
        self._timer_set: set[tuple[float, str, int]] = set()  # a catch-up adds no twin
        self.catch_up_every = catch_up_every
        self._caught_up_at: float | None = None  # the clock at the last catch-up's start
        self._reported: dict[int, float] = {}  # finished activity -> when, seen by catch-up
        # Only the leader indexes timers and waiters: a non-leader would never act on
        # them (the leader's catch-up finds what this process persisted).
        self.leading = False
        self.windows: dict[int, list[tuple[RunWindow, int, int]]] = {}
        self._window_next: dict[int, float] = {}  # group id -> its pending opening timer
        self._finished: set[int] = set()
        self._event = asyncio.Event()
        # One pass at a time: a pass started elsewhere (a test's tick, the loop)
        # waits for the running one, which may have popped the timers it wants.
        self._pass_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.passes = 0
        # Set by the runtime: computers whose windows a reload changed (their running
        # jobs are told: ``jobs.send_windows``).
        self.windows_changed: Callable[[set[int]], Awaitable[None]] | None = None

    # -- memory ------------------------------------------------------------------

    def watch(self, req: dict[str, Any]) -> None:
        """Index one request's pending lifecycle (after creation, approval, at start)."""
        if not self.leading:
            return
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
        if not self.leading:
            return
        key = (when, kind, ident)
        if key not in self._timer_set:
            self._timer_set.add(key)
            heapq.heappush(self.timers, key)

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
        if self.leading and (self.waiters or self.rollouts):
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

    def job_windows(self, computer_id: int) -> list[dict[str, Any]] | None:
        """The computer's maintenance windows as a job operation carries them
        (``domain.jobs.parse_windows``), or None when it has none."""
        ws = self.windows.get(computer_id)
        if not ws:
            return None
        shown = {(str(w), off) for w, off, _ in ws}
        return [{"window": w, "utc_offset": off} for w, off in sorted(shown)]

    def why_held(self, computer_id: int, now: float) -> str | None:
        ws = self.windows.get(computer_id)
        closed = closed_windows(ws, now) if ws else []
        if not closed:
            return None
        opens = max(next_window_open(w, now, off) for w, off, _ in closed)
        shown = ", ".join(f"{w} (UTC{off / 60:+g}h)" for w, off, _ in closed)
        return f"waits for the maintenance window {shown}; opens at {iso(opens)}"

    # -- loading -------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every pending index (not the windows): a new lead loads them afresh."""
        self.waiters.clear()
        self._waits_on.clear()
        self.rollouts.clear()
        self.timers.clear()
        self._timer_set.clear()
        self._window_next.clear()
        self._finished.clear()
        self._reported.clear()

    async def load(self) -> None:
        self._caught_up_at = self.clock()
        async with self.read.connect() as conn:
            await self._watch_pending(conn, None)
        await self.reload_windows(tell=False)

    async def _watch_pending(self, conn: Any, since: float | None) -> None:
        """Index the requests with a lifecycle that still have unfinished activities
        (created since ``since``; None: all) and every schedule's next firing."""
        pending = sa.select(activities.c.request_id).where(
            activities.c.state.notin_([s.value for s in FINAL_STATES]),
            activities.c.request_id == requests.c.id,
        )
        query = sa.select(requests).where(
            sa.or_(
                requests.c.not_before.is_not(None),
                requests.c.depends_on.is_not(None),
                requests.c.approval.is_not(None),
                requests.c.rollout.is_not(None),
            ),
            sa.exists(pending),
        )
        if since is not None:
            query = query.where(requests.c.created_at >= since)
        for row in await conn.execute(query):
            self.watch(dict(row._mapping))
        for row in await conn.execute(
            sa.select(schedules.c.id, schedules.c.next_at).where(schedules.c.next_at.is_not(None))
        ):
            self._at(row.next_at, "cron", row.id)

    async def reload_windows(self, *, tell: bool = True) -> None:
        """Load every computer's windows again; with ``tell``, the computers whose
        windows changed go to ``windows_changed`` (at start there is nothing to tell:
        what each running job got is what the database said)."""
        before = {cid: self.job_windows(cid) for cid in self.windows}
        async with self.read.connect() as conn:
            self.windows = await load_windows(conn)
        changed = {
            cid
            for cid in before.keys() | self.windows.keys()
            if before.get(cid) != self.job_windows(cid)
        }
        if tell and changed and self.windows_changed is not None:
            await self.windows_changed(changed)
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

    async def catch_up(self) -> None:
        """What other processes persisted since the last scan: requests with a
        lifecycle, schedules, and finished activities that waiters or rollouts await.
        One short scan; the leader may also call it on a hint."""
        now = self.clock()
        since = (self._caught_up_at or now) - LEADER_CATCH_UP_OVERLAP
        self._caught_up_at = now
        async with self.read.connect() as conn:
            await self._watch_pending(conn, since)
            on_activity = [i for k, i in self.waiters if k == "activity"]
            on_request = {i for k, i in self.waiters if k == "request"} | self.rollouts
            final = [s.value for s in FINAL_STATES]
            found: list[Any] = []
            finished = sa.select(activities.c.id, activities.c.finished_at)
            if on_activity:
                found += await conn.execute(
                    finished.where(activities.c.id.in_(on_activity), activities.c.state.in_(final))
                )
            if on_request:
                found += await conn.execute(
                    finished.where(
                        activities.c.request_id.in_(list(on_request)),
                        activities.c.state.in_(final),
                        activities.c.finished_at >= since,
                    )
                )
        # Each finish is reported once (a waiter or a rollout re-evaluated is a write).
        done = {int(r.id) for r in found if r.id not in self._reported}
        self._reported.update({int(r.id): r.finished_at or now for r in found})
        for aid in [a for a, at in self._reported.items() if at < since]:
            del self._reported[aid]
        if done:
            self.on_finished(done)

    def add_schedule(self, sid: int, next_at: float) -> None:
        self._at(next_at, "cron", sid)
        self.poke()

    # -- the loop ------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop without a cluster (the indexes loaded by ``load``)."""
        self.leading = True
        self._task = asyncio.create_task(self._loop(), name="lifecycle")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def lead(self, ready: Callable[[], None] = lambda: None) -> None:
        """The leader's duty: load the indexes from the database (then ``ready()``),
        then run the passes and the catch-up scans until canceled (the lead is lost)
        or deposed."""
        self.reset()
        self.leading = True
        try:
            await self.load()
            ready()
            await self._loop()
        finally:
            self.leading = False

    async def _loop(self) -> None:
        while True:
            timeout = self.interval
            if self.timers:
                timeout = max(0.0, min(timeout, self.timers[0][0] - self.clock()))
            await wait_set(self._event, timeout)
            self._event.clear()
            try:
                if (
                    self._caught_up_at is not None
                    and self.clock() - self._caught_up_at >= self.catch_up_every
                ):
                    await self.catch_up()
                await self.run_pass()
            except Deposed:
                raise
            except Exception as exc:
                log_failure(log, exc, "lifecycle pass failed; retrying")
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
            self._timer_set.discard((when, kind, ident))
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
