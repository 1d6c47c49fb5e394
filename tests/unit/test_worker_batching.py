"""Packing task ids into RabbitMQ messages, and the worker's claim/result batcher."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from taskfleet.dispatch.rabbitmq import MAX_IDS_PER_MESSAGE, SPREAD, pack, unpack
from taskfleet.worker.runner import _Batcher


@pytest.mark.parametrize("n", [1, 2, SPREAD, SPREAD + 1, 100, 999, 5000])
def test_pack_keeps_every_id_once_in_order_and_spreads_small_dispatches(n: int) -> None:
    ids = list(range(10, 10 + n))
    bodies = pack(ids)
    assert [i for b in bodies for i in unpack(b)] == ids
    sizes = [len(unpack(b)) for b in bodies]
    assert max(sizes) <= MAX_IDS_PER_MESSAGE
    # A small dispatch is one task per message, so several workers share it.
    assert len(bodies) >= min(n, SPREAD)
    if n <= SPREAD:
        assert sizes == [1] * n


def test_unpack_reads_a_single_id_as_older_servers_published_it_and_refuses_garbage() -> None:
    assert unpack(b"42") == [42]
    assert unpack(b"1,2,3") == [1, 2, 3]
    for bad in (b"", b"x", b"1,,2", b"-1", b"0", b"1;2"):
        with pytest.raises(ValueError):
            unpack(bad)


def test_batcher_runs_what_arrives_together_in_one_transaction_and_never_shares_a_claim() -> None:
    calls: list[list[int]] = []

    async def run_sync(fn: Any) -> Any:
        await asyncio.sleep(0)
        return fn(None)

    def many(_conn: Any, items: list[int]) -> dict[int, Any]:
        calls.append(list(items))
        return {i: f"claimed {i}" for i in items}

    async def main() -> tuple[list[Any], list[Any]]:
        b = _Batcher(run_sync, many, key=lambda i: i, repeat=lambda i: f"duplicate {i}")
        try:
            return await asyncio.gather(b.call_many([1, 2, 3]), b.call_many([3, 4]))
        finally:
            b.close()

    first, second = asyncio.run(main())
    assert calls == [[1, 2, 3, 3, 4]]
    assert first == ["claimed 1", "claimed 2", "claimed 3"]
    assert second == ["duplicate 3", "claimed 4"]


def test_batcher_retries_each_group_alone_when_a_mixed_batch_fails() -> None:
    async def run_sync(fn: Any) -> Any:
        return fn(None)

    def many(_conn: Any, items: list[int]) -> dict[int, Any]:
        if any(i < 0 for i in items):
            raise RuntimeError("bad result")
        return {i: "ok" for i in items}

    async def main() -> tuple[Any, Any]:
        b = _Batcher(run_sync, many, key=lambda i: i, group=lambda i: i < 0)
        try:
            return await asyncio.gather(b.call(-1), b.call(2), return_exceptions=True)
        finally:
            b.close()

    bad, good = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and good == "ok"


def test_a_task_canceled_while_it_waits_for_a_run_slot_never_takes_one() -> None:
    from taskfleet.dispatch.embedded import EmbeddedQueue
    from taskfleet.worker.handlers import StopRequest
    from taskfleet.worker.runner import Worker

    async def run_tx(fn: Any) -> Any:
        raise AssertionError("no database here")

    async def main() -> tuple[bool, bool, bool, int]:
        w = Worker(
            queue=EmbeddedQueue(), types={}, run_tx=run_tx, run_sync=run_tx, pg=False, concurrency=1
        )
        await w._slots.acquire()  # another task runs
        stop = StopRequest()
        waiting = asyncio.create_task(w._slot_unless_stopped(stop))
        await asyncio.sleep(0)
        stop.set()
        canceled = await waiting
        # Another one, not canceled, gets the slot when it frees.
        other = asyncio.create_task(w._slot_unless_stopped(StopRequest()))
        await asyncio.sleep(0)
        w._slots.release()
        got = await other
        early = StopRequest()
        early.set()
        return canceled, got, await w._slot_unless_stopped(early), w._slots._value

    canceled, got, early, free = asyncio.run(main())
    assert (canceled, got, early) == (False, True, False)
    assert free == 0  # exactly one slot taken (by the second), none leaked


def test_an_embedded_worker_claims_the_next_task_in_the_transaction_storing_a_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The slot a finished task frees takes the next delivery, and its claim goes in
    the transaction that stores the result (not one transaction each): with one
    slot, every batch after the first holds one result and one claim."""
    from taskfleet.dispatch.embedded import EmbeddedQueue
    from taskfleet.store.tasks import running
    from taskfleet.worker.builtin import BUILTINS
    from taskfleet.worker.runner import Worker, _Claim

    ids = [1, 2, 3, 4]
    batches: list[list[tuple[str, int]]] = []

    async def run_sync(fn: Any) -> Any:
        await asyncio.sleep(0)  # the writer's queue: a turn at least
        return fn(None)

    async def run_tx(fn: Any) -> Any:
        raise AssertionError("claims and results go through run_sync")

    async def main() -> None:
        stored = asyncio.Event()

        def claim_and_complete(_w: Worker, _conn: Any, items: list[Any]) -> dict[Any, Any]:
            out: dict[Any, Any] = {}
            batch = []
            for i in items:
                if isinstance(i, _Claim):
                    batch.append(("claim", i.task_id))
                    out[("_Claim", i.task_id)] = running.Claimed(i.task_id, "noop", {}, None, None)
                else:
                    batch.append(("result", i.task_id))
                    out[("Outcome", i.task_id)] = True
            batches.append(sorted(batch))
            if ("result", ids[-1]) in batch:
                stored.set()
            return out

        async def no_heartbeat(_w: Worker) -> None:
            return None

        monkeypatch.setattr(Worker, "_claim_and_complete", claim_and_complete)
        monkeypatch.setattr(Worker, "_heartbeat", no_heartbeat)
        q = EmbeddedQueue()
        types = {s.name: s for s in BUILTINS}
        w = Worker(queue=q, types=types, run_tx=run_tx, run_sync=run_sync, pg=False, concurrency=1)
        running_worker = asyncio.create_task(w.run())
        try:
            await q.publish(ids)
            await asyncio.wait_for(stored.wait(), 10)
        finally:
            running_worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running_worker

    asyncio.run(main())
    assert batches == [
        [("claim", 1)],
        [("claim", 2), ("result", 1)],
        [("claim", 3), ("result", 2)],
        [("claim", 4), ("result", 3)],
        [("result", 4)],
    ]
