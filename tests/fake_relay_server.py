"""TEMPORARY: a test double of the server's relay endpoints, for the relay process's tests.

Issue 11 is built on two branches at once: the relay process (s5/relay-proc) and the
server side (s5/relay-server). Until they merge, the relay's tests talk to this double:
a real HTTP server on a real socket (stdlib ``ThreadingHTTPServer`` in a thread of the
test process, so a test can read what it received and steer it), speaking
``protocol/relay.py``. REPLACE it with the real ``taskfleet server`` when both
branches are merged; nothing in ``src/`` imports it.

What it does, as the design (RELAY.md) says the server will: relay enrollment
(``/relay/v1/enroll``), agent enrollment through the relay
(``/relay/v1/enroll-computer``), the relay exchange (per entry: agent messages above
what it applied are recorded once, the agent's ack drops its outbox, messages above
max(ack, have) are sent; ``resync`` forgets ``have``; other computers with messages
above ``have`` are added; the roster is sent whole when the relay's version is
stale), 401 for a revoked relay, per-entry 403 for a computer not behind it, and UDP
tickles to the relay with its key. Operations are really signed (Ed25519), so real
agents run them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from taskfleet.protocol.exchange import operation_message
from taskfleet.protocol.orders import operation_body
from taskfleet.protocol.relay import (
    MAX_RELAY_BODY_BYTES,
    RELAY_ENROLL_COMPUTER_PATH,
    RELAY_ENROLL_PATH,
    RELAY_EXCHANGE_PATH,
    parse_relay_request,
    roster_entry,
)
from taskfleet.protocol.signing import Signer, new_signing_seed
from taskfleet.protocol.tickle import derive_tickle_key, encode_tickle

RELAY_TOKEN = "tfr_fake-relay-token"
ENROLL_TOKEN = "tfe_fake-enroll-token"
AGENT_SETTINGS = {"poll_interval": 1800.0}


@dataclass
class FakeComputer:
    id: int
    generation: int
    secret: str
    tickle_key: bytes
    tickle_port: int | None
    machine_id: str
    relay_id: int | None = 1
    in_acked: int = 0  # highest agent message applied
    agent_ack: int = 0  # highest server message the agent acknowledged
    have: int = 0  # highest server message the relay holds (a hint; resync forgets it)
    outbox: dict[int, dict[str, Any]] = field(default_factory=dict)
    out_seq: int = 0
    address: str | None = None


class FakeRelayServer:
    def __init__(self, relay_poll_interval: float = 60.0) -> None:
        self.lock = threading.RLock()
        self.news = threading.Condition(self.lock)  # wakes held long polls
        self.signer = Signer(new_signing_seed())
        self.master = os.urandom(32)
        self.relay_secret: str | None = None
        self.relay_id = 1
        self.relay_key = b""
        self.relay_tickle_port: int | None = None
        self.relay_enrollments = 0
        self.revoked = False
        self.relay_poll_interval = relay_poll_interval
        self.roster_version = 1
        self.computers: dict[int, FakeComputer] = {}
        self.received: list[tuple[int, int, dict[str, Any]]] = []  # applied, once each
        self.offered: list[tuple[int, int]] = []  # every agent message in any entry
        self.requests: list[dict[str, Any]] = []  # every relay exchange body, decoded
        self.replies: list[dict[str, Any]] = []
        self.entry_status: dict[int, int] = {}  # computer -> a per-entry error to answer
        self.next_op = 1000
        self.long_polls = 0  # relay exchanges held as long polls
        self.lose_replies = 0  # apply this many relay exchanges, then hang up unanswered
        self._httpd: ThreadingHTTPServer | None = None
        self._open: set[socket.socket] = set()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    # -- running -----------------------------------------------------------------

    def start(self) -> None:
        """Listen (again) on the same port."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                fake._open.add(self.connection)

            def finish(self) -> None:
                fake._open.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length > MAX_RELAY_BODY_BYTES:
                    self._send(413, {"error": "too large"})
                    return
                body = self.rfile.read(length)
                status, out = fake.handle(self.path, dict(self.headers.items()), body)
                with fake.lock:
                    lose = self.path == RELAY_EXCHANGE_PATH and status == 200 and fake.lose_replies
                    if lose:
                        fake.lose_replies -= 1
                if lose:  # applied, but the answer never arrives
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._send(status, out)

            def _send(self, status: int, out: dict[str, Any]) -> None:
                raw = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """The server goes away: connections are refused until ``start``."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for conn in list(self._open):  # kept-alive connections go too
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # -- what tests steer and read ---------------------------------------------------

    def add_computer(self, relay: bool = True) -> FakeComputer:
        """A computer enrolled behind the relay without the relay hearing of it."""
        with self.lock:
            cid = max(self.computers, default=0) + 1
            c = FakeComputer(
                cid,
                1,
                "tfc_" + secrets.token_hex(16),
                derive_tickle_key(self.master, cid, 1),
                None,
                f"machine-{cid}",
                self.relay_id if relay else None,
            )
            self.computers[cid] = c
            self.roster_version += 1
            self.news.notify_all()
            return c

    def queue_script(self, cid: int, argv: list[str], timeout: float = 30.0) -> int:
        """A signed execute-script operation for ``cid``; returns its op id."""
        with self.lock:
            c = self.computers[cid]
            self.next_op += 1
            op = self.next_op
            body = operation_body(
                computer=cid,
                generation=c.generation,
                op=op,
                type="execute-script",
                params={"argv": argv},
                policy={"mode": "required", "interval": "once", "every": None},
                timeout=timeout,
                issued_at=time.time(),
            )
            c.out_seq += 1
            c.outbox[c.out_seq] = operation_message(c.out_seq, op, body, self.signer.sign(body))
            self.news.notify_all()
            return op

    def tickle_relay(self) -> None:
        assert self.relay_tickle_port, "the relay did not enroll with a tickle port"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(
                encode_tickle(self.relay_key, self.relay_id, time.time()),
                ("127.0.0.1", self.relay_tickle_port),
            )

    def results(self, cid: int) -> list[dict[str, Any]]:
        with self.lock:
            return [m for c, _, m in self.received if c == cid]

    def seqs(self, cid: int) -> list[int]:
        with self.lock:
            return [s for c, s, _ in self.received if c == cid]

    # -- the endpoints -------------------------------------------------------------

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        with self.lock:
            try:
                data = json.loads(body)
            except ValueError:
                return 400, {"error": "malformed JSON"}
            if path == RELAY_ENROLL_PATH:
                return self._enroll_relay(data)
            if not self._relay_ok(headers):
                return 401, {"error": "unknown relay or wrong secret"}
            if path == RELAY_ENROLL_COMPUTER_PATH:
                return self._enroll_computer(data)
            if path == RELAY_EXCHANGE_PATH:
                return self._exchange(data)
            return 404, {"error": f"no such route: {path}"}

    def _relay_ok(self, headers: dict[str, str]) -> bool:
        h = {k.lower(): v for k, v in headers.items()}
        return (
            not self.revoked
            and self.relay_secret is not None
            and h.get("x-taskfleet-relay") == str(self.relay_id)
            and h.get("authorization") == f"Bearer {self.relay_secret}"
        )

    def _enroll_relay(self, data: dict[str, Any]) -> tuple[int, Any]:
        if data.get("token") != RELAY_TOKEN:
            return 401, {"error": "invalid relay enrollment token"}
        self.relay_enrollments += 1
        self.relay_secret = "tfr_secret_" + secrets.token_hex(16)
        self.relay_key = os.urandom(32)
        self.relay_tickle_port = data.get("tickle_port")
        return 201, {
            "relay_id": self.relay_id,
            "secret": self.relay_secret,
            "generation": 1,
            "tickle_key": self.relay_key.hex(),
            "server_public_key": self.signer.public_key_hex,
            "relay_settings": {"poll_interval": self.relay_poll_interval},
        }

    def _enroll_computer(self, data: dict[str, Any]) -> tuple[int, Any]:
        if data.get("token") != ENROLL_TOKEN:
            return 401, {"error": "invalid enrollment token"}
        old = next(
            (c for c in self.computers.values() if c.machine_id == data.get("machine_id")), None
        )
        cid = old.id if old else max(self.computers, default=0) + 1
        generation = old.generation + 1 if old else 1
        c = FakeComputer(
            cid,
            generation,
            "tfc_" + secrets.token_hex(16),
            derive_tickle_key(self.master, cid, generation),
            data.get("tickle_port"),
            str(data.get("machine_id")),
        )
        self.computers[cid] = c
        self.roster_version += 1
        return 201, {
            "computer_id": cid,
            "secret": c.secret,
            "generation": generation,
            "tickle_key": c.tickle_key.hex(),
            "server_public_key": self.signer.public_key_hex,
            "settings": AGENT_SETTINGS,
            "reenrolled": old is not None,
        }

    def _exchange(self, data: dict[str, Any]) -> tuple[int, Any]:
        self.requests.append(data)
        req = parse_relay_request(data)  # a ProtocolError fails the test's server thread
        mine = {c.id: c for c in self.computers.values() if c.relay_id == self.relay_id}
        if req.resync:
            for c in mine.values():
                c.have = 0

        def quiet() -> bool:
            return (
                not req.entries
                and req.roster == str(self.roster_version)
                and not any(
                    s > max(c.agent_ack, c.have)
                    for c in self.computers.values()
                    if c.relay_id == self.relay_id
                    for s in c.outbox
                )
            )

        if req.wait and quiet():  # a long poll: held until there is work, or the wait ends
            self.long_polls += 1
            self.news.wait_for(lambda: not quiet(), timeout=req.wait)
            mine = {c.id: c for c in self.computers.values() if c.relay_id == self.relay_id}
        out: list[dict[str, Any]] = []
        errors = [{"id": e.id, "status": e.status, "error": e.error} for e in req.errors]
        answered = set()
        for e in req.entries:
            answered.add(e.id)
            c = mine.get(e.id)
            status = self.entry_status.get(e.id)
            if c is None or status:
                errors.append({"id": e.id, "status": status or 403, "error": "not yours"})
                continue
            raw = next(x for x in data["computers"] if x["id"] == e.id)
            for m in raw.get("messages", []):
                self.offered.append((c.id, m["seq"]))
                if m["seq"] > c.in_acked:
                    self.received.append((c.id, m["seq"], m))
                    c.in_acked = m["seq"]
            c.agent_ack = max(c.agent_ack, e.request.ack)
            for seq in [s for s in c.outbox if s <= c.agent_ack]:
                del c.outbox[seq]
            c.have = max(c.have, e.have)
            c.address = e.address
            out.append(self._computer_reply(c))
        for c in mine.values():
            if c.id not in answered and any(s > max(c.agent_ack, c.have) for s in c.outbox):
                out.append(self._computer_reply(c))
        reply = {
            "computers": out,
            "errors": errors,
            "roster": None
            if req.roster == str(self.roster_version)
            else {
                "version": str(self.roster_version),
                "computers": [
                    roster_entry(
                        c.id,
                        c.generation,
                        hashlib.sha256(c.secret.encode()).hexdigest(),
                        c.tickle_key.hex(),
                        c.tickle_port,
                    )
                    for c in mine.values()
                ],
            },
            "server_time": time.time(),
            "settings": AGENT_SETTINGS,
            "relay_settings": {"poll_interval": self.relay_poll_interval},
        }
        self.replies.append(reply)
        return 200, reply

    def _computer_reply(self, c: FakeComputer) -> dict[str, Any]:
        above = max(c.agent_ack, c.have)
        messages = [c.outbox[s] for s in sorted(c.outbox) if s > above]
        if messages:
            c.have = messages[-1]["seq"]
        return {"id": c.id, "ack": c.in_acked, "messages": messages}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
