"""``taskfleet group``: groups of computers, their maintenance windows, computer tags.

Contract: talks to the admin API only (``/groups``, ``/computers/ID/tags``).
"""

from __future__ import annotations

import click

from taskfleet.cli.client import Api, client_options
from taskfleet.cli.output import echo, emit, fail, print_table


@click.group()
def group() -> None:
    """Groups of computers, and computer tags."""


@group.command("list")
@client_options
def group_list(server: str | None, token: str | None, as_json: bool) -> None:
    """List groups and their sizes."""
    rows = Api(server, token).get("/groups")
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "groups", ["name", "computers"], [[g["name"], g["size"]] for g in rs]
        ),
    )


@group.command("create")
@click.argument("name")
@client_options
def group_create(name: str, server: str | None, token: str | None, as_json: bool) -> None:
    """Create a group."""
    out = Api(server, token).post("/groups", {"name": name})
    emit(out, as_json, lambda d: echo(f"group {name} created"))


@group.command("delete")
@click.argument("name")
@client_options
def group_delete(name: str, server: str | None, token: str | None, as_json: bool) -> None:
    """Delete a group (its computers stay enrolled)."""
    Api(server, token).call("DELETE", f"/groups/{name}")
    emit({"deleted": name}, as_json, lambda d: echo(f"group {name} deleted"))


@group.command("add")
@click.argument("name")
@click.argument("computer_ids", type=int, nargs=-1, required=True)
@client_options
def group_add(
    name: str, computer_ids: tuple[int, ...], server: str | None, token: str | None, as_json: bool
) -> None:
    """Add computers to a group."""
    out = Api(server, token).post(f"/groups/{name}/members", {"computer_ids": list(computer_ids)})
    emit(out, as_json, lambda d: echo(f"added {len(computer_ids)} computers to {name}"))


@group.command("remove")
@click.argument("name")
@click.argument("computer_ids", type=int, nargs=-1, required=True)
@client_options
def group_remove(
    name: str, computer_ids: tuple[int, ...], server: str | None, token: str | None, as_json: bool
) -> None:
    """Remove computers from a group."""
    out = Api(server, token).post(
        f"/groups/{name}/members/remove", {"computer_ids": list(computer_ids)}
    )
    emit(out, as_json, lambda d: echo(f"removed {len(computer_ids)} computers from {name}"))


@group.command("tag")
@click.argument("computer_id", type=int)
@click.argument("pair")
@client_options
def group_tag(
    computer_id: int, pair: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Tag a computer: KEY=VALUE (target it with --target tag:KEY=VALUE)."""
    key, eq, value = pair.partition("=")
    if not eq:
        fail(f"expected KEY=VALUE, got {pair!r}")
    out = Api(server, token).call(
        "PUT", f"/computers/{computer_id}/tags", json={"key": key, "value": value}
    )
    emit(out, as_json, lambda d: echo(f"computer {computer_id}: {key}={value}"))


@group.command("untag")
@click.argument("computer_id", type=int)
@click.argument("key")
@client_options
def group_untag(
    computer_id: int, key: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Remove a tag from a computer."""
    Api(server, token).call("DELETE", f"/computers/{computer_id}/tags/{key}")
    emit({"removed": key}, as_json, lambda d: echo(f"computer {computer_id}: {key} removed"))


@group.command("window")
@click.argument("name")
@click.argument("window", required=False)
@click.option("--utc-offset", default="+00:00", show_default=True, help="The group's local time.")
@click.option("--clear", is_flag=True, help="Remove the window: work runs any time.")
@client_options
def group_window(
    name: str,
    window: str | None,
    utc_offset: str,
    clear: bool,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Set a maintenance window (HH:MM-HH:MM): members get client work only inside it."""
    api = Api(server, token)
    if clear == (window is not None):
        fail("give a window HH:MM-HH:MM or --clear")
    if clear:
        out = api.call("DELETE", f"/groups/{name}/window")
    else:
        out = api.call(
            "PUT", f"/groups/{name}/window", json={"window": window, "utc_offset": utc_offset}
        )
    emit(
        out,
        as_json,
        lambda d: echo(
            f"group {name}: window {d['window']} (UTC{(d['utc_offset'] or 0) / 60:+g}h)"
            if d["window"]
            else f"group {name}: no maintenance window"
        ),
    )
