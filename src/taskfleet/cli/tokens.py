"""``taskfleet token``: API tokens (with a role), enrollment tokens for agents and relays.

Contract: talks to the admin API only (``/tokens``); a secret is printed once,
at creation, and never listed.
"""

from __future__ import annotations

import click

from taskfleet.cli.client import Api, client_options
from taskfleet.cli.options import FINITE_FLOAT
from taskfleet.cli.output import echo, emit, fail, print_table, when


@click.group()
def token() -> None:
    """Manage API tokens (with a role) and enrollment tokens."""


@token.command("create")
@click.option("--name", required=True)
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), default=None)
@click.option("--enroll", is_flag=True, help="An enrollment token for agents.")
@click.option("--relay", is_flag=True, help="An enrollment token for relays (tfr_...).")
@click.option("--expires-in", type=FINITE_FLOAT, default=None, help="Seconds until it expires.")
@click.option("--max-uses", type=int, default=None, help="Enrollments allowed.")
@click.option("--group", default=None, help="Group that computers enrolled with it join.")
@client_options
def token_create(
    name: str,
    role: str | None,
    enroll: bool,
    relay: bool,
    expires_in: float | None,
    max_uses: int | None,
    group: str | None,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Create a token; its secret is shown once."""
    if [enroll, relay, bool(role)].count(True) != 1:
        fail(
            "give one of --role ROLE (an API token), --enroll (an enrollment token for "
            "agents) or --relay (an enrollment token for relays)"
        )
    body = {
        "kind": "enroll" if enroll else "relay" if relay else "admin",
        "name": name,
        "role": role,
        "expires_in": expires_in,
        "max_uses": max_uses,
        "group": group,
    }
    out = Api(server, token).post("/tokens", body)
    emit(
        out,
        as_json,
        lambda d: echo(
            f"created {d['kind']} token {d['id']} ({d['role'] or 'enrollment'}): {d['token']}\n"
            "it is shown only once; store it now"
        ),
    )


@token.command("list")
@client_options
def token_list(server: str | None, token: str | None, as_json: bool) -> None:
    """List tokens (never their secrets)."""
    rows = Api(server, token).get("/tokens")
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "tokens",
            ["id", "name", "kind", "role", "created", "expires", "uses left", "revoked"],
            [
                [
                    r["id"],
                    r["name"],
                    r["kind"],
                    r["role"],
                    when(r["created_at"]),
                    when(r["expires_at"]),
                    r["uses_left"],
                    r["revoked"],
                ]
                for r in rs
            ],
        ),
    )


@token.command("revoke")
@click.argument("token_id", type=int)
@client_options
def token_revoke(token_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Revoke a token."""
    Api(server, token).call("DELETE", f"/tokens/{token_id}")
    emit({"revoked": token_id}, as_json, lambda d: echo(f"token {token_id} revoked"))
