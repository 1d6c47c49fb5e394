"""A worker: takes tasks from the dispatch queue, claims, runs, reports, heartbeats (SPEC 4).

Contract: for each delivery the worker claims the task in the database (only a
Queued, unclaimed task can be claimed, so a redelivered task never runs twice
at the same time), runs its handler, stores the result, and only then acks the
delivery. It heartbeats (busy or idle) every ``heartbeat_interval`` seconds.
Logs name each task ``TYPE[id]`` at every step, with the full command line of
command handlers and the status update it stores.
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
from collections.abc import Awaitable, Callable
from typing import Any

from taskfleet.dispatch import Delivery, DispatchQueue
from taskfleet.domain.results import result_line
from taskfleet.store import tasks as store
from taskfleet.worker.handlers import TaskTypeSpec, render_command, run_handler

log = logging.getLogger("taskfleet.worker")

RunTx = Callable[[Callable[[Any], Awaitable[Any]]], Awaitable[Any]]
HEARTBEAT_INTERVAL = 10.0  # seconds; the reaper's timeout is far longer (default 5 h)


class _Batcher:
    """Collects calls that arrive together and runs them as one transaction.

    Claims and results of many small tasks would otherwise cost a transaction
    (and a few statements) each; this is what lets a worker keep up with
    thousands of no-op tasks a second."""

    def __init__(
        self,
        run_tx: RunTx,
        many: Callable[[Any, list[Any]], Awaitable[dict[int, Any]]],
        key: Callable[[Any], int],
    ) -> None:
        self.run_tx = run_tx
        self.many = many
        self.key = key
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def call(self, item: Any) -> Any:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, fut))
        return await fut

    async def _loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            items = [item for item, _ in batch]
            try:
                results = await self.run_tx(functools.partial(self._many, items))
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for item, fut in batch:
                if not fut.done():
                    fut.set_result(results[self.key(item)])

    async def _many(self, items: list[Any], conn: Any) -> dict[int, Any]:
        return await self.many(conn, items)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


class Worker:
    def __init__(
        self,
        *,
        queue: DispatchQueue,
        types: dict[str, TaskTypeSpec],
        run_tx: RunTx,
        pg: bool,
        concurrency: int = 4,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        on_finished: Callable[[int], None] | None = None,
        context: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.queue = queue
        self.types = types
        self.run_tx = run_tx
        self.pg = pg
        self.concurrency = concurrency
        self.heartbeat_interval = heartbeat_interval
        self.on_finished = on_finished
        self.context = context or {}
        self.running: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._claims = _Batcher(
            run_tx,
            lambda c, ids: store.claim_many(c, ids, self.id, time.time(), pg=self.pg),
            key=lambda tid: tid,
        )
        self._results = _Batcher(
            run_tx,
            lambda c, outcomes: store.complete_many(c, self.id, time.time(), outcomes),
            key=lambda o: o.task_id,
        )

    async def run(self) -> None:
        await self._heartbeat()
        beat = asyncio.create_task(self._heartbeats())
        slots = asyncio.Semaphore(self.concurrency)
        log.info(
            "worker %s (%s) consuming %s, %d at a time",
            self.id,
            self.name,
            self.queue.name,
            self.concurrency,
        )
        try:
            async for delivery in self.queue.deliveries(self.concurrency):
                await slots.acquire()
                task = asyncio.create_task(self._handle(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._done_callback(slots))
        finally:
            beat.cancel()
            for t in list(self._tasks):
                t.cancel()
            self._claims.close()
            self._results.close()
            with contextlib.suppress(Exception):
                await self.run_tx(
                    lambda c: store.heartbeat(
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

    def _done_callback(self, slots: asyncio.Semaphore) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            slots.release()

        return done

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self._heartbeat()
            except Exception as exc:  # the database may be away for a while
                log.warning("worker %s heartbeat failed: %s", self.id, exc)

    async def _heartbeat(self) -> None:
        running = sorted(self.running)
        await self.run_tx(
            lambda c: store.heartbeat(
                c,
                worker_id=self.id,
                name=self.name,
                queue=self.queue.name,
                pid=os.getpid(),
                status="busy" if running else "idle",
                running=running,
                now=time.time(),
            )
        )

    async def _handle(self, delivery: Delivery) -> None:
        tid = delivery.task_id
        claimed = await self._claims.call(tid)
        if isinstance(claimed, str):
            log.info(
                "task[%d] delivery dropped%s: %s",
                tid,
                " (redelivered)" if delivery.redelivered else "",
                claimed,
            )
            await delivery.ack()
            return
        name = store.label(claimed.type, tid)
        self.running.add(tid)
        try:
            log.info("%s taken by worker %s", name, self.id)
            spec = self.types.get(claimed.type)
            context = {
                "task_id": tid,
                "type": claimed.type,
                "tenant": claimed.tenant,
                "group": claimed.group,
                **self.context,
            }
            if spec is None:
                ok, rc, output, line, cmd = (
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
                )
            else:
                if spec.kind == "command":
                    with contextlib.suppress(ValueError):
                        log.info(
                            "%s running: %s",
                            name,
                            " ".join(render_command(spec.handler, claimed.params, context)),
                        )
                res = await run_handler(spec, claimed.params, context)
                ok, rc, output, cmd = res.ok, res.return_code, res.output, res.command_line
                stage = "Completed" if res.error is None or rc is not None else "Running"
                line = result_line(
                    stage, "Succeeded" if ok else "Failed", res.error or "handler returned", rc
                )
            await self._store(tid, name, ok=ok, rc=rc, output=output, line=line, cmd=cmd)
            await delivery.ack()
        finally:
            self.running.discard(tid)
        if self.on_finished is not None:
            self.on_finished(tid)

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
    ) -> None:
        delay = 0.5
        while True:
            try:
                stored = await self._results.call(store.Outcome(tid, ok, rc, output, line, cmd))
                break
            except Exception as exc:
                # Never ack before the result is stored: retry until the database is back.
                log.warning("%s result not stored yet (%s); retrying in %.1fs", name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        log.info(
            "%s status update sent: %s%s",
            name,
            "Succeeded" if ok else "Failed",
            "" if stored else " (recorded only: the task had already ended)",
        )
