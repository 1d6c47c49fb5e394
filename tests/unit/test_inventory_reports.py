"""When the agent collects its inventory: the server's asks for the whole one while one is
being collected or is on its way make no second one (agent/inventory_reports.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from taskfleet.agent import state as st
from taskfleet.agent.inventory_reports import InventoryReports
from taskfleet.protocol.inventory import ASK_FULL


class SlowCollector(InventoryReports):
    """Collections that take as long as the test says and queue a message each."""

    def __init__(self, folder: Path) -> None:
        super().__init__(st.LocalState(folder), asyncio.Event(), state_dir=folder, min_interval=0)
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.kinds: list[bool] = []

    async def _collect(self, full: bool) -> int | None:
        self.started.set()
        await self.release.wait()
        self.release.clear()
        self.kinds.append(full)
        seq = self.state.queue_text('{"type": "inventory"}')
        if full:
            self.full_seq = seq
        return seq


def test_asks_while_a_whole_inventory_is_collected_or_queued_make_no_second_one(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        reports = SlowCollector(tmp_path)
        reports.want(full=True)
        task = asyncio.create_task(reports.run())
        await asyncio.wait_for(reports.started.wait(), 5)
        for _ in range(3):  # every reply while the collection runs asks again
            reports.asked(ASK_FULL)
        assert not reports.due.is_set()
        reports.release.set()
        for _ in range(100):
            if reports.kinds:
                break
            await asyncio.sleep(0.01)  # a loop turn, not a wait for time
        assert reports.kinds == [True]
        reports.asked(ASK_FULL)  # queued, not acknowledged yet: still on its way
        assert not reports.due.is_set()
        # Once the server has it, an ask (another mismatch) makes a new one.
        assert reports.full_seq is not None
        reports.state.acked(reports.full_seq)
        reports.asked(ASK_FULL)
        assert reports.due.is_set() and reports.full
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
