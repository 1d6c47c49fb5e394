"""Sends UDP wake-ups ("tickles") to agents that have new work (SPEC 3.2).

Contract: ``wake(states)`` queues computers (deduplicated); a single task sends
their tickles paced by a fleet-wide token bucket and at most one per computer
per ``min_interval``, so a burst of requests never turns into a burst of
traffic. A computer whose last exchange came through its relay is not tickled:
its relay is (once per relay per ``min_interval``, however many of its
computers got work; the relay then exchanges once for all of them and tickles
its agents itself). A tickle only says "exchange now"; losing one costs
latency, never work (agents and relays also poll). ``wake_relays`` tickles
relays themselves (a revoked relay, so it learns it is refused at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable

from taskfleet.protocol.tickle import (
    PerComputerLimiter,
    TicklePacer,
    derive_relay_tickle_key,
    derive_tickle_key,
    encode_tickle,
)
from taskfleet.server import metrics
from taskfleet.server.fleet import ComputerState, RelayState

log = logging.getLogger("taskfleet.tickler")


class Tickler:
    def __init__(
        self,
        master_key: bytes,
        *,
        rate: float,
        min_interval: float,
        clock: Callable[[], float] = time.time,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.master_key = master_key
        self.pacer = TicklePacer(rate)
        self.limiter = PerComputerLimiter(min_interval)
        self.relay_limiter = PerComputerLimiter(min_interval)  # relay ids are their own
        self.min_interval = min_interval
        self.clock = clock
        self._pending: deque[ComputerState | RelayState] = deque()
        self._queued: set[tuple[bool, int]] = set()  # (is a relay, id)
        self._event = asyncio.Event()
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._keys: dict[tuple[bool, int, int], bytes] = {}
        self._deferred: set[tuple[bool, int]] = set()

    def start(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._task = asyncio.create_task(self._loop(), name="tickler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sock:
            self._sock.close()

    def wake(self, states: Iterable[ComputerState]) -> None:
        if not self.enabled:
            return
        for cs in states:
            relay = cs.relay
            target: ComputerState | RelayState = cs
            if relay is not None and cs.via_relay and not relay.revoked:
                target = relay
            self._queue(target)
        if self._pending:
            self._event.set()

    def wake_relays(self, relays: Iterable[RelayState]) -> None:
        """Tickle these relays themselves (revoked ones too): a relay whose token was
        revoked exchanges at once, is refused, and stops serving its agents (503) now
        rather than at its next poll."""
        if not self.enabled:
            return
        for rs in relays:
            self._queue(rs)
        if self._pending:
            self._event.set()

    def _queue(self, target: ComputerState | RelayState) -> None:
        if target.tickle_port is None or not target.address:
            metrics.TICKLES_SKIPPED.labels("no-address").inc()
            return
        key = (isinstance(target, RelayState), target.id)
        if key not in self._queued:
            self._queued.add(key)
            self._pending.append(target)

    def _defer(self, target: ComputerState | RelayState) -> None:
        key = (isinstance(target, RelayState), target.id)
        if key in self._deferred:
            return
        self._deferred.add(key)

        def again() -> None:
            self._deferred.discard(key)
            self._queue(target)
            if self._pending:
                self._event.set()

        asyncio.get_running_loop().call_later(self.min_interval, again)

    def _key(self, target: ComputerState | RelayState) -> bytes:
        relay = isinstance(target, RelayState)
        k = (relay, target.id, target.generation)
        key = self._keys.get(k)
        if key is None:
            derive = derive_relay_tickle_key if relay else derive_tickle_key
            key = self._keys[k] = derive(self.master_key, target.id, target.generation)
        return key

    async def _loop(self) -> None:
        while True:
            try:
                await self._send_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Never die silently: a dead tickler would leave work to the polls.
                log.exception("tickler failed; going on")
                if self._pending:
                    self._event.set()

    async def _send_pending(self) -> None:
        assert self._sock is not None
        while True:
            await self._event.wait()
            self._event.clear()
            while self._pending:
                target = self._pending.popleft()
                relay = isinstance(target, RelayState)
                self._queued.discard((relay, target.id))
                now = self.clock()
                if not (self.relay_limiter if relay else self.limiter).allow(target.id, now):
                    # Too soon after the last one: send it when the interval is
                    # over instead, so new work is never left waiting for a poll.
                    metrics.TICKLES_SKIPPED.labels("deferred").inc()
                    self._defer(target)
                    continue
                wait = self.pacer.reserve(now)
                if wait > 0.002:
                    await asyncio.sleep(wait)
                if target.address is None or target.tickle_port is None:
                    continue
                try:
                    self._sock.sendto(
                        encode_tickle(self._key(target), target.id, self.clock()),
                        (target.address, target.tickle_port),
                    )
                    (metrics.RELAY_TICKLES if relay else metrics.TICKLES).inc()
                except BlockingIOError:
                    # Socket buffer full: yield and let the kernel drain it; the
                    # agent's poll covers a tickle dropped here.
                    await asyncio.sleep(0.001)
                except (OSError, OverflowError, ValueError) as exc:
                    # One bad address must never hold up the computers queued behind it.
                    what = "relay" if relay else "computer"
                    log.warning(
                        "tickle to %s %d at %s failed: %s", what, target.id, target.address, exc
                    )
