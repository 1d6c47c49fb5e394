"""What agents talk to at a relay: the agent exchange and enrollment, health and metrics.

Contract: a raw ASGI app (served by uvicorn, like the server's exchange fast path in
``server/app.py``: no framework layers on the hot path).

* ``POST /agent/v1/exchange`` speaks ``protocol/exchange.py`` unchanged. The agent is
  authenticated against the roster: the SHA-256 of its secret compared in constant
  time with the roster's hash. A computer the relay never knew is answered 503
  ("retry") and the relay asks the server for its roster; one absent from its roster
  is answered 503 the same way until a roster fetched after that request confirms
  it left (moved), then 410, and the agent asks the server directly at once; a secret
  the roster refuses is answered 503 the same way until a roster fetched after that
  refusal confirms it, then 401 (a roster that is merely stale never locks an agent
  out). The body is bounded (413) and validated with ``parse_agent_request`` (400; nothing spooled).
  New messages are spooled durably BEFORE the reply (the spool's group commit: the
  exchanges of one event-loop iteration share one fsync, and each is answered once it
  is done; 500 if that commit failed, so the agent resends); the reply carries ``ack`` (the
  highest agent message the relay holds, or the server's ack if higher),
  ``server_ack`` (what the server acknowledged), cached server messages above the
  agent's ack (at most ``REPLY_MAX_BYTES``, ``more`` beyond), ``server_time`` (the
  server's clock as the relay reckons it) and the agent ``settings`` the server sent.
  A quiet request with ``wait`` is held until server messages for it arrive or the
  wait ends. A relay not enrolled yet, or refused by its server (revoked), answers
  503 so agents fail over to the server.
* Identity (docs/relays.md "Copies behind a relay"): before anything of an exchange
  is spooled, the agent's ``identity`` nonce is checked against the computer's relay
  lineage (``Spool.check_identity``, the rule of ``domain/identity.py``); a conflict,
  or a computer the server flags (roster), is answered 409 with ``"code":
  "identity-conflict"`` (the server's body) and the conflict is reported upstream;
  a fresh offer rides in the reply's ``identity``, durable before it is sent.
* ``POST /agent/v1/enroll`` is forwarded to the server's ``/relay/v1/enroll-computer``;
  the server's answer (or refusal) is passed through; 503 if it cannot be reached.
* ``GET /agent/v1/content/SHA256``: the content, authenticated exactly as the exchange
  (the roster), from the relay's cache (``relay/content.py``: fetched once from the
  server on a miss, verified before it is cached), with ``Range: bytes=N-`` (206, or
  416 beyond the size); 404 unknown content, 502 the server's bytes did not match (nothing
  cached), 503 the server cannot be reached (the agent may fetch from it directly).
* ``GET /healthz``: 200 while the relay serves agents, 503 (with the reason) otherwise.
  ``GET /metrics``: Prometheus text (``relay/metrics.py``).
* Every error is ``{"error": "..."}``; secrets never reach the log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from taskfleet.agent.http import HttpError
from taskfleet.aio import wait_set
from taskfleet.protocol.content import span, valid_sha256
from taskfleet.protocol.exchange import (
    ENROLL_PATH,
    EXCHANGE_PATH,
    MAX_BODY_BYTES,
    ProtocolError,
    loads_body,
    parse_agent_request,
)
from taskfleet.protocol.jobs import CONTENT_PATH
from taskfleet.relay import metrics
from taskfleet.relay.content import ContentCache, FetchError
from taskfleet.relay.spool import Spool, SpoolError, encode
from taskfleet.relay.upstream import Upstream
from taskfleet.settings import (
    CONTENT_CHUNK,
    ENROLL_BODY_MAX,
    IDENTITY_GRACE,
    IDENTITY_ROTATE,
    INT64_MAX,
    REPLY_MAX_BYTES,
)

log = logging.getLogger("taskfleet.relay")

REFUSAL_CODE = "identity-conflict"  # as the server's (server/identity.py)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
JSON = b"application/json"


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    """The client went away before its body arrived."""


class AgentApp:
    def __init__(self, spool: Spool, upstream: Upstream) -> None:
        self.spool = spool
        self.upstream = upstream
        self.waiters: dict[int, asyncio.Event] = {}
        self.refused_at: dict[int, float] = {}  # computer -> when its secret was first refused
        self.left_at: dict[int, float] = {}  # computer -> when it was first found off the roster
        self._commits_reported = 0
        self.content: ContentCache | None = None  # relay/content.py, set by relay/main.py

    def wake(self, ids: set[int]) -> None:
        """Server messages arrived for these computers: answer their long polls now."""
        for cid in ids:
            waiter = self.waiters.get(cid)
            if waiter is not None:
                waiter.set()

    def wake_all(self) -> None:
        for waiter in self.waiters.values():
            waiter.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        content_type = JSON
        try:
            if path == EXCHANGE_PATH:
                status, body = (
                    await self.exchange(scope, receive) if method == "POST" else _no_method()
                )
            elif path == ENROLL_PATH:
                status, body = await self.enroll(receive) if method == "POST" else _no_method()
            elif path.startswith(CONTENT_PATH):
                if method != "GET":
                    status, body = _no_method()
                else:
                    status, body = await self.content_fetch(scope, send, path[len(CONTENT_PATH) :])
                    if status == 0:
                        return  # streamed
            elif path == "/healthz" and method in ("GET", "HEAD"):
                why = self.upstream.unavailable()
                status, body = (200, b'{"status":"ok"}') if why is None else _error(503, why)
            elif path == "/metrics" and method in ("GET", "HEAD"):
                status, body, content_type = 200, self.metrics(), CONTENT_TYPE_LATEST.encode()
            else:
                status, body = _error(404, f"no such route: {path}")
        except _Gone:
            return
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", b"%d" % len(body)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def metrics(self) -> bytes:
        stats = self.spool.stats()
        metrics.SPOOLED.set(stats.spooled)
        metrics.CACHED.set(stats.cached)
        metrics.LAG.set(max(0.0, time.time() - stats.oldest) if stats.oldest else 0.0)
        metrics.COMPUTERS.set(sum(1 for c in self.spool.computers.values() if c.in_roster))
        metrics.SPOOL_COMMITS.inc(self.spool.commits - self._commits_reported)
        self._commits_reported = self.spool.commits
        return generate_latest(metrics.REGISTRY)

    # -- the exchange --------------------------------------------------------------

    async def exchange(self, scope: Scope, receive: Receive) -> tuple[int, bytes]:
        why = self.upstream.unavailable()
        if why is not None:
            return _refuse("unavailable", 503, why)
        headers = dict(scope["headers"])
        who = self.authenticate(headers)
        if isinstance(who, tuple):
            return who
        cid = who
        c = self.spool.computers[cid]
        try:
            raw = await _body(receive, headers, MAX_BODY_BYTES)
            obj = loads_body(raw)
            req = parse_agent_request(obj)
        except _TooLarge:
            return _refuse("too-large", 413, f"exchange body over {MAX_BODY_BYTES} bytes")
        except (orjson.JSONDecodeError, ProtocolError) as exc:
            return _refuse("invalid", 400, f"bad exchange: {exc}")
        rs = self.spool.relay_settings
        refused, offer = self.spool.check_identity(
            cid,
            req.identity,
            time.time(),
            rotate=float(rs.get("identity_rotate", IDENTITY_ROTATE)),
            grace=float(rs.get("identity_grace", IDENTITY_GRACE)),
        )
        if refused is not None:
            try:
                await self.spool.durable()  # the conflict is kept before it is told
            except SpoolError as exc:
                return _refuse("spool", 500, f"the relay could not store this exchange ({exc})")
            if c.identity_report is not None:
                self.upstream.forward()  # the server flags it at once
            return _refuse(
                REFUSAL_CODE,
                409,
                f"computer {cid} refused: {refused}; an administrator must decide "
                "(taskfleet computer identity-reset, or remove it)",
                code=REFUSAL_CODE,
            )
        messages = [(m["seq"], encode(m)) for m in obj.get("messages", [])]
        info = None if req.agent is None else encode(obj["agent"])
        client = scope.get("client")
        before = (c.agent_ack, c.agent_info, c.address)
        new = self.spool.receive(
            cid,
            ack=req.ack,
            messages=messages,
            agent_info=info,
            address=client[0] if client else None,
            now=time.time(),
            agent_port=None if req.agent is None else req.agent.tickle_port,
        )
        try:
            await self.spool.durable()
        except SpoolError as exc:
            return _refuse("spool", 500, f"the relay could not store this exchange ({exc})")
        metrics.AGENT_EXCHANGES.inc()
        if new:
            metrics.RECEIVED.inc(new)
        wholes = [m["seq"] for m in obj.get("messages", []) if _whole_inventory(m)]
        if wholes:
            # The agent answered the server's ask: not asked again (the agent would send
            # another whole one) unless the server asks after it has this one.
            c.whole_at = max(c.whole_at, *wholes)
            c.inventory_full = False
        # A new address too: the server tickles the agent there directly once it
        # fails over, or its relay is revoked.
        if new or before != (c.agent_ack, c.agent_info, c.address):
            self.upstream.forward()
        out, more = self.spool.down_messages(cid, req.ack, REPLY_MAX_BYTES)
        if not out and req.wait > 0 and not new and req.agent is None:
            out, more = await self._long_poll(cid, req.ack, req.wait)
        c = self.spool.computers.get(cid) or c
        if offer is not None:
            metrics.IDENTITY_OFFERS.inc()
        return 200, _reply(
            c.ack_for_agent,
            c.server_ack,
            out,
            self.upstream.server_now(),
            self.spool.settings_json,
            more,
            c.inventory_full,
            offer,
        )

    def authenticate(self, headers: dict[bytes, bytes]) -> int | tuple[int, bytes]:
        """The computer id a request comes from, checked against the roster, or the
        refusal that answers it (module docstring: 401, 503 while it is unknown or its
        absence from the roster is not confirmed, 410 once it is)."""
        raw_id = headers.get(b"x-taskfleet-computer", b"").decode("latin-1")
        cid = int(raw_id) if raw_id.isdigit() and len(raw_id) <= 19 else 0
        if not 0 < cid <= INT64_MAX:
            return _refuse("auth", 401, "missing or malformed X-Taskfleet-Computer header")
        c = self.spool.computers.get(cid)
        if c is None:
            self.upstream.want_roster()
            return _refuse("unknown", 503, "relay does not know this computer yet, retry")
        auth = headers.get(b"authorization", b"")
        digest = hashlib.sha256(auth[7:]).hexdigest() if auth.startswith(b"Bearer ") else ""
        if not hmac.compare_digest(digest, c.secret_hash):
            first = self.refused_at.setdefault(cid, time.monotonic())
            if not self.upstream.roster_confirmed_since(first):
                self.upstream.want_roster()
                return _refuse(
                    "unknown", 503, "relay is checking this computer's credentials, retry"
                )
            return _refuse("auth", 401, "unknown computer or wrong secret")
        self.refused_at.pop(cid, None)
        if not c.in_roster:
            # Absent from the last roster. That roster may predate this computer's
            # enrollment through the relay (built before, answered after): only a
            # roster fetched after this request began settles it, as for a secret.
            first = self.left_at.setdefault(cid, time.monotonic())
            if not self.upstream.roster_confirmed_since(first):
                self.upstream.want_roster()
                return _refuse("unknown", 503, "relay is checking this computer's roster, retry")
            # It left this relay (moved to another relay, or off relays): the agent
            # asks the server at once, whose reply names its relay.
            return _refuse("moved", 410, "this relay no longer serves this computer")
        self.left_at.pop(cid, None)
        return cid

    # -- content -------------------------------------------------------------------

    async def content_fetch(self, scope: Scope, send: Send, sha256: str) -> tuple[int, bytes]:
        """An agent's ``GET /agent/v1/content/SHA``: streamed from the cache (fetched
        once from the server on a miss), with Range; returns the error to send when
        nothing was sent."""
        why = self.upstream.unavailable()
        if why is not None:
            return _refuse("unavailable", 503, why)
        headers = dict(scope["headers"])
        who = self.authenticate(headers)
        if isinstance(who, tuple):
            return who
        if self.content is None:
            return _error(503, "this relay serves no content")
        if not valid_sha256(sha256):
            return _error(404, f"no content {sha256[:80]!r}: a content hash is 64 hex digits")
        try:
            async with self.content.pinned(sha256) as size:
                part = span(headers.get(b"range", b"").decode("latin-1"), size)
                hdrs = [(k.encode(), v.encode()) for k, v in part.headers().items()]
                if not part.unsatisfiable:
                    hdrs.append((b"content-type", b"application/octet-stream"))
                await send({"type": "http.response.start", "status": part.status, "headers": hdrs})
                if part.unsatisfiable:
                    await send({"type": "http.response.body", "body": b""})
                    return 0, b""
                with open(self.content.path(sha256), "rb") as f:
                    f.seek(part.start)
                    left = part.length
                    while left > 0:
                        piece = await asyncio.to_thread(f.read, min(CONTENT_CHUNK, left))
                        if not piece:
                            break
                        left -= len(piece)
                        await send(
                            {"type": "http.response.body", "body": piece, "more_body": left > 0}
                        )
                        metrics.CONTENT_SERVED_BYTES.inc(len(piece))
                if left > 0:  # the file was shorter than it was: end the response short
                    raise ConnectionError(f"content {sha256} ended {left} bytes early")
                return 0, b""
        except FetchError as exc:
            log.warning("content %s for computer %d: %s", sha256, who, exc.message)
            return _error(exc.status, exc.message)

    async def _long_poll(self, cid: int, above: int, wait: float) -> tuple[list[str], bool]:
        waiter = self.waiters.get(cid)
        if waiter is None:
            waiter = self.waiters[cid] = asyncio.Event()
        try:
            await wait_set(waiter, wait)
        finally:
            if self.waiters.get(cid) is waiter:
                del self.waiters[cid]
        if cid not in self.spool.computers:
            return [], False
        return self.spool.down_messages(cid, above, REPLY_MAX_BYTES)

    # -- enrollment ----------------------------------------------------------------

    async def enroll(self, receive: Receive) -> tuple[int, bytes]:
        why = self.upstream.unavailable()
        if why is not None:
            return _refuse("unavailable", 503, why)
        try:
            body = await _body(receive, {}, ENROLL_BODY_MAX)
        except _TooLarge:
            return _refuse("too-large", 413, f"request body over {ENROLL_BODY_MAX} bytes")
        try:
            return 201, await self.upstream.enroll_computer(body)
        except HttpError as exc:
            log.warning("the server refused an agent's enrollment (HTTP %d)", exc.status)
            return exc.status, exc.body
        except (TimeoutError, OSError) as exc:
            metrics.REFUSED.labels("server-unreachable").inc()
            log.warning("cannot forward an enrollment: server unreachable (%s)", exc)
            return _error(503, "the relay cannot reach its server; retry")


async def _body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    length = headers.get(b"content-length", b"")
    if length.isdigit() and int(length) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Gone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _reply(
    ack: int,
    server_ack: int,
    messages: list[str],
    server_time: float,
    settings: str,
    more: bool,
    inventory_full: bool = False,
    offer: str | None = None,
) -> bytes:
    return b'{"ack":%d,"server_ack":%d,"messages":[%s],"server_time":%.3f,"settings":%s%s%s%s}' % (
        ack,
        server_ack,
        ",".join(messages).encode(),
        server_time,
        settings.encode(),
        b',"more":true' if more else b"",
        b',"inventory":"full"' if inventory_full else b"",
        b',"identity":"%s"' % offer.encode() if offer else b"",
    )


def _error(status: int, message: str, code: str | None = None) -> tuple[int, bytes]:
    body = {"error": message} if code is None else {"error": message, "code": code}
    return status, orjson.dumps(body)


def _refuse(reason: str, status: int, message: str, code: str | None = None) -> tuple[int, bytes]:
    metrics.REFUSED.labels(reason).inc()
    return _error(status, message, code)


def _no_method() -> tuple[int, bytes]:
    return _error(405, "method not allowed")


def _whole_inventory(message: Any) -> bool:
    """An agent's message that carries its whole inventory (protocol/inventory.py)."""
    return (
        isinstance(message, dict)
        and message.get("type") == "inventory"
        and (message.get("full") is True)
    )
