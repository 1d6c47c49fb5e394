"""Server task types taskfleet ships and needs itself.

* ``purge-history``: delete finished activities (client and server), their
  history events and orphaned requests older than ``older_than_days`` days: the
  retention period is a parameter (a schedule can run it nightly), not a fixed
  day. Only final activities are ever purged.
* ``noop``: does nothing; for health checks and benchmarks.
Handlers get ``run_tx`` in their context: a way to run a function in a write
transaction (the server's single writer in the embedded default).
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from taskfleet.domain.states import FINAL_STATES
from taskfleet.domain.task_types import TaskTypeSpec
from taskfleet.settings import TASK_TIME_LIMIT
from taskfleet.store.schema import activities, activity_events, requests, server_tasks

BUILTINS = (
    TaskTypeSpec(
        name="purge-history",
        scope="none",
        handler="taskfleet.worker.builtin:purge_history",
        kind="callable",
        time_limit=TASK_TIME_LIMIT,
        concurrency=1,
        retry_safe=True,
        params={"older_than_days": "int"},
        defaults={"older_than_days": 30},
        ranges={"older_than_days": (0, 36500)},
        description="delete finished activities and their history older than N days",
    ),
    TaskTypeSpec(
        name="noop",
        scope="none",
        handler="taskfleet.worker.builtin:noop",
        kind="callable",
        time_limit=60.0,
        retry_safe=True,
        params={"n": "int"},
        defaults={"n": 0},
        description="does nothing (health checks, benchmarks)",
    ),
)


async def noop(params: dict[str, Any], context: dict[str, Any]) -> None:
    return None


async def purge_history(params: dict[str, Any], context: dict[str, Any]) -> str:
    days = int(params["older_than_days"])
    if days < 0:
        raise ValueError("older_than_days must be >= 0")
    cutoff = time.time() - days * 86400.0
    final = [s.value for s in FINAL_STATES]

    async def fn(conn: Any) -> tuple[int, int]:
        ids = list(
            (
                await conn.execute(
                    sa.select(activities.c.id).where(
                        activities.c.state.in_(final),
                        activities.c.finished_at.is_not(None),
                        activities.c.finished_at < cutoff,
                        activities.c.id != context.get("task_id"),
                    )
                )
            ).scalars()
        )
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            await conn.execute(
                activity_events.delete().where(activity_events.c.activity_id.in_(chunk))
            )
            await conn.execute(server_tasks.delete().where(server_tasks.c.activity_id.in_(chunk)))
            await conn.execute(activities.delete().where(activities.c.id.in_(chunk)))
        orphans = await conn.execute(
            requests.delete().where(
                requests.c.created_at < cutoff,
                ~sa.exists().where(activities.c.request_id == requests.c.id),
            )
        )
        return len(ids), orphans.rowcount or 0

    purged, orphaned = await context["run_tx"](fn)
    return f"purged {purged} activities and {orphaned} requests finished before {days} days ago"
