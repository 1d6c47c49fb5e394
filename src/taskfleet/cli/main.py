"""The admin commands of ``taskfleet`` (the agent's are in ``cli/agent.py``).

``cli`` collects them; the ``taskfleet`` command (``taskfleet.cli.root``)
loads this module only when one of them runs. Imports are local to each
command so each loads only what it needs.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import click

from taskfleet.cli import FINITE_FLOAT
from taskfleet.cli.client import (
    Api,
    clean,
    client_options,
    echo,
    emit,
    fail,
    print_fields,
    print_table,
    results_table,
    state_label,
    wait_for_request,
    when,
)


@click.group()
def cli() -> None:
    """The admin commands (served through ``taskfleet.cli.root``)."""


# -- parts ------------------------------------------------------------------------


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


@cli.group(invoke_without_command=True)
@click.option(
    "--database",
    envvar="TASKFLEET_DATABASE",
    default=None,
    help="sqlite:///PATH or postgresql://... [default: DATA_DIR/taskfleet.sqlite3]",
)
@click.option("--listen", default="127.0.0.1:8470", show_default=True, help="HOST:PORT of the API.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("taskfleet-data"),
    show_default=True,
    help="Where the bootstrap admin token (and SQLite file) go.",
)
@click.option(
    "--tickle-rate",
    type=FINITE_FLOAT,
    default=None,
    help="Fleet-wide UDP wake-ups per second [default: 5000].",
)
@click.option(
    "--tickle-min-interval",
    type=FINITE_FLOAT,
    default=None,
    help="Seconds between two wake-ups of one computer [default: 1].",
)
@click.option(
    "--poll-interval",
    type=FINITE_FLOAT,
    default=None,
    help="Seconds between agents' fallback exchanges [default: 1800].",
)
@click.option(
    "--lost-grace",
    type=FINITE_FLOAT,
    default=None,
    help="Seconds past a script's time limit before it is declared lost [default: 60].",
)
@click.option(
    "--reaper-interval",
    type=FINITE_FLOAT,
    default=None,
    help="Seconds between checks for lost activities [default: 5].",
)
@click.option(
    "--task-types",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="TOML file declaring server task types (see docs/task-types.example.toml).",
)
@click.option(
    "--queue",
    default="embedded",
    show_default=True,
    help="Dispatch queue: embedded (in-process workers) or amqp://USER:PASS@HOST/VHOST.",
)
@click.option(
    "--workers",
    type=click.IntRange(0, 256),
    default=4,
    show_default=True,
    help="Embedded queue: server tasks run at once in this process.",
)
@click.option(
    "--heartbeat-timeout",
    type=FINITE_FLOAT,
    default=5 * 3600.0,
    show_default=True,
    help="Seconds without a worker heartbeat before its tasks fail.",
)
@click.option(
    "--tickles/--no-tickles",
    default=True,
    show_default=True,
    help="Send UDP wake-ups (off: agents rely on polls and long polls).",
)
@click.option(
    "--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True
)
@click.pass_context
def server(
    ctx: click.Context,
    database: str | None,
    listen: str,
    data_dir: Path,
    tickle_rate: float | None,
    tickle_min_interval: float | None,
    poll_interval: float | None,
    lost_grace: float | None,
    reaper_interval: float | None,
    task_types: Path | None,
    queue: str,
    workers: int,
    heartbeat_timeout: float,
    tickles: bool,
    log_format: str,
) -> None:
    """Run the server: API, agent exchanges, tickles (one process, SQLite by default).

    `taskfleet server mint-admin-token` makes a new admin token from the data
    folder when none is left."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from taskfleet import logs
    from taskfleet.server.app import create_app
    from taskfleet.server.runtime import ServerConfig
    from taskfleet.store import db

    host, port = _listen(listen)
    logs.setup(log_format)
    database_url = database or _default_database(data_dir)
    try:
        # Checked here too (the server's start-up checks again) for a clean message.
        db.secure_data_dir(data_dir.resolve())
        db.prepare_sqlite(database_url)
    except (db.InsecureFileError, OSError, ValueError) as exc:
        fail(f"refusing to start: {exc}")
    config = ServerConfig(
        database_url=database_url,
        data_dir=data_dir.resolve(),
        public_url=f"http://{host}:{port}",
        tickles=tickles,
        task_types=task_types,
        queue=queue,
        workers=workers,
        heartbeat_timeout=heartbeat_timeout,
    )
    if heartbeat_timeout <= 0:
        raise click.BadParameter("--heartbeat-timeout must be positive")
    if queue != "embedded" and not queue.startswith(("amqp://", "amqps://")):
        raise click.BadParameter(f"--queue must be embedded or amqp://..., not {queue!r}")
    for name, value in (
        ("tickle_rate", tickle_rate),
        ("tickle_min_interval", tickle_min_interval),
        ("poll_interval", poll_interval),
        ("lost_grace", lost_grace),
        ("reaper_interval", reaper_interval),
    ):
        if value is not None:
            if value <= 0:
                raise click.BadParameter(f"--{name.replace('_', '-')} must be positive")
            setattr(config, name, value)
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_keep_alive=120,
        backlog=4096,
    )


