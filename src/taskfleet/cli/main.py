"""The ``taskfleet`` command: one subcommand per part and per kind of work.

Imports are local to each command so ``taskfleet agent`` loads only what an
agent needs (it runs on production machines and must stay lean).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from taskfleet import __version__
from taskfleet.cli.client import (
    Api,
    client_options,
    emit,
    fail,
    print_fields,
    print_table,
    results_table,
    state_label,
    wait_for_request,
    when,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="taskfleet")
def cli() -> None:
    """taskfleet: run work on a fleet of computers and see where it truly stands."""


def main() -> None:
    cli(prog_name="taskfleet")


# -- parts ------------------------------------------------------------------------


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


@cli.command()
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
    type=float,
    default=None,
    help="Fleet-wide UDP wake-ups per second [default: 5000].",
)
@click.option(
    "--tickle-min-interval",
    type=float,
    default=None,
    help="Seconds between two wake-ups of one computer [default: 1].",
)
@click.option(
    "--poll-interval",
    type=float,
    default=None,
    help="Seconds between agents' fallback exchanges [default: 1800].",
)
@click.option(
    "--lost-grace",
    type=float,
    default=None,
    help="Seconds past a script's time limit before it is declared lost [default: 60].",
)
@click.option(
    "--reaper-interval",
    type=float,
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
    type=float,
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
def server(
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
    """Run the server: API, agent exchanges, tickles (one process, SQLite by default)."""
    import uvicorn

    from taskfleet import logs
    from taskfleet.server.app import ServerConfig, create_app

    host, port = _listen(listen)
    logs.setup(log_format)
    config = ServerConfig(
        database_url=database or f"sqlite:///{(data_dir / 'taskfleet.sqlite3').resolve()}",
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


@cli.group(invoke_without_command=True)
@click.option(
    "--server", "server_url", envvar="TASKFLEET_SERVER", help="Server URL [env: TASKFLEET_SERVER]."
)
@click.option("--enroll-token", envvar="TASKFLEET_ENROLL_TOKEN", help="Enrollment token.")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=Path("/var/lib/taskfleet"),
    show_default=True,
    help="The agent's durable local state.",
)
@click.option(
    "--tickle-port",
    type=int,
    default=50124,
    show_default=True,
    help="UDP port for wake-ups; 0 = none, hold a long poll instead.",
)
@click.option("--tickle-bind", default="0.0.0.0", show_default=True)
@click.option(
    "--poll-interval",
    type=float,
    default=None,
    help="Seconds between fallback exchanges [default: what the server says].",
)
@click.option(
    "--allow-scripts/--no-allow-scripts",
    default=False,
    show_default=True,
    help="Whether this computer runs scripts at all.",
)
@click.option(
    "--script-user",
    multiple=True,
    help="Extra users scripts may run as (default: only the agent's own user).",
)
@click.option("--hostname", default=None, help="Name shown for this computer.")
@click.option(
    "--machine-id",
    default=None,
    help="Stable identity [default: from /etc/machine-id and the state folder].",
)
@click.option("--reenroll", is_flag=True, help="Enroll again even if already enrolled.")
@click.option(
    "--run-window",
    default=None,
    help="HH:MM-HH:MM local time when optional work may run; outside it, it is Deferred.",
)
@click.option(
    "--scrub-interval",
    type=float,
    default=3600.0,
    show_default=True,
    help="Seconds between scrubber runs (it also runs at start).",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1, 100),
    default=3,
    show_default=True,
    help="Attempts after which the scrubber stops continuing an operation.",
)
@click.option(
    "--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True
)
@click.pass_context
def agent(
    ctx: click.Context,
    server_url: str | None,
    enroll_token: str | None,
    state_dir: Path,
    tickle_port: int,
    tickle_bind: str,
    poll_interval: float | None,
    allow_scripts: bool,
    script_user: tuple[str, ...],
    hostname: str | None,
    machine_id: str | None,
    reenroll: bool,
    run_window: str | None,
    scrub_interval: float,
    max_attempts: int,
    log_format: str,
) -> None:
    """Run the agent on a managed computer (enrolls on first start)."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"state_dir": state_dir, "max_attempts": max_attempts}
        return
    if run_window is not None:
        from taskfleet.domain.policy import RunWindow

        try:
            RunWindow.parse(run_window)
        except ValueError as exc:
            fail(str(exc))
    if scrub_interval <= 0:
        fail("--scrub-interval must be positive")
    from taskfleet import logs
    from taskfleet.agent.main import AgentConfig, run_agent
    from taskfleet.agent.state import StateError

    if not server_url:
        fail("no server given: use --server URL or set TASKFLEET_SERVER")
    if not 0 <= tickle_port < 65536:
        fail("--tickle-port must be 0..65535")
    logs.setup(log_format)
    config = AgentConfig(
        server=server_url,
        state_dir=state_dir,
        enroll_token=enroll_token,
        tickle_port=tickle_port,
        tickle_bind=tickle_bind,
        poll_interval=poll_interval,
        allow_scripts=allow_scripts,
        script_users=script_user,
        machine_id=machine_id,
        reenroll=reenroll,
        run_window=run_window,
        scrub_interval=scrub_interval,
        max_attempts=max_attempts,
    )
    if hostname:
        config.hostname = hostname
    try:
        run_agent(config)
    except StateError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"agent cannot start: {exc}")


