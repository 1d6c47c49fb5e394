"""A real ``taskfleet relay`` process for tests, and agents whose state a test writes.

``start_relay`` fixture: ``start(server_url, *extra, state_dir=None)`` starts the relay
on free ports (HTTP for agents, UDP for the server's tickles) and waits until it is
ready; it is stopped at the end of the test.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from taskfleet.agent.state import Identity, LocalState
from tests.conftest import Proc, _cli, free_port, spawn, wait_until
from tests.fake_relay_server import RELAY_TOKEN, FakeComputer

READY = "ready: agents on"


@dataclass
class Relay:
    url: str
    port: int
    tickle_port: int
    state_dir: Path
    proc: Proc
    args: list[str]

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        key = name + (("{" + labels + "}") if labels else "")
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def restart(self) -> None:
        self.proc.stop()
        self.proc = _spawn(self)


def _spawn(r: Relay) -> Proc:
    log = r.state_dir.parent / f"{r.state_dir.name}.log"
    # The log is appended across restarts: wait for one more "ready" line.
    before = log.read_text(errors="replace").count(READY) if log.exists() else 0
    proc = spawn(_cli(*r.args), log)

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"relay exited:\n{proc.text()[-3000:]}")
        return proc.text().count(READY) > before

    wait_until(ready, 30, "relay to be ready")
    return proc


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    relays: list[Relay] = []

    def start(server_url: str, *extra: str, state_dir: Path | None = None) -> Relay:
        port = free_port()
        tickle_port = free_port(socket.SOCK_DGRAM)
        state_dir = state_dir or tmp_path / f"relay-{len(relays) + 1}"
        args = [
            "relay",
            "--server",
            server_url,
            "--enroll-token",
            RELAY_TOKEN,
            "--state-dir",
            str(state_dir),
            "--listen",
            f"127.0.0.1:{port}",
            "--tickle-port",
            str(tickle_port),
            "--tickle-bind",
            "127.0.0.1",
            "--name",
            state_dir.name,
            *extra,
        ]
        r = Relay(f"http://127.0.0.1:{port}", port, tickle_port, state_dir, None, args)  # type: ignore[arg-type]
        r.proc = _spawn(r)
        relays.append(r)
        return r

    yield start
    for r in relays:
        r.proc.stop()


def agent_state(folder: Path, relay: Relay, c: FakeComputer, public_key: str, secret: str) -> Path:
    """An agent state folder that says: enrolled as ``c``, talking to ``relay``."""
    state = LocalState(folder)
    state.save_identity(Identity(relay.url, c.id, secret, c.generation, c.tickle_key, public_key))
    state.close()
    return folder


def raw_exchange(
    relay: Relay, cid: int, secret: str, body: object = None, **kw: object
) -> httpx.Response:
    """One agent exchange with the relay over raw HTTP (``content=`` for raw bytes)."""
    headers = {"X-Taskfleet-Computer": str(cid), "Authorization": f"Bearer {secret}"}
    if "content" in kw:
        return httpx.post(relay.url + "/agent/v1/exchange", headers=headers, timeout=30, **kw)  # type: ignore[arg-type]
    return httpx.post(
        relay.url + "/agent/v1/exchange",
        json={"ack": 0} if body is None else body,
        headers=headers,
        timeout=30,
    )