def _default_database(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'taskfleet.sqlite3').resolve()}"


@server.command("mint-admin-token")
@click.option(
    "--database",
    envvar="TASKFLEET_DATABASE",
    default=None,
    help="The server's database [default: DATA_DIR/taskfleet.sqlite3].",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("taskfleet-data"),
    show_default=True,
    help="The server's data folder: the token is written to DATA_DIR/admin-token.",
)
@click.option("--tenant", default="default", show_default=True)
def server_mint_admin_token(database: str | None, data_dir: Path, tenant: str) -> None:
    """Mint a new admin token from the data folder (when no admin token is left).

    Works on the database directly, with or without a running server; the token
    is written to DATA_DIR/admin-token (mode 0600), never printed, and the audit
    log records it."""
    import asyncio
    import getpass
    import socket

    from taskfleet.server.kernel import ApiError
    from taskfleet.server.runtime import mint_admin_token
    from taskfleet.store import db

    try:
        token_id, path = asyncio.run(
            mint_admin_token(
                data_dir.resolve(),
                database or _default_database(data_dir),
                tenant=tenant,
                actor=f"server-cli:{getpass.getuser()}@{socket.gethostname()}",
            )
        )
    except ApiError as exc:
        fail(exc.message)
    except (db.InsecureFileError, OSError, ValueError) as exc:
        fail(str(exc))
    echo(f"admin token {token_id} minted for tenant {tenant}; written to {path}")


@cli.command()
@click.option("--agents", type=click.IntRange(1, 500), default=5, show_default=True)
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path),
    default=Path(".taskfleet-demo"),
    show_default=True,
)
@click.option(
    "--stay/--no-stay",
    default=None,
    help="Keep the fleet running until Ctrl-C [default: when interactive].",
)
def demo(agents: int, workdir: Path, stay: bool | None) -> None:
    """Start a server and real agents here, run a real script on all of them."""
    from taskfleet.cli.demo import run_demo

    sys.exit(run_demo(agents, workdir, sys.stdin.isatty() if stay is None else stay))


# -- tokens -------------------------------------------------------------------------


@cli.group()
def token() -> None:
    """Manage API tokens (with a role) and enrollment tokens."""


