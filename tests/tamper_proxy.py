"""A tampering man in the middle between real agents and a real server (a test helper).

Run as its own process: ``python tests/tamper_proxy.py --listen PORT --upstream URL``.
It forwards every request (enrollment, exchanges) to the server, byte for byte,
and remembers every ``operation`` message it sees in a reply, per computer. A
test arms it with ``POST /_tamper`` (JSON: ``computer`` and ``action``); the
next reply to that computer that carries an operation message then has that
message replaced, under the same ``seq`` (so the conversation's numbering and
the agent's ack stay what the server expects), by:

* ``alter-script``: the same message with its script changed (signature kept);
* ``replay``: the operation message seen first for this computer;
* ``retarget``: the operation message seen first for computer ``from``
  (signed for that one);
* ``cancel-unsigned``: a cancel of operation ``op`` without body or signature;
* ``cancel-wrong-key``: a cancel of ``op`` with a well-formed body for this
  computer and generation, signed with a key of the proxy's own.

``garbage`` replaces the next reply to that computer whole with text that is
not JSON. ``GET /_tamper`` returns what was done (one entry per tampering) and
which operation messages were seen. Nothing here imports the server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from taskfleet.protocol.orders import cancel_body
from taskfleet.protocol.signing import Signer, new_signing_seed

FORWARDED = ("Content-Type", "X-Taskfleet-Computer", "Authorization")


class Tamper:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.plans: dict[int, list[dict[str, Any]]] = {}
        self.seen: dict[int, list[dict[str, Any]]] = {}  # computer -> operation messages
        self.done: list[dict[str, Any]] = []
        self.stranger = Signer(new_signing_seed())

    def arm(self, plan: dict[str, Any]) -> None:
        with self.lock:
            self.plans.setdefault(int(plan["computer"]), []).append(plan)

    def reply(self, computer: int, body: bytes) -> bytes:
        with self.lock:
            plans = self.plans.get(computer, [])
            if plans and plans[0]["action"] == "garbage":
                self.done.append({**plans.pop(0), "seq": None})
                return b"<html>502 Bad Gateway (a broken relay)</html>"
            reply = json.loads(body)
            messages = reply.get("messages", [])
            ops = [i for i, m in enumerate(messages) if m.get("type") == "operation"]
            for i in ops:
                self.seen.setdefault(computer, []).append(messages[i])
            if not plans or not ops:
                return body
            plan = plans.pop(0)
            genuine = messages[ops[0]]
            messages[ops[0]] = {**self._forge(computer, plan, genuine), "seq": genuine["seq"]}
            self.done.append({**plan, "seq": genuine["seq"], "replaced_op": genuine["op"]})
            return json.dumps(reply).encode()

    def _forge(self, computer: int, plan: dict[str, Any], genuine: dict[str, Any]) -> Any:
        action = plan["action"]
        if action == "alter-script":
            payload = json.loads(genuine["body"])
            payload["params"]["script"] = plan["script"]
            return {**genuine, "body": json.dumps(payload, sort_keys=True, separators=(",", ":"))}
        if action == "replay":
            return self.seen[computer][0]
        if action == "retarget":
            return self.seen[int(plan["from"])][0]
        if action == "cancel-unsigned":
            return {"type": "cancel", "op": plan["op"]}
        if action == "cancel-wrong-key":
            generation = json.loads(genuine["body"])["generation"]
            text = cancel_body(computer=computer, generation=generation, op=plan["op"])
            return {
                "type": "cancel",
                "op": plan["op"],
                "body": text,
                "sig": self.stranger.sign(text),
            }
        raise ValueError(f"unknown action {action!r}")

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {"done": list(self.done), "seen": {str(k): v for k, v in self.seen.items()}}


def handler(upstream: urllib.parse.SplitResult, tamper: Tamper) -> type[BaseHTTPRequestHandler]:
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
            if self.path != "/_tamper":
                self._send(404, b"{}")
                return
            self._send(200, json.dumps(tamper.report()).encode())

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/_tamper":
                tamper.arm(json.loads(body))
                self._send(200, b"{}")
                return
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=330)
            try:
                headers = {h: self.headers[h] for h in FORWARDED if self.headers.get(h)}
                conn.request("POST", self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                kind = answer.getheader("Content-Type") or "application/json"
            finally:
                conn.close()
            computer = self.headers.get("X-Taskfleet-Computer")
            if answer.status == 200 and self.path.endswith("/exchange") and computer:
                data = tamper.reply(int(computer), data)
            self._send(answer.status, data, kind)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    server = ThreadingHTTPServer(
        ("127.0.0.1", args.listen), handler(urllib.parse.urlsplit(args.upstream), Tamper())
    )
    server.daemon_threads = True
    print(f"tamper proxy on 127.0.0.1:{args.listen} -> {args.upstream}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
