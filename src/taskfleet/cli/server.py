"""``taskfleet server``: run the server, and mint an admin token from its data folder.

Contract: the only CLI module that imports server internals (``server.app``,
``server.runtime``, ``server.kernel``), inside the commands, so a restructured server is followed
here alone and no other command pays for loading it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from taskfleet import tls
from taskfleet.cli.client import Api, client_options  # light: httpx loads with an Api
from taskfleet.cli.options import FINITE_FLOAT, tls_listener_options
from taskfleet.cli.output import echo, emit, fail, print_table, when
from taskfleet.settings import (
    AUTH_FAILURE_LIMIT,
    AUTH_FAILURE_WINDOW,
    ENROLL_FAILURE_LIMIT,
    IDENTITY_ROTATE,
    LOST_GRACE,
    POLL_INTERVAL,
    REAPER_INTERVAL,
    SERVER_DATA_DIR,
    SERVER_KEEP_ALIVE,
    SERVER_PORT,
    TICKLE_MIN_INTERVAL,
    TICKLE_RATE,
    WORKER_CONCURRENCY,
    WORKER_HEARTBEAT_INTERVAL,
    WORKER_HEARTBEAT_TIMEOUT,
)


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _identity_rotate(value: float | None, default: float) -> float:
    if value is not None and value < 0:
        raise click.BadParameter("--identity-rotate must be 0 or more seconds")
    return default if value is None else value


@click.group(invoke_without_command=True)
@click.option(
    "--database",
    envvar="TASKFLEET_DATABASE",
    default=None,
    help="sqlite:///PATH or postgresql://... [default: DATA_DIR/taskfleet.sqlite3]",
)
@click.option(
    "--listen", default=f"127.0.0.1:{SERVER_PORT}", show_default=True, help="HOST:PORT of the API."
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path(SERVER_DATA_DIR),
    show_default=True,
    help="Where the bootstrap admin token (and SQLite file) go.",
)
@click.option(
    "--tickle-rate",
    type=FINITE_FLOAT,
    default=None,
    help=f"Fleet-wide UDP wake-ups per second [default: {TICKLE_RATE:g}].",
)
@click.option(
    "--tickle-min-interval",
    type=FINITE_FLOAT,
    default=None,
    help=f"Seconds between two wake-ups of one computer [default: {TICKLE_MIN_INTERVAL:g}].",
)
@click.option(
    "--poll-interval",
    type=FINITE_FLOAT,
    default=None,
    help=f"Seconds between agents' fallback exchanges [default: {POLL_INTERVAL:g}].",
)
@click.option(
    "--identity-rotate",
    type=FINITE_FLOAT,
    default=None,
    help="Seconds an agent's identity nonce is kept before the server replaces it: two "
    "agents with one computer's identity are caught within a few rotations "
    f"(0: at every exchange) [default: {IDENTITY_ROTATE:g}].",
)
@click.option(
    "--lost-grace",
    type=FINITE_FLOAT,
    default=None,
    help="Seconds past a script's time limit before it is declared lost "
    f"[default: {LOST_GRACE:g}].",
)
@click.option(
    "--reaper-interval",
    type=FINITE_FLOAT,
    default=None,
    help=f"Seconds between checks for lost activities [default: {REAPER_INTERVAL:g}].",
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
    default=WORKER_CONCURRENCY,
    show_default=True,
    help="Embedded queue: server tasks run at once in this process.",
)
@click.option(
    "--heartbeat-timeout",
    type=FINITE_FLOAT,
    default=WORKER_HEARTBEAT_TIMEOUT,
    show_default=True,
    help="Seconds without a worker heartbeat before its tasks fail.",
)
@click.option(
    "--worker-heartbeat",
    type=FINITE_FLOAT,
    default=None,
    help="Embedded queue: seconds between its worker's heartbeats "
    f"[default: {WORKER_HEARTBEAT_INTERVAL:g}].",
)
@click.option(
    "--tickles/--no-tickles",
    default=True,
    show_default=True,
    help="Send UDP wake-ups (off: agents rely on polls and long polls).",
)
@click.option(
    "--auth-failure-limit",
    type=click.IntRange(1, 1_000_000),
    default=None,
    help=f"Failed API tokens (and, separately, enrollments) from one address within "
    f"{AUTH_FAILURE_WINDOW:g} s before it gets 429 until they age out "
    f"[default: {AUTH_FAILURE_LIMIT} and {ENROLL_FAILURE_LIMIT}].",
)
@click.option(
    "--cluster-heartbeat",
    type=FINITE_FLOAT,
    default=None,
    hidden=True,  # tests: a faster handover (server/cluster.py)
)
@click.option(
    "--leader-catch-up",
    type=FINITE_FLOAT,
    default=None,
    hidden=True,  # tests: how often the leader scans for work other processes persisted
)
@tls_listener_options("the API, the dashboard and agents")
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
    identity_rotate: float | None,
    reaper_interval: float | None,
    task_types: Path | None,
    queue: str,
    workers: int,
    heartbeat_timeout: float,
    worker_heartbeat: float | None,
    tickles: bool,
    auth_failure_limit: int | None,
    cluster_heartbeat: float | None,
    leader_catch_up: float | None,
    tls_cert: Path | None,
    tls_key: Path | None,
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
    problem, warning = tls.listener_problem(tls_cert, tls_key, host)
    if problem:
        fail(problem)
    if warning:
        logging.getLogger("taskfleet.server").warning(warning)
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
        public_url=f"{'https' if tls_cert else 'http'}://{host}:{port}",
        tickles=tickles,
        task_types=task_types,
        queue=queue,
        workers=workers,
        heartbeat_timeout=heartbeat_timeout,
    )
    config.identity_rotate = _identity_rotate(identity_rotate, config.identity_rotate)
    if auth_failure_limit is not None:
        config.auth_failure_limit = config.enroll_failure_limit = auth_failure_limit
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
        ("cluster_heartbeat", cluster_heartbeat),
        ("leader_catch_up", leader_catch_up),
        ("worker_heartbeat", worker_heartbeat),
    ):
        if value is not None:
            if value <= 0:
                raise click.BadParameter(f"--{name.replace('_', '-')} must be positive")
            setattr(config, name, value)
    from taskfleet.listen import bind_tcp

    try:
        # Bound before the app starts: agents and relays that connect while it starts
        # (tickled by it: runtime.start wakes every relay) wait instead of being refused.
        sock = bind_tcp(host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            log_config=None,
            access_log=False,
            timeout_keep_alive=SERVER_KEEP_ALIVE,
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
        )
    ).run(sockets=[sock])


def _default_database(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'taskfleet.sqlite3').resolve()}"


@server.command("key")
@client_options
def server_key(server: str | None, token: str | None, as_json: bool) -> None:
    """Print the server's Ed25519 public key, for `taskfleet agent --server-key` (an
    agent that pins it enrolls only with this server, also through a relay)."""
    about = Api(server, token).get("/server")
    if as_json:
        echo(json.dumps(about))
    else:
        echo(about["public_key"])


@server.command("status")
@client_options
def server_status(server: str | None, token: str | None, as_json: bool) -> None:
    """The server processes on this database (running, stopped, lost) and which one
    leads, since when (the super-admin's; docs/scale-out.md)."""
    data = Api(server, token).get("/servers")

    def table(d: dict[str, Any]) -> None:
        lead = d["leader"]
        if lead:
            echo(f"leader: {lead['id']} since {when(lead['since'])} (epoch {lead['epoch']})")
        print_table(
            "server processes",
            ["id", "host", "pid", "url", "state", "leads", "started", "last heartbeat"],
            [
                [
                    p["id"],
                    p["host"],
                    p["pid"],
                    p["url"],
                    p["state"],
                    "yes" if p["leader"] else "",
                    when(p["started_at"]),
                    when(p["heartbeat_at"]),
                ]
                for p in d["processes"]
            ],
        )

    emit(data, as_json, table)


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
    default=Path(SERVER_DATA_DIR),
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
