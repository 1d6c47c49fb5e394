"""A batch of state changes is one guarded statement on PostgreSQL, with the same
guarantees as one statement per row: every row checked against the state it leaves,
a stale row refuses the batch, an over-long text is refused rather than cut."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.states import Cause, State, transition
from taskfleet.store import db
from taskfleet.store.activities import Change, ConcurrentChange, apply_changes
from taskfleet.store.bulk import id_in
from taskfleet.store.schema import activities, activity_events, tenants
from taskfleet.store.tasks import SERVER

N = 50


async def _setup(conn: AsyncConnection) -> list[int]:
    tid = (
        await conn.execute(tenants.insert().values(name="t", created_at=0).returning(tenants.c.id))
    ).scalar_one()
    ids = []
    for i in range(N):
        ids.append(
            (
                await conn.execute(
                    activities.insert()
                    .values(
                        tenant_id=tid,
                        kind=SERVER.value,
                        type="noop",
                        state=State.QUEUED.value,
                        created_at=i,
                        updated_at=i,
                    )
                    .returning(activities.c.id)
                )
            ).scalar_one()
        )
    return ids


def _claim(aid: int, tenant: int, at: float, reason: str = "taken") -> Change:
    t = transition(
        SERVER,
        State.QUEUED,
        State.IN_PROGRESS,
        cause=Cause.DELIVERED,
        actor="w",
        at=at,
        reason=reason,
    )
    return Change(aid, tenant, t, {"delivered_at": at})


@pytest.fixture
async def engine(database_url):
    await db.upgrade(database_url)
    engine = db.create_engine(database_url, writer=True)
    yield engine
    await engine.dispose()


async def test_a_batch_moves_each_row_with_its_own_values_and_history(engine):
    statements: list[tuple[str, bool]] = []

    def count(conn: Any, cursor: Any, stmt: str, params: Any, ctx: Any, many: bool) -> None:
        statements.append((stmt.split()[0], many))

    async with engine.begin() as conn:
        ids = await _setup(conn)
        tenant = (await conn.execute(sa.select(tenants.c.id))).scalar_one()
        sa.event.listen(engine.sync_engine, "before_cursor_execute", count)
        try:
            await conn.run_sync(apply_changes, [_claim(a, tenant, 1000 + a) for a in ids])
        finally:
            sa.event.remove(engine.sync_engine, "before_cursor_execute", count)
        rows = (
            await conn.execute(
                sa.select(activities.c.id, activities.c.state, activities.c.delivered_at).where(
                    id_in(conn, activities.c.id, ids)
                )
            )
        ).all()
        events = (
            await conn.execute(
                sa.select(activity_events.c.activity_id, activity_events.c.at).where(
                    activity_events.c.to_state == State.IN_PROGRESS.value
                )
            )
        ).all()
    assert sorted((r.id, r.state, r.delivered_at) for r in rows) == [
        (a, State.IN_PROGRESS.value, 1000 + a) for a in ids
    ]
    assert sorted(events) == [(a, 1000 + a) for a in ids]
    if engine.dialect.name == "postgresql":
        # One UPDATE and one INSERT for the 50 rows, not an executemany of 50 each.
        assert statements == [("UPDATE", False), ("INSERT", False)]


async def test_one_stale_row_refuses_the_whole_batch(engine):
    async with engine.connect() as conn:
        async with conn.begin():
            ids = await _setup(conn)
            tenant = (await conn.execute(sa.select(tenants.c.id))).scalar_one()
            await conn.execute(
                activities.update()
                .where(activities.c.id == ids[7])
                .values(state=State.CANCELED.value)
            )
        with pytest.raises(ConcurrentChange, match="1 activities changed concurrently"):
            async with conn.begin():
                await conn.run_sync(apply_changes, [_claim(a, tenant, 5.0) for a in ids])
        states = (
            await conn.execute(
                sa.select(activities.c.state).where(id_in(conn, activities.c.id, ids))
            )
        ).scalars()
        assert sorted(states) == [State.CANCELED.value] + [State.QUEUED.value] * (N - 1)


async def test_an_over_long_reason_is_refused_not_cut(engine):
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite does not enforce VARCHAR lengths")
    async with engine.connect() as conn:
        async with conn.begin():
            ids = await _setup(conn)
            tenant = (await conn.execute(sa.select(tenants.c.id))).scalar_one()
        with pytest.raises(sa.exc.DBAPIError, match="too long"):
            async with conn.begin():
                await conn.run_sync(apply_changes, [_claim(ids[0], tenant, 5.0, reason="x" * 2001)])
        state = (
            await conn.execute(sa.select(activities.c.state).where(activities.c.id == ids[0]))
        ).scalar_one()
        assert state == State.QUEUED.value


async def test_a_json_column_in_a_batch_is_stored_as_json(engine):
    async with engine.begin() as conn:
        ids = await _setup(conn)
        tenant = (await conn.execute(sa.select(tenants.c.id))).scalar_one()
        changes = [_claim(a, tenant, 7.0) for a in ids[:3]]
        for i, ch in enumerate(changes):
            ch.values["agent_report"] = {"worker": "w", "n": i, "text": "é\u0000x"[:1] + "\u2028"}
        await conn.run_sync(apply_changes, changes)
        rows = (
            await conn.execute(
                sa.select(activities.c.id, activities.c.agent_report).where(
                    id_in(conn, activities.c.id, ids[:3])
                )
            )
        ).all()
    assert sorted((r.id, r.agent_report["n"]) for r in rows) == [
        (a, i) for i, a in enumerate(ids[:3])
    ]
    assert {r.agent_report["text"] for r in rows} == {"é\u2028"}


async def test_a_result_a_worker_can_no_longer_act_on_is_recorded_on_the_task(engine):
    """complete_many: a task failed meanwhile (say, its worker was reported lost) keeps
    its state, and the late report is stored on it (a JSON column: the executemany path)."""
    from taskfleet.store.schema import server_tasks
    from taskfleet.store.tasks.running import Outcome, complete_many

    async with engine.begin() as conn:
        ids = await _setup(conn)
        tenant = (await conn.execute(sa.select(tenants.c.id))).scalar_one()
        await conn.execute(
            server_tasks.insert(),
            [
                {
                    "activity_id": a,
                    "tenant_id": tenant,
                    "type": "noop",
                    "params": {},
                    "dedupe_key": f"k{a}",
                    "submitted_by": "t",
                    "claimed_by": "w",
                }
                for a in ids[:2]
            ],
        )
        await conn.execute(
            activities.update()
            .where(id_in(conn, activities.c.id, ids[:2]))
            .values(state=State.FAILED.value)
        )
        done = await conn.run_sync(
            complete_many,
            "w",
            9.0,
            [Outcome(a, True, 0, "out", "Completed:Succeeded", None) for a in ids[:2]],
        )
        rows = (
            await conn.execute(
                sa.select(activities.c.state, activities.c.agent_report).where(
                    id_in(conn, activities.c.id, ids[:2])
                )
            )
        ).all()
    assert done == dict.fromkeys(ids[:2], False)
    assert [(r.state, r.agent_report["ok"], r.agent_report["received_at"]) for r in rows] == [
        (State.FAILED.value, True, 9.0)
    ] * 2
