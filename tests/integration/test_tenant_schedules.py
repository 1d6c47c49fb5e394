"""A disabled tenant's schedules create no work; enabled again, they fire at their
next time (docs/tenants.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from taskfleet.store.schema import schedules
from tests.inproc import START, Harness, eventually, inproc_server


def _utc(hour: int, minute: int) -> float:
    day = START - START % 86400
    t = day + hour * 3600 + minute * 60
    return t if t > START else t + 86400


async def _row(h: Harness, sid: int) -> Any:
    async with h.rt.read.connect() as conn:
        return (await conn.execute(sa.select(schedules).where(schedules.c.id == sid))).one()


async def test_a_disabled_tenants_schedule_does_not_fire(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        root = h.admin
        h.admin = (await h.ok("POST", "/tenants", {"name": "acme"}))["token"]
        [agent] = await h.enroll(1)
        body = {"cron": "0 3 * * *", "request": {"target": "all", "params": {"argv": ["true"]}}}
        sid = (await h.ok("POST", "/schedules", body))["id"]
        acme, h.admin = h.admin, root
        await h.ok("POST", "/tenants/acme/disable")
        h.clock.set(_utc(3, 0))

        async def skipped() -> Any:
            row = await _row(h, sid)
            return row if row.last_error else None

        row = await eventually(skipped, what="the run skipped")
        assert row.runs == 0 and "tenant is disabled" in row.last_error
        assert row.next_at == _utc(3, 0) + 86400
        assert await agent.exchange() == []
        await h.ok("POST", "/tenants/acme/enable")
        h.clock.advance(86400)

        async def fired() -> Any:
            row = await _row(h, sid)
            return row if row.runs == 1 else None

        row = await eventually(fired, what="the run after enabling")
        assert row.last_error is None
        h.admin = acme
        assert len(await h.ok("GET", "/requests")) == 1
