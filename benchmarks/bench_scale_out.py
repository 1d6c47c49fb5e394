"""Cost of coordination (issue 16): 1 vs 2 ``taskfleet server`` processes on one PostgreSQL.

    .venv/bin/python benchmarks/bench_scale_out.py [--quick] [--repeats 3] [--agents 1000]

On a 2-core machine absolute scale-out cannot be shown; what this measures is whether
coordinating two processes (sequence numbers from the database, has-work hints, the
leader's duties and catch-up) collapses throughput. Two configurations run side by side
in the same run, each on a fresh PostgreSQL database ``tf_bench_<pid>_<k>`` (127.0.0.1:5432,
user postgres) and its own RabbitMQ queue; repetitions alternate 1,2 / 2,1 / 1,2 so a
change in the machine's load hits both alike:

* ``1 server``: one process; ``2 servers``: two processes on one database (the first
  started leads).
* **exchanges/s**: the same N simulated agents (``fleet_sim.py``'s, real protocol over
  real HTTP) split evenly over the processes, each agent exchanging with the one it
  enrolled through, the same total of keep-alive connections; empty exchanges as fast as
  the servers answer for a fixed window.
* **activities/s**: a request to all N agents made through the first process (the other
  learns of it by a hint and tickles its agents); N / (request created -> last result
  recorded, the server's own timestamps). Each activity is handed out in one exchange and
  its result recorded in another.
* **tasks/s**: T no-op server tasks submitted through the API in batches alternating
  between the processes, dispatched over RabbitMQ (``--queue``; not the embedded queue,
  whose one in-process worker lives in the leader) to the same ``taskfleet worker``
  processes in both configurations; T / (first submit -> last finished, from the
  database), as in ``bench_tasks.py``.

The table shows the median of the repetitions for each and the ratio 2/1; "other cores" is
the CPU other processes on the machine took while we measured. Results go to
benchmarks/out/scale-out-*.json. Every process, database, queue and temporary folder this
script creates is removed on exit, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_tasks
import common
import fleet_sim
import psutil

PG_BASE = "postgresql://postgres@127.0.0.1:5432"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
MIN_RATIO = 0.9  # 2 processes must not be slower than 1 (beyond noise)


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


@dataclass
class Config:
    """``k`` server processes on one fresh database, with their workers and agents."""

    k: int
    work: Path
    opts: argparse.Namespace
    servers: list[common.ServerProc] = field(default_factory=list)
    workers: list[Any] = field(default_factory=list)
    pools: list[fleet_sim.Pool] = field(default_factory=list)
    db: str = ""
    queue: str = ""
    seq: int = 0  # a unique params.n per task (identical params would be deduplicated)

    @property
    def label(self) -> str:
        return f"{self.k} server{'s' if self.k > 1 else ''}"

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.servers] + [w.pid for w in self.workers]

    @property
    def db_url(self) -> str:
        return f"{PG_BASE}/{self.db}"

    async def start(self, n: int) -> None:
        self.db = f"tf_bench_{os.getpid()}_{self.k}"
        pg_admin(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")
        pg_admin(f"CREATE DATABASE {self.db}")
        bench_tasks.CLEAN.databases.append(self.db)
        self.queue = f"tf_bench_{os.getpid()}_{self.k}_{uuid.uuid4().hex[:6]}"
        bench_tasks.CLEAN.queues.append(self.queue)
        amqp = f"{AMQP}?queue={self.queue}"
        for _ in range(self.k):  # one data folder: the second finds the first's admin token
            self.servers.append(
                common.start_server(
                    self.work,
                    "--poll-interval",
                    "1800",
                    "--queue",
                    amqp,
                    database=self.db_url,
                )
            )
        for i in range(self.opts.worker_procs):
            log = self.work / f"worker-{i}.log"
            w = common.spawn(
                [
                    sys.executable, "-m", "taskfleet", "worker",
                    "--queue", amqp, "--database", self.db_url,
                    "--concurrency", str(self.opts.worker_concurrency),
                    "--name", f"bench-{self.k}-{i}",
                ],
                log,
            )  # fmt: skip
            self.workers.append(w)
            common.wait_until(lambda log=log: "consuming" in log.read_text(), 60, f"worker {i}")
        # the same total of connections, split over the processes
        self.sim = fleet_sim.Sim(self.servers[0].port, self.opts.pool // self.k)
        self.pools = [self.sim.pool] + [
            fleet_sim.Pool(s.port, self.opts.pool // self.k) for s in self.servers[1:]
        ]
        self.admin = fleet_sim.Admin(self.servers[0].port, self.servers[0].admin_token)
        await self.sim.open_udp()
        for p in self.pools:
            await p.warm()
        tok = await self.admin.call(
            "POST", "/api/v1/tokens", {"kind": "enroll", "name": "bench"}, ok=201
        )
        share = n // self.k
        for i, pool in enumerate(self.pools):
            count = share if i < self.k - 1 else n - share * (self.k - 1)
            e = await fleet_sim.enroll_all(
                self.sim, tok["token"], count, 32, f"k{self.k}", pool=pool, start=i * share
            )
            if e["enrolled"] != count:
                raise RuntimeError(f"{self.label}: enrolled {e['enrolled']}/{count}: {e}")
        for _ in range(2):  # every agent has exchanged with its process (memory is warm)
            await fleet_sim.exchange_round(self.sim, self.opts.pool, 120)
        self.client = httpx.Client(
            headers={"Authorization": f"Bearer {self.servers[0].admin_token}"}, timeout=120
        )
        if self.k > 1:  # the first started leads (the scheduler dispatches there)
            r = self.client.get(self.servers[1].url + "/api/v1/servers")
            r.raise_for_status()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        with contextlib.suppress(Exception):
            self.admin.close()
        with contextlib.suppress(Exception):
            self.sim.close()
        for p in self.pools[1:]:
            p.close()
        for w in self.workers:
            common.stop(w)
        for s in self.servers:
            common.stop(s.popen)
        # the queue and the database go after the event loop (bench_tasks.CLEAN, in main)

    # -- measurements ---------------------------------------------------------------------

    async def exchanges(self, seconds: float) -> dict[str, Any]:
        """Empty exchanges (ack up to date), each agent with its own process, for ``seconds``."""
        agents = list(self.sim.agents.values())
        idx = [0]
        codes: Counter[int] = Counter()
        cpu = bench_tasks.CpuMeter([s.pid for s in self.servers])
        c0 = cpu.total()
        load = common.LoadMeter([os.getpid(), *self.pids])
        t0 = time.monotonic()
        stop_at = t0 + seconds

        async def worker() -> None:
            while time.monotonic() < stop_at:
                a = agents[idx[0]]
                idx[0] = (idx[0] + 1) % len(agents)
                if a.busy:
                    await asyncio.sleep(0)
                    continue
                raw = b'{"ack":%d}' % a.server_seq
                a.busy = True
                try:
                    status, _ = await (a.pool or self.sim.pool).request(
                        a.head + b"%d\r\n\r\n" % len(raw) + raw
                    )
                except (OSError, TimeoutError) as exc:
                    codes[-1] += 1
                    print(f"  exchange error {exc!r}", file=sys.stderr)
                    continue
                finally:
                    a.busy = False
                codes[status] += 1

        await asyncio.gather(*(worker() for _ in range(self.opts.pool)))
        wall = time.monotonic() - t0
        ok = codes.get(200, 0)
        srv = cpu.total() - c0
        return {
            "per_second": ok / wall,
            "seconds": wall,
            "ok": ok,
            "codes": {str(k): v for k, v in codes.items()},
            "server_cpu_us_per_exchange": srv * 1e6 / ok if ok else None,
            "other_cores": load.read()["other_cores"],
        }

    async def activities(self) -> dict[str, Any]:
        """A request to every agent through the first process, until every result is in."""
        await asyncio.sleep(1.5)  # > the tickle min interval since any earlier tickle
        cpu = bench_tasks.CpuMeter([s.pid for s in self.servers])
        c0 = cpu.total()
        load = common.LoadMeter([os.getpid(), *self.pids])
        st0 = Counter(self.sim.stats)
        r = await fleet_sim.run_request(
            self.sim, self.admin, self.servers[0].pid, self.opts.request_timeout
        )
        await self.sim.wait_idle(10)
        st = Counter(self.sim.stats)
        st.subtract(st0)
        span = r["server_span_created_to_last_finished"]
        n = r["total"] or 0
        ok = r["states"].get("succeeded", 0)
        if not r["done"] or ok != n:
            print(f"  warning: {self.label}: request not done: {r['states']}", file=sys.stderr)
        return {
            "per_second": ok / span if span else None,
            "activities": n,
            "succeeded": ok,
            "seconds": span,
            "server_cpu_us_per_activity": (cpu.total() - c0) * 1e6 / ok if ok else None,
            # a tickle from a process that does not serve the agent can come before
            # its own process heard the hint: an empty exchange, then a later one
            "exchanges_per_activity": st["exchanges"] / ok if ok else None,
            "tickles_accepted": st["tickles_accepted"],
            "tickles_rate_limited": st["tickles_rejected"],
            "first_operation_s": r["sim_first_op"],
            "all_operations_s": r["sim_all_ops"],
            "other_cores": load.read()["other_cores"],
        }

    def tasks(self, count: int) -> dict[str, Any]:
        """``count`` no-op server tasks, batches alternating between the processes."""
        cpu = bench_tasks.CpuMeter(self.pids)
        c0 = cpu.total()
        load = common.LoadMeter([os.getpid(), *self.pids])
        t0 = time.time()
        ids: list[int] = []
        i = 0
        while len(ids) < count:
            size = min(self.opts.task_batch, count - len(ids))
            batch = [{"type": "noop", "params": {"n": self.seq + j}} for j in range(size)]
            self.seq += size
            via = 0 if self.opts.tasks_via_leader else i % self.k
            url = self.servers[via].url + "/api/v1/tasks/batch"
            r = self.client.post(url, json={"tasks": batch})
            r.raise_for_status()
            body = r.json()
            items = body if isinstance(body, list) else body.get("tasks", body.get("items", []))
            ids += [int(t["id"]) for t in items]
            i += 1
        lo, hi = min(ids), max(ids)
        deadline = time.monotonic() + self.opts.request_timeout
        rows: list[tuple[Any, ...]] = []
        import psycopg

        with psycopg.connect(self.db_url, connect_timeout=5) as conn:
            while time.monotonic() < deadline:
                done = conn.execute(
                    "SELECT count(*) FROM activities WHERE id BETWEEN %s AND %s "
                    "AND kind = 'server' AND finished_at IS NOT NULL",
                    (lo, hi),
                ).fetchone()
                conn.commit()
                if done and done[0] >= len(ids):
                    break
                time.sleep(0.1)
            rows = conn.execute(
                "SELECT created_at, delivered_at, finished_at, state FROM activities "
                "WHERE id BETWEEN %s AND %s AND kind = 'server'",
                (lo, hi),
            ).fetchall()
        ok = [r for r in rows if r[3] == "succeeded" and r[2] is not None]
        if len(ok) != count:
            print(f"  warning: {self.label}: {len(ok)}/{count} tasks succeeded", file=sys.stderr)
        last = max((r[2] for r in ok), default=t0)
        secs = max(1e-9, last - t0)
        lat = [(r[1] - r[0]) * 1000 for r in ok if r[1] is not None]
        return {
            "per_second": len(ok) / secs,
            "tasks": count,
            "succeeded": len(ok),
            "seconds": secs,
            "p50_submit_to_start_ms": bench_tasks.pct(lat, 50),
            "cpu_ms_per_task": (cpu.total() - c0) * 1000 / max(1, len(ok)),
            "other_cores": load.read()["other_cores"],
        }


def med(runs: list[dict[str, Any]], key: str = "per_second") -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def table(configs: list[Config], results: dict[int, dict[str, list[dict[str, Any]]]]) -> str:
    lines = [
        "| measure | 1 server | 2 servers | 2 / 1 | verdict |",
        "|---|---|---|---|---|",
    ]
    names = {
        "exchanges": "agent exchanges/s (empty, fast path)",
        "activities": "activities/s (handed out + result recorded)",
        "tasks": "server tasks/s (API -> RabbitMQ -> workers)",
    }
    for key, label in names.items():
        one, two = (med(results[c.k][key]) for c in configs)
        runs = " / ".join(
            f"{r['per_second']:,.0f}"
            for c in configs
            for r in results[c.k][key]
            if r.get("per_second") is not None
        )
        if one and two:
            ratio = two / one
            verdict = "PASS" if ratio >= MIN_RATIO else "MISS"
            lines.append(
                f"| {label} | {one:,.0f} | {two:,.0f} | **{ratio:.2f}** | {verdict} "
                f"(runs 1s then 2s: {runs}) |"
            )
        else:
            lines.append(f"| {label} | {one} | {two} | - | MISS (no result) |")
    others = [
        r["other_cores"] for c in configs for k in names for r in results[c.k][k]
    ]  # fmt: skip
    lines.append(
        f"| CPU of other processes while measuring (cores; includes PostgreSQL and RabbitMQ "
        f"working for us, and the idle other configuration) | {min(others):.2f}-{max(others):.2f} "
        "| | | |"
    )
    for c in configs:
        acts = results[c.k]["activities"]
        lines.append(
            f"| {c.label}: exchanges per activity / tickles rate-limited / all operations at "
            f"agents (s), median | {med(acts, 'exchanges_per_activity') or 0:.2f} / "
            f"{med(acts, 'tickles_rate_limited') or 0:.0f} / "
            f"{med(acts, 'all_operations_s') or 0:.2f} "
            "| | | |"
        )
        tasks = results[c.k]["tasks"]
        lines.append(
            f"| {c.label}: tasks p50 submit -> start (ms) / CPU ms per task | "
            f"{med(tasks, 'p50_submit_to_start_ms') or 0:.0f} / "
            f"{med(tasks, 'cpu_ms_per_task') or 0:.2f} | | | |"
        )
    return "\n".join(lines)


async def amain(opts: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="tf-bench-scale-"))
    configs = [Config(1, work / "one", opts), Config(2, work / "two", opts)]
    results: dict[int, dict[str, list[dict[str, Any]]]] = {
        c.k: {"exchanges": [], "activities": [], "tasks": []} for c in configs
    }
    info = machine()
    print(f"machine: {info}", file=sys.stderr)
    t_start = time.monotonic()
    try:
        for c in configs:
            c.work.mkdir()
            print(f"[{c.label}] starting, enrolling {opts.agents} agents ...", file=sys.stderr)
            await c.start(opts.agents)
        for rep in range(opts.repeats):
            order = configs if rep % 2 == 0 else configs[::-1]
            for c in order:
                ex = await c.exchanges(opts.hammer_seconds)
                act = await c.activities()
                ts = c.tasks(opts.tasks)
                results[c.k]["exchanges"].append(ex)
                results[c.k]["activities"].append(act)
                results[c.k]["tasks"].append(ts)
                print(
                    f"[{c.label}] run {rep + 1}: {ex['per_second']:,.0f} exchanges/s, "
                    f"{act['per_second'] or 0:,.0f} activities/s, {ts['per_second']:,.0f} tasks/s "
                    f"(others {ex['other_cores']:.2f}/{act['other_cores']:.2f}/"
                    f"{ts['other_cores']:.2f} cores)",
                    file=sys.stderr,
                )
    finally:
        for c in configs:
            c.close()
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "machine": info,
        "code": {"commit": os.popen("git rev-parse --short HEAD").read().strip()},
        "options": vars(opts),
        "results": {str(k): v for k, v in results.items()},
        "seconds": time.monotonic() - t_start,
    }
    path = common.write_json(f"scale-out-{int(time.time())}.json", out)
    print(
        f"\nScale-out cost, {info['date_utc']}, {info['cores']} cores, Python {info['python']}, "
        f"PostgreSQL + RabbitMQ; {opts.agents} simulated agents, {opts.tasks} tasks, "
        f"{opts.worker_procs} workers x {opts.worker_concurrency}; medians of {opts.repeats} "
        f"({out['seconds']:.0f} s)\n"
    )
    print(table(configs, results))
    print(f"\nJSON: {path}")
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (~1 min)")
    ap.add_argument("--agents", type=int, default=None, help="simulated agents [1000]")
    ap.add_argument("--tasks", type=int, default=None, help="server tasks per run [3000]")
    ap.add_argument("--repeats", type=int, default=None, help="repetitions [3]")
    ap.add_argument("--hammer-seconds", type=float, default=None, help="[5]")
    ap.add_argument("--pool", type=int, default=128, help="keep-alive connections in all")
    ap.add_argument("--worker-procs", type=int, default=2)
    ap.add_argument("--worker-concurrency", type=int, default=16)
    ap.add_argument("--task-batch", type=int, default=250, help="tasks per POST")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument(
        "--tasks-via-leader",
        action="store_true",
        help="submit every task through the first process (the leader) instead of alternating",
    )
    opts = ap.parse_args(argv)
    quick = opts.quick
    opts.agents = opts.agents or (100 if quick else 1000)
    opts.tasks = opts.tasks or (200 if quick else 3000)
    opts.repeats = opts.repeats or (1 if quick else 3)
    opts.hammer_seconds = opts.hammer_seconds or (1.0 if quick else 5.0)
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    try:
        return asyncio.run(amain(opts))
    finally:
        common.stop_all()
        bench_tasks.CLEAN.all()  # our queues and databases


if __name__ == "__main__":
    sys.exit(main())
