"""Writing job steps (``job_steps``): one row per (activity, phase, item), the last report wins.

Contract: ``upsert_steps`` inserts or replaces the given rows in one statement, in
the caller's transaction, on SQLite and PostgreSQL alike (``ON CONFLICT DO UPDATE``
on the primary key). The caller passes at most one row per key (the last report of
a batch): one statement cannot update the same row twice on PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.store.schema import job_steps

_UPDATED = ("status", "detail", "at")


async def upsert_steps(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (every column of ``job_steps``), replacing status, detail and time
    of a step already recorded."""
    if not rows:
        return
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = insert(job_steps)
    stmt = stmt.on_conflict_do_update(
        index_elements=[job_steps.c.activity_id, job_steps.c.phase, job_steps.c.item],
        set_={c: stmt.excluded[c] for c in _UPDATED},
    )
    await conn.execute(stmt, rows)
