"""The relay's side of the server: enrollment, agent enrollment forwarding, the relay exchange.

Contract (wire format: ``protocol/relay.py``):

* First start: ``POST /relay/v1/enroll`` with the enrollment token; the identity (id,
  secret, tickle key, server key) is kept in the spool, never logged. A refusal (4xx)
  ends the process with the server's reason; an unreachable server is retried.
* One relay exchange carries every computer with news (spooled messages, a new agent
  ack, address or agent info): at start, at once when agents sent something (whatever
  arrives during an exchange goes in the next one: coalesced), when the server tickles,
  every ``poll_interval`` (``relay_settings``, default ``settings.RELAY_POLL_INTERVAL``),
  and again at once when the reply says ``more`` or a request could not carry
  everything (``MAX_RELAY_COMPUTERS`` entries, ``RELAY_SEND_BUDGET`` bytes of messages).
  Without UDP (``--tickle-port 0``) a quiet exchange is a long poll, abandoned when
  agents bring news.
* The reply is applied in one spool transaction (``Spool.apply``); then the computers
  that got server messages are handed to ``on_news`` (wake their long polls, tickle
  their agents).
* Failures: the server unreachable or 5xx -> exponential backoff
  (``RELAY_RETRY_MIN``..``RELAY_RETRY_MAX``), cut short by an authenticated tickle
  from the server (a server that starts tickles its relays, so results spooled during
  an outage reach it within seconds of its return), and the next request says ``resync``
  (its reply may have been lost: the server resends what the agents have not acked;
  the spool drops duplicates by seq). The first exchange after a start says
  ``resync`` too. A 401 means the relay was revoked: it is logged, kept in the spool,
  agents are answered 503 (so they fail over to the server) and the server is asked
  again every ``RELAY_REVOKED_RETRY``; a later success lifts it.
* Per-entry refusals: 400 and 403 drop that computer's spooled messages (logged as an
  error: the server will never take them from this relay); 5xx keeps them and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from taskfleet import __version__
from taskfleet.agent.http import Connection, HttpError, Streamed, stream_get
from taskfleet.aio import wait_set
from taskfleet.protocol.exchange import MAX_MESSAGES, ProtocolError
from taskfleet.protocol.jobs import RELAY_CONTENT_PATH
from taskfleet.protocol.relay import (
    MAX_RELAY_COMPUTERS,
    RELAY_ENROLL_COMPUTER_PATH,
    RELAY_ENROLL_PATH,
    RELAY_EXCHANGE_PATH,
    parse_relay_reply,
    relay_enroll_body,
    relay_entry,
    relay_request,
    relay_stats,
)
from taskfleet.relay import metrics
from taskfleet.relay.spool import RelayIdentity, Sent, Spool
from taskfleet.settings import (
    LONG_POLL_WAIT,
    RELAY_CONTENT_TIMEOUT,
    RELAY_ENROLL_CONCURRENCY,
    RELAY_HTTP_TIMEOUT,
    RELAY_MAX_RESPONSE,
    RELAY_POLL_INTERVAL,
    RELAY_RETRY_MAX,
    RELAY_RETRY_MIN,
    RELAY_REVOKED_RETRY,
    RELAY_ROSTER_REFRESH_MIN,
    RELAY_SEND_BUDGET,
)

log = logging.getLogger("taskfleet.relay")


class _Stale(Exception):
    """A kept-alive connection to the server was found closed mid-request."""


class EnrollRefused(Exception):
    """The relay cannot enroll (refused, no token, a malformed answer): the process ends
    with the reason."""


@dataclass
class UpstreamConfig:
    server: str
    enroll_token: str | None
    name: str
    advertise: str | None
    tickle_port: int  # 0: no UDP from the server, long-poll instead
    poll_interval: float | None = None  # None: what the server says (relay_settings)
    retry_min: float = RELAY_RETRY_MIN  # backoff while the server is unreachable ...
    retry_max: float = RELAY_RETRY_MAX  # ... doubling up to this


@dataclass
class _Request:
    body: bytes
    sent: dict[int, Sent]
    complete: bool  # every computer with news had all its news in it


class Upstream:
    def __init__(self, spool: Spool, config: UpstreamConfig) -> None:
        self.spool = spool
        self.config = config
        self.ident = spool.identity()
        server = self.ident.server if self.ident else config.server
        if self.ident is not None and self.ident.server != config.server:
            log.warning(
                "state folder was enrolled with %s; talking to it, not %s",
                self.ident.server,
                config.server,
            )
        self.conn = Connection(server, timeout=RELAY_HTTP_TIMEOUT, max_response=RELAY_MAX_RESPONSE)
        self.enroll_conn = Connection(server, timeout=RELAY_HTTP_TIMEOUT)
        # Agents' enrollments forwarded at once, each on a pooled connection of its own.
        self.enroll_slots = asyncio.Semaphore(RELAY_ENROLL_CONCURRENCY)
        self.enroll_pool: list[Connection] = []
        self.trigger = asyncio.Event()
        # Set by an authenticated tickle from the server: it is up, so a backoff ends.
        self.tickled = asyncio.Event()
        self.resync = True  # a (re)start: the server's idea of what the relay holds may be off
        self.offset = 0.0  # server clock - local clock, from the last reply
        self.confirmed_at = -math.inf  # monotonic start of the last exchange that succeeded
        self.roster_wanted = False
        self.roster_asked_at = -math.inf
        self.reachable = False
        self.on_news: Callable[[set[int]], None] = lambda cids: None
        self.on_offset: Callable[[float], None] = lambda offset: None
        self.exchanges = 0
        self.idle_answer = False  # the last long poll came back at once with nothing

    # -- what agents see ---------------------------------------------------------

    def unavailable(self) -> str | None:
        """Why agents cannot be served now (answered with 503), or None."""
        if self.ident is None:
            return "this relay is not enrolled with its server yet; retry"
        if self.spool.revoked:
            return "this relay was refused by its server (revoked); use the server directly"
        return None

    def server_now(self) -> float:
        return time.time() + self.offset

    def forward(self) -> None:
        """Agents brought news: exchange at once (coalesced with whatever comes meanwhile)."""
        self.trigger.set()

    def server_tickled(self) -> None:
        """An authenticated tickle from the server: exchange now, even mid-backoff (a
        server that starts tickles its relays, so spooled results go home at once)."""
        self.tickled.set()
        self.trigger.set()

    def want_roster(self) -> None:
        """An agent the roster does not know (or whose secret it refuses): ask the server
        for the whole roster soon, at most every RELAY_ROSTER_REFRESH_MIN."""
        if self.roster_wanted:
            return
        self.roster_wanted = True
        wait = self.roster_asked_at + RELAY_ROSTER_REFRESH_MIN - time.monotonic()
        if wait <= 0:
            self.trigger.set()
        else:
            asyncio.get_running_loop().call_later(wait, self.trigger.set)

    def roster_confirmed_since(self, moment: float) -> bool:
        """Whether an exchange that started after ``moment`` (monotonic) succeeded: the
        server sends the roster whenever the relay's is stale, so the roster is then
        known to be current."""
        return self.confirmed_at > moment

    @property
    def poll_interval(self) -> float:
        if self.config.poll_interval is not None:
            return self.config.poll_interval
        value = self.spool.relay_settings.get("poll_interval")
        if isinstance(value, int | float) and math.isfinite(value) and value > 0:
            return float(value)
        return RELAY_POLL_INTERVAL

    def _headers(self) -> dict[str, str]:
        assert self.ident is not None
        return {
            "X-Taskfleet-Relay": str(self.ident.relay_id),
            "Authorization": f"Bearer {self.ident.secret}",
        }

    # -- enrollment ----------------------------------------------------------------

    async def enroll(self, stopping: asyncio.Event) -> RelayIdentity | None:
        """Enroll (retrying while the server is unreachable); None if stopped meanwhile."""
        cfg = self.config
        if not cfg.enroll_token:
            raise EnrollRefused(
                f"this relay is not enrolled (state folder {self.spool.folder}); give "
                "--enroll-token"
            )
        body = orjson.dumps(
            relay_enroll_body(
                cfg.enroll_token,
                cfg.name,
                url=cfg.advertise,
                tickle_port=cfg.tickle_port or None,
                version=__version__,
            )
        )
        delay = cfg.retry_min
        while True:
            try:
                raw = await self.enroll_conn.post(RELAY_ENROLL_PATH, body, {})
                break
            except HttpError as exc:
                if 400 <= exc.status < 500:
                    raise EnrollRefused(f"relay enrollment refused: {error_text(exc)}") from None
                log.warning("relay enrollment failed (%s); retrying in %.0fs", exc, delay)
            except (TimeoutError, OSError) as exc:
                log.warning(
                    "server %s unreachable (%s); retrying enrollment in %.0fs",
                    cfg.server,
                    exc or type(exc).__name__,
                    delay,
                )
            await wait_set(stopping, delay)
            if stopping.is_set():
                return None
            delay = min(delay * 2, cfg.retry_max)
        try:
            d = json.loads(raw)
            ident = RelayIdentity(
                cfg.server,
                int(d["relay_id"]),
                str(d["secret"]),
                int(d.get("generation", 1)),
                bytes.fromhex(d["tickle_key"]),
                str(d["server_public_key"]),
            )
            relay_settings = d.get("relay_settings") or {}
        except (ValueError, KeyError, TypeError) as exc:
            raise EnrollRefused(f"the server's enrollment answer is malformed: {exc}") from None
        self.spool.save_identity(ident, relay_settings if isinstance(relay_settings, dict) else {})
        self.ident = ident
        log.info("enrolled as relay %d with %s", ident.relay_id, cfg.server)
        return ident

    def _enroll_connection(self) -> Connection:
        server = self.ident.server if self.ident else self.config.server
        return Connection(server, timeout=RELAY_HTTP_TIMEOUT)

    async def enroll_computer(self, body: bytes) -> bytes:
        """Forward an agent's enrollment; the roster learns the computer at once (its
        secret's hash, from the answer), so the agent is served before the next roster.
        Raises HttpError (the server's answer) or OSError/TimeoutError (unreachable)."""
        async with self.enroll_slots:
            # A connection of its own per enrollment in flight (kept for the next):
            # agents enrolling together are forwarded side by side, not queued behind
            # one connection until they time out and enroll again.
            conn = self.enroll_pool.pop() if self.enroll_pool else self._enroll_connection()
            try:
                raw = await conn.post(RELAY_ENROLL_COMPUTER_PATH, body, self._headers())
            except BaseException:
                await conn.close()
                raise
            self.enroll_pool.append(conn)
        try:
            d = json.loads(raw)
            port = json.loads(body).get("tickle_port")
            self.spool.enrolled(
                int(d["computer_id"]),
                int(d["generation"]),
                hashlib.sha256(str(d["secret"]).encode()).hexdigest(),
                bytes.fromhex(d["tickle_key"]),
                port if type(port) is int and 0 < port < 65536 else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # The agent gets the answer anyway; the roster brings the computer later.
            log.warning("could not read the server's enrollment answer (%s)", exc)
        return raw

    # -- content -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def open_content(self, sha256: str) -> AsyncIterator[Streamed]:
        """The server's answer to ``GET /relay/v1/content/SHA`` (relay/content.py), body
        unread, on a connection of its own: never on ``conn`` or an enrollment
        connection, which carry one request at a time (a transfer of minutes there
        would hold up every exchange, or an enrollment)."""
        if self.ident is None:
            raise ConnectionError("this relay is not enrolled yet")
        async with stream_get(
            self.ident.server,
            RELAY_CONTENT_PATH + sha256,
            self._headers(),
            timeout=RELAY_CONTENT_TIMEOUT,
        ) as answer:
            yield answer

    # -- the loop ------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        if self.ident is None and await self.enroll(stopping) is None:
            return
        delay = self.config.retry_min
        self.trigger.set()
        while True:
            if self.spool.revoked:
                timeout = RELAY_REVOKED_RETRY
            elif not self.config.tickle_port:
                # The long poll itself waits; a server that answers one at once with
                # nothing must not turn it into a busy loop.
                timeout = RELAY_RETRY_MIN if self.idle_answer else 0.0
            else:
                timeout = self.poll_interval
            if timeout:
                await wait_set(self.trigger, timeout)
            self.trigger.clear()
            self.tickled.clear()
            try:
                await self.exchange_once()
                delay = self.config.retry_min
                continue
            except _Stale:
                metrics.UPSTREAM_FAILURES.labels("connection-closed").inc()
                log.info("the server closed the connection mid-exchange; asking again (resync)")
                self.resync = True
                self.trigger.set()
                continue
            except HttpError as exc:
                self.resync = True
                if exc.status == 401:
                    metrics.UPSTREAM_FAILURES.labels("revoked").inc()
                    if not self.spool.revoked:
                        log.error(
                            "the server refused this relay (%s): it was revoked or removed. "
                            "Agents are answered 503 and fail over to the server; "
                            "asking again every %gs",
                            error_text(exc),
                            RELAY_REVOKED_RETRY,
                        )
                        self.spool.set_revoked(True)
                    continue
                metrics.UPSTREAM_FAILURES.labels(f"http-{exc.status // 100}xx").inc()
                log.warning("relay exchange refused: %s; retrying in %.0fs", error_text(exc), delay)
            except (TimeoutError, OSError, ProtocolError, ValueError) as exc:
                self.resync = True
                self.reachable = False
                reason = "invalid-reply" if isinstance(exc, ValueError) else "unreachable"
                metrics.UPSTREAM_FAILURES.labels(reason).inc()
                log.warning(
                    "relay exchange with %s failed (%s: %s); %d messages spooled; "
                    "retrying in %.0fs",
                    self.conn.host,
                    type(exc).__name__,
                    exc,
                    self.spool.stats().spooled,
                    delay,
                )
            # A tickle since this try began (the server just started) ends the wait.
            await _first(stopping, self.tickled, timeout=delay * random.uniform(0.8, 1.2))
            tickled = self.tickled.is_set()
            delay = self.config.retry_min if tickled else min(delay * 2, self.config.retry_max)
            self.trigger.set()

    async def exchange_once(self) -> None:
        """One relay exchange: build, send, apply; raises what the caller backs off on."""
        started = time.monotonic()
        roster_refresh = self.roster_wanted
        if roster_refresh:
            self.roster_wanted = False
            self.roster_asked_at = started
        request = self.build(roster_refresh)
        long_poll = not self.config.tickle_port and not request.sent and not self.spool.revoked
        body = request.body
        wait = LONG_POLL_WAIT if long_poll else 0.0
        if wait:
            body = body[:-1] + b',"wait":%d}' % wait
        reused = self.conn.connected
        post = asyncio.ensure_future(
            self.conn.post(
                RELAY_EXCHANGE_PATH,
                body,
                self._headers(),
                timeout=RELAY_HTTP_TIMEOUT + wait,
                retry_stale=False,
            )
        )
        if wait:
            # Abandon the long poll as soon as agents bring something.
            news = asyncio.ensure_future(self.trigger.wait())
            done, _ = await asyncio.wait({post, news}, return_when=asyncio.FIRST_COMPLETED)
            news.cancel()
            if post not in done:
                post.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await post
                self.resync = True  # its answer, if the server sent one, is lost
                if roster_refresh:
                    self.roster_wanted = True
                return
        try:
            raw = await post
        except BaseException as exc:
            if roster_refresh:
                self.roster_wanted = True
            if reused and isinstance(exc, ConnectionError):
                # The kept-alive connection was closed: by the server going idle, or
                # after it applied the request (its answer lost). Ask again at once,
                # with resync, rather than resend blindly.
                raise _Stale from exc
            raise
        reply = parse_relay_reply(orjson.loads(raw))
        self.offset = reply.server_time - time.time() if reply.server_time else self.offset
        self.on_offset(self.offset)
        applied = self.spool.apply(reply, request.sent)
        self.idle_answer = bool(
            wait
            and time.monotonic() - started < RELAY_RETRY_MIN
            and not (reply.computers or reply.errors or reply.roster or reply.more)
        )
        self.exchanges += 1
        metrics.UPSTREAM.inc()
        metrics.FORWARDED.inc(applied.forwarded)
        self.resync = False
        self.reachable = True
        self.confirmed_at = started
        if self.spool.revoked:
            log.info("the server accepts this relay again: serving agents")
            self.spool.set_revoked(False)
        for err in reply.errors:
            self._entry_refused(err.id, err.status, err.error, applied.dropped.get(err.id, 0))
        if applied.new_down:
            self.on_news(applied.new_down)
        if applied.more or not request.complete:
            self.trigger.set()
        elif applied.retry:
            asyncio.get_running_loop().call_later(RELAY_RETRY_MIN, self.trigger.set)

    def _entry_refused(self, cid: int, status: int, error: str, dropped: int) -> None:
        if status >= 500:
            log.warning("server could not apply computer %d's entry (%s); retrying", cid, error)
            return
        if dropped:
            metrics.DROPPED.inc(dropped)
        log.error(
            "server refused computer %d's entry (%d: %s); %d spooled messages of it dropped",
            cid,
            status,
            error,
            dropped,
        )

    def build(self, roster_refresh: bool = False) -> _Request:
        """The next relay request: every computer with news, within the limits; agent
        messages spliced in as they were spooled (their exact text)."""
        entries: list[bytes] = []
        sent: dict[int, Sent] = {}
        size = 0
        complete = True
        for c in self.spool.computers.values():
            if not c.has_news:
                continue
            if len(entries) >= MAX_RELAY_COMPUTERS or size >= RELAY_SEND_BUDGET:
                complete = False
                break
            texts = self.spool.up_messages(
                c.id, MAX_MESSAGES, RELAY_SEND_BUDGET - size, at_least_one=not entries
            )
            if len(texts) < c.spooled:
                complete = False
                if not texts:
                    break  # the next request carries it
            entry = relay_entry(
                c.id,
                ack=c.agent_ack,
                have=c.have,
                messages=[orjson.Fragment(t) for t in texts],
                agent=orjson.Fragment(c.agent_info) if c.agent_info else None,
                address=c.address,
                seen=c.seen,
                conflict=c.identity_report,  # until a roster shows the server flags it
            )
            encoded = orjson.dumps(entry)
            entries.append(encoded)
            size += len(encoded)
            sent[c.id] = Sent(c.generation, c.agent_ack, c.address, c.agent_info, len(texts))
        stats = self.spool.stats()
        body = orjson.dumps(
            relay_request(
                [],
                roster="" if roster_refresh else self.spool.roster_version,
                resync=self.resync,
                stats=relay_stats(
                    spool=stats.spooled,
                    cached=stats.cached,
                    lag=round(time.time() - stats.oldest, 3) if stats.oldest else 0.0,
                    computers=sum(1 for c in self.spool.computers.values() if c.in_roster),
                ),
            )
        )
        # relay_request puts "computers" right after "roster": splice the entries in.
        body = body.replace(b'"computers":[]', b'"computers":[' + b",".join(entries) + b"]", 1)
        return _Request(body, sent, complete)


def error_text(exc: HttpError) -> str:
    try:
        value: Any = json.loads(exc.body)
        return str(value.get("error") or value.get("detail") or exc)
    except (ValueError, AttributeError):
        return str(exc)


async def _first(*events: asyncio.Event, timeout: float) -> None:
    """Wait until one of ``events`` is set, or ``timeout`` seconds."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
