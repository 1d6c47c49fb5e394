"""Lifecycle engine: what one pass costs with few or many Scheduled and Waiting requests.

Issue "The full activity lifecycle": the server-side scheduler's cost per pass
must follow what changed, not the number of scheduled or waiting activities.
For each N, an in-process server (real app, writer, SQLite store) holds N
Scheduled and N Waiting requests that nothing releases, plus one request
waited on by one other; one activity finishes and one pass runs. Printed: the
pass's wall time and SQL statements, and an idle pass (time moved, no timer
due). Usage: python benchmarks/bench_lifecycle.py [--sizes 10,1000,5000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.inproc import START, inproc_server


async def measure(n: int, repeat: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'db.sqlite3'}"
        async with inproc_server(
            url, Path(tmp), lifecycle_interval=3600, reaper_interval=3600
        ) as h:
            assert h.rt.lifecycle is not None
            await h.rt.lifecycle.stop()  # passes run only when measured
            a, b = await h.enroll(2)
            blocker = await h.run(f"computer:{b.computer_id}")
            for _ in range(n):
                await h.run(f"computer:{b.computer_id}", at=START + 86400)
                await h.run(f"computer:{b.computer_id}", after={"request": blocker["id"]})
            times, statements, idle = [], [], []
            count = 0

            def seen(*_a: object) -> None:
                nonlocal count
                count += 1

            engines = {h.rt.read.sync_engine, h.rt.writer.engine.sync_engine}
            for _ in range(repeat):
                first = await h.run(f"computer:{a.computer_id}")
                await h.run(f"computer:{a.computer_id}", after={"request": first["id"]})
                await h.rt.lifecycle.run_pass()
                ops = await a.exchange()
                await a.report(ops[0])
                for e in engines:
                    sa.event.listen(e, "before_cursor_execute", seen)
                count = 0
                t0 = time.perf_counter()
                await h.rt.lifecycle.run_pass()
                times.append((time.perf_counter() - t0) * 1000)
                statements.append(count)
                h.clock.advance(1)
                t0 = time.perf_counter()
                await h.rt.lifecycle.run_pass()
                idle.append((time.perf_counter() - t0) * 1000)
                for e in engines:
                    sa.event.remove(e, "before_cursor_execute", seen)
                for op in await a.exchange():  # the released one: finish it, keep state small
                    await a.report(op)
                await h.rt.lifecycle.run_pass()
            return {
                "pending": 2 * n,
                "pass_ms": statistics.median(times),
                "statements": statistics.median(statements),
                "idle_ms": statistics.median(idle),
            }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,1000,5000", help="N values (requests of each kind)")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    rows = [await measure(int(n), args.repeat) for n in args.sizes.split(",")]
    print(
        "| Scheduled + Waiting requests | pass after one finish (median) | SQL statements "
        "| idle pass (median) |"
    )
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['pending']:,} | {r['pass_ms']:.2f} ms | {r['statements']:.0f} "
            f"| {r['idle_ms']:.3f} ms |"
        )


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    asyncio.run(main())
