"""The server's tickle sender over a real UDP socket on loopback."""

from __future__ import annotations

import asyncio
import socket
import time

from taskfleet.protocol.tickle import TickleVerifier, derive_tickle_key
from taskfleet.server.fleet import ComputerState
from taskfleet.server.tickler import Tickler

MASTER = b"m" * 32


def _state(cid: int, port: int) -> ComputerState:
    cs = ComputerState(cid, 1, "00" * 32, 1, address="127.0.0.1", tickle_port=port)
    return cs


async def _receive(sock: socket.socket, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(sock, 100), timeout)


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def test_an_unsendable_address_does_not_hold_up_the_others():
    sock = _listener()
    tickler = Tickler(MASTER, rate=1000, min_interval=1.0)
    tickler.start()
    try:
        good = _state(2, sock.getsockname()[1])
        tickler.wake([_state(1, 70000), good])  # port out of range: sendto raises
        data = await _receive(sock)
        verifier = TickleVerifier(derive_tickle_key(MASTER, 2, 1), 2)
        assert verifier.verify(data, time.time()).computer_id == 2
    finally:
        await tickler.stop()
        sock.close()


async def test_a_second_wake_inside_the_interval_is_deferred_not_dropped():
    sock = _listener()
    tickler = Tickler(MASTER, rate=1000, min_interval=0.3)
    tickler.start()
    try:
        cs = _state(5, sock.getsockname()[1])
        tickler.wake([cs])
        first = await _receive(sock)
        tickler.wake([cs])
        second = await _receive(sock)  # arrives once the 0.3 s interval is over
        assert first != second
    finally:
        await tickler.stop()
        sock.close()


async def test_disabled_tickler_sends_nothing():
    tickler = Tickler(MASTER, rate=1000, min_interval=1.0, enabled=False)
    tickler.start()
    try:
        tickler.wake([_state(1, 9)])
        assert not tickler._pending
    finally:
        await tickler.stop()
