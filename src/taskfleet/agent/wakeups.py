"""The agent's UDP wake-ups: the port it listens on and what it does with a datagram.

Contract: ``bind_tickle_port`` binds the wake-up port before anything is
enrolled (a port that is taken stops the agent with a clear error and changes
nothing); ``listen`` hands every datagram to the :class:`TickleVerifier`
(``protocol/tickle.py``: MAC, skew, replay, rate limit), keeps the replay high
water durable in the local state, calls ``woken`` for each accepted tickle,
turns a valid tickle that came inside the rate limit into one exchange when the
interval is over, and logs drops at most once a second.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from taskfleet.agent.state import LocalState
from taskfleet.protocol.tickle import TickleVerifier
from taskfleet.settings import TICKLE_MIN_INTERVAL

log = logging.getLogger("taskfleet.agent")


def bind_tickle_port(bind: str, port: int | None) -> socket.socket | None:
    """The bound, non-blocking wake-up socket; None when wake-ups are off (port 0)."""
    if not port:
        return None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(bind, port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise SystemExit(f"cannot listen on --tickle-bind {bind!r}: {exc}") from None
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise SystemExit(
            f"cannot listen for wake-ups on UDP {bind}:{port} "
            f"({exc.strerror or exc}): is another agent using it? Choose another "
            "--tickle-port, or --tickle-port 0 to hold a long poll instead. "
            "Nothing was enrolled or changed."
        ) from None
    sock.setblocking(False)
    return sock


class _Wakeups(asyncio.DatagramProtocol):
    def __init__(
        self, verifier: TickleVerifier, state: LocalState, woken: Callable[[], None]
    ) -> None:
        self.verifier = verifier
        self.state = state
        self.woken = woken
        self.last_drop_log = -1e9
        self.retickle: asyncio.TimerHandle | None = None

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        verifier = self.verifier
        before = dict(verifier.drops)
        high = verifier.high_water_ms
        accepted = verifier.accept(data, time.time())
        if verifier.high_water_ms > high:
            self.state.save_tickle_high_water(verifier.high_water_ms)
        if accepted:
            self.woken()
            return
        reason = next((k for k, v in verifier.drops.items() if v != before.get(k)), "?")
        now = time.monotonic()
        # Say why, but never let a flood of bad datagrams flood the log too.
        if reason == "rate-limited" and self.retickle is None:
            # A valid wake-up inside the interval: exchange once it is over.
            def again() -> None:
                self.retickle = None
                self.woken()

            self.retickle = asyncio.get_running_loop().call_later(TICKLE_MIN_INTERVAL, again)
        if reason != "rate-limited" and now - self.last_drop_log >= 1.0:
            self.last_drop_log = now
            log.warning("tickle dropped (%s) from %s; totals %s", reason, addr[0], verifier.drops)


async def listen(
    sock: socket.socket, verifier: TickleVerifier, state: LocalState, woken: Callable[[], None]
) -> asyncio.DatagramTransport:
    """Serve wake-ups on ``sock`` until the transport is closed."""
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: _Wakeups(verifier, state, woken), sock=sock
    )
    return transport
