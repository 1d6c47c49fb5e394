"""Sends UDP wake-ups ("tickles") to agents that have new work (SPEC 3.2).

Contract: ``wake(states)`` queues computers (deduplicated); a single task sends
their tickles paced by a fleet-wide token bucket and at most one per computer
per ``min_interval``, so a burst of requests never turns into a burst of
traffic. A tickle only says "exchange now"; losing one costs latency, never
work (agents also poll).
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
    derive_tickle_key,
    encode_tickle,
)
from taskfleet.server import metrics
from taskfleet.server.fleet import ComputerState

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
        self.min_interval = min_interval
        self.clock = clock
        self._pending: deque[ComputerState] = deque()
        self._queued: set[int] = set()
        self._event = asyncio.Event()
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._keys: dict[tuple[int, int], bytes] = {}
        self._deferred: set[int] = set()

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
            if cs.tickle_port is None or not cs.address:
                metrics.TICKLES_SKIPPED.labels("no-address").inc()
                continue
            if cs.id not in self._queued:
                self._queued.add(cs.id)
                self._pending.append(cs)
        if self._pending:
            self._event.set()

    def _defer(self, cs: ComputerState) -> None:
        if cs.id in self._deferred:
            return
        self._deferred.add(cs.id)

        def again() -> None:
            self._deferred.discard(cs.id)
            self.wake([cs])

        asyncio.get_running_loop().call_later(self.min_interval, again)

    def _key(self, cs: ComputerState) -> bytes:
        k = (cs.id, cs.generation)
        key = self._keys.get(k)
        if key is None:
            key = self._keys[k] = derive_tickle_key(self.master_key, cs.id, cs.generation)
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
                cs = self._pending.popleft()
                self._queued.discard(cs.id)
                now = self.clock()
                if not self.limiter.allow(cs.id, now):
                    # Too soon after the last one: send it when the interval is
                    # over instead, so new work is never left waiting for a poll.
                    metrics.TICKLES_SKIPPED.labels("deferred").inc()
                    self._defer(cs)
                    continue
                wait = self.pacer.reserve(now)
                if wait > 0.002:
                    await asyncio.sleep(wait)
                if cs.address is None or cs.tickle_port is None:
                    continue
                try:
                    self._sock.sendto(
                        encode_tickle(self._key(cs), cs.id, self.clock()),
                        (cs.address, cs.tickle_port),
                    )
                    metrics.TICKLES.inc()
                except BlockingIOError:
                    # Socket buffer full: yield and let the kernel drain it; the
                    # agent's poll covers a tickle dropped here.
                    await asyncio.sleep(0.001)
                except (OSError, OverflowError, ValueError) as exc:
                    # One bad address must never hold up the computers queued behind it.
                    log.warning("tickle to computer %d at %s failed: %s", cs.id, cs.address, exc)
