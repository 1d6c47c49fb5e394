"""The CLI's HTTP client for the admin API, and what several commands share on top of it.

Contract: :class:`Api` is the one way a command talks to the server (``--server``,
``--token`` from :func:`client_options`); an HTTP error ends the command through
``output.fail`` (exit 2) with the server's message, cleaned. Only GETs that are
safe to repeat ride out a restart (:meth:`Api.poll`). httpx is imported when a
client is made, not when this module loads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import click

from taskfleet.cli.output import clean, duration, fail, first_line, print_table, state_label
from taskfleet.settings import CLI_HTTP_TIMEOUT, CLI_POLL_INTERVAL, TENANT_HEADER


class Api:
    def __init__(self, server: str | None, token: str | None) -> None:
        import httpx

        if not server:
            fail("no server given: use --server URL or set TASKFLEET_SERVER")
        if not token:
            fail("no token given: use --token TOKEN or set TASKFLEET_TOKEN")
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"}
        tenant = acting_tenant()
        if tenant:  # the super-admin acts in this tenant (docs/tenants.md)
            headers[TENANT_HEADER] = tenant
        self.http = httpx.Client(
            base_url=self.server,
            headers=headers,
            timeout=CLI_HTTP_TIMEOUT,
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


def _pydantic_detail(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(x) for x in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail
        )
    return str(detail)


_TENANT_KEY = "taskfleet.tenant"


def _remember_tenant(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta[_TENANT_KEY] = value


def acting_tenant() -> str | None:
    """The tenant named with --tenant (or TASKFLEET_TENANT), if any."""
    ctx = click.get_current_context(silent=True)
    value = ctx.meta.get(_TENANT_KEY) if ctx is not None else None
    return str(value) if value else None


def client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)
    fn = click.option(
        "--tenant",
        envvar="TASKFLEET_TENANT",
        expose_value=False,
        callback=_remember_tenant,
        help="Act in this tenant (the super-admin only; docs/tenants.md) [env: TASKFLEET_TENANT].",
    )(fn)
    fn = click.option(
        "--token", envvar="TASKFLEET_TOKEN", help="API token [env: TASKFLEET_TOKEN]."
    )(fn)
    fn = click.option(
        "--server", envvar="TASKFLEET_SERVER", help="Server URL [env: TASKFLEET_SERVER]."
    )(fn)
    return fn


def wait_for_request(api: Api, request_id: int, *, show_progress: bool) -> dict[str, Any]:
    """Poll a request until every child finished; show a live progress bar.

    A server restart meanwhile does not end the wait: polls retry (Api.poll)."""
    req: dict[str, Any] = api.poll(f"/requests/{request_id}")
    if not show_progress:
        while not req["progress"]["done"]:
            time.sleep(CLI_POLL_INTERVAL)  # polling interval of a human-facing CLI, not a test wait
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
            time.sleep(CLI_POLL_INTERVAL)
            req = api.poll(f"/requests/{request_id}")


def results_table(
    api: Api, req: dict[str, Any], as_json: bool, *, waited: bool = False
) -> list[dict[str, Any]]:
    fetch = api.poll if waited else api.get
    rows: list[dict[str, Any]] = fetch(
        "/activities", request_id=req["id"], limit=req["total"], output=True
    )
    rows.sort(key=lambda a: a["computer_id"] or 0)
    if as_json:
        click.echo(json.dumps({"request": req, "activities": rows}, indent=2, default=str))
        return rows
    script = req["type"] == "execute-script"
    print_table(
        f"request {req['id']}: {req['type']} on {req['target']}",
        [
            "activity",
            "computer",
            "status",
            "exit",
            "output (first line)" if script else "result",
            "duration",
        ],
        [
            [
                a["id"],
                f"{a['computer_id']} {a.get('hostname') or ''}".strip(),
                state_label(a["state"]),
                a["exit_code"],
                first_line(a.get("stdout")) or first_line(a.get("result_line"))
                if script
                else result_part(a.get("result_line")) or a.get("reason"),
                duration(a),
            ]
            for a in rows
        ],
    )
    return rows


def result_part(line: str | None) -> str:
    """What a result line says happened (its ``Result:`` part), for typed activities and
    jobs, whose first line of output is a tool's chatter."""
    if not line:
        return ""
    _, sep, rest = line.partition("Result: ")
    return rest.rsplit(", Return code: ", 1)[0] if sep else first_line(line)
