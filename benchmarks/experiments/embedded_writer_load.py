"""Where the embedded server-task path spends its time: the single writer's transactions.

    .venv/bin/python benchmarks/experiments/embedded_writer_load.py [RATE] [N] [WORKERS]

Runs the server in this process (SQLite in a temporary folder, in-process
workers), submits N no-op tasks in batches of 100 paced at RATE per second
(RATE 0: in batches of 5000 at once, like bench_tasks.py's burn-down) through
the API (ASGI, no sockets), waits until the last one ends, and prints the rate
done, the submit latency, the CPU of this process per 1,000 tasks, per kind
of write (function jobs in the writer, the worker's claim/result batches) how
many transactions ran, their mean and max time, mean size and total time, the
most frequent mixes of claims and results in a worker batch, and the SQL
statements per task. Defaults: 1500 6000 64.
A diagnostic, not a benchmark with a target: the instrumentation (timing
wrappers) costs a little.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from taskfleet.server import writer as writer_mod
from taskfleet.server.app import create_app
from taskfleet.server.runtime import ServerConfig
from taskfleet.worker import runner as runner_mod

STATS: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
STATEMENTS: collections.Counter[str] = collections.Counter()  # first words of each SQL
MIXES: collections.Counter[tuple[int, int]] = collections.Counter()  # (claims, results)


def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
    STATEMENTS[" ".join(statement.split()[:3])] += 1


def _timed(cls: Any, name: str, label: str) -> None:
    original = getattr(cls, name)

    async def wrapper(self: Any, jobs: list[Any]) -> None:
        t = time.perf_counter()
        await original(self, jobs)
        STATS[label].append((time.perf_counter() - t, len(jobs)))

    setattr(cls, name, wrapper)


async def main(rate: float, n: int, workers: int) -> None:
    _timed(writer_mod.Writer, "_fns", "writer function-job transactions")
    if hasattr(writer_mod.Writer, "_syncs"):  # run_sync jobs (session 12); absent before
        _timed(writer_mod.Writer, "_syncs", "writer sync-job transactions")
    _timed(runner_mod._Batcher, "_run", "worker claim/result batches")
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", _count)
    claim_and_complete = runner_mod.Worker._claim_and_complete

    def mixed(self: Any, conn: Any, items: list[Any]) -> Any:
        claims = sum(1 for i in items if isinstance(i, runner_mod._Claim))
        MIXES[(claims, len(items) - claims)] += 1
        return claim_and_complete(self, conn, items)

    runner_mod.Worker._claim_and_complete = mixed  # type: ignore[method-assign]
    tmp = Path(tempfile.mkdtemp())
    cfg = ServerConfig(
        database_url=f"sqlite:///{tmp / 'db.sqlite3'}", data_dir=tmp, tickles=False, workers=workers
    )
    app = create_app(cfg)
    async with app.router.lifespan_context(app):
        token = (tmp / "admin-token").read_text().strip()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://taskfleet",
            headers={"Authorization": f"Bearer {token}"},
        ) as c:
            STATEMENTS.clear()
            MIXES.clear()
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            submit: list[float] = []
            last = 0
            # RATE 0: burn-down, all at once in batches of 5000 (bench_tasks.py's phase a).
            size = 5000 if rate <= 0 else 100
            for b in range(n // size):
                delay = 0 if rate <= 0 else t0 + b * size / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                ts = time.perf_counter()
                tasks = [{"type": "noop", "params": {"n": b * size + j}} for j in range(size)]
                body = {"tasks": tasks}
                r = await c.post("/api/v1/tasks/batch", json=body)
                r.raise_for_status()
                submit.append(time.perf_counter() - ts)
                last = r.json()[-1]["id"]
            offered = n / (time.perf_counter() - t0)
            deadline = time.monotonic() + 300
            while (await c.get(f"/api/v1/tasks/{last}")).json()["state"] not in (
                "succeeded",
                "failed",
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the last task did not end within 300 s")
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
    mean_submit = 1000 * sum(submit) / len(submit)
    print(
        f"workers {workers}: offered {offered:.0f}/s, done {n / elapsed:.0f}/s "
        f"over {elapsed:.1f} s; submit answer mean {mean_submit:.1f} ms, "
        f"max {1000 * max(submit):.1f}; CPU {1000 * cpu / n:.2f} s/1k (this whole process)"
    )
    for label, rows in STATS.items():
        times = [t for t, _ in rows]
        sizes = [k for _, k in rows]
        print(
            f"{label}: {len(rows)}, mean {1000 * sum(times) / len(times):.2f} ms, "
            f"max {1000 * max(times):.1f} ms, mean size {sum(sizes) / len(sizes):.1f}, "
            f"total {sum(times):.2f} s ({100 * sum(times) / elapsed:.0f}% of the run)"
        )
    # A batch of only claims or only results means they missed each other (a
    # transaction more per task).
    common = ", ".join(f"{c}+{r} x{k}" for (c, r), k in MIXES.most_common(6))
    print(f"worker batches, claims+results: {common}")
    # Reads included (the poll for the last task); deterministic enough to compare.
    total = sum(STATEMENTS.values())
    print(f"SQL statements: {total / n:.2f} per task; the most frequent per 1k tasks:")
    for text, count in STATEMENTS.most_common(12):
        print(f"  {1000 * count / n:8.1f}  {text}")


if __name__ == "__main__":
    args = [float(a) for a in sys.argv[1:4]]
    rate, n, workers = (args + [1500, 6000, 64][len(args) :])[:3]
    asyncio.run(main(rate, int(n), int(workers)))
