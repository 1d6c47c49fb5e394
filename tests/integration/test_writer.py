"""The single writer batches jobs into one transaction; a failing job undoes only itself."""

from __future__ import annotations

import asyncio
import stat
from typing import Any

import pytest
import sqlalchemy as sa

from taskfleet.domain.states import Cause, State, transition
from taskfleet.server.writer import Writer
from taskfleet.store import db
from taskfleet.store.activities import Change, ConcurrentChange, apply_changes
from taskfleet.store.schema import activities, tenants
from taskfleet.store.tasks import SERVER


async def _started(database_url: str) -> tuple[Writer, Any]:
    """A started writer on a migrated database, and its engine (stop both in the test)."""
    await db.upgrade(database_url)
    engine = db.create_engine(database_url, writer=True)
    writer = Writer(engine)
    writer.start()
    return writer, engine


async def test_a_failing_job_in_a_batch_rolls_back_only_its_own_writes(database_url):
    writer, engine = await _started(database_url)
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


def _move(aid: int, tenant: int, to: State) -> Change:
    return Change(
        aid,
        tenant,
        transition(SERVER, State.QUEUED, to, cause=Cause.DELIVERED, actor="w", at=5.0, reason="x"),
    )


async def test_sync_jobs_share_a_transaction_and_a_failing_one_undoes_only_itself(database_url):
    """``run_sync``: the same contract as ``run`` (on SQLite: its own thread and
    connection; on PostgreSQL: ``AsyncConnection.run_sync``)."""
    writer, engine = await _started(database_url)
    after_calls: list[str] = []

    def insert(name: str, fail: bool = False):
        def fn(conn: sa.Connection) -> str:
            conn.execute(tenants.insert().values(name=name, created_at=0))
            if fail:
                raise ValueError(f"{name} failed")
            return name

        return fn

    try:
        results = await asyncio.gather(
            writer.run_sync(insert("a"), after=after_calls.append),
            writer.run_sync(insert("b", fail=True), after=after_calls.append),
            writer.run_sync(insert("c"), after=after_calls.append),
            writer.run(lambda c: c.execute(sa.select(1))),  # an async job between: in order
            writer.run_sync(insert("d"), after=after_calls.append),
            return_exceptions=True,
        )
        assert results[0] == "a" and results[2] == "c" and results[4] == "d"
        assert isinstance(results[1], ValueError)
        assert after_calls == ["a", "c", "d"]
        with pytest.raises(ValueError, match="e failed"):  # a batch of one
            await writer.run_sync(insert("e", fail=True))
        async with engine.connect() as conn:
            names = set((await conn.execute(sa.select(tenants.c.name))).scalars())
        assert names == {"a", "c", "d"}
        with pytest.raises(sa.exc.IntegrityError):
            await writer.run_sync(insert("a"))
    finally:
        await writer.stop()
        await engine.dispose()


async def test_a_sync_job_on_a_stale_row_raises_concurrent_change_and_reports_what_it_finished(
    database_url,
):
    writer, engine = await _started(database_url)
    finished: list[set[int]] = []
    writer.on_finished = finished.append
    try:
        stale, tenant = await writer.run(lambda c: c.run_sync(_queued_task_sync))
        await writer.run_sync(lambda c: apply_changes(c, [_move(stale, tenant, State.CANCELED)]))
        assert finished == [{stale}]  # Canceled is final: the lifecycle engine hears of it
        with pytest.raises(ConcurrentChange):
            await writer.run_sync(
                lambda c: apply_changes(c, [_move(stale, tenant, State.IN_PROGRESS)])
            )
        async with engine.connect() as conn:
            state = (
                await conn.execute(sa.select(activities.c.state).where(activities.c.id == stale))
            ).scalar_one()
        assert state == State.CANCELED.value
        assert finished == [{stale}]
    finally:
        await writer.stop()
        await engine.dispose()


def _queued_task_sync(conn: sa.Connection) -> tuple[int, int]:
    tenant = conn.execute(
        tenants.insert().values(name="t", created_at=0).returning(tenants.c.id)
    ).scalar_one()
    aid = conn.execute(
        activities.insert()
        .values(
            tenant_id=tenant,
            kind=SERVER.value,
            type="noop",
            state=State.QUEUED.value,
            created_at=0,
            updated_at=0,
        )
        .returning(activities.c.id)
    ).scalar_one()
    return int(aid), int(tenant)


async def test_the_sqlite_writer_sync_connection_is_as_durable_and_private_as_the_async_one(
    database_url,
):
    if db.sqlite_path(database_url) is None:
        pytest.skip("SQLite only: PostgreSQL runs sync jobs on the async connection")
    db.prepare_sqlite(database_url)
    writer, engine = await _started(database_url)
    try:

        def pragmas(conn: sa.Connection) -> tuple[Any, ...]:
            return tuple(
                conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                for p in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            )

        assert await writer.run_sync(pragmas) == ("wal", 2, 1, 30000)  # 2: FULL
        await writer.run_sync(lambda c: c.execute(tenants.insert().values(name="x", created_at=0)))
        path = db.sqlite_path(database_url)
        assert path is not None
        for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        await writer.stop()
        await engine.dispose()
