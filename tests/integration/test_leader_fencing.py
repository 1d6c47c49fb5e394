"""Epoch fencing (issue 16; server/cluster.py): two server runtimes on one PostgreSQL
database and one fake clock. The leader loses its lock without noticing, the other
takes the lead one epoch further: the deposed leader's cron firing is refused (nothing
is written), it steps down, and the schedule fires once, in the new leader."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from taskfleet.server.cluster import Deposed
from taskfleet.server.runtime import fire_schedule
from taskfleet.store.schema import requests, schedules
from tests.conftest import BACKEND
from tests.inproc import START, FakeClock, Harness, eventually, inproc_server

DUTIES = ["lifecycle", "reaper", "scheduler", "tickler"]
# Beats only when the test calls them; no reaper pass writes in the window under test.
QUIET = {"cluster_heartbeat": 3600.0, "reaper_interval": 3600.0}


async def _fired(h: Harness, sid: int) -> tuple[int, int]:
    async with h.rt.read.connect() as conn:
        runs = (await conn.execute(sa.select(schedules.c.runs).where(schedules.c.id == sid))).one()
        count = sa.select(sa.func.count()).select_from(requests)
        made = (await conn.execute(count.where(requests.c.schedule_id == sid))).scalar()
    return int(runs[0]), int(made or 0)


@pytest.mark.skipif(BACKEND != "postgresql", reason="several servers share PostgreSQL only")
async def test_a_deposed_leaders_cron_firing_is_refused_and_the_run_fires_once(
    database_url: str, tmp_path: Path
) -> None:
    clock = FakeClock()
    async with (
        inproc_server(database_url, tmp_path, clock, **QUIET) as a,
        inproc_server(database_url, tmp_path, clock, **QUIET) as b,
    ):
        old, new = a.rt.cluster, b.rt.cluster
        assert old is not None and new is not None
        assert old.is_leader and not new.is_leader and new.duties_running == []
        await a.enroll(1)
        hour = START - START % 3600 + 3600
        sid = (
            await a.ok(
                "POST",
                "/schedules",
                {"cron": "0 * * * *", "request": {"target": "all", "params": {"argv": ["true"]}}},
            )
        )["id"]
        # The leader's lock session ends and it has not noticed (no beat yet): the
        # other process takes the lead, one epoch further.
        await old._drop_lock_conn()
        await new.beat()
        assert new.is_leader and new.epoch == (old.epoch or 0) + 1
        assert old.is_leader  # what it believes; the database says otherwise
        await eventually(lambda: _ready(b), what="the new leader's duties")

        clock.set(hour)
        with pytest.raises(Deposed):  # the stale epoch's firing writes nothing
            await fire_schedule(a.rt, sid)
        assert old.refused >= 1
        # Both lifecycles now find the schedule due: the deposed one is refused and
        # steps down; the new leader fires it, once.

        async def settled() -> tuple[int, int] | None:
            fired = await _fired(b, sid)
            return fired if fired == (1, 1) and not old.is_leader else None

        await eventually(settled, what="one run, and the deposed leader stepped down")
        assert old.refused >= 2 and old.duties_running == [] and old.epoch is None
        assert new.duties_running == DUTIES
        clock.advance(30)  # the next passes of both fire nothing more
        await b.tick()
        assert await _fired(b, sid) == (1, 1)


async def _ready(h: Harness) -> bool:
    assert h.rt.lifecycle is not None
    return h.rt.lifecycle.leading and h.rt.lifecycle._caught_up_at is not None
