"""``taskfleet account``: the dashboard's login accounts; ``taskfleet login-link``.

Contract: talks to the admin API only (``/accounts``, ``/login-links``). A
password is read from an interactive prompt (asked twice) or from standard
input with ``--password-stdin`` (its first line), never from the command line,
where other users could read it. (``taskfleet user`` is the typed activity that
manages Unix users on computers: a different thing.)
"""

from __future__ import annotations

import sys

import click

from taskfleet.cli.client import Api, client_options
from taskfleet.cli.output import echo, emit, fail, print_table, when


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            fail("--password-stdin: standard input is empty")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        fail("no terminal to ask the password on: use --password-stdin")
    value: str = click.prompt("password", hide_input=True, confirmation_prompt=True)
    return value


@click.group()
def account() -> None:
    """Manage the dashboard's login accounts (user name and password) of a tenant."""


@account.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), required=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@client_options
def account_create(
    name: str, role: str, password_stdin: bool, server: str | None, token: str | None, as_json: bool
) -> None:
    """Create a login account in the tenant (the super-admin: --tenant NAME)."""
    api = Api(server, token)
    out = api.post("/accounts", {"name": name, "role": role, "password": _password(password_stdin)})
    emit(out, as_json, lambda d: echo(f"created account {d['name']} ({d['role']})"))


@account.command("list")
@client_options
def account_list(server: str | None, token: str | None, as_json: bool) -> None:
    """List the tenant's login accounts."""
    rows = Api(server, token).get("/accounts")
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "accounts",
            ["id", "name", "role", "disabled", "created", "last login"],
            [
                [
                    r["id"],
                    r["name"],
                    r["role"],
                    r["disabled"],
                    when(r["created_at"]),
                    when(r["last_login_at"]),
                ]
                for r in rs
            ],
        ),
    )


@account.command("disable")
@click.argument("name")
@client_options
def account_disable(name: str, server: str | None, token: str | None, as_json: bool) -> None:
    """Disable an account: its dashboard sessions end at once."""
    out = Api(server, token).post(f"/accounts/{name}/disable")
    emit(out, as_json, lambda d: echo(f"account {d['name']} disabled"))


@account.command("enable")
@click.argument("name")
@client_options
def account_enable(name: str, server: str | None, token: str | None, as_json: bool) -> None:
    """Enable a disabled account again."""
    out = Api(server, token).post(f"/accounts/{name}/enable")
    emit(out, as_json, lambda d: echo(f"account {d['name']} enabled"))


@account.command("password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@client_options
def account_password(
    name: str, password_stdin: bool, server: str | None, token: str | None, as_json: bool
) -> None:
    """Set an account's password."""
    out = Api(server, token).call(
        "PUT", f"/accounts/{name}/password", json={"password": _password(password_stdin)}
    )
    emit(out, as_json, lambda d: echo(f"password of account {d['name']} set"))


@click.command("login-link")
@client_options
def login_link(server: str | None, token: str | None, as_json: bool) -> None:
    """Print a one-time dashboard login link for this token (short-lived, single use)."""
    api = Api(server, token)
    out = api.post("/login-links")
    out["url"] = api.server + out["path"]
    emit(out, as_json, lambda d: echo(d["url"]))
