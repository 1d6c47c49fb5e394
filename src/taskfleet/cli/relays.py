"""``taskfleet relay``: run a relay (no subcommand), or list, show and assign relays.

Contract: with no subcommand the group runs the relay process
(``taskfleet.relay.main``, imported only then, so the admin subcommands never load
it and the process never loads the admin API's helpers beyond this module). The
subcommands talk to the admin API only (``/relays``).
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from taskfleet.cli.client import Api, client_options
from taskfleet.cli.output import echo, emit, fail, print_fields, print_table, when

# -- the relay process (the group; its options come with the relay process) ----------


@click.group(invoke_without_command=True)
@click.pass_context
def relay(ctx: click.Context) -> None:
    """Run a relay (with no subcommand), or list, show and assign relays (admin)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        process = importlib.import_module("taskfleet.relay.main")
    except ModuleNotFoundError as exc:
        if exc.name not in ("taskfleet.relay", "taskfleet.relay.main"):
            raise
        fail("this taskfleet has no relay process; see taskfleet relay --help")
    process.main(**ctx.params)


# -- administration: relay list | show | assign ----------------------------------------


def _stat(r: dict[str, Any], key: str) -> Any:
    value = (r.get("stats") or {}).get(key)
    return None if value is None else f"{value:g}"


@relay.command("list")
@client_options
def relay_list(server: str | None, token: str | None, as_json: bool) -> None:
    """List relays: their computers, last contact, spool, cache and forward lag."""
    rows = Api(server, token).get("/relays")
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "relays",
            [
                "id",
                "name",
                "computers",
                "via relay",
                "last contact",
                "spool",
                "cached",
                "lag (s)",
                "version",
                "revoked",
            ],
            [
                [
                    r["id"],
                    r["name"],
                    r["computers"],
                    r["computers_via_relay"],
                    when(r["last_seen_at"]),
                    _stat(r, "spool"),
                    _stat(r, "cached"),
                    _stat(r, "lag"),
                    r["version"],
                    when(r["revoked_at"]) if r["revoked_at"] else "no",
                ]
                for r in rs
            ],
        ),
    )


@relay.command("show")
@click.argument("relay_id", type=int)
@client_options
def relay_show(relay_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Show a relay, what it last reported, and the computers behind it."""
    r = Api(server, token).get(f"/relays/{relay_id}")

    def table(r: dict[str, Any]) -> None:
        print_fields(
            f"relay {r['id']}",
            [
                ("name", r["name"]),
                ("url", r["url"]),
                ("address", r["address"]),
                ("tickle port", r["tickle_port"]),
                ("version", r["version"]),
                ("generation", r["generation"]),
                ("enrolled", when(r["enrolled_at"])),
                ("last contact", when(r["last_seen_at"])),
                ("revoked", when(r["revoked_at"]) if r["revoked_at"] else "no"),
                ("computers", r["computers"]),
                ("via relay", r["computers_via_relay"]),
                *[(f"stats: {k}", v) for k, v in sorted((r.get("stats") or {}).items())],
            ],
        )
        print_table(
            "computers behind it",
            ["id", "hostname", "last seen"],
            [[c["id"], c["hostname"], when(c["last_seen_at"])] for c in r["members"]],
        )

    emit(r, as_json, table)


@relay.command("assign")
@click.argument("relay_id", type=int)
@click.option("--group", required=True, help="The group whose computers go behind the relay.")
@client_options
def relay_assign(
    relay_id: int, group: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Put the computers of a group behind a relay (admin)."""
    out = Api(server, token).post(f"/relays/{relay_id}/assign", {"group": group})
    emit(
        out,
        as_json,
        lambda d: echo(
            f"relay {d['relay_id']}: {len(d['computers'])} computers of group {d['group']} assigned"
        ),
    )
