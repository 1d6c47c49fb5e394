"""Callable task handlers for the cancel tests (imported by the server and workers)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any


async def wait_async(params: dict[str, Any], context: dict[str, Any]) -> str:
    where = Path(params["dir"])
    (where / "started").touch()
    try:
        await asyncio.sleep(3600)
    finally:
        (where / "ended").write_text("cancelled" if asyncio.current_task().cancelling() else "")
    return "slept an hour"


def wait_sync(params: dict[str, Any], context: dict[str, Any]) -> str:
    """A plain function (so it runs in a thread): returns once ``dir/gate`` exists."""
    where = Path(params["dir"])
    (where / "started").touch()
    while not (where / "gate").exists():
        time.sleep(0.02)
    return "returned after the gate opened"
