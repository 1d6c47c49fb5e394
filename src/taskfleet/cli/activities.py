"""``taskfleet activity``: one unit of work on one computer.

Contract: talks to the admin API only (``/activities``); bulk cancel shows the
count first and asks (or wants --yes) before it cancels.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from taskfleet.cli.client import Api, client_options
from taskfleet.cli.options import FINITE_FLOAT
from taskfleet.cli.output import echo, emit, fail, print_fields, print_table, state_label, when


@click.group()
def activity() -> None:
    """Activities: one unit of work on one computer."""


@activity.command("list")
@click.option("--request", "request_id", type=int, default=None)
@click.option("--computer", "computer_id", type=int, default=None)
@click.option("--state", default=None)
@click.option("--limit", type=int, default=100, show_default=True)
@client_options
def activity_list(
    request_id: int | None,
    computer_id: int | None,
    state: str | None,
    limit: int,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """List activities, newest first."""
    state = state.lower().replace(" ", "_").replace("-", "_") if state else None
    rows = Api(server, token).get(
        "/activities", request_id=request_id, computer_id=computer_id, state=state, limit=limit
    )
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "activities",
            ["id", "request", "computer", "type", "state", "exit", "result", "updated"],
            [
                [
                    a["id"],
                    a["request_id"],
                    f"{a['computer_id']} {a.get('hostname') or ''}",
                    a["type"],
                    state_label(a["state"]),
                    a["exit_code"],
                    a["result_line"] or a["reason"],
                    when(a["updated_at"]),
                ]
                for a in rs
            ],
        ),
    )


@activity.command("show")
@click.argument("activity_id", type=int)
@client_options
def activity_show(activity_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Show one activity: state, result, output and its full history."""
    a = Api(server, token).get(f"/activities/{activity_id}")

    def table(a: dict[str, Any]) -> None:
        print_fields(
            f"activity {a['id']}",
            [
                ("request", a["request_id"]),
                ("computer", f"{a['computer_id']} {a['hostname']}"),
                ("type", a["type"]),
                ("state", state_label(a["state"])),
                ("reason", a["reason"]),
                ("result", a["result_line"]),
                ("exit code", a["exit_code"]),
                ("started (agent)", when(a["agent_started_at"])),
                ("ended (agent)", when(a["agent_ended_at"])),
                ("agent report", a["agent_report"]),
            ],
        )
        for name in ("stdout", "stderr"):
            if a.get(name):
                echo(f"--- {name} ---\n{a[name].rstrip()}")
        print_table(
            "history",
            ["at", "from", "to", "cause", "actor", "reason"],
            [
                [
                    when(e["at"]),
                    state_label(e["from_state"] or "-"),
                    state_label(e["to_state"]),
                    e["cause"],
                    e["actor"],
                    e["reason"],
                ]
                for e in a["history"]
            ],
        )

    emit(a, as_json, table)


@activity.command("cancel")
@click.argument("activity_id", type=int)
@click.option("--reason", default="")
@client_options
def activity_cancel(
    activity_id: int, reason: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Cancel an activity (a running one is stopped on its computer)."""
    a = Api(server, token).post(f"/activities/{activity_id}/cancel", {"reason": reason})
    emit(a, as_json, lambda d: echo(f"activity {activity_id}: {state_label(d['state'])}"))


@activity.command("cancel-bulk")
@click.option("--state", default=None, help="queued, scheduled, waiting, blocked, in_progress")
@click.option("--type", "type_name", default=None)
@click.option("--group", default=None)
@click.option("--older-than", type=FINITE_FLOAT, default=None, help="Seconds since created.")
@click.option("--request", "request_id", type=int, default=None)
@click.option("--reason", default="")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@client_options
def activity_cancel_bulk(
    state: str | None,
    type_name: str | None,
    group: str | None,
    older_than: float | None,
    request_id: int | None,
    reason: str,
    yes: bool,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Cancel every unfinished activity matching the filters; shows the count first."""
    if not any(v is not None for v in (state, type_name, group, older_than, request_id)):
        fail("give at least one filter (--state, --type, --group, --older-than, --request)")
    api = Api(server, token)
    body = {
        "state": state.lower().replace(" ", "_") if state else None,
        "type": type_name,
        "group": group,
        "older_than": older_than,
        "request_id": request_id,
        "reason": reason,
    }
    preview = api.post("/activities/cancel", {**body, "dry_run": True})
    if preview["count"] == 0:
        emit(preview, as_json, lambda d: echo("no unfinished activity matches"))
        return
    if not yes:
        if not sys.stdin.isatty():
            fail(f"{preview['count']} activities match; add --yes to cancel them")
        click.confirm(f"cancel {preview['count']} activities?", abort=True)
    out = api.post("/activities/cancel", body)
    emit(out, as_json, lambda d: echo(f"{d['count']} activities canceled"))
