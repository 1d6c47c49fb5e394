"""Hands a real agent job operations through a real server (a test helper process).

Run as ``python tests/job_proxy.py --listen PORT --upstream URL --seed HEX``, where
HEX is the server's signing seed (``server_secrets.signing_seed``, read by the
test from the server's database). Why: a job is a request of type ``job``, and
the server on this branch does not create those yet (its job API is another
branch's work); this is the smallest honest stand-in. The agent talks to the
real server through this proxy (``--server`` is the proxy), which forwards
every request byte for byte, except:

* ``POST /_job`` arms it (JSON ``computer`` and ``action``). The next reply to
  that computer that carries an ``operation`` message has it replaced, under the
  same ``seq`` and for the same operation id (so the server's numbering, acks
  and the activity the result lands on stay what they are), by:
  ``job``: a job operation with ``params`` (signed with the server's key exactly
  as ``server/exchange.py`` signs: ``orders.operation_body`` with the genuine
  operation's computer, generation, policy, timeout and issue time);
  ``terminate``: a signed terminate order for operation ``op`` (the carrier
  request's activity is then never run by the agent).
* It serves job content itself (``GET /agent/v1/content/{sha}``,
  ``tests/content_server.py``): ``POST /_content`` (raw bytes) adds some,
  ``POST /_gate`` / ``/_release`` (``sha256``, ``after``) hold an answer mid-way.
* It records every message the agents send (``GET /_job``: per computer, by
  their ``seq``, the last copy of each), so a test reads the ``job-step``
  reports, which the server on this branch does not keep yet.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from taskfleet.protocol.exchange import terminate_message
from taskfleet.protocol.jobs import CONTENT_PATH
from taskfleet.protocol.orders import operation_body, terminate_body
from taskfleet.protocol.signing import Signer
from tests.content_server import ContentStore

FORWARDED = ("Content-Type", "X-Taskfleet-Computer", "Authorization")


class Jobs:
    def __init__(self, signer: Signer) -> None:
        self.lock = threading.Lock()
        self.signer = signer
        self.plans: dict[int, list[dict[str, Any]]] = {}
        self.sent: dict[int, dict[int, dict[str, Any]]] = {}  # computer -> seq -> message
        self.done: list[dict[str, Any]] = []
        self.content = ContentStore()

    def arm(self, plan: dict[str, Any]) -> None:
        with self.lock:
            self.plans.setdefault(int(plan["computer"]), []).append(plan)

    def request(self, computer: int, body: bytes) -> None:
        try:
            messages = json.loads(body).get("messages") or []
        except ValueError:
            return
        with self.lock:
            for m in messages:
                self.sent.setdefault(computer, {})[int(m["seq"])] = m

    def reply(self, computer: int, body: bytes) -> bytes:
        with self.lock:
            plans = self.plans.get(computer, [])
            if not plans:
                return body
            reply = json.loads(body)
            messages = reply.get("messages", [])
            ops = [i for i, m in enumerate(messages) if m.get("type") == "operation"]
            if not ops:
                return body
            plan = plans.pop(0)
            genuine = messages[ops[0]]
            messages[ops[0]] = self._replace(computer, plan, genuine)
            self.done.append({**plan, "seq": genuine["seq"], "carrier": genuine["op"]})
            return json.dumps(reply).encode()

    def _replace(self, computer: int, plan: dict[str, Any], genuine: dict[str, Any]) -> Any:
        payload = json.loads(genuine["body"])
        if plan["action"] == "job":
            body = operation_body(
                computer=computer,
                generation=payload["generation"],
                op=genuine["op"],
                type="job",
                params=plan["params"],
                policy=payload["policy"],
                timeout=payload["timeout"],
                issued_at=payload["issued_at"],
            )
            return {**genuine, "body": body, "sig": self.signer.sign(body)}
        if plan["action"] == "terminate":
            body = terminate_body(
                computer=computer, generation=payload["generation"], op=int(plan["op"])
            )
            return terminate_message(genuine["seq"], int(plan["op"]), body, self.signer.sign(body))
        raise ValueError(f"unknown action {plan['action']!r}")

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {
                "done": list(self.done),
                "messages": {
                    str(c): [by_seq[s] for s in sorted(by_seq)] for c, by_seq in self.sent.items()
                },
                "content": self.content.report(),
            }


def handler(upstream: urllib.parse.SplitResult, jobs: Jobs) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the agent expects

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.startswith(CONTENT_PATH):
                try:
                    jobs.content.answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the agent went away (killed)
                return
            if self.path != "/_job":
                self._send(404, b"{}")
                return
            self._send(200, json.dumps(jobs.report()).encode())

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/_job":
                jobs.arm(json.loads(body))
                self._send(200, b"{}")
                return
            if self.path == "/_content":
                self._send(200, json.dumps({"sha256": jobs.content.add(body)}).encode())
                return
            if self.path in ("/_gate", "/_release"):
                d = json.loads(body)
                if self.path == "/_gate":
                    jobs.content.gate(d["sha256"], int(d["after"]))
                else:
                    jobs.content.release(d["sha256"])
                self._send(200, b"{}")
                return
            computer = self.headers.get("X-Taskfleet-Computer")
            exchange = self.path.endswith("/exchange") and computer
            if exchange:
                jobs.request(int(computer or 0), body)
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=330)
            try:
                headers = {h: self.headers[h] for h in FORWARDED if self.headers.get(h)}
                conn.request("POST", self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                kind = answer.getheader("Content-Type") or "application/json"
            finally:
                conn.close()
            if answer.status == 200 and exchange:
                data = jobs.reply(int(computer or 0), data)
            self._send(answer.status, data, kind)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--seed", required=True, help="the server's signing seed, hex")
    args = parser.parse_args()
    jobs = Jobs(Signer(bytes.fromhex(args.seed)))
    server = ThreadingHTTPServer(
        ("127.0.0.1", args.listen), handler(urllib.parse.urlsplit(args.upstream), jobs)
    )
    server.daemon_threads = True
    print(f"job proxy on 127.0.0.1:{args.listen} -> {args.upstream}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
