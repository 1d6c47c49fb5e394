"""The lifecycle options every command that creates work shares (``run``, ``job create``).

Contract: ``lifecycle_options`` adds ``--at``, ``--after``, ``--approval``, the rollout
options, ``--expires-in`` and ``--cron`` to a command; ``lifecycle_fields`` turns their
values into the request body's fields (a clear error for a bad combination);
``schedule`` posts a ``--cron`` schedule whose template is the body. A helper module:
it loads no command's module, so ``taskfleet job`` does not load ``taskfleet run``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from taskfleet.cli.client import Api
from taskfleet.cli.options import FINITE_FLOAT, seconds_arg, when_arg
from taskfleet.cli.output import echo, emit, fail, when


def after_arg(value: str | None, metric: str, threshold: float) -> dict[str, Any] | None:
    if value is None:
        return None
    kind, sep, ident = value.partition(":")
    if not sep:
        kind, ident = "request", value
    if kind not in ("request", "activity") or not ident.isdigit():
        fail(f"--after expects request:ID, activity:ID or ID, got {value!r}")
    return {kind: int(ident), "metric": metric, "percent": threshold}


# The lifecycle options every command that creates work takes (run, job create): one
# definition, so they read and behave the same everywhere.
_LIFECYCLE_OPTIONS = (
    click.option(
        "--expires-in",
        type=FINITE_FLOAT,
        default=None,
        help="Seconds: work a computer has not picked up by then is Canceled (expired).",
    ),
    click.option("--at", "at", default=None, help="Scheduled: not earlier than (ISO, epoch, +2h)."),
    click.option(
        "--cron",
        default=None,
        help="Recurring schedule, 5 fields in UTC: each run is a new request.",
    ),
    click.option(
        "--after",
        default=None,
        help="Waiting: start after request:ID (or ID) or activity:ID finishes (see --threshold).",
    ),
    click.option(
        "--after-metric",
        type=click.Choice(["finished", "succeeded"]),
        default="finished",
        show_default=True,
        help="What --after counts.",
    ),
    click.option(
        "--threshold", type=FINITE_FLOAT, default=100.0, show_default=True, help="Percent."
    ),
    click.option("--approval", is_flag=True, help="Blocked until an admin approves it."),
    click.option("--separate-approver", is_flag=True, help="The requester may not approve."),
    click.option("--approval-expires-in", default=None, help="Canceled if not approved by (2h)."),
    click.option("--canary", type=int, default=None, help="Rollout: computers in the first wave."),
    click.option("--wave-size", type=int, default=None, help="Rollout: computers per wave."),
    click.option(
        "--wave-share", type=FINITE_FLOAT, default=None, help="Rollout: percent per wave."
    ),
    click.option(
        "--wave-success",
        type=FINITE_FLOAT,
        default=100.0,
        show_default=True,
        help="Rollout: percent of a wave that must succeed before the next starts.",
    ),
    click.option(
        "--max-failures",
        type=FINITE_FLOAT,
        default=100.0,
        show_default=True,
        help="Rollout: pause when more than this percent of finished computers failed.",
    ),
)


def lifecycle_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the lifecycle options (``_LIFECYCLE_OPTIONS``) to a command; it receives them
    as keyword arguments and hands them to :func:`lifecycle_fields`."""
    for option in reversed(_LIFECYCLE_OPTIONS):
        f = option(f)
    return f


def lifecycle_fields(
    *,
    expires_in: float | None,
    at: str | None,
    after: str | None,
    after_metric: str,
    threshold: float,
    approval: bool,
    separate_approver: bool,
    approval_expires_in: str | None,
    canary: int | None,
    wave_size: int | None,
    wave_share: float | None,
    wave_success: float,
    max_failures: float,
    **_: Any,
) -> dict[str, Any]:
    """The request body's lifecycle fields from the options (``--cron`` is not one: the
    caller posts the body to ``/schedules`` instead, see :func:`create_or_schedule`)."""
    body: dict[str, Any] = {
        "expires_in": expires_in,
        "at": when_arg(at, "--at"),
        "after": after_arg(after, after_metric, threshold),
    }
    if approval or separate_approver or approval_expires_in:
        body["approval"] = {
            "separation": separate_approver,
            "expires_in": seconds_arg(approval_expires_in, "--approval-expires-in")
            if approval_expires_in
            else None,
        }
    if canary is not None or wave_size is not None or wave_share is not None:
        body["rollout"] = {
            "canary": canary or 0,
            "size": wave_size,
            "share": wave_share,
            "success": wave_success,
            "max_failures": max_failures,
        }
    return body


def schedule(api: Api, cron: str, body: dict[str, Any], as_json: bool) -> None:
    """``--cron``: a schedule whose template is ``body`` (each run a new request)."""
    sched = api.post("/schedules", {"cron": cron, "request": body})
    emit(
        sched,
        as_json,
        lambda d: echo(
            f"schedule {d['id']} created ({d['cron']} UTC); first run at {when(d['next_at'])}"
        ),
    )
