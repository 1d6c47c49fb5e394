"""Prototype of relay changes suggested by the relay benchmark, applied by monkeypatching.

src/ is not touched: this launcher patches the running process, then runs the normal
``taskfleet`` CLI, so the same benchmark compares before and after:

    python benchmarks/relay_sim.py --n 10000 --relays 4 --compare-direct \\
        --relay-cmd benchmarks/experiments/patched_relay.py

``TF_RELAY_PATCH`` (comma-separated, default ``groupcommit``) picks the patches:

* ``groupcommit`` - the spool's writes of one event-loop iteration share ONE commit
  (one fsync): the first write opens the transaction and schedules the COMMIT with
  ``call_soon`` (so it runs after every handler made ready in this iteration), each
  write is a SAVEPOINT inside it (a failing one rolls back alone), and an agent
  exchange answers only once the commit holding its write is done. Durability is the
  same as today (the reply still follows the fsync); what changes is that agents whose
  requests arrive while an fsync runs share the next one instead of queueing for one
  each. The commit still blocks the event loop (a production version would rather run
  it in a thread).
* ``nosync`` - ``PRAGMA synchronous=NORMAL``: no fsync per commit at all. NOT safe (a
  power cut may undo acknowledged spool writes); only an upper bound of what any
  commit batching can win.

These are experiments for measuring, not production code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from taskfleet.relay import http as relay_http
from taskfleet.relay import spool as spool_mod

PATCHES = set(filter(None, os.environ.get("TF_RELAY_PATCH", "groupcommit").split(",")))


if "nosync" in PATCHES:
    _orig_init = spool_mod.Spool.__init__

    def _init(self: Any, *args: Any, **kwargs: Any) -> None:
        _orig_init(self, *args, **kwargs)
        self.db.execute("PRAGMA synchronous=NORMAL")

    spool_mod.Spool.__init__ = _init  # type: ignore[method-assign]


if "groupcommit" in PATCHES:

    class _Group:
        open = False
        fut: asyncio.Future[None] | None = None
        commits = 0
        writes = 0

    def _commit(spool: Any) -> None:
        fut, _Group.open, _Group.fut = _Group.fut, False, None
        try:
            spool.db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                spool.db.execute("ROLLBACK")
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            raise
        _Group.commits += 1
        if fut is not None and not fut.done():
            fut.set_result(None)

    _orig_tx = spool_mod.Spool._tx

    @contextlib.contextmanager
    def _tx(self: Any) -> Iterator[Any]:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            with _orig_tx(self) as db:
                yield db
            return
        if not _Group.open:
            self.db.execute("BEGIN IMMEDIATE")
            _Group.open = True
            _Group.fut = loop.create_future()
            loop.call_soon(_commit, self)
        _Group.writes += 1
        self.db.execute("SAVEPOINT tf_write")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK TO tf_write")
            self.db.execute("RELEASE tf_write")
            raise
        self.db.execute("RELEASE tf_write")

    spool_mod.Spool._tx = _tx  # type: ignore[method-assign]

    _orig_exchange = relay_http.AgentApp.exchange

    async def _exchange(self: Any, scope: Any, receive: Any) -> tuple[int, bytes]:
        result = await _orig_exchange(self, scope, receive)
        fut = _Group.fut
        if fut is not None:
            # our write (if any) is in the open group: answer once it is on disk
            await asyncio.shield(fut)
        return result

    relay_http.AgentApp.exchange = _exchange  # type: ignore[method-assign]


if __name__ == "__main__":
    from taskfleet.cli import root

    print(f"patched relay: {sorted(PATCHES)}", file=sys.stderr, flush=True)
    root(prog_name="taskfleet")