@agent.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def agent_status(ctx: click.Context, as_json: bool) -> None:
    """Show this agent's identity and local operation records."""
    from taskfleet.agent.state import LocalState, StateError

    try:
        state = LocalState(ctx.obj["state_dir"])
    except StateError as exc:
        fail(str(exc))
    ident = state.identity()
    data = {
        "computer_id": ident.computer_id if ident else None,
        "server": ident.server if ident else None,
        "server_seq": state.server_seq,
        "unsent_results": state.outbox_size(),
        "records": state.records(),
    }
    names = [
        "unknown",
        "working",
        "downloading",
        "installing",
        "success",
        "failed",
        "canceled",
        "deferred",
    ]

    def table(d: dict[str, Any]) -> None:
        print_fields(
            "agent",
            [
                ("computer", d["computer_id"]),
                ("server", d["server"]),
                ("unsent results", d["unsent_results"]),
            ],
        )
        print_table(
            "local records",
            ["op", "type", "status", "attempts", "received", "ended"],
            [
                [
                    r["op"],
                    r["type"],
                    f"{r['status']} {names[r['status']]}",
                    r["attempts"],
                    when(r["received_at"]),
                    when(r["ended_at"]),
                ]
                for r in d["records"]
            ],
        )

    emit(data, as_json, table)


