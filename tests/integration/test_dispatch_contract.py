"""The dispatch port's contract, run against every adapter (embedded and RabbitMQ).

Contract: the same cases run against each adapter of ``taskfleet.dispatch``
(as dramatiq runs its broker tests against every broker), each on a queue of its
own (RabbitMQ: the ``amqp_url`` fixture's own queue name, dropped afterwards):
published ids are delivered once each in dispatch order, however many a
delivery carries; a rejected delivery comes back; a cancel reaches every
listener; close is clean. Where the adapters promise different things, the
case says so through the adapter's flags:

* ``redelivers_unacked``: RabbitMQ redelivers a message that was never acked
  once its consumer's connection is gone (``redelivered`` set). The embedded
  queue does not: it lives and dies with its process, and its durability is the
  database's (a task is marked dispatched before it is published, and every
  dispatched-but-unclaimed task is published again at server start), so a
  delivery its consumer dropped is not handed out again by the queue itself.
* ``packs``: RabbitMQ packs a large dispatch into fewer messages than tasks;
  the embedded queue hands over one id per delivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from taskfleet.dispatch import Delivery, DispatchQueue, open_queue
from taskfleet.dispatch.embedded import EmbeddedQueue

WAIT = 20.0  # seconds: a deadline for what must arrive, never a pause


@dataclass
class Adapter:
    """One adapter under test: handles on one queue, closed at the end."""

    kind: str
    url: str
    redelivers_unacked: bool
    packs: bool
    handles: list[DispatchQueue] = field(default_factory=list)
    _shared: EmbeddedQueue | None = None

    async def open(self) -> DispatchQueue:
        """A connected handle on the queue: a new connection for a broker; for the
        embedded queue, its process's one queue (there is no other to connect to)."""
        if self._shared is not None:
            return self._shared
        q = open_queue(self.url)
        await q.connect()
        if isinstance(q, EmbeddedQueue):
            self._shared = q
        self.handles.append(q)
        return q


@pytest.fixture(
    params=["embedded", pytest.param("rabbitmq", marks=pytest.mark.services)],
)
async def adapter(request: pytest.FixtureRequest) -> AsyncIterator[Adapter]:
    if request.param == "embedded":
        a = Adapter("embedded", "embedded", redelivers_unacked=False, packs=False)
    else:
        url = request.getfixturevalue("amqp_url")  # skips, or fails in CI, without RabbitMQ
        a = Adapter("rabbitmq", url, redelivers_unacked=True, packs=True)
    yield a
    for q in a.handles:
        await q.close()


async def take(stream: AsyncIterator[Delivery], n_ids: int) -> list[Delivery]:
    """Deliveries from ``stream`` until they carry ``n_ids`` ids, within the deadline."""
    got: list[Delivery] = []

    async def collect() -> None:
        while sum(len(d.task_ids) for d in got) < n_ids:
            got.append(await anext(stream))

    await asyncio.wait_for(collect(), WAIT)
    return got


def ids_of(deliveries: list[Delivery]) -> list[int]:
    return [t for d in deliveries for t in d.task_ids]


async def test_published_ids_are_delivered_once_each_in_dispatch_order(adapter: Adapter) -> None:
    q = await adapter.open()
    await q.publish([11, 12, 13])
    await q.publish([14])
    stream = q.deliveries(prefetch=10)
    got = await take(stream, 4)
    assert ids_of(got) == [11, 12, 13, 14]
    for d in got:
        assert not d.redelivered
        await d.ack()
    # Nothing acked comes back: the next delivery is what is published next.
    await q.publish([15])
    assert ids_of(await take(stream, 1)) == [15]


async def test_a_large_dispatch_arrives_whole_in_order_however_many_ids_a_delivery_carries(
    adapter: Adapter,
) -> None:
    q = await adapter.open()
    ids = list(range(1, 201))
    await q.publish(ids)
    stream = q.deliveries(prefetch=500)
    got = await take(stream, len(ids))
    assert ids_of(got) == ids
    assert all(d.task_ids for d in got)  # at least one id each
    if adapter.packs:
        assert len(got) < len(ids) and max(len(d.task_ids) for d in got) > 1
    else:
        assert len(got) == len(ids)
    for d in got:
        await d.ack()


async def test_a_rejected_delivery_with_requeue_comes_back(adapter: Adapter) -> None:
    q = await adapter.open()
    await q.publish([21])
    stream = q.deliveries(prefetch=10)
    (first,) = await take(stream, 1)
    await first.reject(requeue=True)
    (again,) = await take(stream, 1)
    assert again.task_ids == [21]
    await again.ack()


async def test_a_delivery_never_acked_comes_back_after_its_consumer_goes_away_where_promised(
    adapter: Adapter,
) -> None:
    consumer = await adapter.open()
    publisher = await adapter.open()
    await publisher.publish([31])
    gone = consumer.deliveries(prefetch=10)
    (held,) = await take(gone, 1)
    assert held.task_ids == [31] and not held.redelivered
    # The consumer goes away without acking: its stream ends and its connection closes.
    await gone.aclose()  # type: ignore[attr-defined]
    if adapter.kind != "embedded":
        await consumer.close()
    await publisher.publish([32])
    successor = await adapter.open()
    stream = successor.deliveries(prefetch=10)
    if adapter.redelivers_unacked:
        got = await take(stream, 2)
        assert sorted(ids_of(got)) == [31, 32]
        assert next(d for d in got if d.task_ids == [31]).redelivered
    else:
        # The embedded promise: the queue does not hand it out again (the server's
        # republish of dispatched-but-unclaimed tasks at start is what recovers it).
        got = await take(stream, 1)
        assert ids_of(got) == [32]
    for d in got:
        await d.ack()


async def test_a_cancel_reaches_every_listener(adapter: Adapter) -> None:
    heard: dict[str, list[list[int]]] = {"a": [], "b": []}
    first, second = await adapter.open(), await adapter.open()
    await first.listen_cancels(heard["a"].append)
    await second.listen_cancels(heard["b"].append)
    sender = await adapter.open()
    await sender.cancel([41, 42])

    async def both_heard() -> None:
        while not (heard["a"] and heard["b"]):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(both_heard(), WAIT)
    assert heard == {"a": [[41, 42]], "b": [[41, 42]]}


async def test_close_is_clean_and_what_was_published_stays_for_the_next_consumer(
    adapter: Adapter,
) -> None:
    q = await adapter.open()
    await q.listen_cancels(lambda ids: None)
    stream = q.deliveries(prefetch=10)
    await q.publish([51])
    (d,) = await take(stream, 1)
    await d.ack()
    await q.publish([52])
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(q.close(), WAIT)
    await asyncio.wait_for(q.close(), WAIT)  # closing twice is harmless
    if adapter.kind == "embedded":
        # One queue per process: "close" ends nothing, and what was published stays.
        nxt = q
    else:
        nxt = await adapter.open()
    got = await take(nxt.deliveries(prefetch=10), 1)
    assert ids_of(got) == [52]
    await got[0].ack()
