"""Writing activity state changes: the only code that assigns ``activities.state``.

Contract: callers get a :class:`~taskfleet.domain.states.Transition` from
``domain.states.transition`` (which checks the table) and hand it here with the
columns that change alongside; ``apply_changes`` updates the rows and appends
one history event per change, in the caller's transaction. Rows are updated
only if they are still in the state the transition starts from, so a racing
writer cannot be overwritten silently.
The writing functions are synchronous (a ``Connection``) so that a hot writer
transaction runs whole as one synchronous function (``Writer.run_sync``); async code
calls them as ``await conn.run_sync(apply_changes, changes)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from taskfleet.domain.states import FINAL_STATES, Transition
from taskfleet.store.bulk import TEXT_MATCH, insert_rows, update_rows
from taskfleet.store.schema import activities, activity_events

# A transaction that sets ``conn.info[FINISHED] = set()`` learns which
# activities it moved to a final state (the server's lifecycle engine reacts
# to those after the commit). Opt-in, so other processes collect nothing.
FINISHED = "taskfleet.finished"


class ConcurrentChange(RuntimeError):
    """An activity changed state under us; the transaction must be retried."""


@dataclass
class Change:
    activity_id: int
    tenant_id: int
    transition: Transition
    values: dict[str, Any] = field(default_factory=dict)


def apply_changes(conn: sa.Connection, changes: list[Change]) -> None:
    if not changes:
        return
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for ch in changes:
        t = ch.transition
        assert t.from_state is not None, "use insert for creation events"
        params = {
            "b_id": ch.activity_id,
            "b_from": t.from_state.value,
            "state": t.to_state.value,
            "updated_at": t.at,
            "reason": t.reason,
            **ch.values,
        }
        by_columns.setdefault(tuple(sorted(params)), []).append(params)
    for rows in by_columns.values():
        # ``state || ''``: the same test, but no index on state can serve it.
        # PostgreSQL's generic plan for a prepared statement on a table without
        # statistics was seen to pick the (state, ...) indexes over the primary
        # key and read every Queued row per update (730 rows per claimed task
        # against 25 with this; bench_tasks.py, 2026-11-22).
        matched = update_rows(
            conn, activities, rows, {"b_id": "id", "b_from": "state" + TEXT_MATCH}
        )
        if matched < len(rows):
            raise ConcurrentChange(f"{len(rows) - matched} activities changed concurrently")
    insert_events(conn, [(ch.activity_id, ch.tenant_id, ch.transition) for ch in changes])
    finished = conn.info.get(FINISHED)
    if finished is not None:
        finished.update(ch.activity_id for ch in changes if ch.transition.to_state in FINAL_STATES)


def insert_events(conn: sa.Connection, rows: list[tuple[int, int, Transition]]) -> None:
    if not rows:
        return
    insert_rows(
        conn,
        activity_events,
        [
            {
                "activity_id": aid,
                "tenant_id": tid,
                "from_state": t.from_state.value if t.from_state else None,
                "to_state": t.to_state.value,
                "cause": t.cause.value,
                "actor": t.actor,
                "at": t.at,
                "reason": t.reason,
            }
            for aid, tid, t in rows
        ],
    )


def insert_activities(conn: sa.Connection, rows: list[dict[str, Any]]) -> list[int]:
    """Insert activity rows, returning their ids in order, with few statements.

    PostgreSQL: INSERT ... RETURNING in pages (ordered by SQLAlchemy). SQLite:
    one executemany, then the ids by arithmetic: all writes of a process go
    through the single writer inside BEGIN IMMEDIATE, and SQLite gives a table
    without AUTOINCREMENT max(rowid)+1, so the new ids are consecutive.
    """
    if not rows:
        return []
    if conn.dialect.name == "postgresql":
        result = conn.execute(
            activities.insert().returning(activities.c.id, sort_by_parameter_order=True), rows
        )
        return [int(i) for i in result.scalars().all()]
    before = conn.execute(sa.select(sa.func.max(activities.c.id))).scalar() or 0
    conn.execute(activities.insert(), rows)
    after = conn.execute(sa.select(sa.func.max(activities.c.id))).scalar() or 0
    if after - before != len(rows):
        raise ConcurrentChange("activity ids were not consecutive; retry the batch")
    return list(range(int(before) + 1, int(after) + 1))
