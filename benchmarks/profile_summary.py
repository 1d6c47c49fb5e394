"""Rank a py-spy raw (collapsed stacks) profile: self and inclusive time per function.

Usage: ``python benchmarks/profile_summary.py benchmarks/out/profiles/n10000-tickled.txt
[--top 30] [--focus taskfleet]``. Percentages are of the active (non-idle) samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m["file"]
    for marker in ("site-packages/", "/src/", "/lib/python3.11/"):
        if marker in f:
            f = f.split(marker, 1)[1]
            break
    return f"{m['func']} ({f})"


# Leaf frames that mean "waiting", which py-spy cannot always tell from running: the
# event loop inside uvloop's C run loop (epoll), an aiosqlite worker waiting for work.
_WAITING = (
    re.compile(r"^Runner\.run \(.*asyncio/runners\.py:\d+\)$"),
    re.compile(r"^_connection_worker_thread \(.*aiosqlite/core\.py:59\)$"),
    re.compile(r"^_worker \(.*concurrent/futures/thread\.py:81\)$"),
)


def load(path: Path) -> tuple[list[tuple[list[str], int]], int]:
    """(active stacks, waiting samples)."""
    stacks = []
    waiting = 0
    for line in path.read_text(errors="replace").splitlines():
        body, _, count = line.rpartition(" ")
        if not body or not count.isdigit():
            continue
        frames = [
            f.strip()
            for f in body.split(";")
            if f.strip() and not f.startswith(("process ", "thread "))
        ]
        if frames and any(w.match(_FRAME_SHORT(frames[-1])) for w in _WAITING):
            waiting += int(count)
            continue
        stacks.append(([_short(f) for f in frames], int(count)))
    return stacks, waiting


def _FRAME_SHORT(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    f = m["file"].split("site-packages/")[-1].split("/lib/python3.11/")[-1]
    return f"{m['func']} ({f}:{m['line']})"


def summarize(path: Path, top: int = 25, focus: str | None = None) -> str:
    stacks, waiting = load(path)
    total = sum(c for _, c in stacks) or 1
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    own: Counter[str] = Counter()  # innermost frame of our own code (or focus) in the stack
    for frames, c in stacks:
        if frames:
            self_t[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
        mine = [f for f in frames if (focus or "taskfleet/") in f]
        if mine:
            own[mine[-1]] += c
    lines = [f"{path.name}: {total} active samples ({waiting} waiting samples left out)"]
    for title, counter in (
        ("self time (leaf frame)", self_t),
        ("inclusive time", incl),
        (f"attributed to the innermost {focus or 'taskfleet'} frame", own),
    ):
        lines.append(f"  -- {title}")
        for name, c in counter.most_common(top):
            lines.append(f"  {100 * c / total:5.1f}%  {name}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--focus", default=None)
    a = ap.parse_args()
    for p in a.paths:
        print(summarize(p, a.top, a.focus))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
