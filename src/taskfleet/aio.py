"""asyncio helpers every long-running loop shares (server, agent, relay).

Contract: ``wait_set(event, timeout)`` waits until ``event`` is set or ``timeout``
seconds pass (None: no limit) and says whether it was set. Unlike
``asyncio.wait_for`` on Python 3.11, it never swallows a cancel that arrives just as
the event is set: a loop that swallowed it would run on, and whoever cancelled it (a
lost lead, a stopping server) would wait for it for ever (seen: a leader's duty that
never stopped).
"""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout: float | None) -> bool:
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
