"""``taskfleet run``, ``taskfleet request ...`` and ``taskfleet approval``.

Contract: every ``request`` subcommand is defined here, once: creating work
(run, its lifecycle options), following it (list, show, rerun), holding and
releasing it (approve, reject, resume, wait, cancel), and the approvals queue.
Talks to the admin API only.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from taskfleet.cli.client import Api, client_options, results_table, wait_for_request
from taskfleet.cli.lifecycle import after_arg, lifecycle_fields, lifecycle_options
from taskfleet.cli.options import FINITE_FLOAT
from taskfleet.cli.output import echo, emit, fail, print_table, state_label, when
from taskfleet.cli.typed import create_and_follow
from taskfleet.settings import OUTPUT_CAP, SCRIPT_INTERPRETER, SCRIPT_TIMEOUT


@click.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--target",
    required=True,
    help="all | group:NAME | tag:KEY=VALUE | computer:ID[,ID...] | package:NAME[OP VERSION] "
    "| os:ID[-VERSION]",
)
@click.option(
    "--timeout",
    type=FINITE_FLOAT,
    default=SCRIPT_TIMEOUT,
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
@click.option("--interpreter", default=SCRIPT_INTERPRETER, show_default=True, help="For --script.")
@click.option("--env", "env_pairs", multiple=True, help="KEY=VALUE for the script.")
@click.option("--cwd", default=None, help="Working directory on the computer.")
@click.option("--user", default=None, help="Run as this user (the agent must allow it).")
@click.option(
    "--output-cap", type=int, default=None, help=f"Bytes kept per stream [default: {OUTPUT_CAP}]."
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
@lifecycle_options
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
    optional: bool,
    every: float | None,
    cron: str | None,
    command: tuple[str, ...],
    server: str | None,
    token: str | None,
    as_json: bool,
    **lifecycle: Any,
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
        **lifecycle_fields(**lifecycle),
    }
    create_and_follow(api, body, cron=cron, wait=wait, as_json=as_json)


@click.group()
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
        for line in lifecycle_lines(req):
            echo(line)
    results_table(api, req, as_json)


def lifecycle_lines(req: dict[str, Any]) -> list[str]:
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
    body = {"after": after_arg(after, after_metric, threshold)}
    out = Api(server, token).call("PUT", f"/requests/{request_id}/after", json=body)
    emit(out, as_json, lambda r: echo(f"request {request_id} waits: {_states(r)}"))


def _states(r: dict[str, Any]) -> str:
    return ", ".join(f"{state_label(k)} {v}" for k, v in r["progress"]["counts"].items())


@click.group()
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
