"""A worker: takes tasks from the dispatch queue, claims, runs, reports, heartbeats (SPEC 4).

Contract: a delivery carries one or more task ids. The worker claims them in
the database in one transaction (only a Queued, unclaimed task can be claimed,
so a redelivered task never runs twice at the same time; an id already claimed
is dropped), runs each claimed task's handler, stores each result, and only
when every result of the delivery is stored acks it. At most ``concurrency``
handlers run at once; a new delivery is taken only while fewer than
``concurrency`` tasks are being claimed, waiting to run or running, so a
worker holds at most ``concurrency - 1`` plus one delivery's tasks claimed and
not yet run (In Progress), besides those whose results it is storing. It
heartbeats (busy or idle) every ``heartbeat_interval`` seconds. Logs name each
task ``TYPE[id]`` at every step, with the full command line of command handlers
and the status update it stores.

Cancel (issue 9): the worker listens for cancels on the dispatch port and, at
every heartbeat, also reads which of its tasks were canceled (a message may be
lost). A canceled task it holds is stopped (``handlers.StopRequest``: process
group killed, coroutine cancelled; a thread cannot be, and that is recorded at
once), and its outcome is stored as the confirmation that frees its slot: the
state stays Canceled and the store records what really happened. A task
canceled before its handler started is never started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, NamedTuple

from taskfleet.dispatch import Delivery, DispatchQueue
from taskfleet.domain.results import result_line
from taskfleet.domain.task_types import TaskTypeSpec, render_command
from taskfleet.settings import (
    BATCH_SETTLE_TURNS,
    CLAIM_RETRY_DELAY,
    EARLY_CANCEL_MEMORY,
    RESULT_RETRY_MAX,
    RESULT_RETRY_MIN,
    WORKER_HEARTBEAT_INTERVAL,
)
from taskfleet.store import tasks as store
from taskfleet.store.tasks import heartbeats, running, stops
from taskfleet.worker.handlers import StopRequest, run_handler

log = logging.getLogger("taskfleet.worker")

RunTx = Callable[[Callable[[Any], Awaitable[Any]]], Awaitable[Any]]
# Runs a synchronous ``fn(conn)`` in a write transaction (``Writer.run_sync``; a separate
# worker process: ``AsyncConnection.run_sync``).
RunSync = Callable[[Callable[[Any], Any]], Awaitable[Any]]


class _Batcher:
    """Collects calls that arrive together and runs them as one transaction.

    Claims and results of many small tasks would otherwise cost a transaction
    (and a few statements) each; this is what lets a worker keep up with
    thousands of no-op tasks a second. Claims and results share the batch
    (one commit for both; a batch waits a few loop turns for what is about to
    come, see ``_settle``), and an item whose key is already in the batch gets
    ``repeat(item)`` instead of sharing the first one's result: two deliveries
    of one task must not both get its claim. If a batch of several groups
    fails, each group is tried alone, so a bad result cannot hold up claims
    (or the other way round)."""

    def __init__(
        self,
        run_sync: RunSync,
        many: Callable[[Any, list[Any]], dict[Hashable, Any]],
        key: Callable[[Any], Hashable],
        group: Callable[[Any], Hashable] = lambda _: None,
        repeat: Callable[[Any], Any] | None = None,
    ) -> None:
        self.run_sync = run_sync
        self.many = many  # synchronous: the transaction runs whole as one function
        self.key = key
        self.group = group
        self.repeat = repeat
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def _submit(self, item: Any) -> asyncio.Future[Any]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, fut))
        return fut

    async def call(self, item: Any) -> Any:
        return await self._submit(item)

    async def call_many(self, items: list[Any]) -> list[Any]:
        """All of ``items`` in one transaction (with whatever else is waiting)."""
        if len(items) == 1:  # the embedded queue's case: no gather to pay for
            return [await self._submit(items[0])]
        futures = [self._submit(item) for item in items]
        return list(await asyncio.gather(*futures))

    async def _loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await self._settle()
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            groups: dict[Hashable, list[tuple[Any, asyncio.Future[Any]]]] = {}
            for entry in batch:
                groups.setdefault(self.group(entry[0]), []).append(entry)
            try:
                await self._run(batch)
            except Exception as exc:
                if len(groups) == 1:
                    self._fail(batch, exc)
                    continue
                for part in groups.values():
                    try:
                        await self._run(part)
                    except Exception as exc:
                        self._fail(part, exc)

    async def _settle(self) -> None:
        """Let what is about to arrive arrive (a few loop turns while each brings more):
        a finished task's result comes a few turns before the claim of the delivery
        that takes its slot, and without this they went in two transactions."""
        for _ in range(BATCH_SETTLE_TURNS):
            queued = self._queue.qsize()
            await asyncio.sleep(0)
            if self._queue.qsize() == queued:
                return

    async def _run(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        items = [item for item, _ in batch]
        results = await self.run_sync(functools.partial(self._many, items))
        seen: set[Hashable] = set()
        for item, fut in batch:
            k = self.key(item)
            value = results[k] if k not in seen or self.repeat is None else self.repeat(item)
            seen.add(k)
            if not fut.done():
                fut.set_result(value)

    @staticmethod
    def _fail(batch: list[tuple[Any, asyncio.Future[Any]]], exc: Exception) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(exc)

    def _many(self, items: list[Any], conn: Any) -> dict[Hashable, Any]:
        return self.many(conn, items)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


class _Claim(NamedTuple):
    task_id: int


class Worker:
    def __init__(
        self,
        *,
        queue: DispatchQueue,
        types: dict[str, TaskTypeSpec],
        run_tx: RunTx,
        run_sync: RunSync,
        pg: bool,
        concurrency: int = 4,
        heartbeat_interval: float = WORKER_HEARTBEAT_INTERVAL,
        on_finished: Callable[[int], None] | None = None,
        context: dict[str, Any] | None = None,
        name: str | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.id = worker_id or uuid.uuid4().hex[:16]
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.queue = queue
        self.types = types
        self.run_tx = run_tx
        self.pg = pg
        self.concurrency = concurrency
        self.heartbeat_interval = heartbeat_interval
        self.on_finished = on_finished
        self.context = context or {}
        self.running: set[int] = set()  # claimed by this worker and not yet reported
        self._stops: dict[int, StopRequest] = {}  # one per task in ``running``
        # Cancels of ids not (yet) in ``running``: a cancel message can overtake
        # the end of our own claim; remembered a while, then forgotten.
        self._early_cancels: dict[int, float] = {}
        self._notes: set[asyncio.Task[None]] = set()
        self._in_hand = 0  # ids of deliveries taken and not yet finished or dropped
        self._room = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        # Claims and results go through one batcher: a transaction records the
        # results that are ready and claims the deliveries that arrived.
        self._db = _Batcher(
            run_sync,
            self._claim_and_complete,
            key=lambda item: (type(item).__name__, item.task_id),
            group=lambda item: type(item).__name__,
            repeat=lambda _: "delivered twice at once; the other copy runs it",
        )

    def _claim_and_complete(self, conn: Any, items: list[Any]) -> dict[Hashable, Any]:
        now = time.time()
        out: dict[Hashable, Any] = {}
        outcomes = [i for i in items if isinstance(i, running.Outcome)]
        if outcomes:
            done = running.complete_many(conn, self.id, now, outcomes)
            out.update((("Outcome", tid), v) for tid, v in done.items())
        claims = [i.task_id for i in items if isinstance(i, _Claim)]
        if claims:
            got = running.claim_many(conn, claims, self.id, now, pg=self.pg)
            out.update((("_Claim", tid), v) for tid, v in got.items())
        return out

    def cancel_requested(self, task_ids: list[int]) -> None:
        """The dispatch port (or the heartbeat's look at the database) says: stop these."""
        now = time.monotonic()
        for tid in task_ids:
            stop = self._stops.get(tid)
            if stop is None:
                self._early_cancels[tid] = now
            elif not stop.is_set():
                log.info("task[%d] cancel received: stopping its handler", tid)
                stop.set()

    def _stop_request(self, tid: int) -> StopRequest:
        stop = StopRequest(on_held=lambda why: self._note(tid, why))
        if self._early_cancels.pop(tid, None) is not None:
            stop.set()
        self._stops[tid] = stop
        return stop

    def _note(self, tid: int, why: str) -> None:
        """Record at once that a canceled task's handler goes on (and holds its slot)."""
        log.warning("task[%d] cancel requested; %s", tid, why)

        async def write() -> None:
            with contextlib.suppress(Exception):  # the final report records it anyway
                await self.run_tx(
                    lambda c: stops.note_stop(
                        c, tid, self.id, time.time(), f"cancel requested; {why}"
                    )
                )

        task = asyncio.create_task(write())
        self._notes.add(task)
        task.add_done_callback(self._notes.discard)

    async def run(self) -> None:
        await self.queue.listen_cancels(self.cancel_requested)
        await self._heartbeat()
        beat = asyncio.create_task(self._heartbeats())
        log.info(
            "worker %s (%s) consuming %s, %d at a time",
            self.id,
            self.name,
            self.queue.name,
            self.concurrency,
        )
        try:
            async for delivery in self.queue.deliveries(self.concurrency):
                # Take the next delivery only with room for it: a delivery's tasks
                # are claimed together, and claimed tasks should not queue up here
                # while other workers are idle.
                while self._in_hand >= self.concurrency:
                    self._room.clear()
                    await self._room.wait()
                self._in_hand += len(delivery.task_ids)
                task = asyncio.create_task(self._handle(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            beat.cancel()
            for t in list(self._tasks):
                t.cancel()
            self._db.close()
            with contextlib.suppress(Exception):
                await self.run_tx(
                    lambda c: heartbeats.heartbeat(
                        c,
                        worker_id=self.id,
                        name=self.name,
                        queue=self.queue.name,
                        pid=os.getpid(),
                        status="stopped",
                        running=[],
                        now=time.time(),
                    )
                )

    def _release(self, count: int = 1) -> None:
        self._in_hand -= count
        if self._in_hand < self.concurrency:
            self._room.set()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self._heartbeat()
            except Exception as exc:  # the database may be away for a while
                log.warning("worker %s heartbeat failed: %s", self.id, exc)

    async def _heartbeat(self) -> None:
        running = sorted(self.running)

        async def beat(c: Any) -> list[int]:
            await heartbeats.heartbeat(
                c,
                worker_id=self.id,
                name=self.name,
                queue=self.queue.name,
                pid=os.getpid(),
                status="busy" if running else "idle",
                running=running,
                now=time.time(),
            )
            # The record of cancels: a cancel message lost on the way costs a heartbeat.
            return await stops.stops_for(c, self.id, running)

        to_stop = await self.run_tx(beat)
        self.cancel_requested([t for t in to_stop if t in self._stops])
        cutoff = time.monotonic() - EARLY_CANCEL_MEMORY
        for tid, at in list(self._early_cancels.items()):
            if at < cutoff:
                del self._early_cancels[tid]

    async def _handle(self, delivery: Delivery) -> None:
        ids = delivery.task_ids
        try:
            claims = await self._db.call_many([_Claim(tid) for tid in ids])
        except Exception as exc:
            # Nothing was claimed (the transaction failed): the delivery goes back
            # to the queue, after a pause so a database outage is not a busy loop.
            log.warning("claiming tasks %s failed (%s); the delivery goes back", ids, exc)
            self._release(len(ids))
            await asyncio.sleep(CLAIM_RETRY_DELAY)
            with contextlib.suppress(Exception):
                await delivery.reject(requeue=True)
            return
        runs = []
        for tid, claimed in zip(ids, claims, strict=True):
            if isinstance(claimed, str):
                log.info(
                    "task[%d] delivery dropped%s: %s",
                    tid,
                    " (redelivered)" if delivery.redelivered else "",
                    claimed,
                )
                self._release()
            else:
                self.running.add(tid)
                self._stop_request(tid)
                runs.append(self._run(claimed))
        if len(runs) == 1:
            await runs[0]  # one task per delivery (embedded): no gather task per task
        elif runs:
            await asyncio.gather(*runs)
        # Every claimed task's result is stored (or none was claimed): only now may
        # the broker forget the delivery.
        await delivery.ack()

    async def _run(self, claimed: running.Claimed) -> None:
        tid = claimed.id
        name = store.label(claimed.type, tid)
        stop = self._stops.get(tid) or self._stop_request(tid)
        released = False
        try:
            if await self._slot_unless_stopped(stop):
                try:
                    log.info("%s taken by worker %s", name, self.id)
                    ok, rc, output, line, cmd, stopped = await self._execute(claimed, name, stop)
                finally:
                    self._slots.release()
            else:
                log.info("%s canceled before its handler started: not started", name)
                ok, rc, output, cmd, stopped = False, None, "", None, True
                line = result_line(
                    "Starting", "Canceled", "canceled before its handler started", None
                )
            # A task whose handler returned no longer takes room: storing its result
            # overlaps with claiming and running the next ones (its delivery stays
            # unacknowledged until then, bounded by the prefetch).
            self._release()
            released = True
            await self._store(
                tid, name, ok=ok, rc=rc, output=output, line=line, cmd=cmd, stopped=stopped
            )
        finally:
            self.running.discard(tid)
            self._stops.pop(tid, None)
            if not released:
                self._release()
        if self.on_finished is not None:
            self.on_finished(tid)

    async def _slot_unless_stopped(self, stop: StopRequest) -> bool:
        """Take a run slot; False (and no slot) if the task is canceled first."""
        if stop.is_set():
            return False
        if not self._slots.locked():
            await self._slots.acquire()  # free now: no wait, so no race with the stop
            return True
        acquire: asyncio.Future[Any] = asyncio.ensure_future(self._slots.acquire())
        halt: asyncio.Future[Any] = stop.future()
        try:
            await asyncio.wait({acquire, halt}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.cancel()
            if not acquire.done():
                acquire.cancel()
        if acquire.done() and not acquire.cancelled():
            if stop.is_set():
                self._slots.release()
                return False
            return True
        return False

    async def _execute(
        self, claimed: running.Claimed, name: str, stop: StopRequest
    ) -> tuple[bool, int | None, str, str, str | None, bool]:
        spec = self.types.get(claimed.type)
        context = {
            "task_id": claimed.id,
            "type": claimed.type,
            "tenant": claimed.tenant,
            "group": claimed.group,
            **self.context,
        }
        if spec is None:
            return (
                False,
                None,
                "",
                result_line(
                    "Starting",
                    "Failed",
                    f"task type {claimed.type!r} is not declared on this worker",
                    None,
                ),
                None,
                False,
            )
        if spec.kind == "command":
            with contextlib.suppress(ValueError):
                log.info(
                    "%s running: %s",
                    name,
                    " ".join(render_command(spec.handler, claimed.params, context)),
                )
        res = await run_handler(spec, claimed.params, context, stop=stop)
        ok, rc = res.ok, res.return_code
        stage = "Completed" if res.error is None or rc is not None else "Running"
        status = "Canceled" if res.stopped else "Succeeded" if ok else "Failed"
        line = result_line(stage, status, res.error or "handler returned", rc)
        return ok, rc, res.output, line, res.command_line, res.stopped

    async def _store(
        self,
        tid: int,
        name: str,
        *,
        ok: bool,
        rc: int | None,
        output: str,
        line: str,
        cmd: str | None,
        stopped: bool = False,
    ) -> None:
        delay = RESULT_RETRY_MIN
        while True:
            try:
                stored = await self._db.call(
                    running.Outcome(tid, ok, rc, output, line, cmd, stopped=stopped)
                )
                break
            except Exception as exc:
                # Never ack before the result is stored: retry until the database is back.
                log.warning("%s result not stored yet (%s); retrying in %.1fs", name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESULT_RETRY_MAX)
        log.info(
            "%s status update sent: %s%s",
            name,
            "Canceled (stopped)" if stopped else "Succeeded" if ok else "Failed",
            "" if stored else " (recorded only: the task had already ended)",
        )
