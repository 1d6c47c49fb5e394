"""No-op server-task throughput, latency and CPU: taskfleet (embedded, RabbitMQ) vs Celery.

    .venv/bin/python benchmarks/bench_tasks.py [--quick] [--n 20000]

Needs (all on 127.0.0.1): RabbitMQ 5672 guest/guest, PostgreSQL 5432 (trust, user
postgres) and ``pip install -e .[dev,bench]`` (celery is benchmark-only).

Setups, each with N no-op tasks in two phases:
  (a) burn-down: submit all (batches of 5000), then drain;
  (b) continuous: batches of 100 at a steady rate (80% of what (a) sustained, or the
      fixed rate ``--offer`` asks for) while it drains.

* taskfleet embedded: ``taskfleet server`` on SQLite with in-process workers (--workers).
* taskfleet RabbitMQ: server with ``--queue amqp://...?queue=<unique>`` on a fresh
  PostgreSQL database, plus ``--tf-procs`` ``taskfleet worker`` processes.
* Celery on the same RabbitMQ, no-op task, ``--celery-procs`` workers with ``--pool=solo``
  (one process each, like a taskfleet worker), no result backend (ignored results):
  "safe" = durable queue, persistent messages, publisher confirms, acks late, prefetch 1;
  "fast" = transient queue and messages, acks early, prefetch 64.

Figures: tasks/s end to end (first submit to last finish), p50/p99 submit-to-start latency
(taskfleet: delivered_at - created_at from the database; Celery: the task's start time minus
the time passed by the producer just before apply_async) and CPU seconds per 1,000 tasks of
the server and worker processes (psutil; the broker, PostgreSQL and this client are not
counted, for either system). Results go to benchmarks/out/tasks-*.json.

Every loop is bounded in count and time; every process, queue, database and temporary
directory this script creates is removed on exit, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT_DIR = HERE / "out"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
PG_BASE = "postgresql://postgres@127.0.0.1:5432"
PY = sys.executable

TARGET_EMBEDDED_TPS = 2000.0
TARGET_RABBIT_VS_CELERY_SAFE = 2.0
BATCH_MAX = 5000  # the batch endpoint's limit
STEADY_BATCH = 100
STEADY_FRACTION = 0.8  # continuous phase: this share of the burn-down rate
# Continuous "keeps up" (issue 16): the client offered at least this share of the rate
# asked (a server slow to answer a submit slows the offer too), and the tasks were done
# at least at this share of what was offered (first submit to last finish).
KEEP_UP = 0.95

# -- cleanup registry ------------------------------------------------------------------------


@dataclass
class Cleanup:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)

    def stop_procs(self, procs: list[subprocess.Popen[bytes]] | None = None) -> None:
        targets = list(self.procs if procs is None else procs)
        for p in targets:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in targets:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
            # anything left in its process group (prefork children and the like)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            if p in self.procs:
                self.procs.remove(p)

    def drop_queue(self, name: str) -> None:
        async def drop() -> None:
            import aio_pika

            conn = await aio_pika.connect(AMQP, timeout=10)
            async with conn:
                channel = await conn.channel()
                await channel.queue_delete(name)

        try:
            asyncio.run(asyncio.wait_for(drop(), 20))
        except Exception as exc:
            print(f"  warning: could not delete queue {name}: {exc!r}", file=sys.stderr)
        if name in self.queues:
            self.queues.remove(name)

    def drop_database(self, name: str) -> None:
        try:
            pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        except Exception as exc:
            print(f"  warning: could not drop database {name}: {exc!r}", file=sys.stderr)
        if name in self.databases:
            self.databases.remove(name)

    def all(self) -> None:
        self.stop_procs()
        for q in list(self.queues):
            self.drop_queue(q)
        for d in list(self.databases):
            self.drop_database(d)
        for d in list(self.dirs):
            shutil.rmtree(d, ignore_errors=True)
            self.dirs.remove(d)


CLEAN = Cleanup()


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT):
    with open(log, "ab") as out:
        p = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
    CLEAN.procs.append(p)
    return p


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        with contextlib.suppress(Exception):
            v = check()
            if v:
                return v
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


# -- CPU accounting ------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds (user+system) of some processes and their descendants."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in pids]

    def total(self) -> float:
        t = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                c = p.cpu_times()  # children_*: descendants already waited for
                t += c.user + c.system + c.children_user + c.children_system
                for ch in p.children(recursive=True):  # live descendants
                    with contextlib.suppress(psutil.Error):
                        cc = ch.cpu_times()
                        t += cc.user + cc.system
        return t


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    i = min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))
    return v[i]


@dataclass
class Phase:
    setup: str
    phase: str  # burn-down | continuous
    n: int
    done: int
    seconds: float
    tasks_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_s: float
    cpu_s_per_1000: float
    submit_rate: float | None = None  # continuous: offered tasks/s
    note: str = ""


def summarize(
    setup: str,
    phase: str,
    n: int,
    first_submit: float,
    rows: list[tuple[float, float, float]],  # (created/submitted, started, finished)
    cpu: float,
    rate: float | None,
    note: str = "",
) -> Phase:
    done = [r for r in rows if r[1] is not None and r[2] is not None]
    last = max((r[2] for r in done), default=first_submit)
    secs = max(1e-9, last - first_submit)
    lat = [(r[1] - r[0]) * 1000 for r in done]
    return Phase(
        setup,
        phase,
        n,
        len(done),
        round(secs, 3),
        round(len(done) / secs, 1),
        round(pct(lat, 50), 1),
        round(pct(lat, 99), 1),
        round(cpu, 2),
        round(cpu / max(1, len(done)) * 1000, 3),
        None if rate is None else round(rate, 1),
        note,
    )


# -- taskfleet -----------------------------------------------------------------------------------


class TaskfleetRun:
    """One taskfleet server (+ workers) for both phases; tasks told apart by id."""

    def __init__(self, args: argparse.Namespace, work: Path, mode: str) -> None:
        self.args = args
        self.work = work
        self.mode = mode  # embedded | rabbitmq
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = work / f"tf-{mode}"
        self.data_dir.mkdir()
        self.queue_name: str | None = None
        self.db_name: str | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.seq = 0  # params.n, unique per task (identical params would be deduplicated)

    @property
    def setup_name(self) -> str:
        if self.mode == "embedded":
            return f"taskfleet embedded SQLite (--workers {self.args.embedded_workers})"
        return (
            f"taskfleet RabbitMQ+PG ({self.args.tf_procs} worker procs "
            f"x --concurrency {self.args.tf_concurrency})"
        )

    def start(self) -> None:
        server = [
            PY, "-m", "taskfleet", "server",
            "--listen", f"127.0.0.1:{self.port}",
            "--data-dir", str(self.data_dir),
            "--no-tickles",
        ]  # fmt: skip
        if self.mode == "embedded":
            self.db_url = f"sqlite:///{self.data_dir / 'taskfleet.sqlite3'}"
            server += ["--workers", str(self.args.embedded_workers)]
        else:
            self.db_name = "tfbench_" + uuid.uuid4().hex[:12]
            pg_admin(f"CREATE DATABASE {self.db_name}")
            CLEAN.databases.append(self.db_name)
            self.db_url = f"{PG_BASE}/{self.db_name}"
            self.queue_name = "tfbench_" + uuid.uuid4().hex[:12]
            CLEAN.queues.append(self.queue_name)
            self.amqp = f"{AMQP}?queue={self.queue_name}"
            server += ["--queue", self.amqp]
        server += ["--database", self.db_url]
        srv = spawn(server, self.work / f"server-{self.mode}.log")
        self.procs.append(srv)
        wait_for(
            lambda: httpx.get(self.url + "/healthz", timeout=2).status_code == 200,
            60,
            "server",
            srv,
        )
        token_file = self.data_dir / "admin-token"
        self.token = wait_for(
            lambda: token_file.exists() and token_file.read_text().strip(), 20, "admin token"
        )
        if self.mode == "rabbitmq":
            for i in range(self.args.tf_procs):
                log = self.work / f"worker-{i}.log"
                w = spawn(
                    [
                        PY,
                        "-m",
                        "taskfleet",
                        "worker",
                        "--queue",
                        self.amqp,
                        "--database",
                        self.db_url,
                        "--concurrency",
                        str(self.args.tf_concurrency),
                        "--name",
                        f"bench-{i}",
                    ],
                    log,
                )
                self.procs.append(w)
                wait_for(lambda log=log: "consuming" in log.read_text(), 60, f"worker {i}", w)
        self.client = httpx.Client(
            base_url=self.url + "/api/v1",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=120,
        )
        self.cpu = CpuMeter([p.pid for p in self.procs])

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        CLEAN.stop_procs(self.procs)
        if self.queue_name:
            CLEAN.drop_queue(self.queue_name)
        if self.db_name:
            CLEAN.drop_database(self.db_name)

    def _submit(self, count: int) -> list[int]:
        tasks = [{"type": "noop", "params": {"n": self.seq + i}} for i in range(count)]
        self.seq += count
        r = self.client.post("/tasks/batch", json={"tasks": tasks})
        r.raise_for_status()
        body = r.json()
        items = body if isinstance(body, list) else body.get("tasks", body.get("items", []))
        ids = [int(t["id"]) for t in items]
        if len(ids) != count or any(t.get("duplicate_of") for t in items):
            raise RuntimeError(f"batch submit returned {len(ids)} ids for {count} tasks")
        return ids

    # database reads (outside the measured processes)
    def _query(self, sql: str, lo: int, hi: int) -> list[tuple[Any, ...]]:
        if self.mode == "embedded":
            path = self.data_dir / "taskfleet.sqlite3"
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            try:
                return conn.execute(sql.replace("%s", "?"), (lo, hi)).fetchall()
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.db_url, connect_timeout=5) as conn:
            return conn.execute(sql, (lo, hi)).fetchall()

    def _finished(self, lo: int, hi: int) -> int:
        sql = (
            "SELECT count(*) FROM activities WHERE id BETWEEN %s AND %s "
            "AND kind = 'server' AND finished_at IS NOT NULL"
        )
        return int(self._query(sql, lo, hi)[0][0])

    def _rows(self, lo: int, hi: int) -> list[tuple[float, float, float]]:
        sql = (
            "SELECT created_at, delivered_at, finished_at, state FROM activities "
            "WHERE id BETWEEN %s AND %s AND kind = 'server'"
        )
        rows = self._query(sql, lo, hi)
        bad = sum(1 for r in rows if r[3] != "succeeded")
        if bad:
            print(f"  warning: {bad} tasks not succeeded", file=sys.stderr)
        return [(r[0], r[1], r[2]) for r in rows]

    def _drain(self, ids: list[int], deadline: float) -> None:
        lo, hi = min(ids), max(ids)
        n = len(ids)
        while time.monotonic() < deadline:
            if self._finished(lo, hi) >= n:
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{self.mode}: a process exited ({p.args[:4]})")
            time.sleep(0.1)
        print(f"  warning: {self.mode}: drain timed out", file=sys.stderr)

    def burn_down(self, n: int) -> Phase:
        timeout = self.args.phase_timeout
        cpu0 = self.cpu.total()
        t0 = time.time()
        deadline = time.monotonic() + timeout
        ids: list[int] = []
        while len(ids) < n and time.monotonic() < deadline:
            ids += self._submit(min(BATCH_MAX, n - len(ids)))
        t_sub = time.time() - t0
        self._drain(ids, deadline)
        cpu = self.cpu.total() - cpu0
        ph = summarize(
            self.setup_name, "burn-down", n, t0, self._rows(min(ids), max(ids)), cpu, None,
            f"submit took {t_sub:.1f}s",
        )  # fmt: skip
        return ph

    def continuous(self, n: int, rate: float) -> Phase:
        timeout = self.args.phase_timeout
        cpu0 = self.cpu.total()
        t0 = time.time()
        m0 = time.monotonic()
        deadline = m0 + timeout
        ids: list[int] = []
        batches = (n + STEADY_BATCH - 1) // STEADY_BATCH
        for b in range(batches):
            if time.monotonic() > deadline:
                break
            due = m0 + b * STEADY_BATCH / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ids += self._submit(min(STEADY_BATCH, n - len(ids)))
        offered = len(ids) / max(1e-9, time.monotonic() - m0)
        self._drain(ids, deadline)
        cpu = self.cpu.total() - cpu0
        return summarize(
            self.setup_name, "continuous", n, t0, self._rows(min(ids), max(ids)), cpu, offered,
            f"target {rate:.0f}/s in batches of {STEADY_BATCH}",
        )  # fmt: skip


# -- Celery --------------------------------------------------------------------------------------


class CeleryRun:
    def __init__(self, args: argparse.Namespace, work: Path, mode: str) -> None:
        self.args = args
        self.mode = mode
        self.work = work
        self.out = work / f"celery-{mode}"
        self.out.mkdir()
        self.queue = f"celbench_{mode}_" + uuid.uuid4().hex[:12]
        self.env = {
            "BENCH_CELERY_MODE": mode,
            "BENCH_CELERY_QUEUE": self.queue,
            "BENCH_CELERY_OUT": str(self.out),
            "BENCH_CELERY_BROKER": AMQP,
            "PYTHONPATH": str(HERE),
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def setup_name(self) -> str:
        return f"Celery {self.mode} ({self.args.celery_procs} procs x --pool=solo)"

    def start(self) -> None:
        CLEAN.queues.append(self.queue)
        for k, v in self.env.items():
            os.environ[k] = v
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        import importlib

        import tasks_celery_app

        self.mod = importlib.reload(tasks_celery_app)  # picks up this mode's environment
        celery = str(Path(PY).parent / "celery")
        for i in range(self.args.celery_procs):
            log = self.work / f"celery-{self.mode}-{i}.log"
            p = spawn(
                [
                    celery,
                    "-A",
                    "tasks_celery_app",
                    "worker",
                    "--pool=solo",
                    "-Q",
                    self.queue,
                    "-n",
                    f"bench{i}-{self.mode}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "-l",
                    "INFO",
                ],
                log,
                env=self.env,
                cwd=HERE,
            )
            self.procs.append(p)
            wait_for(lambda log=log: "ready." in log.read_text(), 60, f"celery worker {i}", p)
        self.cpu = CpuMeter([p.pid for p in self.procs])
        self.seen_lines = 0

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.mod.app.pool.force_close_all()
            # kombu keeps producer pools per broker URL process-wide: the next run's
            # app (a repetition) must not get this run's closed one.
            import kombu.pools

            kombu.pools.reset()
        CLEAN.stop_procs(self.procs)
        CLEAN.drop_queue(self.queue)

    def _read(self) -> list[tuple[float, float, float]]:
        rows = []
        for f in self.out.glob("celery-*.txt"):
            for line in f.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3:
                    rows.append((float(parts[0]), float(parts[1]), float(parts[2])))
        return rows

    def _count(self) -> int:
        return sum(f.read_bytes().count(b"\n") for f in self.out.glob("celery-*.txt"))

    def _drain(self, target: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self._count() >= target:
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError("a celery worker exited")
            time.sleep(0.1)
        print(f"  warning: celery {self.mode}: drain timed out", file=sys.stderr)

    def _phase_rows(self, before: set[tuple[float, float, float]]):
        return [r for r in self._read() if r not in before]

    def burn_down(self, n: int) -> Phase:
        before = set(self._read())
        base = len(before)
        task = self.mod.noop
        cpu0 = self.cpu.total()
        t0 = time.time()
        deadline = time.monotonic() + self.args.phase_timeout
        with self.mod.app.producer_or_acquire() as producer:
            for i in range(n):
                task.apply_async((time.time(),), producer=producer)
                if i % 1000 == 0 and time.monotonic() > deadline:
                    break
        t_sub = time.time() - t0
        self._drain(base + n, deadline)
        cpu = self.cpu.total() - cpu0
        return summarize(
            self.setup_name, "burn-down", n, t0, self._phase_rows(before), cpu, None,
            f"submit took {t_sub:.1f}s",
        )  # fmt: skip

    def continuous(self, n: int, rate: float) -> Phase:
        before = set(self._read())
        base = len(before)
        task = self.mod.noop
        cpu0 = self.cpu.total()
        t0 = time.time()
        m0 = time.monotonic()
        deadline = m0 + self.args.phase_timeout
        sent = 0
        batches = (n + STEADY_BATCH - 1) // STEADY_BATCH
        with self.mod.app.producer_or_acquire() as producer:
            for b in range(batches):
                if time.monotonic() > deadline:
                    break
                delay = m0 + b * STEADY_BATCH / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                for _ in range(min(STEADY_BATCH, n - sent)):
                    task.apply_async((time.time(),), producer=producer)
                    sent += 1
        offered = sent / max(1e-9, time.monotonic() - m0)
        self._drain(base + sent, deadline)
        cpu = self.cpu.total() - cpu0
        return summarize(
            self.setup_name, "continuous", n, t0, self._phase_rows(before), cpu, offered,
            f"target {rate:.0f}/s in batches of {STEADY_BATCH}",
        )  # fmt: skip


# -- driver --------------------------------------------------------------------------------------


def run_setup(run: TaskfleetRun | CeleryRun, n: int, results: list[Phase]) -> None:
    print(f"\n== {run.setup_name}: N={n}", flush=True)
    try:
        run.start()
        a = run.burn_down(n)
        results.append(a)
        print(f"  burn-down: {a.tasks_per_s:.0f} tasks/s, p50 {a.p50_ms} ms", flush=True)
        rate = run.args.offer or max(50.0, STEADY_FRACTION * a.tasks_per_s)
        b = run.continuous(n, rate)
        results.append(b)
        print(f"  continuous: {b.tasks_per_s:.0f} tasks/s, p50 {b.p50_ms} ms", flush=True)
    except Exception as exc:
        print(f"  FAILED: {exc!r}", file=sys.stderr, flush=True)
        results.append(Phase(run.setup_name, "error", n, 0, 0, 0, 0, 0, 0, 0, None, repr(exc)))
    finally:
        run.stop()


def scheduler_figure(timeout: float) -> dict[str, Any]:
    try:
        p = subprocess.run(
            [PY, str(HERE / "bench_scheduler.py")],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"bench_scheduler.py took over {timeout:.0f}s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    return {"rc": p.returncode, "lines": lines}


def fmt_table(results: list[Phase]) -> str:
    head = (
        f"{'setup':<52} {'phase':<11} {'done':>6} {'secs':>7} {'tasks/s':>8} "
        f"{'offered/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU s/1k':>8}"
    )
    out = [head, "-" * len(head)]
    for r in results:
        offered = "" if r.submit_rate is None else f"{r.submit_rate:.0f}"
        out.append(
            f"{r.setup:<52} {r.phase:<11} {r.done:>6} {r.seconds:>7.2f} {r.tasks_per_s:>8.0f} "
            f"{offered:>9} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f} {r.cpu_s_per_1000:>8.3f}"
        )
    return "\n".join(out)


def phase_verdicts(results: list[Phase], offer: float | None = None) -> dict[str, Any]:
    """Per phase: the targets met or missed and the ratios between setups (printed too)."""

    def best(prefix: str, phase: str) -> Phase | None:
        # only complete phases count: a stalled or timed-out one would give a false ratio
        r = next((r for r in results if r.setup.startswith(prefix) and r.phase == phase), None)
        if r is not None and r.done < r.n:
            print(f"[{phase}] {r.setup}: only {r.done}/{r.n} done: left out of the verdicts")
            return None
        return r

    verdicts: dict[str, Any] = {}
    print()
    for phase in ("burn-down", "continuous"):
        emb = best("taskfleet embedded", phase)
        rab = best("taskfleet RabbitMQ", phase)
        safe = best("Celery safe", phase)
        fast = best("Celery fast", phase)
        v: dict[str, Any] = {}
        if emb and phase == "continuous" and emb.submit_rate is not None:
            # The target: keeps up with 2,000/s offered (bench run with --offer).
            offered = emb.submit_rate
            ok = offered >= KEEP_UP * TARGET_EMBEDDED_TPS and emb.tasks_per_s >= KEEP_UP * offered
            v["embedded_tps"] = emb.tasks_per_s
            v["embedded_offered"] = offered
            v["embedded_target"] = "PASS" if ok else "MISS"
            print(
                f"[{phase}] embedded {emb.tasks_per_s:.0f} tasks/s done of {offered:.0f}/s "
                f"offered vs target: keeps up (>= {KEEP_UP:.0%}) with >= "
                f"{TARGET_EMBEDDED_TPS:.0f}/s offered: {v['embedded_target']}"
                + ("" if offer else " (not the issue's measure: run with --offer 2000)")
            )
        elif emb:
            ok = emb.tasks_per_s >= TARGET_EMBEDDED_TPS
            v["embedded_tps"] = emb.tasks_per_s
            v["embedded_target"] = "PASS" if ok else "MISS"
            print(
                f"[{phase}] embedded {emb.tasks_per_s:.0f} tasks/s vs target "
                f">= {TARGET_EMBEDDED_TPS:.0f}: {v['embedded_target']}"
            )
        if rab and safe and safe.tasks_per_s:
            ratio = rab.tasks_per_s / safe.tasks_per_s
            v["rabbitmq_over_celery_safe"] = round(ratio, 2)
            v["rabbitmq_target"] = "PASS" if ratio >= TARGET_RABBIT_VS_CELERY_SAFE else "MISS"
            print(
                f"[{phase}] taskfleet RabbitMQ / Celery safe = {ratio:.2f}x "
                f"(target >= {TARGET_RABBIT_VS_CELERY_SAFE:.0f}x): {v['rabbitmq_target']}"
            )
        if rab and fast and fast.tasks_per_s:
            v["rabbitmq_over_celery_fast"] = round(rab.tasks_per_s / fast.tasks_per_s, 2)
            print(f"[{phase}] taskfleet RabbitMQ / Celery fast = {v['rabbitmq_over_celery_fast']}x")
        if emb and safe and safe.tasks_per_s:
            v["embedded_over_celery_safe"] = round(emb.tasks_per_s / safe.tasks_per_s, 2)
        if emb and fast and fast.tasks_per_s:
            v["embedded_over_celery_fast"] = round(emb.tasks_per_s / fast.tasks_per_s, 2)
        if "embedded_over_celery_safe" in v or "embedded_over_celery_fast" in v:
            print(
                f"[{phase}] embedded / Celery safe = {v.get('embedded_over_celery_safe')}x, "
                f"embedded / Celery fast = {v.get('embedded_over_celery_fast')}x"
            )
        verdicts[phase] = v
    return verdicts


def median_ratios(per_rep: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each same-run ratio over the repetitions (printed too)."""
    out: dict[str, Any] = {}
    print("\n-- median over the repetitions")
    for phase in ("burn-down", "continuous"):
        keys = sorted(
            {k for v in per_rep for k in v.get(phase, {}) if k.endswith(("_tps", "fast", "safe"))}
        )
        out[phase] = {}
        for k in keys:
            values = [v[phase][k] for v in per_rep if k in v.get(phase, {})]
            out[phase][k] = statistics.median(values)
            each = ", ".join(f"{x:.2f}" for x in values)
            print(f"[{phase}] {k}: median {out[phase][k]:.2f} of {each}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N=2000 (a few minutes)")
    ap.add_argument("--n", type=int, default=None, help="tasks per phase [20000; quick 2000]")
    ap.add_argument("--embedded-workers", type=int, default=16, help="server --workers [16]")
    ap.add_argument("--tf-procs", type=int, default=2, help="taskfleet worker processes [2]")
    ap.add_argument("--tf-concurrency", type=int, default=16, help="taskfleet worker --concurrency")
    ap.add_argument("--celery-procs", type=int, default=2, help="celery solo workers [2]")
    ap.add_argument("--only", default="embedded,rabbitmq,celery-safe,celery-fast,scheduler")
    ap.add_argument(
        "--offer",
        type=float,
        default=None,
        help="continuous phase: offer this many tasks/s [80%% of the burn-down rate]",
    )
    ap.add_argument("--phase-timeout", type=float, default=None, help="seconds per phase")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the setups this many times, the order reversed every other time, and "
        "judge the same-run ratios by their median [1]",
    )
    args = ap.parse_args()
    n = args.n or (2000 if args.quick else 20000)
    if not 1 <= n <= 200_000:
        ap.error("--n must be 1..200000")
    if args.offer is not None and not 1 <= args.offer <= 100_000:
        ap.error("--offer must be 1..100000 tasks/s")
    if not 1 <= args.repeat <= 20:
        ap.error("--repeat must be 1..20")
    args.phase_timeout = args.phase_timeout or max(60.0, n / 50)
    only = set(args.only.split(","))
    OUT_DIR.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tfbench-"))
    CLEAN.dirs.append(work)
    keep_logs = OUT_DIR / "tasks-logs"

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    started = time.time()
    results: list[Phase] = []
    sched: dict[str, Any] | None = None
    setups: list[tuple[str, Callable[[Path], Any]]] = [
        ("embedded", lambda w: TaskfleetRun(args, w, "embedded")),
        ("rabbitmq", lambda w: TaskfleetRun(args, w, "rabbitmq")),
        ("celery-safe", lambda w: CeleryRun(args, w, "safe")),
        ("celery-fast", lambda w: CeleryRun(args, w, "fast")),
    ]
    reps: list[list[Phase]] = []
    try:
        for rep in range(args.repeat):
            # Alternate the order: a machine whose load drifts favours neither side.
            order = setups if rep % 2 == 0 else setups[::-1]
            reps.append([])
            rep_work = work / f"rep{rep + 1}"  # each run's files apart (the logs are kept)
            rep_work.mkdir()
            for name, make in order:
                if name in only:
                    run_setup(make(rep_work), n, reps[-1])
            results.extend(reps[-1])
        if "scheduler" in only and not args.quick:
            print("\n== benchmarks/bench_scheduler.py", flush=True)
            sched = scheduler_figure(300)
    finally:
        # keep the process logs of the last run for inspection (benchmarks/out is gitignored)
        with contextlib.suppress(Exception):
            CLEAN.stop_procs()
            shutil.rmtree(keep_logs, ignore_errors=True)
            keep_logs.mkdir()
            for f in work.glob("**/*.log"):
                shutil.copy(f, keep_logs / f"{f.parent.name}-{f.name}")
        CLEAN.all()

    duration = time.time() - started
    print("\n" + fmt_table(results))

    if args.repeat == 1:
        verdicts = phase_verdicts(results, args.offer)
    else:
        per_rep = []
        for i, rep_results in enumerate(reps, 1):
            print(f"\n-- repetition {i}", end="")
            per_rep.append(phase_verdicts(rep_results, args.offer))
        verdicts = {"repetitions": per_rep, "median": median_ratios(per_rep)}
    if sched is not None:
        print("\nbench_scheduler.py (pass over 100k pending):")
        for ln in sched.get("lines", [sched.get("error", "")]):
            print("  " + ln)
    else:
        print("\nscheduler pass over 100k pending: see benchmarks/bench_scheduler.py (not run)")
    print(f"\nduration {duration:.0f}s; N={n}")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    doc = {
        "when": stamp,
        "n": n,
        "quick": args.quick,
        "duration_s": round(duration, 1),
        "config": {
            "embedded_workers": args.embedded_workers,
            "offer": args.offer,
            "tf_worker_procs": args.tf_procs,
            "tf_worker_concurrency": args.tf_concurrency,
            "celery_procs": args.celery_procs,
            "celery_pool": "solo",
            "celery_result_backend": None,
            "cpus": os.cpu_count(),
        },
        "results": [asdict(r) for r in results],
        "targets": verdicts,
        "scheduler": sched,
    }
    path = OUT_DIR / f"tasks-{stamp}.json"
    path.write_text(json.dumps(doc, indent=2))
    (OUT_DIR / "tasks-latest.json").write_text(json.dumps(doc, indent=2))
    print(f"results: {path}")
    return 1 if any(r.phase == "error" for r in results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        CLEAN.all()