@token.command("create")
@click.option("--name", required=True)
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), default=None)
@click.option("--enroll", is_flag=True, help="An enrollment token for agents.")
@click.option("--expires-in", type=FINITE_FLOAT, default=None, help="Seconds until it expires.")
@click.option("--max-uses", type=int, default=None, help="Enrollments allowed.")
@click.option("--group", default=None, help="Group that computers enrolled with it join.")
@client_options
def token_create(
    name: str,
    role: str | None,
    enroll: bool,
    expires_in: float | None,
    max_uses: int | None,
    group: str | None,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Create a token; its secret is shown once."""
    if enroll == bool(role):
        fail("give either --role ROLE (an API token) or --enroll (an enrollment token)")
    body = {
        "kind": "enroll" if enroll else "admin",
        "name": name,
        "role": role,
        "expires_in": expires_in,
        "max_uses": max_uses,
        "group": group,
    }
    out = Api(server, token).post("/tokens", body)
    emit(
        out,
        as_json,
        lambda d: echo(
            f"created {d['kind']} token {d['id']} ({d['role'] or 'enrollment'}): {d['token']}\n"
            "it is shown only once; store it now"
        ),
    )


@token.command("list")
@client_options
def token_list(server: str | None, token: str | None, as_json: bool) -> None:
    """List tokens (never their secrets)."""
    rows = Api(server, token).get("/tokens")
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "tokens",
            ["id", "name", "kind", "role", "created", "expires", "uses left", "revoked"],
            [
                [
                    r["id"],
                    r["name"],
                    r["kind"],
                    r["role"],
                    when(r["created_at"]),
                    when(r["expires_at"]),
                    r["uses_left"],
                    r["revoked"],
                ]
                for r in rs
            ],
        ),
    )


@token.command("revoke")
@click.argument("token_id", type=int)
@client_options
def token_revoke(token_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Revoke a token."""
    Api(server, token).call("DELETE", f"/tokens/{token_id}")
    emit({"revoked": token_id}, as_json, lambda d: echo(f"token {token_id} revoked"))


# -- run ------------------------------------------------------------------------------


def _after_arg(value: str | None, metric: str, threshold: float) -> dict[str, Any] | None:
    if value is None:
        return None
    kind, sep, ident = value.partition(":")
    if not sep:
        kind, ident = "request", value
    if kind not in ("request", "activity") or not ident.isdigit():
        fail(f"--after expects request:ID, activity:ID or ID, got {value!r}")
    return {kind: int(ident), "metric": metric, "percent": threshold}


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--target", required=True, help="all | group:NAME | tag:KEY=VALUE | computer:ID[,ID...]"
)
@click.option(
    "--timeout",
    type=FINITE_FLOAT,
    default=300.0,
    show_default=True,
    help="Seconds before the agent kills the script.",
)
@click.option("--wait", is_flag=True, help="Show progress and the results when done.")
@click.option(
    "--script",
    "script_file",
    type=click.File("r"),
    default=None,
    help="Run this script file instead of a command.",
)
@click.option("--interpreter", default="/bin/sh", show_default=True, help="For --script.")
@click.option("--env", "env_pairs", multiple=True, help="KEY=VALUE for the script.")
@click.option("--cwd", default=None, help="Working directory on the computer.")
@click.option("--user", default=None, help="Run as this user (the agent must allow it).")
@click.option(
    "--output-cap", type=int, default=None, help="Bytes kept per stream [default: 65536]."
)
@click.option(
    "--expires-in",
    type=FINITE_FLOAT,
    default=None,
    help="Seconds: work a computer has not picked up by then is Canceled (expired).",
)
@click.option(
    "--optional",
    is_flag=True,
    help="Optional work: each computer defers it until its local run window.",
)
@click.option(
    "--every",
    type=FINITE_FLOAT,
    default=None,
    help="Recurring: run again every this many seconds until canceled.",
)
@click.option("--at", "at", default=None, help="Scheduled: not earlier than (ISO, epoch, +2h).")
@click.option(
    "--cron", default=None, help="Recurring schedule, 5 fields in UTC: each run is a new request."
)
@click.option(
    "--after",
    default=None,
    help="Waiting: start after request:ID (or ID) or activity:ID finishes (see --threshold).",
)
@click.option(
    "--after-metric",
    type=click.Choice(["finished", "succeeded"]),
    default="finished",
    show_default=True,
    help="What --after counts.",
)
@click.option("--threshold", type=FINITE_FLOAT, default=100.0, show_default=True, help="Percent.")
@click.option("--approval", is_flag=True, help="Blocked until an admin approves it.")
@click.option("--separate-approver", is_flag=True, help="The requester may not approve.")
@click.option("--approval-expires-in", default=None, help="Canceled if not approved by (2h).")
@click.option("--canary", type=int, default=None, help="Rollout: computers in the first wave.")
@click.option("--wave-size", type=int, default=None, help="Rollout: computers per wave.")
@click.option("--wave-share", type=FINITE_FLOAT, default=None, help="Rollout: percent per wave.")
@click.option(
    "--wave-success",
    type=FINITE_FLOAT,
    default=100.0,
    show_default=True,
    help="Rollout: percent of a wave that must succeed before the next starts.",
)
@click.option(
    "--max-failures",
    type=FINITE_FLOAT,
    default=100.0,
    show_default=True,
    help="Rollout: pause when more than this percent of finished computers failed.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@client_options
def run(
    target: str,
    timeout: float,
    wait: bool,
    script_file: Any,
    interpreter: str,
    env_pairs: tuple[str, ...],
    cwd: str | None,
    user: str | None,
    output_cap: int | None,
    expires_in: float | None,
    optional: bool,
    every: float | None,
    at: str | None,
    cron: str | None,
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
    command: tuple[str, ...],
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Run a command (after --) or a script file on target computers.

    Lifecycle options: --at schedules it, --cron repeats it, --after makes it
    wait for other work, --approval holds it for an admin, --canary and
    --wave-size/--wave-share roll it out in waves."""
    if bool(command) == bool(script_file):
        fail("give a command after -- or --script FILE (not both)")
    params: dict[str, Any] = {}
    if command:
        params["argv"] = list(command)
    else:
        params["script"] = script_file.read()
        params["interpreter"] = interpreter
    env = {}
    for pair in env_pairs:
        k, eq, v = pair.partition("=")
        if not eq or not k:
            fail(f"--env expects KEY=VALUE, got {pair!r}")
        env[k] = v
    params.update(env=env, cwd=cwd, user=user)
    if output_cap is not None:
        params["output_cap"] = output_cap
    api = Api(server, token)
    policy: dict[str, Any] = {"mode": "optional" if optional else "required"}
    if every is not None:
        policy.update(interval="recurring", every=every)
        if wait:
            fail("--wait does not end for recurring work; follow it with taskfleet request show")
    body: dict[str, Any] = {
        "type": "execute-script",
        "target": target,
        "params": params,
        "timeout": timeout,
        "policy": policy,
        "expires_in": expires_in,
        "at": _when_arg(at, "--at"),
        "after": _after_arg(after, after_metric, threshold),
    }
    if approval or separate_approver or approval_expires_in:
        body["approval"] = {
            "separation": separate_approver,
            "expires_in": _seconds_arg(approval_expires_in, "--approval-expires-in")
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
    if cron is not None:
        if wait:
            fail("--wait does not end for a schedule; follow it with taskfleet schedule show")
        sched = api.post("/schedules", {"cron": cron, "request": body})
        emit(
            sched,
            as_json,
            lambda d: echo(
                f"schedule {d['id']} created ({d['cron']} UTC); first run at {when(d['next_at'])}"
            ),
        )
        return
    req = api.post("/requests", body)
    if not wait:
        emit(
            req,
            as_json,
            lambda r: echo(
                f"request {r['id']} created: {r['total']} computers; "
                f"follow it with: taskfleet request show {r['id']}"
            ),
        )
        return
    req = wait_for_request(api, req["id"], show_progress=not as_json)
    rows = results_table(api, req, as_json, waited=True)
    sys.exit(0 if all(a["state"] == "succeeded" for a in rows) else 1)


# -- requests and activities --------------------------------------------------------------


@cli.group()
def request() -> None:
    """Requests: one per run, with one activity per computer."""


def _req_row(r: dict[str, Any]) -> list[Any]:
    p = r["progress"]
    return [
        r["id"],
        r["type"],
        r["target"],
        when(r["created_at"]),
        r["created_by"],
        f"{p['finished']}/{p['total']}",
        p["succeeded"],
        ", ".join(f"{state_label(k)} {v}" for k, v in p["counts"].items()),
    ]


_REQ_COLS = ["id", "type", "target", "created", "by", "finished", "succeeded", "states"]


@request.command("list")
@click.option("--limit", type=int, default=50, show_default=True)
@client_options
def request_list(limit: int, server: str | None, token: str | None, as_json: bool) -> None:
    """List recent requests with their progress."""
    rows = Api(server, token).get("/requests", limit=limit)
    emit(rows, as_json, lambda rs: print_table("requests", _REQ_COLS, [_req_row(r) for r in rs]))


@request.command("show")
@click.argument("request_id", type=int)
@client_options
def request_show(request_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Show a request's progress and per-computer results."""
    api = Api(server, token)
    req = api.get(f"/requests/{request_id}")
    if not as_json:
        print_table(None, _REQ_COLS, [_req_row(req)])
        for line in _lifecycle_lines(req):
            echo(line)
    results_table(api, req, as_json)


def _lifecycle_lines(req: dict[str, Any]) -> list[str]:
    """What holds a request: its time, dependency, approval, rollout state."""
    out = []
    if req.get("not_before"):
        out.append(f"not earlier than: {when(req['not_before'])}")
    d = req.get("depends_on")
    if d:
        out.append(f"after: {d['kind']} {d['on']} {d['percent']:g}% {d['metric']}")
    a = req.get("approval")
    if a:
        status = a.get("decision") or "awaiting approval"
        by = f" by {a['decided_by']}" if a.get("decided_by") else ""
        exp = f", expires {when(a['expires_at'])}" if a.get("expires_at") and not by else ""
        sep = " (requester may not approve)" if a.get("separation") else ""
        out.append(f"approval: {status}{by}{exp}{sep}")
    r = req.get("rollout")
    if r:
        step = f"{r['size']} computers" if r.get("size") else f"{r['share']:g}%"
        if r.get("paused"):
            state = f"PAUSED: {r.get('pause_reason')}"
        else:
            state = "finished" if (req.get("progress") or {}).get("done") else "running"
        out.append(
            f"rollout: {r['waves']} waves (canary {r['canary']}, then {step}), next wave at "
            f"{r['success']:g}% succeeded, pause above {r['max_failures']:g}% failed; {state}"
        )
    if req.get("schedule_id"):
        out.append(f"run of schedule {req['schedule_id']}")
    return out


@request.command("cancel")
@click.argument("request_id", type=int)
@click.option("--reason", default="")
@client_options
def request_cancel(
    request_id: int, reason: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Cancel every unfinished activity of a request."""
    out = Api(server, token).post(f"/requests/{request_id}/cancel", {"reason": reason})
    emit(
        out,
        as_json,
        lambda d: echo(f"request {request_id}: {len(d['canceled'])} activities canceled"),
    )


@cli.group()
def activity() -> None:
    """Activities: one unit of work on one computer."""


@activity.command("list")
@click.option("--request", "request_id", type=int, default=None)
@click.option("--computer", "computer_id", type=int, default=None)
@click.option("--state", default=None)
@click.option("--limit", type=int, default=100, show_default=True)
@client_options
def activity_list(
    request_id: int | None,
    computer_id: int | None,
    state: str | None,
    limit: int,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """List activities, newest first."""
    state = state.lower().replace(" ", "_").replace("-", "_") if state else None
    rows = Api(server, token).get(
        "/activities", request_id=request_id, computer_id=computer_id, state=state, limit=limit
    )
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "activities",
            ["id", "request", "computer", "type", "state", "exit", "result", "updated"],
            [
                [
                    a["id"],
                    a["request_id"],
                    f"{a['computer_id']} {a.get('hostname') or ''}",
                    a["type"],
                    state_label(a["state"]),
                    a["exit_code"],
                    a["result_line"] or a["reason"],
                    when(a["updated_at"]),
                ]
                for a in rs
            ],
        ),
    )


@activity.command("show")
@click.argument("activity_id", type=int)
@client_options
def activity_show(activity_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Show one activity: state, result, output and its full history."""
    a = Api(server, token).get(f"/activities/{activity_id}")

    def table(a: dict[str, Any]) -> None:
        print_fields(
            f"activity {a['id']}",
            [
                ("request", a["request_id"]),
                ("computer", f"{a['computer_id']} {a['hostname']}"),
                ("type", a["type"]),
                ("state", state_label(a["state"])),
                ("reason", a["reason"]),
                ("result", a["result_line"]),
                ("exit code", a["exit_code"]),
                ("started (agent)", when(a["agent_started_at"])),
                ("ended (agent)", when(a["agent_ended_at"])),
                ("agent report", a["agent_report"]),
            ],
        )
        for name in ("stdout", "stderr"):
            if a.get(name):
                echo(f"--- {name} ---\n{a[name].rstrip()}")
        print_table(
            "history",
            ["at", "from", "to", "cause", "actor", "reason"],
            [
                [
                    when(e["at"]),
                    state_label(e["from_state"] or "-"),
                    state_label(e["to_state"]),
                    e["cause"],
                    e["actor"],
                    e["reason"],
                ]
                for e in a["history"]
            ],
        )

    emit(a, as_json, table)


@activity.command("cancel")
@click.argument("activity_id", type=int)
@click.option("--reason", default="")
@client_options
def activity_cancel(
    activity_id: int, reason: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Cancel an activity (a running one is stopped on its computer)."""
    a = Api(server, token).post(f"/activities/{activity_id}/cancel", {"reason": reason})
    emit(a, as_json, lambda d: echo(f"activity {activity_id}: {state_label(d['state'])}"))


# -- computers and groups -----------------------------------------------------------------


@cli.group()
def computer() -> None:
    """Enrolled computers."""


@computer.command("list")
@client_options
def computer_list(server: str | None, token: str | None, as_json: bool) -> None:
    """List enrolled computers."""
    rows = Api(server, token).get("/computers")
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "computers",
            ["id", "hostname", "last seen", "address", "scripts", "groups", "tags"],
            [
                [
                    c["id"],
                    c["hostname"],
                    when(c["last_seen_at"]),
                    c["address"],
                    "yes" if (c["policy"] or {}).get("scripts") else "no",
                    ",".join(c["groups"]),
                    ",".join(f"{k}={v}" for k, v in c["tags"].items()),
                ]
                for c in rs
            ],
        ),
    )


@computer.command("show")
@click.argument("computer_id", type=int)
@client_options
def computer_show(computer_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Show a computer and its recent activities."""
    c = Api(server, token).get(f"/computers/{computer_id}")

    def table(c: dict[str, Any]) -> None:
        print_fields(
            f"computer {c['id']}",
            [
                ("hostname", c["hostname"]),
                ("enrolled", when(c["enrolled_at"])),
                ("last seen", when(c["last_seen_at"])),
                ("address", c["address"]),
                ("tickle port", c["tickle_port"]),
                ("agent", c["agent_version"]),
                ("generation", c["generation"]),
                ("removed", when(c["removed_at"]) if c.get("removed_at") else None),
                ("policy", c["policy"]),
                ("groups", ", ".join(c["groups"])),
                ("tags", ", ".join(f"{k}={v}" for k, v in c["tags"].items())),
            ],
        )
        print_table(
            "recent activities",
            ["id", "request", "state", "exit", "result"],
            [
                [
                    a["id"],
                    a["request_id"],
                    state_label(a["state"]),
                    a["exit_code"],
                    a["result_line"] or a["reason"],
                ]
                for a in c["activities"]
            ],
        )

    emit(c, as_json, table)


@computer.command("remove")
@click.argument("computer_id", type=int)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@client_options
def computer_remove(
    computer_id: int, yes: bool, server: str | None, token: str | None, as_json: bool
) -> None:
    """Remove a computer (admin): its open work is Canceled, its credentials stop working.

    Its history stays readable (taskfleet activity list --computer ID); enrolling
    the machine again brings it back."""
    api = Api(server, token)
    c = api.get(f"/computers/{computer_id}")
    if c.get("removed_at"):
        fail(f"computer {computer_id} was already removed")
    if not yes:
        if not sys.stdin.isatty():
            fail(f"this removes computer {computer_id}; add --yes to do it")
        click.confirm(
            f"remove computer {computer_id} ({clean(c['hostname'])}) and cancel its open work?",
            abort=True,
        )
    out = api.call("DELETE", f"/computers/{computer_id}")
    emit(
        out,
        as_json,
        lambda d: echo(
            f"computer {d['id']} ({clean(d['hostname'])}) removed; "
            f"{len(d['canceled'])} open activities canceled"
        ),
    )


@cli.group()
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


# -- server tasks ---------------------------------------------------------------------------


@cli.command()
@click.option(
    "--queue",
    envvar="TASKFLEET_QUEUE",
    required=True,
    help="amqp://USER:PASS@HOST/VHOST [env: TASKFLEET_QUEUE].",
)
@click.option(
    "--database",
    envvar="TASKFLEET_DATABASE",
    required=True,
    help="The server's database (postgresql://...) [env: TASKFLEET_DATABASE].",
)
@click.option(
    "--task-types",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="The same TOML file the server uses.",
)
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True)
@click.option("--heartbeat-interval", type=FINITE_FLOAT, default=10.0, show_default=True)
@click.option("--name", default=None, help="Name in logs and `taskfleet task workers`.")
@click.option(
    "--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True
)
def worker(
    queue: str,
    database: str,
    task_types: Path | None,
    concurrency: int,
    heartbeat_interval: float,
    name: str | None,
    log_format: str,
) -> None:
    """Run a worker: take server tasks from RabbitMQ, run them, heartbeat."""
    from taskfleet import logs
    from taskfleet.worker.main import run_worker

    logs.setup(log_format)
    if heartbeat_interval <= 0:
        fail("--heartbeat-interval must be positive")
    try:
        run_worker(
            queue=queue,
            database=database,
            task_types=task_types,
            concurrency=concurrency,
            heartbeat_interval=heartbeat_interval,
            name=name,
        )
    except ValueError as exc:
        fail(str(exc))


@cli.group()
def task() -> None:
    """Server tasks: submit, list, show, cancel (run by workers under the batch scheduler)."""


def _when_arg(value: str | None, option: str = "--not-before") -> float | None:
    """Epoch seconds, an ISO 8601 time (no zone: local time), or +DURATION from now."""
    if value is None:
        return None
    from datetime import datetime

    from taskfleet.settings import TIME_MAX, TIME_MIN

    at: float | None = None
    if value.startswith("+"):
        at = time.time() + _seconds_arg(value[1:], option)
    else:
        with contextlib.suppress(ValueError):
            at = float(value)
        if at is None:
            try:
                at = datetime.fromisoformat(value).timestamp()
            except (ValueError, OverflowError):
                fail(f"{option} expects epoch seconds, an ISO time or +DURATION, got {value!r}")
    # "nan", "inf", "1e20" parse as floats; the server would refuse them less clearly.
    if not TIME_MIN <= at <= TIME_MAX:  # False for NaN too
        fail(f"{option} must be a time between 1970 and 2100, got {value!r}")
    return at


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds_arg(value: str, option: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h``, ``1d`` -> seconds."""
    text = value.strip().lower()
    unit = _UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        fail(f"{option} expects a duration like 90, 30s, 10m, 2h or 1d, got {value!r}")
    if not 0 < seconds < math.inf:
        fail(f"{option} must be a positive, finite duration, got {value!r}")
    return seconds


_TASK_COLS = ["id", "task", "state", "scope", "dispatched", "worker", "result / waiting for"]


def _task_row(t: dict[str, Any]) -> list[Any]:
    scope = (
        (t.get("group_name") and f"group:{t['group_name']}")
        or (t.get("scope_tenant") and f"tenant:{t['scope_tenant']}")
        or "-"
    )
    return [
        t["id"],
        t["name"],
        state_label(t["state"]),
        scope,
        when(t["dispatched_at"]),
        t["claimed_by"],
        t.get("result_line") or t.get("waiting_for") or t.get("reason"),
    ]


@task.command("submit")
@click.argument("type_name", metavar="TYPE")
@click.option("--tenant", default=None)
@click.option("--group", default=None)
@click.option("--param", "params", multiple=True, help="K=V (repeatable).")
@click.option("--not-before", default=None, help="Epoch seconds, ISO time or +DURATION.")
@click.option("--approval", is_flag=True, help="Blocked until an admin approves it.")
@click.option("--separate-approver", is_flag=True, help="The submitter may not approve.")
@click.option("--approval-expires-in", default=None, help="Canceled if not approved by (2h).")
@click.option("--after", "after_task", type=int, default=None, help="Wait for this task.")
@click.option(
    "--after-metric",
    type=click.Choice(["finished", "succeeded"]),
    default="finished",
    show_default=True,
)
@client_options
def task_submit(
    type_name: str,
    tenant: str | None,
    group: str | None,
    params: tuple[str, ...],
    not_before: str | None,
    approval: bool,
    separate_approver: bool,
    approval_expires_in: str | None,
    after_task: int | None,
    after_metric: str,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Submit a server task; a duplicate of a waiting one is not queued again."""
    values: dict[str, str] = {}
    for pair in params:
        k, eq, v = pair.partition("=")
        if not eq or not k:
            fail(f"--param expects K=V, got {pair!r}")
        values[k] = v
    out = Api(server, token).post(
        "/tasks",
        {
            "type": type_name,
            "tenant": tenant,
            "group": group,
            "params": values,
            "not_before": _when_arg(not_before),
            "approval": {
                "separation": separate_approver,
                "expires_in": _seconds_arg(approval_expires_in, "--approval-expires-in")
                if approval_expires_in
                else None,
            }
            if approval or separate_approver or approval_expires_in
            else None,
            "after": {"task": after_task, "metric": after_metric} if after_task else None,
        },
    )

    def human(d: dict[str, Any]) -> None:
        t = d["task"]
        if d["duplicate_of"] is not None:
            echo(f"duplicate of {t['name']} ({state_label(t['state'])}): not queued again")
        else:
            echo(f"submitted {t['name']} ({state_label(t['state'])})")

    emit(out, as_json, human)


@task.command("approve")
@click.argument("task_id", type=int)
@client_options
def task_approve(task_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Approve a Blocked task (admin; maybe not its submitter)."""
    t = Api(server, token).post(f"/tasks/{task_id}/approve")
    emit(t, as_json, lambda t: echo(f"{t['name']} approved: {state_label(t['state'])}"))


@task.command("reject")
@click.argument("task_id", type=int)
@click.option("--reason", default="")
@client_options
def task_reject(
    task_id: int, reason: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Reject a Blocked task: it is Canceled."""
    t = Api(server, token).post(f"/tasks/{task_id}/reject", {"reason": reason})
    emit(t, as_json, lambda t: echo(f"{t['name']} rejected: {state_label(t['state'])}"))


@task.command("list")
@click.option("--state", default=None)
@click.option("--type", "type_name", default=None)
@click.option("--limit", type=int, default=100, show_default=True)
@client_options
def task_list(
    state: str | None,
    type_name: str | None,
    limit: int,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """List server tasks, newest first."""
    rows = Api(server, token).get("/tasks", state=state, type=type_name, limit=limit)
    emit(rows, as_json, lambda rs: print_table("tasks", _TASK_COLS, [_task_row(t) for t in rs]))


@task.command("show")
@click.argument("task_id", type=int)
@client_options
def task_show(task_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Show one server task."""
    t = Api(server, token).get(f"/tasks/{task_id}")

    def human(t: dict[str, Any]) -> None:
        print_fields(
            t["name"],
            [
                ("state", state_label(t["state"])),
                ("params", t["params"]),
                ("tenant", t["scope_tenant"]),
                ("group", t["group_name"]),
                ("not before", when(t["not_before"])),
                ("dispatched", when(t["dispatched_at"])),
                ("worker", t["claimed_by"]),
                ("command line", t["command_line"]),
                ("waiting for", t.get("waiting_for")),
                ("result", t["result_line"]),
                ("return code", t["exit_code"]),
                ("reason", t["reason"]),
                *(
                    [("slot", "held: canceled, its worker has not confirmed the stop yet")]
                    if t.get("stopping")
                    else []
                ),
            ],
        )
        if t.get("stdout"):
            echo(f"--- output ---\n{t['stdout'].rstrip()}")

    emit(t, as_json, human)


@task.command("cancel")
@click.argument("task_id", type=int)
@click.option("--reason", default="")
@client_options
def task_cancel(
    task_id: int, reason: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Cancel a server task; a running one is stopped by its worker.

    A task In Progress is Canceled at once and its worker is told to stop it; it
    keeps its slot (its type's limit) until the worker confirms the stop."""
    t = Api(server, token).post(f"/tasks/{task_id}/cancel", {"reason": reason})

    def human(d: dict[str, Any]) -> None:
        line = f"{d['name']}: {state_label(d['state'])}"
        if d.get("stop_requested_at") is not None:
            line += f" ({d['reason']})"
        echo(line)

    emit(t, as_json, human)


@task.command("types")
@client_options
def task_types_cmd(server: str | None, token: str | None, as_json: bool) -> None:
    """List the declared server task types."""
    rows = Api(server, token).get("/task-types")
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "task types",
            ["name", "scope", "kind", "limit", "time limit", "excludes", "retry"],
            [
                [
                    r["name"],
                    r["scope"],
                    r["kind"],
                    r["concurrency"] or "-",
                    f"{r['time_limit']:g}s",
                    ",".join(r["excludes"]),
                    r["retry_safe"],
                ]
                for r in rs
            ],
        ),
    )


@request.command("rerun")
@click.argument("request_id", type=int)
@click.option("--wait", is_flag=True, help="Show progress and the results when done.")
@client_options
def request_rerun(
    request_id: int, wait: bool, server: str | None, token: str | None, as_json: bool
) -> None:
    """Run a request again on only the computers where it failed."""
    api = Api(server, token)
    req = api.post(f"/requests/{request_id}/rerun-failed")
    if not wait:
        emit(
            req,
            as_json,
            lambda r: echo(
                f"request {r['id']} re-runs request {request_id} on its {r['total']} failed "
                "computers"
            ),
        )
        return
    req = wait_for_request(api, req["id"], show_progress=not as_json)
    rows = results_table(api, req, as_json, waited=True)
    sys.exit(0 if all(a["state"] == "succeeded" for a in rows) else 1)


@activity.command("cancel-bulk")
@click.option("--state", default=None, help="queued, scheduled, waiting, blocked, in_progress")
@click.option("--type", "type_name", default=None)
@click.option("--group", default=None)
@click.option("--older-than", type=FINITE_FLOAT, default=None, help="Seconds since created.")
@click.option("--request", "request_id", type=int, default=None)
@click.option("--reason", default="")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@client_options
def activity_cancel_bulk(
    state: str | None,
    type_name: str | None,
    group: str | None,
    older_than: float | None,
    request_id: int | None,
    reason: str,
    yes: bool,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Cancel every unfinished activity matching the filters; shows the count first."""
    if not any(v is not None for v in (state, type_name, group, older_than, request_id)):
        fail("give at least one filter (--state, --type, --group, --older-than, --request)")
    api = Api(server, token)
    body = {
        "state": state.lower().replace(" ", "_") if state else None,
        "type": type_name,
        "group": group,
        "older_than": older_than,
        "request_id": request_id,
        "reason": reason,
    }
    preview = api.post("/activities/cancel", {**body, "dry_run": True})
    if preview["count"] == 0:
        emit(preview, as_json, lambda d: echo("no unfinished activity matches"))
        return
    if not yes:
        if not sys.stdin.isatty():
            fail(f"{preview['count']} activities match; add --yes to cancel them")
        click.confirm(f"cancel {preview['count']} activities?", abort=True)
    out = api.post("/activities/cancel", body)
    emit(out, as_json, lambda d: echo(f"{d['count']} activities canceled"))


# -- lifecycle: approvals, rollouts, dependencies, windows, schedules -------------------


@request.command("approve")
@click.argument("request_id", type=int)
@client_options
def request_approve(request_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Approve a request that waits for approval (admin; maybe not its requester)."""
    out = Api(server, token).post(f"/requests/{request_id}/approve")
    emit(out, as_json, lambda r: echo(f"request {request_id} approved: {_states(r)}"))


@request.command("reject")
@click.argument("request_id", type=int)
@click.option("--reason", default="")
@client_options
def request_reject(
    request_id: int, reason: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Reject a request that waits for approval: its activities are Canceled."""
    out = Api(server, token).post(f"/requests/{request_id}/reject", {"reason": reason})
    emit(out, as_json, lambda r: echo(f"request {request_id} rejected: {_states(r)}"))


@request.command("resume")
@click.argument("request_id", type=int)
@client_options
def request_resume(request_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Resume a paused rollout (to stop it instead: taskfleet request cancel)."""
    out = Api(server, token).post(f"/requests/{request_id}/resume")
    emit(out, as_json, lambda r: echo(f"rollout {request_id} resumed: {_states(r)}"))


@request.command("wait")
@click.argument("request_id", type=int)
@click.option("--after", required=True, help="request:ID (or ID) or activity:ID")
@click.option(
    "--after-metric",
    type=click.Choice(["finished", "succeeded"]),
    default="finished",
    show_default=True,
)
@click.option("--threshold", type=FINITE_FLOAT, default=100.0, show_default=True, help="Percent.")
@client_options
def request_wait(
    request_id: int,
    after: str,
    after_metric: str,
    threshold: float,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Make a Blocked or Waiting request wait for other work (replaces its dependency)."""
    body = {"after": _after_arg(after, after_metric, threshold)}
    out = Api(server, token).call("PUT", f"/requests/{request_id}/after", json=body)
    emit(out, as_json, lambda r: echo(f"request {request_id} waits: {_states(r)}"))


def _states(r: dict[str, Any]) -> str:
    return ", ".join(f"{state_label(k)} {v}" for k, v in r["progress"]["counts"].items())


@cli.group()
def approval() -> None:
    """Approvals: requests held Blocked until an admin decides."""


@approval.command("list")
@client_options
def approval_list(server: str | None, token: str | None, as_json: bool) -> None:
    """Requests waiting for approval, oldest first."""
    rows = Api(server, token).get("/approvals")
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "awaiting approval",
            ["what", "type", "target", "computers", "requested by", "at", "expires", "separate"],
            [
                [
                    f"request {r['request_id']}"
                    if r["kind"] == "request"
                    else f"task {r['task_id']}",
                    r["type"],
                    r["target"],
                    r["total"],
                    r["requested_by"],
                    when(r["requested_at"]),
                    when(r["expires_at"]) if r["expires_at"] else "never",
                    "yes" if r["separation"] else "no",
                ]
                for r in rs
            ],
        ),
    )


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


@cli.group()
def schedule() -> None:
    """Cron schedules: `taskfleet run --cron ...` creates one; each run is its own request."""


_SCHED_COLS = ["id", "cron (UTC)", "target", "next run", "runs", "last request", "state / error"]


def _sched_row(d: dict[str, Any]) -> list[Any]:
    state = "canceled" if d["canceled_at"] else (d["last_error"] or "active")
    return [
        d["id"],
        d["cron"],
        d["template"]["target"],
        when(d["next_at"]) if d["next_at"] else "-",
        d["runs"],
        d["last_request_id"] or "-",
        state,
    ]


@schedule.command("list")
@client_options
def schedule_list(server: str | None, token: str | None, as_json: bool) -> None:
    """All schedules with their next run."""
    rows = Api(server, token).get("/schedules")
    emit(
        rows, as_json, lambda rs: print_table("schedules", _SCHED_COLS, [_sched_row(d) for d in rs])
    )


@schedule.command("show")
@click.argument("schedule_id", type=int)
@client_options
def schedule_show(schedule_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """One schedule."""
    d = Api(server, token).get(f"/schedules/{schedule_id}")
    emit(d, as_json, lambda d: print_table(None, _SCHED_COLS, [_sched_row(d)]))


@schedule.command("cancel")
@click.argument("schedule_id", type=int)
@client_options
def schedule_cancel(schedule_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Stop future runs (runs already created go on; cancel them as requests)."""
    d = Api(server, token).post(f"/schedules/{schedule_id}/cancel")
    emit(d, as_json, lambda d: echo(f"schedule {schedule_id} canceled"))
