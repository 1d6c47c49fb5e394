"""Compare fleet-simulator results of two or more builds (e.g. before/after a change).

Usage: ``python benchmarks/compare.py A.json B.json [...]`` with files written by
``fleet_sim.py --json-out`` or ``run.py`` (benchmarks/out/results-*.json).

Wall-clock figures move with whatever else runs on the machine; the CPU figures
(server CPU per empty exchange, server CPU per request) barely do, so they are
the ones to trust when the "other CPU" column is high.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def _runs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if "runs" in doc:
        return doc["runs"]
    return (doc.get("fleet") or {}).get("runs", [])


def _med(runs: list[dict[str, Any]], key: str) -> float | None:
    pool = [r for r in runs if not r.get("disturbed")] or runs
    vals = [r.get(key) for r in pool if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _cpu_s(r: dict[str, Any]) -> float | None:
    if r.get("server_cpu_seconds") is not None:
        return r["server_cpu_seconds"]
    # older files: cores x the time the meter ran (close to seconds_to_done_api)
    if r.get("seconds_to_done_api") is None:
        return None
    return r["server_cpu_cores"] * r["seconds_to_done_api"]


def _row(name: str, r: dict[str, Any]) -> list[str]:
    h = r["hammer"]
    us = h.get("server_cpu_us_per_exchange") or (
        h["server_cpu_cores"] * h["seconds"] * 1e6 / h["exchanges_ok"] if h["exchanges_ok"] else 0
    )
    tick = r["tickled_runs"]
    for t in tick:
        t["_cpu_s"] = _cpu_s(t)
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    return [
        name,
        f"{r['n']:,}",
        f(_med(tick, "seconds_to_done_api"), ".2f"),
        f(_med(tick, "_cpu_s"), ".2f"),
        f(_med(tick, "seconds_post"), ".2f"),
        f(statistics.median([t["load"]["other_cores"] for t in tick]), ".2f"),
        f(h["per_second"], ",.0f"),
        f(us, ".0f"),
        f(h["load"]["other_cores"], ".2f"),
        f(r["polled"]["seconds_to_done_api"], ".2f"),
    ]


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    header = [
        "build",
        "N",
        "request s",
        "srv CPU s",
        "POST s",
        "other CPU",
        "exch/s",
        "CPU us/exch",
        "other CPU",
        "polled s",
    ]
    rows = []
    for arg in sys.argv[1:]:
        doc = json.loads(Path(arg).read_text())
        for r in _runs(doc):
            rows.append(_row(Path(arg).stem, r))
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    for line in [header, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    print("(request/POST/srv CPU: medians of undisturbed tickled runs, or of all if none;")
    print(" 'other CPU': cores used by processes this benchmark did not start)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
