"""``taskfleet agent``: run the agent, and look at or repair its local state.

Kept apart from the admin commands (one module per noun: ``cli/requests.py``
and the like) so that starting an agent imports only this module, the lean
shared helpers (``cli/output.py``, ``cli/options.py``), click and the agent
itself: it runs on production machines and must stay lean (issue "The embedded
fleet end to end": idle RSS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from taskfleet.cli.options import FINITE_FLOAT, read_token_file
from taskfleet.cli.output import emit, fail, print_fields, print_table, when
from taskfleet.settings import (
    AGENT_INVENTORY_INTERVAL,
    AGENT_INVENTORY_MIN_INTERVAL,
    AGENT_PACKAGE_LOCK_TIMEOUT,
    AGENT_RELAY_FAILOVER_AFTER,
    AGENT_RELAY_PROBE_INTERVAL,
    AGENT_STATE_DIR,
    AGENT_TICKLE_BIND,
    AGENT_TICKLE_PORT,
    SCRUB_INTERVAL,
    SCRUB_MAX_ATTEMPTS,
)


@click.group(invoke_without_command=True)
@click.option(
    "--server", "server_url", envvar="TASKFLEET_SERVER", help="Server URL [env: TASKFLEET_SERVER]."
)
@click.option(
    "--relay",
    "relay_url",
    envvar="TASKFLEET_RELAY",
    default=None,
    help="Enroll and exchange through this relay (http://HOST:PORT); --server stays the "
    "fallback when the relay fails [env: TASKFLEET_RELAY].",
)
@click.option(
    "--relay-failover-after",
    type=FINITE_FLOAT,
    default=AGENT_RELAY_FAILOVER_AFTER,
    show_default=True,
    help="Seconds of relay failures before exchanging with the server directly.",
)
@click.option(
    "--relay-probe-interval",
    type=FINITE_FLOAT,
    default=AGENT_RELAY_PROBE_INTERVAL,
    show_default=True,
    help="While direct, seconds between two tries of the relay (back to it when it answers).",
)
@click.option(
    "--server-key",
    default=None,
    help="The server's public key (64 hex digits): refuse an enrollment answer carrying "
    "another (a relay could swap it) [default: trust the first key].",
)
@click.option(
    "--enroll-token",
    envvar="TASKFLEET_ENROLL_TOKEN",
    help="Enrollment token [env: TASKFLEET_ENROLL_TOKEN]; on the command line it is "
    "visible to every user in `ps`: prefer the variable or --enroll-token-file.",
)
@click.option(
    "--enroll-token-file",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    default=None,
    help="Read the enrollment token from this file (first line).",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=Path(AGENT_STATE_DIR),
    show_default=True,
    help="The agent's durable local state.",
)
@click.option(
    "--tickle-port",
    type=int,
    default=AGENT_TICKLE_PORT,
    show_default=True,
    help="UDP port for wake-ups; 0 = none, hold a long poll instead.",
)
@click.option("--tickle-bind", default=AGENT_TICKLE_BIND, show_default=True)
@click.option(
    "--poll-interval",
    type=FINITE_FLOAT,
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
    "--ca-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Verify an https:// server with this CA (PEM) instead of the system's; kept in "
    "the state folder, so later starts need not give it again.",
)
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
    type=FINITE_FLOAT,
    default=SCRUB_INTERVAL,
    show_default=True,
    help="Seconds between scrubber runs (it also runs at start).",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1, 100),
    default=SCRUB_MAX_ATTEMPTS,
    show_default=True,
    help="Attempts after which the scrubber stops continuing an operation.",
)
@click.option(
    "--inventory/--no-inventory",
    "report_inventory",
    default=True,
    show_default=True,
    help="Report this computer's inventory (OS, hardware, packages, users; docs/inventory.md).",
)
@click.option(
    "--system-root",
    "--inventory-root",
    "inventory_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/"),
    show_default=True,
    help="The system this agent reports and manages (files, dpkg, apt, accounts) is under "
    "this root: a container's view of its host, or a test's throw-away root.",
)
@click.option(
    "--inventory-admindir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="dpkg's database for the inventory [default: ROOT/var/lib/dpkg].",
)
@click.option(
    "--inventory-interval",
    type=FINITE_FLOAT,
    default=AGENT_INVENTORY_INTERVAL,
    show_default=True,
    help="Seconds between inventory collections when nothing else asks for one.",
)
@click.option(
    "--inventory-min-interval",
    type=FINITE_FLOAT,
    default=AGENT_INVENTORY_MIN_INTERVAL,
    hidden=True,  # tests: collections closer together than a minute
)
@click.option(
    "--allow-type",
    multiple=True,
    help="A typed activity this computer runs (docs/activity-types.md): a type such as "
    "change-packages, a family (accounts, packages, snaps, system) or 'all'; repeat for "
    "more. Default: none of those that change the system.",
)
@click.option(
    "--restart-command",
    default=None,
    help="The restart command, split into words (no shell); {minutes} and {message} are "
    "filled in [default: shutdown -r +{minutes} {message}].",
)
@click.option(
    "--shutdown-command",
    default=None,
    help="The shutdown command, as --restart-command [default: shutdown -h +{minutes} {message}].",
)
@click.option(
    "--boot-id-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    hidden=True,  # tests: what tells a restart happened [default: the kernel's boot_id]
)
@click.option(
    "--restart-grace",
    type=FINITE_FLOAT,
    default=None,
    hidden=True,  # tests: seconds after a restart's delay before it is Failed [15 min]
)
@click.option(
    "--package-lock-timeout",
    type=FINITE_FLOAT,
    default=AGENT_PACKAGE_LOCK_TIMEOUT,
    show_default=True,
    help="Seconds a package activity waits for apt's or dpkg's lock held by another process.",
)
@click.option(
    "--apt-option",
    multiple=True,
    help="An extra apt-get setting NAME=VALUE for package activities (repeat for more).",
)
@click.option(
    "--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True
)
@click.pass_context
def agent(
    ctx: click.Context,
    server_url: str | None,
    relay_url: str | None,
    relay_failover_after: float,
    relay_probe_interval: float,
    server_key: str | None,
    enroll_token: str | None,
    enroll_token_file: Path | None,
    state_dir: Path,
    ca_file: Path | None,
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
    report_inventory: bool,
    inventory_root: Path,
    inventory_admindir: Path | None,
    inventory_interval: float,
    inventory_min_interval: float,
    allow_type: tuple[str, ...],
    restart_command: str | None,
    shutdown_command: str | None,
    boot_id_file: Path | None,
    restart_grace: float | None,
    package_lock_timeout: float,
    apt_option: tuple[str, ...],
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
    if inventory_interval <= 0 or inventory_min_interval < 0:
        fail("--inventory-interval must be positive")
    if restart_grace is not None and not 0 <= restart_grace <= 86400:
        fail("--restart-grace must be 0..86400 seconds")
    actions = _action_options(
        allow_type, restart_command, shutdown_command, package_lock_timeout, apt_option
    )
    server_key = _relay_options(relay_url, relay_failover_after, relay_probe_interval, server_key)
    if enroll_token_file is not None:
        if enroll_token:
            fail(
                "give the enrollment token once: --enroll-token (or TASKFLEET_ENROLL_TOKEN) "
                "or --enroll-token-file"
            )
        enroll_token = read_token_file(enroll_token_file)
    from taskfleet import logs
    from taskfleet.agent.main import AgentConfig, run_agent
    from taskfleet.agent.state import StateError

    if not server_url:
        fail(
            "no server given: use --server URL or set TASKFLEET_SERVER"
            + (" (with --relay, the server is the fallback)" if relay_url else "")
        )
    if not 0 <= tickle_port < 65536:
        fail("--tickle-port must be 0..65535")
    logs.setup(log_format)
    from taskfleet.tls import pin_ca

    try:
        ca_file = pin_ca(state_dir, ca_file)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    config = AgentConfig(
        server=server_url,
        state_dir=state_dir,
        ca_file=ca_file,
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
        relay=relay_url,
        relay_failover_after=relay_failover_after,
        relay_probe_interval=relay_probe_interval,
        server_key=server_key,
        inventory=report_inventory,
        inventory_root=inventory_root,
        inventory_admindir=inventory_admindir,
        inventory_interval=inventory_interval,
        inventory_min_interval=inventory_min_interval,
        boot_id_file=boot_id_file,
        restart_grace=restart_grace,
        **actions,
    )
    if hostname:
        config.hostname = hostname
    try:
        run_agent(config)
    except StateError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"agent cannot start: {exc}")


def _relay_options(
    relay_url: str | None, failover_after: float, probe_interval: float, server_key: str | None
) -> str | None:
    """Check the relay options; returns the pinned server key, normalised."""
    if relay_url is not None and not relay_url.startswith(("http://", "https://")):
        fail(f"--relay {relay_url!r} is not an http(s)://HOST[:PORT] URL")
    if failover_after < 0:
        fail("--relay-failover-after must be 0 or more seconds")
    if probe_interval <= 0:
        fail("--relay-probe-interval must be positive")
    if server_key is None:
        return None
    key = server_key.strip().lower()
    if len(key) != 64 or any(ch not in "0123456789abcdef" for ch in key):
        fail("--server-key must be the server's Ed25519 public key: 64 hex digits")
    return key


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
        "server_key": ident.server_public_key if ident else None,
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
                ("server key", d["server_key"]),
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
                    f"{r['status']} {names[r['status']]}"
                    + (" (awaiting restart)" if r.get("awaiting_restart") else ""),
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
            killed = scrub.kill_leftover(ops[r.op])
            if d.action.value == "scrub":
                scrub.scrub(state, ops[r.op], d, killed=killed, folder=folder)
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


def _action_options(
    allow_type: tuple[str, ...],
    restart_command: str | None,
    shutdown_command: str | None,
    package_lock_timeout: float,
    apt_option: tuple[str, ...],
) -> dict[str, Any]:
    """The typed-activity options, checked: AgentConfig's fields."""
    import shlex

    from taskfleet.domain.actions import allowed_types

    try:
        allowed_types(allow_type)
    except ValueError as exc:
        fail(f"--allow-type: {exc}")
    commands: dict[str, tuple[str, ...] | None] = {}
    for name, value in (("restart", restart_command), ("shutdown", shutdown_command)):
        try:
            words = None if value is None else tuple(shlex.split(value))
        except ValueError as exc:
            fail(f"--{name}-command: {exc}")
        if words is not None and not words:
            fail(f"--{name}-command must name a program")
        commands[f"{name}_command"] = words
    if not 0 <= package_lock_timeout <= 86400:
        fail("--package-lock-timeout must be 0..86400 seconds")
    for opt in apt_option:
        if "=" not in opt or opt.startswith(("-", "=")) or "\n" in opt:
            fail(f"--apt-option must be NAME=VALUE, not {opt!r}")
    return {
        "allow_types": allow_type,
        "package_lock_timeout": package_lock_timeout,
        "apt_options": apt_option,
        **commands,
    }
