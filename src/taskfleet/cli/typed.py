"""What every typed-activity command shares (``packages``, ``user``, ``restart``, ...).

Contract: ``typed_options`` adds ``--target``, ``--timeout``, ``--wait``,
``--optional``, the lifecycle options (``cli/lifecycle.py``) and the client options
to a command; ``submit`` posts ``POST /api/v1/requests`` with the activity's
``type`` and ``params`` (the server validates them: ``domain/actions``) and the
lifecycle fields, or a ``--cron`` schedule, and prints what was created; with
``--wait`` it follows the request and exits 0 only if every computer succeeded.
A helper module: it loads no command's module.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from taskfleet.cli.client import Api, client_options, results_table, wait_for_request
from taskfleet.cli.lifecycle import lifecycle_fields, lifecycle_options, schedule
from taskfleet.cli.options import FINITE_FLOAT
from taskfleet.cli.output import echo, emit, fail

TARGET_HELP = (
    "all | group:NAME | tag:KEY=VALUE | computer:ID[,ID...] | package:NAME[OP VERSION] "
    "| os:ID[-VERSION]"
)


def typed_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options every typed-activity command takes; the command hands them on to
    :func:`submit` as ``**common``."""
    f = client_options(f)
    f = lifecycle_options(f)
    f = click.option(
        "--optional",
        is_flag=True,
        help="Optional work: each computer defers it until its local run window.",
    )(f)
    f = click.option("--wait", is_flag=True, help="Show progress and the results when done.")(f)
    f = click.option(
        "--timeout",
        type=FINITE_FLOAT,
        default=None,
        help="Seconds the activity may take on a computer [default: the type's].",
    )(f)
    f = click.option("--target", required=True, help=TARGET_HELP)(f)
    return f


def submit(
    type: str,
    params: dict[str, Any],
    *,
    target: str,
    timeout: float | None,
    wait: bool,
    optional: bool,
    cron: str | None,
    server: str | None,
    token: str | None,
    as_json: bool,
    **lifecycle: Any,
) -> None:
    """Create the request (or schedule) for typed activity ``type`` and report it."""
    api = Api(server, token)
    body: dict[str, Any] = {
        "type": type,
        "target": target,
        "params": params,
        "timeout": timeout,
        "policy": {"mode": "optional" if optional else "required"},
        **lifecycle_fields(**lifecycle),
    }
    create_and_follow(api, body, cron=cron, wait=wait, as_json=as_json, what=f" ({type})")


def create_and_follow(
    api: Api, body: dict[str, Any], *, cron: str | None, wait: bool, as_json: bool, what: str = ""
) -> None:
    """Post ``body`` as a request (or, with ``cron``, a schedule), say what was created,
    and with ``wait`` follow it to the end: exit 0 only if every computer succeeded."""
    if cron is not None:
        if wait:
            fail("--wait does not end for a schedule; follow it with taskfleet schedule show")
        schedule(api, cron, body, as_json)
        return
    req = api.post("/requests", body)
    if not wait:
        emit(
            req,
            as_json,
            lambda r: echo(
                f"request {r['id']}{what} created: {r['total']} computers; "
                f"follow it with: taskfleet request show {r['id']}"
            ),
        )
        return
    req = wait_for_request(api, req["id"], show_progress=not as_json)
    rows = results_table(api, req, as_json, waited=True)
    sys.exit(0 if all(a["state"] == "succeeded" for a in rows) else 1)
