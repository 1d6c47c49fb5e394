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

Only the leader sends (issue 16: one pacer and one per-computer limit for the whole
fleet, however many server processes). ``lead`` is its duty (``server/cluster.py``):
while it runs, ``leading`` is true; it tickles every relay when it starts (a relay
backs off while the server is away: this brings its spooled results home now). A
process that does not lead hands its wake-ups to the leader (``forward``: the
targets, address and port as this process knows them, through the ``tickle`` hint),
except those it marks ``hinted``: they came with a has-work hint (``Fleet.mark_work``),
on which the leader tickles from its own memory. ``forwarded(body)`` queues what
another process handed over (checked entry by entry: a bad one is skipped). On
SQLite the one process leads from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from taskfleet.protocol.tickle import (
    PerComputerLimiter,
    TicklePacer,
    derive_relay_tickle_key,
    derive_tickle_key,
    encode_tickle,
)
from taskfleet.server import metrics
from taskfleet.server.fleet import ComputerState, RelayState
from taskfleet.server.hints import parse_entries
from taskfleet.settings import INT64_MAX

log = logging.getLogger("taskfleet.tickler")


@dataclass(frozen=True, slots=True)
class Target:
    """Where one tickle goes: a computer's agent, or a relay (``relay``)."""

    relay: bool
    id: int
    generation: int
    address: str
    port: int

    def entry(self) -> list[Any]:
        """As the ``tickle`` hint carries it."""
        return [self.relay, self.id, self.generation, self.address, self.port]

    @staticmethod
    def from_entry(raw: Any) -> Target | None:
        """A forwarded entry, or None if it is not a well-formed target."""
        if not isinstance(raw, list) or len(raw) != 5:
            return None
        relay, id_, gen, address, port = raw
        if not (
            isinstance(relay, bool)
            and type(id_) is int
            and 0 < id_ <= INT64_MAX
            and type(gen) is int
            and 0 <= gen <= INT64_MAX
            and type(port) is int
            and 0 < port < 65536
            and isinstance(address, str)
            and _is_ip(address)
        ):
            return None
        return Target(relay, id_, gen, address, port)


def _is_ip(address: str) -> bool:
    # Only an IP literal: a host name would make sendto resolve it on the event loop.
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def target_of(state: ComputerState | RelayState) -> Target | None:
    """Where a wake-up of ``state`` goes (None: no address or port known)."""
    if isinstance(state, ComputerState):
        relay = state.relay
        if relay is not None and state.via_relay and not relay.revoked:
            state = relay
    if state.tickle_port is None or not state.address:
        metrics.TICKLES_SKIPPED.labels("no-address").inc()
        return None
    return Target(
        isinstance(state, RelayState), state.id, state.generation, state.address, state.tickle_port
    )


class Tickler:
    def __init__(
        self,
        master_key: bytes,
        *,
        rate: float,
        min_interval: float,
        clock: Callable[[], float] = time.time,
        enabled: bool = True,
        leading: bool = True,
    ) -> None:
        self.enabled = enabled
        self.master_key = master_key
        self.pacer = TicklePacer(rate)
        self.limiter = PerComputerLimiter(min_interval)
        self.relay_limiter = PerComputerLimiter(min_interval)  # relay ids are their own
        self.min_interval = min_interval
        self.clock = clock
        self.leading = leading
        # Not leading: hands targets to the leader (the ``tickle`` hint); None: dropped.
        self.forward: Callable[[list[Target]], None] | None = None
        self._pending: deque[Target] = deque()
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

    async def lead(self, ready: Callable[[], None], relays: Iterable[RelayState]) -> None:
        """The leader's duty: this process sends the fleet's tickles until canceled."""
        self.leading = True
        try:
            self.wake_relays(rs for rs in relays if not rs.revoked)
            ready()
            await asyncio.Event().wait()  # until the lead is lost (canceled)
        finally:
            self.leading = False

    def wake(self, states: Iterable[ComputerState], *, hinted: bool = False) -> None:
        """Tickle these computers (or their relays). ``hinted``: their has-work hint
        went to the other processes, so a process that does not lead does nothing."""
        if not self.enabled or (hinted and not self.leading):
            return
        self._send([t for cs in states if (t := target_of(cs)) is not None])

    def wake_relays(self, relays: Iterable[RelayState]) -> None:
        """Tickle these relays themselves (revoked ones too): a relay whose token was
        revoked exchanges at once, is refused, and stops serving its agents (503) now
        rather than at its next poll."""
        if self.enabled:
            self._send([t for rs in relays if (t := target_of(rs)) is not None])

    def forwarded(self, body: str) -> None:
        """Targets another process handed over (the ``tickle`` hint): sent if leading."""
        if not self.enabled or not self.leading:
            return
        entries = parse_entries(body)
        targets = [t for e in entries if (t := Target.from_entry(e)) is not None]
        if not entries or len(targets) != len(entries):
            log.warning("a tickle hint with malformed entries: those were skipped")
        self._send(targets)

    def _send(self, targets: list[Target]) -> None:
        if not targets:
            return
        if not self.leading:
            if self.forward is not None:
                self.forward(targets)
                metrics.TICKLES_FORWARDED.inc(len(targets))
            return
        for t in targets:
            self._queue(t)
        if self._pending:
            self._event.set()

    def _queue(self, target: Target) -> None:
        key = (target.relay, target.id)
        if key not in self._queued:
            self._queued.add(key)
            self._pending.append(target)

    def _defer(self, target: Target) -> None:
        key = (target.relay, target.id)
        if key in self._deferred:
            return
        self._deferred.add(key)

        def again() -> None:
            self._deferred.discard(key)
            self._queue(target)
            if self._pending:
                self._event.set()

        asyncio.get_running_loop().call_later(self.min_interval, again)

    def _key(self, target: Target) -> bytes:
        k = (target.relay, target.id, target.generation)
        key = self._keys.get(k)
        if key is None:
            derive = derive_relay_tickle_key if target.relay else derive_tickle_key
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
                relay = target.relay
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
                try:
                    self._sock.sendto(
                        encode_tickle(self._key(target), target.id, self.clock()),
                        (target.address, target.port),
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
