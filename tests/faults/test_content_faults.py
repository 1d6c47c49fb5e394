"""Content at a real relay when things go wrong (issue 12): the relay killed (SIGKILL)
in the middle of fetching content from the server restarts and never serves a partial
file; a server whose bytes do not match the hash gets the agent a 502 and nothing is
cached. Between the relay and the real server sits a small proxy of this test's own
that passes everything through, except that it can stall or corrupt a content fetch."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskfleet.protocol.jobs import RELAY_CONTENT_PATH
from tests.acceptance.test_cli import tf
from tests.conftest import Server, enroll_token, free_port, wait_until
from tests.relay_proc import Relay, enroll_through, start_relay

__all__ = ["start_relay"]  # the fixture, used by name

SIZE = 3_000_000


class ContentProxy:
    """Passes the relay's requests to the server; a content fetch can be ``stall``ed
    (the first half sent, then held until ``release``, then cut) or ``corrupt``ed (one
    byte flipped, the length kept)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = "pass"
        self.release = threading.Event()
        self.stalled = threading.Event()
        self.fetches = 0
        self.client = httpx.Client(base_url=target, timeout=120)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _headers(self) -> dict[str, str]:
                skip = ("host", "content-length", "connection")
                return {k: v for k, v in self.headers.items() if k.lower() not in skip}

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                r = proxy.client.post(self.path, content=body, headers=self._headers())
                self._answer(r.status_code, {"Content-Type": "application/json"}, r.content)

            def do_GET(self) -> None:
                r = proxy.client.get(self.path, headers=self._headers())
                body = r.content
                if self.path.startswith(RELAY_CONTENT_PATH) and r.status_code == 200:
                    proxy.fetches += 1
                    if proxy.mode == "corrupt":
                        body = body[:-1] + bytes([body[-1] ^ 1])
                    elif proxy.mode == "stall":
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        proxy.stalled.set()
                        proxy.release.wait(60)
                        self.close_connection = True
                        with contextlib.suppress(OSError):
                            self.connection.shutdown(socket.SHUT_RDWR)
                        return
                self._answer(r.status_code, {"Content-Type": r.headers["content-type"]}, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.client.close()


@pytest.fixture
def proxied(server: Server, start_relay: Any, tmp_path: Path) -> Iterator[tuple[Relay, Any]]:
    """A real relay reaching the real server through a ContentProxy; one computer
    enrolled through it; content of SIZE bytes added."""
    proxy = ContentProxy(server.url)
    relay = start_relay(server, via=proxy.url)
    agent = enroll_through(relay, enroll_token(server), "pc")
    data = bytes(range(251)) * (SIZE // 251) + b"x" * (SIZE % 251)
    path = tmp_path / "kb.msu"
    path.write_bytes(data)
    tf(server, "content", "add", str(path))
    sha = hashlib.sha256(data).hexdigest()
    yield relay, (proxy, agent, sha, data)
    proxy.close()


def _fetch(relay: Relay, agent: dict[str, Any], sha: str, timeout: float = 30) -> httpx.Response:
    headers = {
        "X-Taskfleet-Computer": str(agent["computer_id"]),
        "Authorization": f"Bearer {agent['secret']}",
    }
    return httpx.get(f"{relay.url}/agent/v1/content/{sha}", headers=headers, timeout=timeout)


def _cache(relay: Relay) -> list[str]:
    folder = relay.state_dir / "content"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_relay_killed_mid_fetch_never_serves_a_partial_file(
    proxied: tuple[Relay, Any],
) -> None:
    relay, (proxy, agent, sha, data) = proxied
    proxy.mode = "stall"
    asked: dict[str, Any] = {}

    def ask() -> None:
        with contextlib.suppress(httpx.HTTPError):
            asked["r"] = _fetch(relay, agent, sha, timeout=60)

    waiting = threading.Thread(target=ask, daemon=True)
    waiting.start()
    assert proxy.stalled.wait(30), "the relay never fetched the content"
    # Half the bytes are in the relay's temporary file; none under the content's name.
    wait_until(lambda: [n for n in _cache(relay) if n.startswith(".fetch-")], 10, "a partial fetch")
    assert sha not in _cache(relay)
    relay.proc.kill9()
    waiting.join(30)
    assert "r" not in asked or asked["r"].status_code != 200  # the agent got no content

    proxy.mode = "pass"
    proxy.release.set()
    relay.restart()
    assert _cache(relay) == []  # the partial fetch is gone at start
    r = _fetch(relay, agent, sha)
    assert r.status_code == 200 and r.content == data
    assert _cache(relay) == [sha]
    assert (relay.state_dir / "content" / sha).read_bytes() == data


def test_bytes_that_do_not_match_their_hash_are_502_and_not_cached(
    proxied: tuple[Relay, Any],
) -> None:
    relay, (proxy, agent, sha, data) = proxied
    proxy.mode = "corrupt"
    r = _fetch(relay, agent, sha)
    assert r.status_code == 502, r.text
    assert "nothing cached" in r.json()["error"]
    assert _cache(relay) == []
    assert relay.metric("taskfleet_relay_content_fetch_failures_total", 'status="502"') == 1
    # Not cached, so the next request fetches again: a server that is right now is believed.
    proxy.mode = "pass"
    r = _fetch(relay, agent, sha)
    assert r.status_code == 200 and r.content == data
    assert proxy.fetches == 2 and _cache(relay) == [sha]
