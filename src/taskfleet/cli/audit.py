"""``taskfleet audit``: who did what, when, from where, and how it ended (docs/audit.md).

Contract: talks to the admin API only (``GET /audit``, admin role). The filters
go to the server as they are, but ``--since``/``--until`` are turned into epoch
seconds here: ``2h`` (that long ago), an ISO 8601 time (no zone: local time, like
every time the CLI takes) or epoch seconds. A table or ``--json`` shows one page
(``--limit``); ``--csv`` and ``--jsonl`` write every matching entry as the server
streams it, byte for byte when the output is a file or a pipe, cleaned of escape
sequences when it is a terminal.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from taskfleet.cli.client import Api, client_options
from taskfleet.cli.options import seconds_arg, when_arg
from taskfleet.cli.output import clean, emit, fail, print_table, when


def ago_arg(value: str | None, option: str) -> float | None:
    """``2h``, ``30m``, ``1d``, ``90s`` ago; else a time as ``when_arg`` takes it."""
    if value is None:
        return None
    text = value.strip()
    if text[-1:].lower() in ("s", "m", "h", "d") and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - seconds_arg(text, option)
    return when_arg(text, option)


@click.command("audit")
@click.option("--actor", default=None, help='Who: "token:3", "schedule:4", "unknown"; prefix*.')
@click.option("--action", default=None, help='What: "request.cancel", or a prefix: "request.*".')
@click.option("--object", "obj", default=None, help='On what: "request:12", "group:web".')
@click.option("--since", default=None, help="From: 2h (ago), an ISO time or epoch seconds.")
@click.option("--until", default=None, help="Before: 2h (ago), an ISO time or epoch seconds.")
@click.option("--outcome", type=click.Choice(["ok", "refused", "failed"]), default=None)
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.option("--csv", "as_csv", is_flag=True, help="Every matching entry as CSV.")
@click.option("--jsonl", "as_jsonl", is_flag=True, help="Every matching entry as JSON lines.")
@client_options
def audit(
    actor: str | None,
    action: str | None,
    obj: str | None,
    since: str | None,
    until: str | None,
    outcome: str | None,
    limit: int,
    as_csv: bool,
    as_jsonl: bool,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """The audit log, newest first: a page, or every matching entry (--csv, --jsonl)."""
    if [as_csv, as_jsonl, as_json].count(True) > 1:
        fail("give at most one of --csv, --jsonl and --json")
    params: dict[str, Any] = {
        "actor": actor,
        "action": action,
        "object": obj,
        "since": ago_arg(since, "--since"),
        "until": ago_arg(until, "--until"),
        "outcome": outcome,
    }
    params = {k: v for k, v in params.items() if v is not None}
    api = Api(server, token)
    if as_csv or as_jsonl:
        _export(api, {**params, "format": "csv" if as_csv else "jsonl"})
        return
    rows = api.get("/audit", limit=limit, **params)
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "audit log",
            ["id", "at", "actor", "address", "action", "object", "outcome", "detail"],
            [
                [
                    e["id"],
                    when(e["at"]),
                    e["actor"],
                    e["address"] or "-",
                    e["action"],
                    e["object"] or "-",
                    e["outcome"],
                    json.dumps(e["detail"], ensure_ascii=False, sort_keys=True)[:200],
                ]
                for e in rs
            ],
        ),
    )


def _export(api: Api, params: dict[str, Any]) -> None:
    import httpx

    out = sys.stdout
    tty = out.isatty()
    try:
        with api.http.stream("GET", "/api/v1/audit", params=params) as resp:
            if resp.status_code >= 400:
                resp.read()
                try:
                    message = resp.json().get("error")
                except ValueError:
                    message = resp.text[:500]
                fail(f"{message} (HTTP {resp.status_code})")
            if tty:
                for line in resp.iter_lines():
                    click.echo(clean(line, multiline=True))
            else:
                for chunk in resp.iter_bytes():
                    out.buffer.write(chunk)
                out.buffer.flush()
    except httpx.HTTPError as exc:
        fail(f"cannot reach {api.server}: {exc}")
