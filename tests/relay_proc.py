"""A real ``taskfleet relay`` process for tests, against the real server.

``start_relay`` fixture: ``start(server, *extra, state_dir=None, via=None)`` makes a
relay enrollment token at ``server`` (``POST /api/v1/tokens {"kind": "relay"}``),
starts the relay on free ports (HTTP for agents, UDP for the server's tickles) and
waits until it is ready; it is stopped at the end of the test. ``via`` is another
URL for the relay to reach the server by (an :class:`HttpForwarder` in front of it).

What only a test does (a forged tickle, a lost reply, a refused entry) is done here
with the protocol's own helpers against the real processes: :meth:`Relay.tickle`
sends a datagram as the server would (with the relay's key, or another), and
:class:`HttpForwarder` passes the relay's requests to the real server and can drop
or amend one answer on the way back.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskfleet.agent.state import Identity, LocalState
from taskfleet.protocol.tickle import encode_tickle
from tests.conftest import (
    Proc,
    Server,
    _cli,
    _start_server_proc,
    activities_of,
    free_port,
    run_request,
    spawn,
    wait_until,
)
from tests.raw_agent import SCRIPTS_OK

READY = "ready: agents on"


def relay_token(server: Server, name: str = "branch") -> dict[str, Any]:
    with server.api() as api:
        r = api.post("/tokens", json={"kind": "relay", "name": name})
    assert r.status_code == 201, r.text
    return dict(r.json())


@dataclass
class Relay:
    url: str
    port: int
    tickle_port: int
    state_dir: Path
    proc: Proc
    args: list[str]
    server: Server
    token: dict[str, Any]

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

    def identity(self) -> dict[str, Any]:
        """What the relay keeps of its enrollment (its state database, read-only)."""
        db = sqlite3.connect(f"file:{self.state_dir / 'relay.db'}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()
        finally:
            db.close()
        assert row is not None, "the relay is not enrolled"
        return dict(json.loads(row[0]))

    @property
    def relay_id(self) -> int:
        return int(self.identity()["relay_id"])

    def tickle(self, key: bytes | None = None) -> None:
        """A wake-up datagram as the server sends it (with another ``key``: forged)."""
        ident = self.identity()
        key = bytes.fromhex(ident["tickle_key"]) if key is None else key
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(
                encode_tickle(key, int(ident["relay_id"]), time.time()),
                ("127.0.0.1", self.tickle_port),
            )

    def shown(self) -> dict[str, Any]:
        """The relay as the server shows it (``GET /api/v1/relays/{id}``)."""
        with self.server.api() as api:
            r = api.get(f"/relays/{self.relay_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())


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

    def start(
        server: Server, *extra: str, state_dir: Path | None = None, via: str | None = None
    ) -> Relay:
        port = free_port()
        tickle_port = free_port(socket.SOCK_DGRAM)
        state_dir = state_dir or tmp_path / f"relay-{len(relays) + 1}"
        token = relay_token(server, state_dir.name)
        args = [
            "relay",
            "--server",
            via or server.url,
            "--enroll-token",
            token["token"],
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
        scheme = "https" if "--tls-cert" in extra else "http"
        r = Relay(
            f"{scheme}://127.0.0.1:{port}",
            port,
            tickle_port,
            state_dir,
            None,  # type: ignore[arg-type]
            args,
            server,
            token,
        )
        r.proc = _spawn(r)
        relays.append(r)
        return r

    yield start
    for r in relays:
        r.proc.stop()


# -- the server's side, through its API ------------------------------------------------


def queue_script(server: Server, cid: int, argv: list[str], timeout: float = 30) -> int:
    """A script request for one computer (a real request); returns its request id."""
    return int(run_request(server, f"computer:{cid}", {"argv": argv}, timeout)["id"])


def done_activity(server: Server, request_id: int) -> dict[str, Any] | None:
    """The request's one activity once it ended (its output included), else None."""
    rows = activities_of(server, request_id)
    if len(rows) != 1 or rows[0]["state"] in ("queued", "in_progress"):
        return None
    return rows[0]


def history(server: Server, activity_id: int) -> list[tuple[str | None, str, str]]:
    with server.api() as api:
        rows = api.get(f"/activities/{activity_id}").json()["history"]
    return [(h["from_state"], h["to_state"], h["cause"]) for h in rows]


def ended_once(server: Server, request_id: int) -> dict[str, Any] | None:
    """The request's activity once ended, checked to have ended exactly once (one
    end in its history: a result recorded twice would show twice)."""
    a = done_activity(server, request_id)
    if a is None:
        return None
    ends = [h for h in history(server, a["id"]) if h[1] in ("succeeded", "failed")]
    assert len(ends) == 1, history(server, a["id"])
    return a