@agent.command("scrub")
@click.option("--dry-run", is_flag=True, help="Only print the decisions.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def agent_scrub(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Run the task status scrubber (SPEC 5) on the local records and print each decision."""
    from taskfleet.agent import scrub
    from taskfleet.agent.state import LocalState, StateError

    folder = ctx.obj["state_dir"]
    try:
        state = LocalState(folder)
    except StateError as exc:
        fail(str(exc))
    if not dry_run and scrub.agent_lock(folder).held_elsewhere():
        fail(
            "the agent is running: it scrubs its own records (at start and every "
            "--scrub-interval); stop it first, or use --dry-run to see the decisions"
        )
    running = scrub.executor_lock(folder).held_elsewhere()
    plan, ops = scrub.plan(
        state, folder, executor_running=running, max_attempts=ctx.obj["max_attempts"]
    )
    rows = [
        {
            "op": r.op,
            "pushed": r.pushed,
            "mode": r.mode.value,
            "interval": r.interval.value,
            "status": int(r.status),
            "status_name": r.status.name.title(),
            "checkpoint": r.has_checkpoint,
            "attempts": r.attempts,
            "decision": d.action.value,
            "rule": d.rule,
        }
        for r, d in plan.decisions
    ]
    if not dry_run:
        for r, d in plan.decisions:
            if d.action.value == "leave":
                continue
            scrub.kill_leftover(ops[r.op])
            if d.action.value == "scrub":
                scrub.scrub(state, ops[r.op], d)
            else:
                state.requeue(r.op)  # the agent runs it (attempt counted) at its start
    data = {
        "skipped": plan.skipped,
        "dry_run": dry_run,
        "scrubbed": plan.scrubbed,
        "decisions": rows,
    }

    def table(d: dict[str, Any]) -> None:
        if d["skipped"]:
            click.echo("skipped: a task executor is running (SPEC 5 rule 1)")
            return
        print_table(
            "scrubber" + (" (dry run)" if dry_run else ""),
            [
                "op",
                "pushed",
                "mode",
                "interval",
                "status",
                "checkpoint",
                "attempts",
                "decision",
                "rule",
            ],
            [
                [
                    r["op"],
                    "pushed" if r["pushed"] else "pulled",
                    r["mode"],
                    r["interval"],
                    f"{r['status']} {r['status_name']}",
                    "yes" if r["checkpoint"] else "no",
                    r["attempts"],
                    r["decision"],
                    r["rule"],
                ]
                for r in d["decisions"]
            ],
        )
        click.echo(f"{d['scrubbed']} {'would be ' if dry_run else ''}scrubbed")

    emit(data, as_json, table)


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
@click.option("--expires-in", type=float, default=None, help="Seconds until it expires.")
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
        lambda d: click.echo(
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
    emit({"revoked": token_id}, as_json, lambda d: click.echo(f"token {token_id} revoked"))


# -- run ------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--target", required=True, help="all | group:NAME | tag:KEY=VALUE | computer:ID[,ID...]"
)
@click.option(
    "--timeout",
    type=float,
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
    type=float,
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
    type=float,
    default=None,
    help="Recurring: run again every this many seconds until canceled.",
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
    command: tuple[str, ...],
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Run a command (after --) or a script file on target computers."""
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
    req = api.post(
        "/requests",
        {
            "type": "execute-script",
            "target": target,
            "params": params,
            "timeout": timeout,
            "policy": policy,
            "expires_in": expires_in,
        },
    )
    if not wait:
        emit(
            req,
            as_json,
            lambda r: click.echo(
                f"request {r['id']} created: {r['total']} computers; "
                f"follow it with: taskfleet request show {r['id']}"
            ),
        )
        return
    req = wait_for_request(api, req["id"], show_progress=not as_json)
    rows = results_table(api, req, as_json)
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
    results_table(api, req, as_json)


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
        lambda d: click.echo(f"request {request_id}: {len(d['canceled'])} activities canceled"),
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
                click.echo(f"--- {name} ---\n{a[name].rstrip()}")
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
    emit(a, as_json, lambda d: click.echo(f"activity {activity_id}: {state_label(d['state'])}"))


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
    emit(out, as_json, lambda d: click.echo(f"group {name} created"))


@group.command("delete")
@click.argument("name")
@client_options
def group_delete(name: str, server: str | None, token: str | None, as_json: bool) -> None:
    """Delete a group (its computers stay enrolled)."""
    Api(server, token).call("DELETE", f"/groups/{name}")
    emit({"deleted": name}, as_json, lambda d: click.echo(f"group {name} deleted"))


@group.command("add")
@click.argument("name")
@click.argument("computer_ids", type=int, nargs=-1, required=True)
@client_options
def group_add(
    name: str, computer_ids: tuple[int, ...], server: str | None, token: str | None, as_json: bool
) -> None:
    """Add computers to a group."""
    out = Api(server, token).post(f"/groups/{name}/members", {"computer_ids": list(computer_ids)})
    emit(out, as_json, lambda d: click.echo(f"added {len(computer_ids)} computers to {name}"))


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
    emit(out, as_json, lambda d: click.echo(f"removed {len(computer_ids)} computers from {name}"))


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
    emit(out, as_json, lambda d: click.echo(f"computer {computer_id}: {key}={value}"))


@group.command("untag")
@click.argument("computer_id", type=int)
@click.argument("key")
@client_options
def group_untag(
    computer_id: int, key: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Remove a tag from a computer."""
    Api(server, token).call("DELETE", f"/computers/{computer_id}/tags/{key}")
    emit({"removed": key}, as_json, lambda d: click.echo(f"computer {computer_id}: {key} removed"))


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
@click.option("--heartbeat-interval", type=float, default=10.0, show_default=True)
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


def _when_arg(value: str | None) -> float | None:
    if value is None:
        return None
    from datetime import datetime

    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        fail(f"--not-before expects epoch seconds or an ISO time, got {value!r}")


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
@click.option("--not-before", default=None, help="Epoch seconds or ISO time.")
@client_options
def task_submit(
    type_name: str,
    tenant: str | None,
    group: str | None,
    params: tuple[str, ...],
    not_before: str | None,
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
        },
    )

    def human(d: dict[str, Any]) -> None:
        t = d["task"]
        if d["duplicate_of"] is not None:
            click.echo(f"duplicate of {t['name']} ({state_label(t['state'])}): not queued again")
        else:
            click.echo(f"submitted {t['name']} ({state_label(t['state'])})")

    emit(out, as_json, human)


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
            ],
        )
        if t.get("stdout"):
            click.echo(f"--- output ---\n{t['stdout'].rstrip()}")

    emit(t, as_json, human)


@task.command("cancel")
@click.argument("task_id", type=int)
@click.option("--reason", default="")
@client_options
def task_cancel(
    task_id: int, reason: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Cancel a server task."""
    t = Api(server, token).post(f"/tasks/{task_id}/cancel", {"reason": reason})
    emit(t, as_json, lambda d: click.echo(f"{d['name']}: {state_label(d['state'])}"))


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
            lambda r: click.echo(
                f"request {r['id']} re-runs request {request_id} on its {r['total']} failed "
                "computers"
            ),
        )
        return
    req = wait_for_request(api, req["id"], show_progress=not as_json)
    rows = results_table(api, req, as_json)
    sys.exit(0 if all(a["state"] == "succeeded" for a in rows) else 1)


@activity.command("cancel-bulk")
@click.option("--state", default=None, help="queued, scheduled, waiting, blocked, in_progress")
@click.option("--type", "type_name", default=None)
@click.option("--group", default=None)
@click.option("--older-than", type=float, default=None, help="Seconds since created.")
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
        emit(preview, as_json, lambda d: click.echo("no unfinished activity matches"))
        return
    if not yes:
        if not sys.stdin.isatty():
            fail(f"{preview['count']} activities match; add --yes to cancel them")
        click.confirm(f"cancel {preview['count']} activities?", abort=True)
    out = api.post("/activities/cancel", body)
    emit(out, as_json, lambda d: click.echo(f"{d['count']} activities canceled"))
