"""The server's tickle sender over a real UDP socket on loopback: only a leading
tickler sends; one that does not lead hands its targets over (issue 16)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import orjson

from taskfleet.protocol.tickle import TickleVerifier, derive_tickle_key
from taskfleet.server.fleet import ComputerState
from taskfleet.server.tickler import Target, Tickler

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


async def test_a_tickler_that_does_not_lead_forwards_and_the_leader_sends_what_it_is_handed():
    sock = _listener()
    handed: list[list[Target]] = []
    other = Tickler(MASTER, rate=1000, min_interval=1.0, leading=False)
    other.forward = handed.append
    leader = Tickler(MASTER, rate=1000, min_interval=1.0, leading=False)
    leader.start()
    try:
        cs = _state(7, sock.getsockname()[1])
        other.wake([cs], hinted=True)  # its has-work hint reaches the leader: nothing here
        assert handed == []
        other.wake([cs])
        [[target]] = handed
        body = orjson.dumps([target.entry(), [False, 8, 1, "host.example", 9], "junk"]).decode()
        leader.forwarded(body)  # not leading yet: dropped
        assert not leader._pending
        lead = asyncio.create_task(leader.lead(lambda: None, []))
        await asyncio.sleep(0)  # the duty starts
        assert leader.leading
        leader.forwarded(body)  # the host name and the junk are skipped
        data = await _receive(sock)
        assert TickleVerifier(derive_tickle_key(MASTER, 7, 1), 7).verify(data, time.time())
        assert not leader._pending and leader._queued == set()
        lead.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lead
        assert not leader.leading
    finally:
        await leader.stop()
        sock.close()