def gated(gate: Path) -> list[str]:
    """A script that ends once the test creates ``gate``, printing its operation id."""
    return [
        "sh",
        "-c",
        f'while [ ! -e "{gate}" ]; do sleep 0.05; done; echo "$TASKFLEET_OPERATION_ID"',
    ]


def stop_server(server: Server) -> None:
    server.proc.stop()


def start_server_again(server: Server) -> None:
    """The same server (port, data, database) started again after ``stop_server``."""
    server.proc = _start_server_proc(server)


def behind(server: Server, relay: Relay) -> list[int]:
    return [m["id"] for m in relay.shown()["members"]]


# -- agents whose state a test writes --------------------------------------------------


def enroll_through(relay: Relay, enroll_token: str, name: str) -> dict[str, Any]:
    """Enroll a computer through the real relay as an agent would (raw HTTP)."""
    body = {
        "token": enroll_token,
        "hostname": name,
        "machine_id": f"machine-{name}",
        "policy": SCRIPTS_OK,
    }
    r = httpx.post(relay.url + "/agent/v1/enroll", json=body, timeout=30)
    assert r.status_code == 201, r.text
    return dict(r.json())


def agent_state(folder: Path, url: str, enrolled: dict[str, Any], secret: str) -> Path:
    """An agent state folder that says: enrolled as ``enrolled`` (an enrollment answer),
    talking to ``url``, with ``secret`` (the right one, or not)."""
    state = LocalState(folder)
    state.save_identity(
        Identity(
            url,
            int(enrolled["computer_id"]),
            secret,
            int(enrolled["generation"]),
            bytes.fromhex(enrolled["tickle_key"]),
            str(enrolled["server_public_key"]),
        )
    )
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


# -- between the relay and the server ------------------------------------------------


class HttpForwarder:
    """Passes HTTP requests to the real server and its answers back, on a port of its
    own; a test can ``pause`` it (connections refused, as if the server were down) and
    ``amend`` the next answers to a path: the function gets the server's answer body
    and returns what the relay gets instead (``None``: the connection is cut, the
    answer lost; the server applied the request all the same), or the very same
    bytes object to let this answer pass and amend a later one."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.amends: list[tuple[str, Callable[[bytes], bytes | None]]] = []
        self.requests: list[tuple[str, bytes]] = []
        self.slow: dict[str, threading.Event] = {}  # path -> answers held until it is set
        self.in_flight: dict[str, int] = {}
        self.most_in_flight: dict[str, int] = {}  # path -> most requests at once
        self._httpd: ThreadingHTTPServer | None = None
        self._open: set[socket.socket] = set()
        self._client = httpx.Client(base_url=target, timeout=120)

    def amend(self, path: str, change: Callable[[bytes], bytes | None]) -> None:
        with self.lock:
            self.amends.append((path, change))

    def start(self) -> None:
        fwd = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                fwd._open.add(self.connection)

            def finish(self) -> None:
                fwd._open.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                keep = ("content-type", "authorization", "x-taskfleet-relay")
                headers = {k: v for k, v in self.headers.items() if k.lower() in keep}
                with fwd.lock:
                    fwd.requests.append((self.path, body))
                    n = fwd.in_flight[self.path] = fwd.in_flight.get(self.path, 0) + 1
                    fwd.most_in_flight[self.path] = max(n, fwd.most_in_flight.get(self.path, 0))
                    gate = fwd.slow.get(self.path)
                try:
                    if gate is not None:
                        gate.wait(30)
                    r = fwd._client.post(self.path, content=body, headers=headers)
                except httpx.HTTPError:
                    self._cut()
                    return
                finally:
                    with fwd.lock:
                        fwd.in_flight[self.path] -= 1
                out: bytes | None = r.content
                with fwd.lock:
                    change = next((c for p, c in fwd.amends if p == self.path), None)
                    if change is not None and r.status_code == 200:
                        out = change(r.content)
                        if out is not r.content:  # returned as it was: not this one
                            fwd.amends.remove((self.path, change))
                if out is None:
                    self._cut()
                    return
                self.send_response(r.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def _cut(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def pause(self) -> None:
        """Connections refused until ``start``."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for conn in list(self._open):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.pause()
        self._client.close()


@pytest.fixture
def forwarder() -> Iterator[Callable[[Server], HttpForwarder]]:
    made: list[HttpForwarder] = []

    def make(server: Server) -> HttpForwarder:
        f = HttpForwarder(server.url)
        f.start()
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()
