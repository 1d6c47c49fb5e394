"""``taskfleet schedule``: cron schedules (``taskfleet run --cron`` creates one).

Contract: talks to the admin API only (``/schedules``).
"""

from __future__ import annotations

from typing import Any

import click

from taskfleet.cli.client import Api, client_options
from taskfleet.cli.output import echo, emit, print_table, when


@click.group()
def schedule() -> None:
    """Cron schedules: `taskfleet run --cron ...` creates one; each run is its own request."""


_SCHED_COLS = ["id", "cron (UTC)", "target", "next run", "runs", "last request", "state / error"]


def _sched_row(d: dict[str, Any]) -> list[Any]:
    state = "canceled" if d["canceled_at"] else (d["last_error"] or "active")
    return [
        d["id"],
        d["cron"],
        d["template"]["target"],
        when(d["next_at"]) if d["next_at"] else "-",
        d["runs"],
        d["last_request_id"] or "-",
        state,
    ]


@schedule.command("list")
@client_options
def schedule_list(server: str | None, token: str | None, as_json: bool) -> None:
    """All schedules with their next run."""
    rows = Api(server, token).get("/schedules")
    emit(
        rows, as_json, lambda rs: print_table("schedules", _SCHED_COLS, [_sched_row(d) for d in rs])
    )


@schedule.command("show")
@click.argument("schedule_id", type=int)
@client_options
def schedule_show(schedule_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """One schedule."""
    d = Api(server, token).get(f"/schedules/{schedule_id}")
    emit(d, as_json, lambda d: print_table(None, _SCHED_COLS, [_sched_row(d)]))


@schedule.command("cancel")
@click.argument("schedule_id", type=int)
@client_options
def schedule_cancel(schedule_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Stop future runs (runs already created go on; cancel them as requests)."""
    d = Api(server, token).post(f"/schedules/{schedule_id}/cancel")
    emit(d, as_json, lambda d: echo(f"schedule {schedule_id} canceled"))
