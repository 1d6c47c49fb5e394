"""``taskfleet tenant``: create, list, disable, enable tenants (the super-admin only).

Contract: talks to the admin API only (``/tenants``); ``create`` prints the new
tenant's first admin token once. Working in a tenant as the super-admin is the
``--tenant NAME`` option of every command (docs/tenants.md).
"""

from __future__ import annotations

import click

from taskfleet.cli.client import Api, client_options
from taskfleet.cli.output import echo, emit, print_table, when


@click.group()
def tenant() -> None:
    """Manage tenants (the super-admin only): each sees nothing of the others."""


@tenant.command("create")
@click.argument("name")
@client_options
def tenant_create(name: str, server: str | None, token: str | None, as_json: bool) -> None:
    """Create a tenant; its first admin token is shown once."""
    out = Api(server, token).post("/tenants", {"name": name})
    emit(
        out,
        as_json,
        lambda d: echo(
            f"created tenant {d['name']} ({d['id']}); its first admin token: {d['token']}\n"
            "it is shown only once; store it now"
        ),
    )


@tenant.command("list")
@client_options
def tenant_list(server: str | None, token: str | None, as_json: bool) -> None:
    """List tenants."""
    rows = Api(server, token).get("/tenants")
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "tenants",
            ["id", "name", "created", "disabled", "computers", "accounts"],
            [
                [
                    r["id"],
                    r["name"],
                    when(r["created_at"]),
                    r["disabled"],
                    r["computers"],
                    r["accounts"],
                ]
                for r in rs
            ],
        ),
    )


def _switch(name: str, action: str, server: str | None, token: str | None, as_json: bool) -> None:
    out = Api(server, token).post(f"/tenants/{name}/{action}")
    emit(out, as_json, lambda d: echo(f"tenant {d['name']} {action}d"))


@tenant.command("disable")
@click.argument("name")
@client_options
def tenant_disable(name: str, server: str | None, token: str | None, as_json: bool) -> None:
    """Disable a tenant: its tokens, accounts, sessions and enrollments are refused."""
    _switch(name, "disable", server, token, as_json)


@tenant.command("enable")
@click.argument("name")
@client_options
def tenant_enable(name: str, server: str | None, token: str | None, as_json: bool) -> None:
    """Enable a disabled tenant again."""
    _switch(name, "enable", server, token, as_json)
