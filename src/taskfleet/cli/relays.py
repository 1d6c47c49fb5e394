"""``taskfleet relay``: run a relay (no subcommand), and the relay admin commands.

Two parts, one group. With no subcommand the group's callback runs the relay process
(``relay/main.py``); it imports only this module, the lean shared helpers, click and
the relay (no admin client, httpx or server: a relay runs near its agents and stays
lean). The admin subcommands (``list``, ``show``, ``assign``) talk to the admin API
(``/relays``) through ``cli/client.py``, whose httpx loads only when a client is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from taskfleet.cli.client import Api, client_options  # light: httpx loads with an Api
from taskfleet.cli.options import FINITE_FLOAT, read_token_file, tls_listener_options
from taskfleet.cli.output import echo, emit, fail, print_fields, print_table, when
from taskfleet.protocol.relay import STAT_CACHED, STAT_LAG, STAT_SPOOL
from taskfleet.settings import (
    RELAY_CONTENT_CACHE_BYTES,
    RELAY_LISTEN,
    RELAY_RETRY_MAX,
    RELAY_RETRY_MIN,
    RELAY_STATE_DIR,
    RELAY_TICKLE_BIND,
    RELAY_TICKLE_PORT,
)

# -- the relay process ------------------------------------------------------------------


@click.group(invoke_without_command=True)
@click.option(
    "--server", "server_url", envvar="TASKFLEET_SERVER", help="Server URL [env: TASKFLEET_SERVER]."
)
@click.option(
    "--enroll-token",
    envvar="TASKFLEET_RELAY_TOKEN",
    help="Relay enrollment token (first start) [env: TASKFLEET_RELAY_TOKEN]; on the command "
    "line it is visible in `ps`: prefer the variable or --enroll-token-file.",
)
@click.option(
    "--enroll-token-file",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    default=None,
    help="Read the relay enrollment token from this file (first line).",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=Path(RELAY_STATE_DIR),
    show_default=True,
    help="The relay's identity, spool and cache (kept 0600).",
)
@click.option(
    "--listen",
    default=RELAY_LISTEN,
    show_default=True,
    help="HOST:PORT where agents reach this relay.",
)
@click.option(
    "--advertise",
    default=None,
    help="The URL agents use for this relay, as the server shows it [default: none].",
)
@click.option(
    "--tickle-port",
    type=int,
    default=RELAY_TICKLE_PORT,
    show_default=True,
    help="UDP port for the server's wake-ups; 0 = none, long-poll the server instead.",
)
@click.option(
    "--tickle-bind", default=RELAY_TICKLE_BIND, show_default=True, help="Address for --tickle-port."
)
@click.option(
    "--poll-interval",
    type=FINITE_FLOAT,
    default=None,
    help="Seconds between exchanges when nothing happens [default: what the server says, 60].",
)
@click.option(
    "--retry-min",
    type=FINITE_FLOAT,
    default=RELAY_RETRY_MIN,
    show_default=True,
    help="Seconds before the first retry while the server is unreachable (then doubling).",
)
@click.option(
    "--retry-max",
    type=FINITE_FLOAT,
    default=RELAY_RETRY_MAX,
    show_default=True,
    help="The longest wait between retries (a tickle from the server ends any wait).",
)
@click.option(
    "--content-cache-mb",
    type=click.IntRange(min=0),
    default=RELAY_CONTENT_CACHE_BYTES // (1024 * 1024),
    show_default=True,
    help="MiB of content (job downloads) the relay keeps for its agents, least recently "
    "used evicted first; a file being served is never evicted.",
)
@click.option("--name", default=None, help="This relay's name at the server [default: hostname].")
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Verify an https:// server with this CA (PEM) instead of the system's; kept in "
    "the state folder, so later starts need not give it again.",
)
@tls_listener_options("agents")
@click.option(
    "--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True
)
@click.pass_context
def relay(
    ctx: click.Context,
    server_url: str | None,
    enroll_token: str | None,
    enroll_token_file: Path | None,
    state_dir: Path,
    ca_file: Path | None,
    listen: str,
    advertise: str | None,
    tickle_port: int,
    tickle_bind: str,
    poll_interval: float | None,
    retry_min: float,
    retry_max: float,
    content_cache_mb: int,
    name: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    log_format: str,
) -> None:
    """Run a relay near a group of agents (enrolls on first start), or manage relays."""
    if ctx.invoked_subcommand is not None:
        return
    if not server_url:
        fail("no server given: use --server URL or set TASKFLEET_SERVER")
    if enroll_token_file is not None:
        if enroll_token:
            fail("give the enrollment token once: --enroll-token or --enroll-token-file")
        enroll_token = read_token_file(enroll_token_file)
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"--listen {listen!r}: expected HOST:PORT")
    if not 0 <= tickle_port < 65536:
        fail("--tickle-port must be 0..65535")
    if poll_interval is not None and poll_interval <= 0:
        fail("--poll-interval must be positive")
    if not 0 < retry_min <= retry_max:
        fail("--retry-min and --retry-max must be positive, the minimum not above the maximum")
    from taskfleet import tls

    problem, warning = tls.listener_problem(tls_cert, tls_key, host.strip("[]"))
    if problem:
        fail(problem)
    import logging
    import socket

    from taskfleet import logs
    from taskfleet.relay.main import RelayConfig, run_relay
    from taskfleet.relay.spool import SpoolError
    from taskfleet.relay.upstream import EnrollRefused

    logs.setup(log_format)
    if warning:  # the agents' secrets would cross the network in the clear
        logging.getLogger("taskfleet.relay").warning("%s", warning)
    try:
        ca_file = tls.pin_ca(state_dir, ca_file)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    config = RelayConfig(
        server=server_url,
        state_dir=state_dir,
        ca_file=ca_file,
        host=host.strip("[]") or RELAY_LISTEN.rpartition(":")[0],
        port=int(port),
        enroll_token=enroll_token,
        name=name or socket.gethostname(),
        advertise=advertise,
        tickle_port=tickle_port,
        tickle_bind=tickle_bind,
        poll_interval=poll_interval,
        retry_min=retry_min,
        retry_max=retry_max,
        content_cache_bytes=content_cache_mb * 1024 * 1024,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    try:
        run_relay(config)
    except (SpoolError, EnrollRefused) as exc:
        fail(str(exc))
    except ValueError as exc:  # a malformed --server URL
        fail(str(exc))


# -- administration: relay list | show | assign ----------------------------------------


def _stat(r: dict[str, Any], key: str) -> Any:
    value = (r.get("stats") or {}).get(key)
    return None if value is None else f"{value:g}"


@relay.command("list")
@client_options
def relay_list(server: str | None, token: str | None, as_json: bool) -> None:
    """List relays: their computers, last contact, spool, cache and forward lag."""
    rows = Api(server, token).get("/relays")
    emit(
        rows,
        as_json,
        lambda rs: print_table(
            "relays",
            [
                "id",
                "name",
                "computers",
                "via relay",
                "last contact",
                "spool",
                "cached",
                "lag (s)",
                "version",
                "revoked",
            ],
            [
                [
                    r["id"],
                    r["name"],
                    r["computers"],
                    r["computers_via_relay"],
                    when(r["last_seen_at"]),
                    _stat(r, STAT_SPOOL),
                    _stat(r, STAT_CACHED),
                    _stat(r, STAT_LAG),
                    r["version"],
                    when(r["revoked_at"]) if r["revoked_at"] else "no",
                ]
                for r in rs
            ],
        ),
    )


@relay.command("show")
@click.argument("relay_id", type=int)
@client_options
def relay_show(relay_id: int, server: str | None, token: str | None, as_json: bool) -> None:
    """Show a relay, what it last reported, and the computers behind it."""
    r = Api(server, token).get(f"/relays/{relay_id}")

    def table(r: dict[str, Any]) -> None:
        print_fields(
            f"relay {r['id']}",
            [
                ("name", r["name"]),
                ("url", r["url"]),
                ("address", r["address"]),
                ("tickle port", r["tickle_port"]),
                ("version", r["version"]),
                ("generation", r["generation"]),
                ("enrolled", when(r["enrolled_at"])),
                ("last contact", when(r["last_seen_at"])),
                ("revoked", when(r["revoked_at"]) if r["revoked_at"] else "no"),
                ("computers", r["computers"]),
                ("via relay", r["computers_via_relay"]),
                *[(f"stats: {k}", v) for k, v in sorted((r.get("stats") or {}).items())],
            ],
        )
        print_table(
            "computers behind it",
            ["id", "hostname", "last seen"],
            [[c["id"], c["hostname"], when(c["last_seen_at"])] for c in r["members"]],
        )

    emit(r, as_json, table)


@relay.command("assign")
@click.argument("relay_id", type=int)
@click.option("--group", required=True, help="The group whose computers go behind the relay.")
@client_options
def relay_assign(
    relay_id: int, group: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Put the computers of a group behind a relay (admin)."""
    out = Api(server, token).post(f"/relays/{relay_id}/assign", {"group": group})
    emit(
        out,
        as_json,
        lambda d: echo(
            f"relay {d['relay_id']}: {len(d['computers'])} computers of group {d['group']} assigned"
        ),
    )
