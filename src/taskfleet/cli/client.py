"""The CLI's HTTP client for the admin API, and shared output helpers.

Contract: every text that came from the server (script output, result lines,
hostnames, reasons, tag values, names, error messages) reaches the terminal
through :func:`clean` (tables, fields and :func:`echo` apply it), so a script
or an agent cannot send escape sequences to the administrator's terminal.
``--json`` output is exact JSON (``json.dumps`` escapes every control character).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import click


class Api:
    def __init__(self, server: str | None, token: str | None) -> None:
        import httpx

        if not server:
            fail("no server given: use --server URL or set TASKFLEET_SERVER")
        if not token:
            fail("no token given: use --token TOKEN or set TASKFLEET_TOKEN")
        self.server = server.rstrip("/")
        self.http = httpx.Client(
            base_url=self.server,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60.0,
        )

    def call(self, method: str, path: str, *, retry_for: float = 0.0, **kwargs: Any) -> Any:
        """One API call; ``retry_for`` seconds of retries when the server is unreachable
        or a proxy says it is (502, 503, 504): only for calls that are safe to repeat."""
        import httpx

        from taskfleet.settings import CLI_RETRY_MAX_DELAY

        deadline = time.monotonic() + retry_for
        delay = 0.25
        told = False
        while True:
            problem = None
            try:
                resp = self.http.request(method, "/api/v1" + path, **kwargs)
            except httpx.TransportError as exc:
                problem = f"cannot reach {self.server}: {exc}"
            except httpx.HTTPError as exc:
                fail(f"cannot reach {self.server}: {exc}")
            else:
                if resp.status_code in (502, 503, 504):
                    problem = f"{self.server} answers HTTP {resp.status_code}"
            if problem is None:
                break
            if time.monotonic() + delay > deadline:
                fail(problem)
            if not told:
                told = True
                click.echo(f"{clean(problem)}; retrying for up to {retry_for:g}s ...", err=True)
            time.sleep(delay)  # backoff of a human-facing CLI, not a test wait
            delay = min(delay * 2, CLI_RETRY_MAX_DELAY)
        if told:
            click.echo(f"{self.server} is back; still waiting", err=True)
        if resp.status_code == 204:
            return None
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text[:500]}
        if resp.status_code >= 400:
            message = body.get("error") if isinstance(body, dict) else None
            if message is None and isinstance(body, dict) and "detail" in body:
                message = _pydantic_detail(body["detail"])
            fail(f"{message or body} (HTTP {resp.status_code})")
        return body

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def poll(self, path: str, **params: Any) -> Any:
        """A GET that rides out a server restart (``settings.CLI_WAIT_RETRY``)."""
        from taskfleet.settings import CLI_WAIT_RETRY

        return self.call(
            "GET",
            path,
            retry_for=CLI_WAIT_RETRY,
            params={k: v for k, v in params.items() if v is not None},
        )

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("POST", path, json=body)


# Terminal escape sequences, removed whole so that no parameter bytes are left:
# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), DCS/SOS/PM/APC (ESC P|X|^|_ ... ST),
# other ESC sequences, and the 8-bit CSI.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[ -/]*[0-~]?"
    r"|\x9b[0-?]*[ -/]*[@-~]?"
)
# Left-over control characters (C0 but tab and newline, DEL, C1) and the bidi
# controls that reorder what a line shows.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(value: Any, *, multiline: bool = False) -> str:
    """Remote text made safe for a terminal: no escape sequence, no control character.

    ``multiline`` keeps newlines and tabs (script output); otherwise they become
    spaces (a table cell, a field, a name). A carriage return that is not part of
    a CRLF ends a line: it cannot overwrite what was printed before it."""
    text = "-" if value is None else str(value)
    text = _ESCAPES.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROLS.sub("", text)
    if not multiline:
        text = text.replace("\n", " ").replace("\t", " ")
    return text


def echo(text: Any = "", *, err: bool = False) -> None:
    """``click.echo`` for human output that may hold remote text (lines kept)."""
    click.echo(clean(text, multiline=True), err=err)


def _pydantic_detail(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(x) for x in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail
        )
    return str(detail)


def fail(message: str, code: int = 2) -> NoReturn:
    # Server messages quote what they refuse (hostnames, names): cleaned too.
    click.echo(f"error: {clean(message, multiline=True)}", err=True)
    sys.exit(code)


def client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)
    fn = click.option(
        "--token", envvar="TASKFLEET_TOKEN", help="API token [env: TASKFLEET_TOKEN]."
    )(fn)
    fn = click.option(
        "--server", envvar="TASKFLEET_SERVER", help="Server URL [env: TASKFLEET_SERVER]."
    )(fn)
    return fn


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def emit(data: Any, as_json: bool, table: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        table(data)


def print_table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text, not str: rich would read "[...]" in remote text as its markup.
    t = Table(
        title=None if title is None else Text(clean(title)), show_lines=False, header_style="bold"
    )
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[Text(clean(v)) for v in r])
    Console(width=max(100, int(os.environ.get("COLUMNS", "0") or 0))).print(t)


def print_fields(title: str, fields: list[tuple[str, Any]]) -> None:
    from rich.console import Console

    console = Console()
    console.print(clean(title), style="bold", highlight=False, markup=False)
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        console.print(f"  {k.ljust(width)}  {clean(v)}", highlight=False, markup=False)


def first_line(text: str | None) -> str:
    if not text:
        return ""
    text = clean(text, multiline=True).strip()
    return text.splitlines()[0][:80] if text else ""


def duration(a: dict[str, Any]) -> str:
    s, e = a.get("agent_started_at"), a.get("agent_ended_at")
    return f"{e - s:.2f}s" if s and e else "-"


def state_label(state: str) -> str:
    return state.replace("_", " ").title()


def wait_for_request(api: Api, request_id: int, *, show_progress: bool) -> dict[str, Any]:
    """Poll a request until every child finished; show a live progress bar.

    A server restart meanwhile does not end the wait: polls retry (Api.poll)."""
    req = api.poll(f"/requests/{request_id}")
    if not show_progress:
        while not req["progress"]["done"]:
            time.sleep(0.2)  # polling interval of a human-facing CLI, not a test wait
            req = api.poll(f"/requests/{request_id}")
        return req
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]request {task.fields[rid]}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task("run", total=req["progress"]["total"], rid=request_id, counts="")
        while True:
            p = req["progress"]
            from rich.markup import escape

            counts = escape(
                clean(", ".join(f"{state_label(k)} {v}" for k, v in p["counts"].items()))
            )
            bar.update(task, completed=p["finished"], counts=counts)
            if p["done"]:
                return req
            time.sleep(0.2)
            req = api.poll(f"/requests/{request_id}")


def results_table(
    api: Api, req: dict[str, Any], as_json: bool, *, waited: bool = False
) -> list[dict[str, Any]]:
    fetch = api.poll if waited else api.get
    rows = fetch("/activities", request_id=req["id"], limit=req["total"], output=True)
    rows.sort(key=lambda a: a["computer_id"] or 0)
    if as_json:
        click.echo(json.dumps({"request": req, "activities": rows}, indent=2, default=str))
        return rows
    print_table(
        f"request {req['id']}: {req['type']} on {req['target']}",
        ["activity", "computer", "status", "exit", "output (first line)", "duration"],
        [
            [
                a["id"],
                f"{a['computer_id']} {a.get('hostname') or ''}".strip(),
                state_label(a["state"]),
                a["exit_code"],
                first_line(a.get("stdout")) or first_line(a.get("result_line")),
                duration(a),
            ]
            for a in rows
        ],
    )
    return rows
