"""Real relays in front of a real server, for tests of agents behind them.

``start_real_relay`` fixture: ``start(server)`` makes a relay enrollment token on
``server`` (``POST /tokens`` kind relay), starts a ``taskfleet relay`` process on free
ports with it and waits until it serves agents; ``RealRelay.kill9`` and ``restart``
(same state folder, same ports) are for outage tests; every relay is stopped at the
end of the test. ``relay_agent(start_agent, server, relay, token, *extra)`` starts a
``taskfleet agent --relay`` (short failover and probe times unless given).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Agent, Proc, Server, _cli, free_port, spawn, wait_until

READY = "ready: agents on"


@dataclass
class RealRelay:
    url: str
    state_dir: Path
    log: Path
    args: list[str]
    proc: Proc = field(init=False)

    def start(self) -> None:
        before = self.log.read_text(errors="replace").count(READY) if self.log.exists() else 0
        self.proc = spawn(_cli(*self.args), self.log)

        def ready() -> bool:
            if not self.proc.alive():
                raise AssertionError(f"relay exited:\n{self.proc.text()[-3000:]}")
            return self.proc.text().count(READY) > before

        wait_until(ready, 30, "relay to be ready")

    def kill9(self) -> None:
        self.proc.kill9()

    def restart(self) -> None:
        self.proc.stop()
        self.start()

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        key = name + (("{" + labels + "}") if labels else "")
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0


def relay_token(server: Server, name: str) -> str:
    with server.api() as api:
        r = api.post("/tokens", json={"kind": "relay", "name": name})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


@pytest.fixture
def start_real_relay(tmp_path: Path) -> Iterator[Callable[..., RealRelay]]:
    relays: list[RealRelay] = []

    def start(server: Server, *extra: str) -> RealRelay:
        name = f"relay-{len(relays) + 1}"
        port = free_port()
        state_dir = tmp_path / name
        args = [
            "relay",
            "--server",
            server.url,
            "--enroll-token",
            relay_token(server, name),
            "--state-dir",
            str(state_dir),
            "--listen",
            f"127.0.0.1:{port}",
            "--tickle-port",
            str(free_port(socket.SOCK_DGRAM)),
            "--tickle-bind",
            "127.0.0.1",
            "--name",
            name,
            # Given: the server refuses a relay enrollment without a URL (see the report).
            "--advertise",
            f"http://127.0.0.1:{port}",
            *extra,
        ]
        r = RealRelay(f"http://127.0.0.1:{port}", state_dir, tmp_path / f"{name}.log", args)
        r.start()
        relays.append(r)
        return r

    yield start
    for r in relays:
        r.proc.stop()


def relay_agent(
    start_agent: Callable[..., Agent],
    server: Server,
    relay: RealRelay,
    token: str,
    *extra: str,
    **kw: Any,
) -> Agent:
    """A real agent enrolled through ``relay`` (``--server`` stays its fallback)."""
    timing = [] if "--relay-failover-after" in extra else ["--relay-failover-after", "1"]
    timing += [] if "--relay-probe-interval" in extra else ["--relay-probe-interval", "1"]
    return start_agent(server, token, "--relay", relay.url, *timing, *extra, **kw)
