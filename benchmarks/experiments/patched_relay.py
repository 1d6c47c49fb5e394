"""Prototype of relay changes suggested by the relay benchmark, applied by monkeypatching.

src/ is not touched: this launcher patches the running process, then runs the normal
``taskfleet`` CLI, so the same benchmark compares before and after:

    python benchmarks/relay_sim.py --n 10000 --relays 4 --compare-direct \\
        --relay-cmd benchmarks/experiments/patched_relay.py

``TF_RELAY_PATCH`` (comma-separated, default ``nosync``) picks the patches. (The
``groupcommit`` prototype that was here landed in ``relay/spool.py`` in session 6.)

* ``nosync`` - ``PRAGMA synchronous=NORMAL``: no fsync per commit at all. NOT safe (a
  power cut may undo acknowledged spool writes); only an upper bound of what any
  commit batching can win.

These are experiments for measuring, not production code.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from taskfleet.relay import spool as spool_mod

PATCHES = set(filter(None, os.environ.get("TF_RELAY_PATCH", "nosync").split(",")))


if "nosync" in PATCHES:
    _orig_init = spool_mod.Spool.__init__

    def _init(self: Any, *args: Any, **kwargs: Any) -> None:
        _orig_init(self, *args, **kwargs)
        self.db.execute("PRAGMA synchronous=NORMAL")

    spool_mod.Spool.__init__ = _init  # type: ignore[method-assign]


if __name__ == "__main__":
    from taskfleet.cli import root

    print(f"patched relay: {sorted(PATCHES)}", file=sys.stderr, flush=True)
    root(prog_name="taskfleet")
