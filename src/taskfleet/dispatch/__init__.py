"""The dispatch queue port (SPEC 4.5): the scheduler publishes task ids, workers consume them.

Contract of every adapter:
* ``publish(ids)`` returns only when the queue holds them durably (RabbitMQ:
  publisher confirms); if it raises, the caller treats them as not dispatched.
* ``deliveries()`` yields :class:`Delivery` objects, at most ``prefetch``
  unacknowledged at a time (embedded: twice that; its only consumer is the
  worker of its process, whose own room bounds what it claims). A delivery
  carries one or more task ids (RabbitMQ packs the tasks of a large dispatch
  into fewer messages); a worker acks it only after the result of every task
  in it that it claimed is stored. A delivery that is never acked comes back
  (RabbitMQ redelivers it when the worker's connection dies); the database
  claim makes that harmless: a task already claimed is dropped, one never
  claimed runs once.
* ``cancel(ids)`` tells every worker consuming the queue to stop those tasks
  if it runs them (a broadcast; the worker that holds one stops it and
  reports, the others ignore it). It is a prompt, not the record: the
  database says which tasks are to be stopped, and workers also read that at
  every heartbeat, so a cancel message lost with a broker link only delays
  the stop. ``listen_cancels(handler)`` is the worker's side: ``handler`` is
  called (on the worker's loop) with the ids of every cancel published from
  then on.
Adapters: ``embedded`` (in-process asyncio queue, one id per delivery; durable
through the database: dispatched-but-unclaimed tasks are published again at
server start) and ``rabbitmq`` (aio-pika).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol


class Delivery(Protocol):
    redelivered: bool

    @property
    def task_ids(self) -> list[int]: ...  # in dispatch order, at least one

    async def ack(self) -> None: ...

    async def reject(self, requeue: bool) -> None: ...


class DispatchQueue(Protocol):
    name: str  # for logs and the workers table, never with credentials

    async def connect(self) -> None: ...

    async def publish(self, task_ids: list[int]) -> None: ...

    def deliveries(self, prefetch: int) -> AsyncIterator[Delivery]: ...

    async def cancel(self, task_ids: list[int]) -> None: ...

    async def listen_cancels(self, handler: Callable[[list[int]], None]) -> None: ...

    async def close(self) -> None: ...


def open_queue(url: str) -> DispatchQueue:
    if url == "embedded":
        from taskfleet.dispatch.embedded import EmbeddedQueue

        return EmbeddedQueue()
    if url.startswith(("amqp://", "amqps://")):
        from taskfleet.dispatch.rabbitmq import RabbitQueue

        return RabbitQueue(url)
    raise ValueError(f"unknown queue {url!r}: use embedded or amqp://USER:PASS@HOST/VHOST")
