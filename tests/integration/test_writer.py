"""The single writer batches jobs into one transaction; a failing job undoes only itself."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from taskfleet.server.writer import Writer
from taskfleet.store import db
from taskfleet.store.schema import tenants


async def test_a_failing_job_in_a_batch_rolls_back_only_its_own_writes(database_url):
    await db.upgrade(database_url)
    engine = db.create_engine(database_url, writer=True)
    writer = Writer(engine)
    writer.start()
    after_calls: list[str] = []

    def insert(name: str, fail: bool = False):
        async def fn(conn):
            await conn.execute(tenants.insert().values(name=name, created_at=0))
            if fail:
                raise ValueError(f"{name} failed")
            return name

        return fn

    try:
        results = await asyncio.gather(
            writer.run(insert("a"), after=after_calls.append),
            writer.run(insert("b", fail=True), after=after_calls.append),
            writer.run(insert("c"), after=after_calls.append),
            return_exceptions=True,
        )
        assert results[0] == "a" and results[2] == "c"
        assert isinstance(results[1], ValueError)
        assert after_calls == ["a", "c"]
        async with engine.connect() as conn:
            names = set((await conn.execute(sa.select(tenants.c.name))).scalars())
        assert names == {"a", "c"}
        # The unique name of "a" is still enforced afterwards: the batch committed.
        with pytest.raises(sa.exc.IntegrityError):
            await writer.run(insert("a"))
    finally:
        await writer.stop()
        await engine.dispose()
