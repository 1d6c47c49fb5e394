"""RabbitMQ dispatch queue (aio-pika): durable queue, persistent messages,
publisher confirms, prefetch, manual acknowledgement after the result is stored.

A publish that is not confirmed (the connection dropped between publish and
confirm) raises; the scheduler then un-marks those tasks as dispatched and
publishes them again later. If the first copy did reach the queue, the second
delivery finds the task already claimed and is dropped: nothing is lost and
nothing runs twice.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

QUEUE_NAME = "taskfleet.tasks"
PUBLISH_TIMEOUT = 30.0  # seconds to wait for publisher confirms


class _Delivery:
    def __init__(self, message: Any) -> None:
        self._m = message
        self.task_id = int(message.body)
        self.redelivered = bool(message.redelivered)

    async def ack(self) -> None:
        await self._m.ack()

    async def reject(self, requeue: bool) -> None:
        await self._m.reject(requeue=requeue)


class RabbitQueue:
    def __init__(self, url: str) -> None:
        # ``?queue=NAME`` picks the queue (default taskfleet.tasks), so several
        # fleets (or test runs) can share one broker.
        u = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(u.query)
        self.queue_name = query.pop("queue", [QUEUE_NAME])[0]
        self.url = urllib.parse.urlunsplit(
            u._replace(query=urllib.parse.urlencode(query, doseq=True))
        )
        # Never put credentials in logs or the workers table.
        self.name = f"amqp://{u.hostname}:{u.port or 5672}{u.path or '/'} {self.queue_name}"
        self._conn: Any = None
        self._channel: Any = None
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        import aio_pika

        self._conn = await aio_pika.connect_robust(self.url)
        self._channel = await self._conn.channel(publisher_confirms=True)
        await self._channel.declare_queue(self.queue_name, durable=True)

    async def publish(self, task_ids: list[int]) -> None:
        import aio_pika

        if self._channel is None:
            await self.connect()
        exchange = self._channel.default_exchange
        confirms = [
            exchange.publish(
                aio_pika.Message(str(tid).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=self.queue_name,
            )
            for tid in task_ids
        ]
        # Each publish resolves on the broker's confirm (raises on nack or a lost link);
        # a broker that stops answering must not stall the scheduler forever.
        await asyncio.wait_for(asyncio.gather(*confirms), PUBLISH_TIMEOUT)

    async def deliveries(self, prefetch: int) -> AsyncIterator[_Delivery]:
        if self._channel is None:
            await self.connect()
        await self._channel.set_qos(prefetch_count=prefetch)
        queue = await self._channel.declare_queue(self.queue_name, durable=True)
        async with queue.iterator() as it:
            async for message in it:
                yield _Delivery(message)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = self._channel = None
