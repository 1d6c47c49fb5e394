"""server/cluster.py: a process that gains the lead but cannot write it down (the
database failed that beat) stamps the leadership row at its next beat, instead of
believing it leads while the database names no leader (or the previous one)."""

from __future__ import annotations

import contextlib

import sqlalchemy as sa

from taskfleet.server.cluster import Cluster
from taskfleet.server.writer import Writer
from taskfleet.store import db
from taskfleet.store.schema import leadership


async def test_a_lead_gained_in_a_beat_whose_write_failed_is_written_at_the_next(database_url):
    await db.upgrade(database_url)
    engine = db.create_engine(database_url, writer=True)
    writer = Writer(engine)
    writer.start()
    cluster = Cluster(writer, engine, None, url="http://127.0.0.1:1", clock=lambda: 100.0)
    real_run = writer.run
    fail = True

    async def run(fn, after=None):
        if fail and "write" in fn.__qualname__:  # the beat's write, not the registration
            raise sa.exc.OperationalError("UPDATE", {}, OSError(28, "No space left on device"))
        return await real_run(fn, after)

    writer.run = run  # type: ignore[method-assign]
    try:
        # The first beat fails (the server's loop logs it and beats again).
        with contextlib.suppress(sa.exc.OperationalError):
            await cluster.start()
        assert not cluster.is_leader
        fail = False
        await cluster.beat()
        assert cluster.is_leader
        async with engine.connect() as conn:
            row = (await conn.execute(sa.select(leadership))).one()
        assert (row.holder, row.epoch) == (cluster.id, 1)
        assert (await cluster.status())["leader"]["id"] == cluster.id
    finally:
        await writer.stop()
        await engine.dispose()
