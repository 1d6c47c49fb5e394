"""The schema in store/schema.py is exactly what the Alembic migrations build."""

from __future__ import annotations

import asyncio

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from taskfleet.store import db
from taskfleet.store.schema import metadata


def _diff(url: str) -> list:
    async def run() -> list:
        engine = db.create_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda sync: compare_metadata(
                        MigrationContext.configure(sync, opts={"compare_type": True}), metadata
                    )
                )
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_schema_equals_all_migrations_applied(database_url):
    db.upgrade_sync(database_url)
    assert _diff(database_url) == []


def test_migrations_are_idempotent_and_reversible(database_url):
    db.upgrade_sync(database_url)
    db.upgrade_sync(database_url)  # a restart applies nothing twice
    from alembic import command

    command.downgrade(db._alembic_config(database_url), "base")
    db.upgrade_sync(database_url)
    assert _diff(database_url) == []


def test_an_empty_database_differs_from_the_schema(database_url):
    # Guards the guard: compare_metadata must see a missing schema.
    engine_url = database_url
    if engine_url.startswith("sqlite"):
        from pathlib import Path

        Path(engine_url.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    assert _diff(engine_url) != []
