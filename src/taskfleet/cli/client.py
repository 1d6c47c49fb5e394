"""The CLI's HTTP client for the admin API, and shared output helpers."""

from __future__ import annotations

import json
import os
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

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            resp = self.http.request(method, "/api/v1" + path, **kwargs)
        except httpx.HTTPError as exc:
            fail(f"cannot reach {self.server}: {exc}")
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

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("POST", path, json=body)


def _pydantic_detail(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(x) for x in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail
        )
    return str(detail)


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"error: {message}", err=True)
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

    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["-" if v is None else str(v) for v in r])
    Console(width=max(100, int(os.environ.get("COLUMNS", "0") or 0))).print(t)


def print_fields(title: str, fields: list[tuple[str, Any]]) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{title}[/bold]")
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        console.print(
            f"  {k.ljust(width)}  {'-' if v is None else v}", highlight=False, markup=False
        )


def first_line(text: str | None) -> str:
    if not text:
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:80]


def duration(a: dict[str, Any]) -> str:
    s, e = a.get("agent_started_at"), a.get("agent_ended_at")
    return f"{e - s:.2f}s" if s and e else "-"


def state_label(state: str) -> str:
    return state.replace("_", " ").title()


def wait_for_request(api: Api, request_id: int, *, show_progress: bool) -> dict[str, Any]:
    """Poll a request until every child finished; show a live progress bar."""
    req = api.get(f"/requests/{request_id}")
    if not show_progress:
        while not req["progress"]["done"]:
            time.sleep(0.2)  # polling interval of a human-facing CLI, not a test wait
            req = api.get(f"/requests/{request_id}")
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
            counts = ", ".join(f"{state_label(k)} {v}" for k, v in p["counts"].items())
            bar.update(task, completed=p["finished"], counts=counts)
            if p["done"]:
                return req
            time.sleep(0.2)
            req = api.get(f"/requests/{request_id}")


def results_table(api: Api, req: dict[str, Any], as_json: bool) -> list[dict[str, Any]]:
    rows = api.get("/activities", request_id=req["id"], limit=req["total"], output=True)
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
