"""In-process dispatch queue: the embedded default (one process, no broker).

Durability comes from the database: a task is marked dispatched before it is
put here, and at server start every dispatched-but-unclaimed task is published
again, so a crash between the two loses nothing. Its one consumer is this
process's worker, so nothing it holds is held from another: ``deliveries``
keeps up to twice ``prefetch`` unacknowledged (see there why).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass


@dataclass
class _Delivery:
    task_id: int
    queue: EmbeddedQueue
    redelivered: bool = False

    @property
    def task_ids(self) -> list[int]:
        # One id per delivery: the in-process hand-over costs nothing, so
        # packing would only make tasks wait behind each other.
        return [self.task_id]

    async def ack(self) -> None:
        self.queue._inflight.release()

    async def reject(self, requeue: bool) -> None:
        self.queue._inflight.release()
        if requeue:
            self.queue._q.put_nowait(self.task_id)


class EmbeddedQueue:
    name = "embedded"

    def __init__(self) -> None:
        self._q: asyncio.Queue[int] = asyncio.Queue()
        self._inflight = asyncio.Semaphore(1 << 30)
        self._cancel_handlers: list[Callable[[list[int]], None]] = []

    async def connect(self) -> None:
        return None

    async def publish(self, task_ids: list[int]) -> None:
        for tid in task_ids:
            self._q.put_nowait(tid)

    async def deliveries(self, prefetch: int) -> AsyncIterator[_Delivery]:
        # Twice the prefetch: the worker's own room (``concurrency``) already bounds
        # what it claims, and its tasks whose results are being stored keep their
        # deliveries unacked. Held to ``prefetch``, those kept the next deliveries
        # out until the results' transaction committed, so claims and results never
        # shared one: a transaction more per task, and the single writer's rate is
        # the embedded bound (benchmarks/experiments/embedded_writer_load.py).
        self._inflight = asyncio.Semaphore(2 * prefetch)
        while True:
            await self._inflight.acquire()
            tid = await self._q.get()
            yield _Delivery(tid, self)

    async def cancel(self, task_ids: list[int]) -> None:
        # The in-process workers hear it at once; nothing can lose it on the way.
        for handler in list(self._cancel_handlers):
            handler(list(task_ids))

    async def listen_cancels(self, handler: Callable[[list[int]], None]) -> None:
        self._cancel_handlers.append(handler)

    async def close(self) -> None:
        return None

    def qsize(self) -> int:
        return self._q.qsize()
