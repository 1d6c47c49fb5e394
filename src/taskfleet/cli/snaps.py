"""``taskfleet snap``: snaps on the computers.

Contract: each command posts one typed activity (``domain/actions/snaps.py``;
docs/activity-types.md "Snaps") through ``cli/typed.py``: ``install NAME...
[--channel C] [--classic]``, ``remove NAME...``, ``refresh [NAME...] [--channel C]``,
``hold NAME... [--for SECONDS|forever]``, ``unhold NAME...``. The server validates
them; computers without snapd are refused up front.
"""

from __future__ import annotations

from typing import Any

import click

from taskfleet.cli.output import fail
from taskfleet.cli.typed import submit, typed_options


@click.group()
def snap() -> None:
    """Snaps on the computers (typed activities: docs/activity-types.md)."""


@snap.command("install")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@click.option("--channel", default=None, help="[TRACK/]RISK[/BRANCH] (one snap only).")
@click.option("--classic", is_flag=True, help="Classic confinement (one snap only).")
@typed_options
def snap_install(names: tuple[str, ...], channel: str | None, classic: bool, **common: Any) -> None:
    """Install snaps."""
    params: dict[str, Any] = {"names": list(names), "classic": classic}
    if channel is not None:
        params["channel"] = channel
    submit("snap-install", params, **common)


@snap.command("remove")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@typed_options
def snap_remove(names: tuple[str, ...], **common: Any) -> None:
    """Remove snaps."""
    submit("snap-remove", {"names": list(names)}, **common)


@snap.command("refresh")
@click.argument("names", metavar="[NAME]...", nargs=-1)
@click.option("--channel", default=None, help="[TRACK/]RISK[/BRANCH] (one snap only).")
@typed_options
def snap_refresh(names: tuple[str, ...], channel: str | None, **common: Any) -> None:
    """Refresh the named snaps, or every snap."""
    params: dict[str, Any] = {"names": list(names)}
    if channel is not None:
        params["channel"] = channel
    submit("snap-refresh", params, **common)


@snap.command("hold")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@click.option(
    "--for",
    "hold_for",
    default="forever",
    show_default=True,
    help="Seconds automatic refreshes wait, or forever.",
)
@typed_options
def snap_hold(names: tuple[str, ...], hold_for: str, **common: Any) -> None:
    """Hold automatic refreshes of snaps."""
    value: int | str = hold_for
    if hold_for != "forever":
        if not hold_for.isdigit():
            fail(f"--for takes whole seconds or forever, not {hold_for!r}")
        value = int(hold_for)
    submit("snap-hold", {"names": list(names), "hold_for": value}, **common)


@snap.command("unhold")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@typed_options
def snap_unhold(names: tuple[str, ...], **common: Any) -> None:
    """Let snaps refresh automatically again."""
    submit("snap-unhold", {"names": list(names)}, **common)
