"""``taskfleet restart|shutdown|signal|resync``: the system activities (docs/activity-types.md).

Contract: each command posts its typed activity (``domain/actions/system.py``) through
``cli/typed.py``'s ``submit``, with every typed command's options (``--target``,
``--wait``, the lifecycle). ``--delay`` takes 0 (now) or a duration (``90``, ``30s``,
``5m``, ``1h``); shutdown(8) counts whole minutes, so the computer rounds it up. A
restart without ``--timeout`` is given its delay plus an hour: the server ends it
Failed (lost) if its agent has not reported it back by then. ``signal`` takes exactly
one of ``--process NAME`` or ``--pid N``. Bad values are refused before any request
(exit 2); the server checks the parameters again.
"""

from __future__ import annotations

import math
from typing import Any

import click

from taskfleet.cli.options import seconds_arg
from taskfleet.cli.output import fail
from taskfleet.cli.typed import submit, typed_options

RESTART_BACKSTOP = 3600.0  # seconds a restart may take beyond its delay (--timeout default)


def delay_arg(value: str | None) -> float | None:
    """``--delay``: 0 or a duration, in seconds (None: the type's default, 60 s)."""
    if value is None:
        return None
    text = value.strip().lower()
    try:
        if float(text.rstrip("smhd") or "x") == 0:
            return 0.0
    except ValueError:
        pass
    seconds = seconds_arg(value, "--delay")
    if seconds > 86400:
        fail(f"--delay must be at most a day, got {value!r}")
    return seconds


def _power_params(delay: str | None, message: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    seconds = delay_arg(delay)
    if seconds is not None:
        params["delay"] = seconds
    if message is not None:
        params["message"] = message
    return params


def _power_options(f: Any) -> Any:
    f = click.option("--message", default=None, help="Told to the users logged in.")(f)
    f = click.option(
        "--delay",
        default=None,
        help="When: 0 (now) or a duration such as 90, 30s, 5m, 1h [default: 1m]; "
        "rounded up to whole minutes.",
    )(f)
    return f


@click.command()
@_power_options
@typed_options
def restart(delay: str | None, message: str | None, **common: Any) -> None:
    """Restart computers; Succeeded when each one's agent comes back after the restart."""
    params = _power_params(delay, message)
    if common["timeout"] is None:
        minutes = math.ceil(params.get("delay", 60.0) / 60)
        common["timeout"] = minutes * 60 + RESTART_BACKSTOP
    submit("restart", params, **common)


@click.command()
@_power_options
@typed_options
def shutdown(delay: str | None, message: str | None, **common: Any) -> None:
    """Shut computers down; Succeeded once each agent reports the shutdown initiated."""
    submit("shutdown", _power_params(delay, message), **common)


@click.command()
@click.option("--process", default=None, help="The exact process name (as ps -o comm shows).")
@click.option("--pid", type=click.IntRange(min=2), default=None, help="The process ID.")
@click.option(
    "--signal",
    "sig",
    default="TERM",
    show_default=True,
    help="HUP, INT, QUIT, KILL, USR1, USR2, TERM, CONT, STOP or TSTP.",
)
@typed_options
def signal(process: str | None, pid: int | None, sig: str, **common: Any) -> None:
    """Send a signal to a process by exact name (every match) or PID.

    The agent never signals PID 1, a kernel thread, itself, its process group or its
    ancestors."""
    if (process is None) == (pid is None):
        raise click.UsageError("give exactly one of --process NAME or --pid N")
    params: dict[str, Any] = {"signal": sig}
    if process is not None:
        params["process"] = process
    else:
        params["pid"] = pid
    submit("signal-process", params, **common)


@click.command()
@typed_options
def resync(**common: Any) -> None:
    """Have computers report their whole inventory again."""
    submit("resync", {}, **common)
