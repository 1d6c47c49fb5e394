"""UDP wake-ups at the relay: from the server to the relay, from the relay to its agents.

Contract (datagram and checks: ``protocol/tickle.py``):

* In: the server tickles the relay (the relay's id in the id field, the relay's own
  tickle key) on ``--tickle-port``. A tickle that passes ``TickleVerifier`` (MAC,
  skew against the server's clock, replay, at most one per ``TICKLE_MIN_INTERVAL``)
  makes the relay exchange at once; one inside the interval is acted on when it is
  over; anything else is dropped and counted. The newest accepted timestamp is kept
  in the spool, so a tickle captured before a restart stays refused after it.
* Out: after a reply brought server messages for some computers, the relay tickles
  each of their agents: its tickle key from the roster, the address the relay last
  heard it from, its tickle port (the agent's own word, else the roster's). Paced by a
  relay-wide token bucket (``relay_settings.tickle_rate``, default ``TICKLE_RATE``)
  and at most one per computer per ``TICKLE_MIN_INTERVAL`` (one asked for inside the
  interval is sent when it is over), so a tickle never amplifies traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from taskfleet.protocol.tickle import (
    PerComputerLimiter,
    TicklePacer,
    TickleVerifier,
    encode_tickle,
)
from taskfleet.relay import metrics
from taskfleet.relay.spool import Computer, Spool
from taskfleet.settings import TICKLE_MAX_SKEW, TICKLE_MIN_INTERVAL, TICKLE_RATE

log = logging.getLogger("taskfleet.relay")


class ServerTickles(asyncio.DatagramProtocol):
    """Tickles from the server: each accepted one calls ``wake``."""

    def __init__(self, spool: Spool, key: bytes, relay_id: int, wake: Callable[[], None]) -> None:
        self.spool = spool
        self.wake = wake
        self.verifier = TickleVerifier(
            key,
            relay_id,
            max_skew=TICKLE_MAX_SKEW,
            min_interval=TICKLE_MIN_INTERVAL,
            replay_floor_ms=spool.tickle_high_water_ms,
        )
        self.later: asyncio.TimerHandle | None = None
        self.last_log = -1e9

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        before = dict(self.verifier.drops)
        high = self.verifier.high_water_ms
        accepted = self.verifier.accept(data, time.time())
        if self.verifier.high_water_ms > high:
            self.spool.save_tickle_high_water(self.verifier.high_water_ms)
        if accepted:
            metrics.TICKLES_IN.labels("accepted").inc()
            self.wake()
            return
        reason = next((k for k, v in self.verifier.drops.items() if v != before.get(k)), "?")
        metrics.TICKLES_IN.labels(reason).inc()
        if reason == "rate-limited":
            if self.later is None:
                # Valid, but inside the interval: exchange once it is over.
                def again() -> None:
                    self.later = None
                    self.wake()

                self.later = asyncio.get_running_loop().call_later(TICKLE_MIN_INTERVAL, again)
            return
        now = time.monotonic()
        if now - self.last_log >= 1.0:  # say why, without letting a flood flood the log
            self.last_log = now
            log.warning("tickle from %s dropped (%s)", addr[0], reason)


class AgentTickler:
    """Wakes the agents behind the relay; ``wake(ids)`` queues, one task sends."""

    def __init__(
        self,
        spool: Spool,
        server_now: Callable[[], float],
        *,
        rate: float = TICKLE_RATE,
        min_interval: float = TICKLE_MIN_INTERVAL,
    ) -> None:
        self.spool = spool
        self.server_now = server_now
        self.pacer = TicklePacer(rate)
        self.limiter = PerComputerLimiter(min_interval)
        self.min_interval = min_interval
        self._pending: deque[int] = deque()
        self._queued: set[int] = set()
        self._deferred: set[int] = set()
        self._event = asyncio.Event()
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._task = asyncio.create_task(self._loop(), name="agent-tickler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sock:
            self._sock.close()

    def set_rate(self, rate: float) -> None:
        if rate != self.pacer.rate:
            self.pacer = TicklePacer(rate)

    def set_min_interval(self, seconds: float) -> None:
        """The server's ``tickle_min_interval`` (``relay_settings``): per computer."""
        if seconds != self.min_interval:
            self.min_interval = seconds
            self.limiter = PerComputerLimiter(seconds)

    def wake(self, ids: set[int]) -> None:
        for cid in ids:
            if cid not in self._queued:
                self._queued.add(cid)
                self._pending.append(cid)
        if self._pending:
            self._event.set()

    def _defer(self, cid: int) -> None:
        if cid in self._deferred:
            return
        self._deferred.add(cid)

        def again() -> None:
            self._deferred.discard(cid)
            self.wake({cid})

        asyncio.get_running_loop().call_later(self.min_interval, again)

    async def _loop(self) -> None:
        while True:
            try:
                await self._send_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("agent tickler failed; going on")  # never die silently
                if self._pending:
                    self._event.set()

    async def _send_pending(self) -> None:
        assert self._sock is not None
        while True:
            await self._event.wait()
            self._event.clear()
            while self._pending:
                cid = self._pending.popleft()
                self._queued.discard(cid)
                c = self.spool.computers.get(cid)
                port = _tickle_port(c) if c else None
                if c is None or not c.in_roster or not c.address or not port:
                    continue  # its own poll (or long poll) fetches the work
                now = time.monotonic()
                if not self.limiter.allow(cid, now):
                    self._defer(cid)
                    continue
                wait = self.pacer.reserve(now)
                if wait > 0.002:
                    await asyncio.sleep(wait)
                try:
                    self._sock.sendto(
                        encode_tickle(c.tickle_key, cid, self.server_now()), (c.address, port)
                    )
                    metrics.TICKLES_OUT.inc()
                except BlockingIOError:
                    await asyncio.sleep(0.001)  # buffer full; the agent's poll covers it
                except (OSError, OverflowError, ValueError) as exc:
                    log.warning("tickle to computer %d at %s failed: %s", cid, c.address, exc)


def _tickle_port(c: Computer) -> int | None:
    """Where the agent listens: its own word (kept by the spool), else the roster's
    (the server's record, which may be older: the roster is not sent again for a
    new port)."""
    if c.agent_port is not None:
        return c.agent_port or None  # 0: it told us it has no UDP port (long poll)
    return c.tickle_port
