"""``taskfleet demo``: a real embedded fleet on this machine, end to end.

Starts ``taskfleet server`` (SQLite file, no other service) and N real
``taskfleet agent`` processes, each with its own state folder and tickle
port, enrolled with an enrollment token; runs a real script on all of them
with a live progress bar; prints the per-computer results and how to go on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

from taskfleet.cli.client import Api, results_table, wait_for_request
from taskfleet.cli.output import print_table
from taskfleet.settings import LOGIN_LINK_TTL

DEMO_SCRIPT = """\
echo "hello from computer $TASKFLEET_COMPUTER_ID on $(uname -n), pid $$"
uname -sr
echo "load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)"
"""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise click.ClickException(f"timed out after {timeout:g}s waiting for {what}")


def run_demo(n_agents: int, workdir: Path, stay: bool) -> int:
    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = [sys.executable, "-m", "taskfleet"]
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(workdir / log, "wb") as out:
            p = subprocess.Popen(
                exe + args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        procs.append(p)
        return p

    try:
        click.echo(f"starting the server on {url} (SQLite in {workdir / 'server'}) ...")
        server = spawn(
            ["server", "--listen", f"127.0.0.1:{port}", "--data-dir", str(workdir / "server")],
            "server.log",
        )
        token_file = workdir / "server" / "admin-token"

        def server_up() -> bool:
            if server.poll() is not None:
                raise click.ClickException(f"the server exited; see {workdir / 'server.log'}")
            return token_file.exists() and _healthy(url)

        _wait("the server", server_up, 60)
        admin = token_file.read_text().strip()
        api = Api(url, admin)
        enroll = api.post("/tokens", {"kind": "enroll", "name": "demo", "max_uses": n_agents})[
            "token"
        ]
        click.echo(f"starting {n_agents} agents (each its own state folder and UDP port) ...")
        for i in range(1, n_agents + 1):
            spawn(
                [
                    "agent",
                    "--server",
                    url,
                    "--enroll-token",
                    enroll,
                    "--state-dir",
                    str(workdir / f"agent-{i}"),
                    "--tickle-port",
                    str(free_port(socket.SOCK_DGRAM)),
                    "--tickle-bind",
                    "127.0.0.1",
                    "--allow-scripts",
                    "--hostname",
                    f"demo-{i}",
                ],
                f"agent-{i}.log",
            )
        _wait(f"{n_agents} agents to enroll", lambda: len(api.get("/computers")) >= n_agents, 60)
        computers = api.get("/computers")
        api.post("/groups", {"name": "demo"})
        api.post("/groups/demo/members", {"computer_ids": [c["id"] for c in computers]})
        print_table(
            "enrolled computers",
            ["id", "hostname", "tickle port"],
            [[c["id"], c["hostname"], c["tickle_port"]] for c in computers],
        )
        click.echo("running a script on group:demo ...")
        req = api.post(
            "/requests",
            {
                "type": "execute-script",
                "target": "group:demo",
                "params": {"script": DEMO_SCRIPT},
                "timeout": 60,
            },
        )
        started = time.monotonic()
        req = wait_for_request(api, req["id"], show_progress=True)
        elapsed = time.monotonic() - started
        rows = results_table(api, req, as_json=False)
        ok = sum(a["state"] == "succeeded" for a in rows)
        click.echo(f"\n{ok}/{len(rows)} succeeded; all results recorded in {elapsed:.2f}s\n")
        click.echo(
            f"API:       {url}/api/v1  (OpenAPI: {url}/openapi.json, metrics: {url}/metrics)"
        )
        link = api.post("/login-links")
        click.echo(f"dashboard: {url}/ui/  (log in with the admin token: cat {token_file})")
        click.echo(
            f"one-time login link (valid {LOGIN_LINK_TTL / 60:g} min, once): {url}{link['path']}"
        )
        click.echo(f"admin token file: {token_file}")
        click.echo(f"logs:      {workdir}/*.log")
        # The quick start installs into .venv: name the command so it works as printed.
        tf = shutil.which("taskfleet") or str(Path(sys.executable).parent / "taskfleet")
        tf = "taskfleet" if shutil.which("taskfleet") == tf else tf
        click.echo(
            "try, in another terminal while the fleet runs:\n"
            f"  export TASKFLEET_SERVER={url} TASKFLEET_TOKEN=$(cat {token_file})\n"
            f"  {tf} computer list\n"
            f"  {tf} run --target group:demo --wait -- uname -a\n"
            f"  {tf} activity show {rows[0]['id']}"
        )
        if stay:
            click.echo("\nthe fleet keeps running; press Ctrl-C to stop it")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 0 if ok == len(rows) else 1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@click.command()
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
    sys.exit(run_demo(agents, workdir, sys.stdin.isatty() if stay is None else stay))
