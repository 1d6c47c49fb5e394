"""``taskfleet computer``: enrolled computers (list, show, remove).

Contract: talks to the admin API only (``/computers``); removing asks (or wants
--yes) first. Tags are set through ``taskfleet group tag`` (cli/groups.py).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from taskfleet.cli.client import Api, client_options
from taskfleet.cli.output import (
    clean,
    echo,
    emit,
    fail,
    print_fields,
    print_table,
    state_label,
    when,
)


@click.group()
def computer() -> None:
    """Enrolled computers."""


@computer.command("list")
@client_options
def computer_list(server: str | None, token: str | None, as_json: bool) -> None:
    """List enrolled computers."""
    rows = Api(server, token).get("/computers")
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "computers",
            ["id", "hostname", "last seen", "address", "scripts", "groups", "tags"],
            [
                [
                    c["id"],
                    c["hostname"],
                    when(c["last_seen_at"]),
                    c["address"],
                    "yes" if (c["policy"] or {}).get("scripts") else "no",
                    ",".join(c["groups"]),
                    ",".join(f"{k}={v}" for k, v in c["tags"].items()),
                ]
                for c in rs
            ],
        ),
    )


@computer.command("show")
@click.argument("computer_id", type=int)
@client_options
def computer_show(computer_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Show a computer and its recent activities."""
    c = Api(server, token).get(f"/computers/{computer_id}")

    def table(c: dict[str, Any]) -> None:
        print_fields(
            f"computer {c['id']}",
            [
                ("hostname", c["hostname"]),
                ("enrolled", when(c["enrolled_at"])),
                ("last seen", when(c["last_seen_at"])),
                ("address", c["address"]),
                ("tickle port", c["tickle_port"]),
                ("agent", c["agent_version"]),
                ("generation", c["generation"]),
                ("removed", when(c["removed_at"]) if c.get("removed_at") else None),
                ("policy", c["policy"]),
                ("groups", ", ".join(c["groups"])),
                ("tags", ", ".join(f"{k}={v}" for k, v in c["tags"].items())),
            ],
        )
        print_table(
            "recent activities",
            ["id", "request", "state", "exit", "result"],
            [
                [
                    a["id"],
                    a["request_id"],
                    state_label(a["state"]),
                    a["exit_code"],
                    a["result_line"] or a["reason"],
                ]
                for a in c["activities"]
            ],
        )

    emit(c, as_json, table)


@computer.command("remove")
@click.argument("computer_id", type=int)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@client_options
def computer_remove(
    computer_id: int, yes: bool, server: str | None, token: str | None, as_json: bool
) -> None:
    """Remove a computer (admin): its open work is Canceled, its credentials stop working.

    Its history stays readable (taskfleet activity list --computer ID); enrolling
    the machine again brings it back."""
    api = Api(server, token)
    c = api.get(f"/computers/{computer_id}")
    if c.get("removed_at"):
        fail(f"computer {computer_id} was already removed")
    if not yes:
        if not sys.stdin.isatty():
            fail(f"this removes computer {computer_id}; add --yes to do it")
        click.confirm(
            f"remove computer {computer_id} ({clean(c['hostname'])}) and cancel its open work?",
            abort=True,
        )
    out = api.call("DELETE", f"/computers/{computer_id}")
    emit(
        out,
        as_json,
        lambda d: echo(
            f"computer {d['id']} ({clean(d['hostname'])}) removed; "
            f"{len(d['canceled'])} open activities canceled"
        ),
    )
