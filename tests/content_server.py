"""Content by hash over real HTTP, as a job's Download step fetches it (a test helper).

``ContentStore`` answers ``GET /agent/v1/content/{sha256}`` (``protocol/jobs.py``
CONTENT_PATH) with the bytes it holds for that hash: 200 whole, or 206 from
``Range: bytes=N-``; it wants the agent's credentials headers (401 without). A
test can make one hash answer with another status (``fail``), serve the wrong
bytes (``corrupt``), or stop after N bytes until the test releases it (``gate``:
the download is then in flight, for a terminate, a cancel or a kill -9), and
reads back every request it had (``requests``: hash, the Range start, the
computer). ``serve(store)`` runs it in a thread of the test process;
``tests/job_proxy.py`` serves it from the proxy's process.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from taskfleet.protocol.jobs import CONTENT_PATH


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ContentStore:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.blobs: dict[str, bytes] = {}
        self.failures: dict[str, int] = {}
        self.gates: dict[str, tuple[int, threading.Event]] = {}
        self.requests: list[dict[str, Any]] = []
        self.served = threading.Condition(self.lock)
        self.paused: set[str] = set()  # hashes whose answer waits at its gate now

    def add(self, data: bytes) -> str:
        sha = sha256(data)
        with self.lock:
            self.blobs[sha] = data
        return sha

    def corrupt(self, sha: str, data: bytes) -> None:
        """Serve ``data`` under ``sha`` (it does not hash to it)."""
        with self.lock:
            self.blobs[sha] = data

    def fail(self, sha: str, status: int) -> None:
        with self.lock:
            self.failures[sha] = status

    def gate(self, sha: str, after: int) -> None:
        """Answers for ``sha`` stop after ``after`` bytes until ``release``."""
        with self.lock:
            self.gates[sha] = (after, threading.Event())

    def release(self, sha: str) -> None:
        with self.lock:
            gate = self.gates.pop(sha, None)
        if gate is not None:
            gate[1].set()

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": list(self.requests), "paused": sorted(self.paused)}

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        sha = handler.path[len(CONTENT_PATH) :]
        rng = handler.headers.get("Range") or ""
        start = int(rng[len("bytes=") : -1]) if rng.startswith("bytes=") else 0
        computer = handler.headers.get("X-Taskfleet-Computer")
        with self.lock:
            self.requests.append({"sha256": sha, "start": start, "computer": computer})
            data = self.blobs.get(sha)
            status = self.failures.get(sha)
            gate = self.gates.get(sha)
        if not computer or not (handler.headers.get("Authorization") or "").startswith("Bearer "):
            status = 401
        if data is None or status is not None:
            body = b'{"error": "no such content"}'
            handler.send_response(status or 404)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        part = data[start:]
        handler.send_response(206 if start else 200)
        handler.send_header("Content-Length", str(len(part)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        if gate is not None and gate[0] - start < len(part):
            first = max(0, gate[0] - start)
            handler.wfile.write(part[:first])
            handler.wfile.flush()
            with self.lock:
                self.paused.add(sha)
            gate[1].wait(120)
            with self.lock:
                self.paused.discard(sha)
            part = part[first:]
        handler.wfile.write(part)


def content_handler(store: ContentStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.startswith(CONTENT_PATH):
                # The agent may go away mid-answer (killed, canceled).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    store.answer(self)
                return
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def serve(store: ContentStore) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``store`` on a free local port in a daemon thread; (server, base URL)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), content_handler(store))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
