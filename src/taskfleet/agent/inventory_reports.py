"""When the agent reports its inventory, and what it keeps of it (issue 13; docs/inventory.md).

Contract:

* ``InventoryReports.run()`` collects at start, when ``want()`` is called (an
  operation finished; the server asked for the whole inventory), and every
  ``interval`` (``AGENT_INVENTORY_INTERVAL``), never twice within
  ``min_interval`` (``AGENT_INVENTORY_MIN_INTERVAL``): calls in between make one
  collection when that time has passed.
* A collection runs in a child process (``python -m taskfleet.agent.inventory``),
  so the event loop never waits and the agent's own memory never holds the
  inventory. The child compares with the snapshot kept in the state folder
  (``inventory.json``) and prints the message: a delta, or the whole inventory
  when there is no snapshot (enrollment, re-enrollment: ``forget()``) or the
  server asked for it. Nothing changed: nothing is sent.
* The message is queued in the local state (resent until the server acks it,
  like every message) and only then the new snapshot is kept, so the next delta
  is made against what was queued last. Messages are applied in order, so that
  is what the server holds once it has them; if a crash separates the two
  steps, the server finds that the next delta's ``base`` is not what it holds
  and asks for the whole inventory.
* While a whole inventory is being collected, or queued and not yet acknowledged,
  the server's ask for one (it asks in every reply until it has one) makes no
  second one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from taskfleet.agent.state import LocalState
from taskfleet.aio import wait_set
from taskfleet.protocol.inventory import ASK_FULL, MAX_INVENTORY_BYTES
from taskfleet.settings import (
    AGENT_INVENTORY_INTERVAL,
    AGENT_INVENTORY_MIN_INTERVAL,
    INVENTORY_TOOL_TIMEOUT,
)

log = logging.getLogger("taskfleet.agent")


class InventoryReports:
    def __init__(
        self,
        state: LocalState,
        trigger: asyncio.Event,
        *,
        state_dir: Path,
        root: Path = Path("/"),
        admindir: Path | None = None,
        interval: float = AGENT_INVENTORY_INTERVAL,
        min_interval: float = AGENT_INVENTORY_MIN_INTERVAL,
    ) -> None:
        self.state = state
        self.trigger = trigger
        self.path = state_dir / "inventory.json"
        self.root = root
        self.admindir = admindir
        self.interval = interval
        self.min_interval = min_interval
        self.due = asyncio.Event()
        self.full = False
        self.full_seq: int | None = None  # a whole inventory queued, maybe not acked yet
        self.collecting_full = False  # a whole inventory is being collected now
        self.last = -float("inf")  # monotonic time of the last collection
        self.collections = 0
        self.resyncs: list[asyncio.Future[None]] = []  # Resynchronize: the next whole one

    def want(self, *, full: bool = False) -> None:
        """Collect (at the next allowed time); ``full``: send the whole inventory."""
        if full:
            if self.collecting_full or (
                self.full_seq is not None and self.state.is_queued(self.full_seq)
            ):
                return  # one is on its way (the server asks in each reply until it has it)
            self.full = True
        self.due.set()

    async def resync(self) -> None:
        """Collect the whole inventory and queue it; returns once it is queued, raises
        ``OSError`` or ``ValueError`` if that collection fails."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.resyncs.append(done)
        self.full = True  # even if a whole one is on its way: this one is asked for now
        self.due.set()
        await done

    def asked(self, ask: str | None) -> None:
        """What a reply's ``inventory`` says: ``"full"``, the server wants the whole one."""
        if ask == ASK_FULL:
            self.want(full=True)

    def forget(self) -> None:
        """A new identity: the server has nothing of ours, the next report is whole."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def run(self) -> None:
        self.due.set()  # at start
        while True:
            await wait_set(self.due, self.interval)
            wait = self.last + self.min_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.due.clear()
            self.last = time.monotonic()
            try:
                await self.collect_once()
            except (OSError, ValueError) as exc:
                log.warning("inventory not collected: %s", exc)

    async def collect_once(self) -> int | None:
        """One collection; the sequence number of the message queued, None if none."""
        full, self.full = self.full, False
        waiting, self.resyncs = (self.resyncs, []) if full else ([], self.resyncs)
        self.collecting_full = full
        try:
            seq = await self._collect(full)
        except BaseException as exc:
            self.collecting_full = False
            for w in waiting:
                if not w.done():
                    w.set_exception(exc if isinstance(exc, Exception) else OSError("stopped"))
            raise
        self.collecting_full = False
        for w in waiting:
            if not w.done():
                w.set_result(None)
        return seq

    async def _collect(self, full: bool) -> int | None:
        argv = [sys.executable, "-m", "taskfleet.agent.inventory", "--state", str(self.path)]
        argv += ["--root", str(self.root)]
        if self.admindir is not None:
            argv += ["--admindir", str(self.admindir)]
        if full or not self.path.exists():
            argv.append("--full")
            full = True
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": _our_path()},
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 3 * INVENTORY_TOOL_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise OSError("the inventory collector took too long") from None
        except asyncio.CancelledError:  # the agent stops: so does its collector
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        if proc.returncode != 0:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise OSError(f"the inventory collector exited {proc.returncode}: {last[0][:300]}")
        self.collections += 1
        text = out.decode()
        nxt = self.path.with_name(self.path.name + ".next")
        if not text:
            return None
        if len(text) > MAX_INVENTORY_BYTES:
            raise ValueError(f"the inventory message is {len(text)} bytes")
        seq = self.state.queue_text(text)
        os.replace(nxt, self.path)
        if full:
            self.full_seq = seq
        log.info(
            "inventory queued as message %d (%s, %d bytes)",
            seq,
            "whole" if full else "delta",
            len(text),
        )
        self.trigger.set()
        return seq


def _our_path() -> str:
    """PYTHONPATH for the collector: where this taskfleet is imported from first."""
    here = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join(
        [here, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    )
