"""Shared helpers for the benchmarks: process hygiene, the server under test, sampling.

Every child process is started in its own session (so one killpg stops it and
whatever it spawned) and with PR_SET_PDEATHSIG, so that even a benchmark that is
SIGKILLed leaves nothing behind. Every wait here is bounded by a deadline.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "benchmarks" / "out"
HOST = "127.0.0.1"  # every byte of benchmark traffic stays on loopback

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_children: list[subprocess.Popen[bytes]] = []
_children_lock = threading.Lock()


def _child_setup() -> None:
    # Runs in the child between fork and exec: die with the parent.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def spawn(
    args: list[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    new_session: bool = True,
) -> subprocess.Popen[bytes]:
    """Start a child with output to ``log``; it is stopped by ``stop_all`` at exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        p = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=new_session,
            preexec_fn=_child_setup,
            env={**os.environ, **(env or {})},
        )
    with _children_lock:
        _children.append(p)
    return p


def stop(p: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL it if it does not go in time."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
    # A group may outlive its leader (e.g. a script the agent ran): reap the rest.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    with _children_lock:
        if p in _children:
            _children.remove(p)


def stop_many(procs: list[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    """Stop many children in parallel: SIGTERM all, wait once, SIGKILL stragglers."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.01, deadline - time.monotonic()))
    for p in procs:
        stop(p, timeout=2)


def stop_all() -> None:
    with _children_lock:
        procs = list(_children)
    stop_many(procs)


def leftover_pids() -> list[int]:
    with _children_lock:
        return [p.pid for p in _children if p.poll() is None]


def install_cleanup() -> None:
    """Stop every child at exit, on SIGTERM and SIGHUP too (Ctrl-C raises KeyboardInterrupt)."""
    atexit.register(stop_all)
    # A shell that starts us in the background sets SIGINT to "ignore"; restore it
    # so Ctrl-C / kill -INT always means "stop and clean up".
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.last = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss
            except psutil.Error:
                return
            self.last = rss
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


class CpuMeter:
    """CPU seconds used by a process between ``start`` and ``read`` (user + system)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.t0 = time.monotonic()
        self.c0 = self._cpu()
        self.th0 = self._threads()

    def _threads(self) -> dict[int, float]:
        try:
            return {t.id: t.user_time + t.system_time for t in self.proc.threads()}
        except psutil.Error:
            return {}

    def split(self) -> dict[str, float]:
        """CPU cores used since start: the main thread (the event loop) and the others
        (for the server: aiosqlite's database threads)."""
        wall = time.monotonic() - self.t0
        now = self._threads()
        main = now.get(self.proc.pid, 0.0) - self.th0.get(self.proc.pid, 0.0)
        other = sum(v - self.th0.get(k, 0.0) for k, v in now.items() if k != self.proc.pid)
        return {"main_thread_cores": main / wall, "other_threads_cores": other / wall}

    def _cpu(self) -> float:
        try:
            t = self.proc.cpu_times()
        except psutil.Error:
            return 0.0
        return t.user + t.system

    def read(self) -> tuple[float, float]:
        """(cpu seconds, wall seconds) since start."""
        return self._cpu() - self.c0, time.monotonic() - self.t0


def cpu_seconds(pids: list[int], children: bool = False) -> float:
    """User + system CPU seconds of these processes (``children``: plus their waited-for
    children's, e.g. the scripts an agent ran)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
            if children:
                total += t.children_user + t.children_system
    return total


def settle(pids: list[int], below: float, timeout: float) -> float:
    """Wait (bounded) until these processes together use less than ``below`` cores over
    a second (e.g. agents done with their first inventory); the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        c0 = cpu_seconds(pids, children=True)
        time.sleep(1.0)
        if cpu_seconds(pids, children=True) - c0 < below:
            break
    return time.monotonic() - t0


class FsyncProbe:
    """Writes a byte and fsyncs a file in ``folder`` every ``interval`` seconds in a
    thread, timing each fsync: what a small durable commit (a spool, a state store)
    waits for on this disk at that moment. ``window(t0, t1)``: the fsyncs begun between
    two ``time.monotonic()`` readings."""

    def __init__(self, folder: Path, interval: float = 0.05) -> None:
        self.path = folder / "fsync-probe"
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (monotonic start, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fsync-probe", daemon=True)

    def start(self) -> FsyncProbe:
        self._thread.start()
        return self

    def _run(self) -> None:
        fd = os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            while not self._stop.is_set():
                os.pwrite(fd, b"x", 0)
                t = time.monotonic()
                os.fsync(fd)
                self.samples.append((t, time.monotonic() - t))
                self._stop.wait(self.interval)
        finally:
            os.close(fd)

    def window(self, t0: float, t1: float) -> dict[str, float | None]:
        xs = [d * 1000 for t, d in self.samples if t0 <= t <= t1]
        return {
            "count": len(xs),
            "p50_ms": percentile(xs, 50),
            "p99_ms": percentile(xs, 99),
            "max_ms": max(xs) if xs else None,
        }

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def http_status(port: int, path: str = "/healthz", timeout: float = 1.0) -> int | None:
    """The status of ``GET path`` on a loopback port (None: nothing answered)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as c:
            c.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            head = c.recv(64)
    except OSError:
        return None
    code = head[9:12]
    return int(code) if head.startswith(b"HTTP/1.1 ") and code.isdigit() else None


@dataclass
class ServerProc:
    url: str
    port: int
    data_dir: Path
    database: str
    popen: subprocess.Popen[bytes]
    log: Path
    admin_token: str = ""
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid


def start_server(
    workdir: Path,
    *extra: str,
    port: int | None = None,
    database: str | None = None,
    launcher: str | None = None,
) -> ServerProc:
    """A real ``taskfleet server`` on loopback with embedded SQLite in ``workdir``.

    ``launcher``: a script to run instead of ``-m taskfleet`` (same CLI), e.g.
    benchmarks/experiments/patched_server.py to measure suggested changes.
    """
    port = port or free_port()
    data_dir = workdir / "server"
    database = database or f"sqlite:///{data_dir / 'taskfleet.sqlite3'}"
    log = workdir / f"server-{port}-{int(time.time() * 1000)}.log"
    args = [
        sys.executable,
        *([launcher] if launcher else ["-m", "taskfleet"]),
        "server",
        "--listen",
        f"{HOST}:{port}",
        "--data-dir",
        str(data_dir),
        "--database",
        database,
        "--log-format",
        "json",
        *extra,
    ]
    p = spawn(args, log)
    s = ServerProc(f"http://{HOST}:{port}", port, data_dir, database, p, log, args=list(extra))

    def up() -> bool:
        if p.poll() is not None:
            raise RuntimeError(f"server exited ({p.returncode}):\n{log.read_text()[-3000:]}")
        return http_status(port) == 200

    wait_until(up, 90, "server to start")
    token_file = data_dir / "admin-token"
    s.admin_token = wait_until(
        lambda: token_file.exists() and token_file.read_text().strip(), 10, "admin token"
    )
    return s


def server_log_problems(log: Path, limit: int = 5) -> list[str]:
    """Error/warning lines of a JSON server log (tracebacks are what matters)."""
    out = []
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("level") in ("error", "critical"):
                out.append(rec.get("msg", "")[:300])
    return out[:limit]


def write_json(name: str, data: Any) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / name
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


class PySpy:
    """``py-spy record`` of a process while the block runs (no-op when ``out`` is None).

    Raw (collapsed-stack) output; ``benchmarks/profile_summary.py`` ranks it.
    """

    def __init__(
        self, pid: int, out: Path | None, rate: int = 200, nonblocking: bool = False
    ) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self.nonblocking = nonblocking
        self.p: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PySpy:
        if self.out is None:
            return self
        exe = Path(sys.executable).parent / "py-spy"
        if not exe.exists():
            raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.p = spawn(
            [
                str(exe),
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                str(self.rate),
                "--format",
                "raw",
                "--output",
                str(self.out),
                *(["--nonblocking"] if self.nonblocking else []),
            ],
            self.out.with_suffix(".log"),
        )
        time.sleep(0.5)  # let it attach
        return self

    def __exit__(self, *exc: object) -> None:
        if self.p is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.p.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(30)
        stop(self.p)


def sched_cpu_ns(pid: int) -> int | None:
    """CPU time of all a process's threads in ns from /proc/PID/task/*/schedstat.

    psutil's cpu_times count 10 ms clock ticks: over a 20 s window one tick is
    0.5 ms/s, as large as the idle-CPU target itself. schedstat is exact.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


class LoadMeter:
    """Machine-wide CPU use in a window, split into ours and everybody else's.

    The benchmark machine may be shared (other test runs): ``other_cores`` says how
    much CPU processes we did not start took while we measured (``top_others`` names
    them); ``steal_cores`` is time the hypervisor gave to other guests. "Ours" counts
    the children our processes waited for too (an agent's scripts, a CLI command the
    benchmark ran): short-lived, they would otherwise count as somebody else's load.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = set(pids)
        self.all0 = self._all()
        self.t0 = time.monotonic()
        self.c0 = psutil.cpu_times()

    @staticmethod
    def _all() -> dict[int, tuple[float, str, float]]:
        """pid -> (its CPU seconds, its command, its waited-for children's CPU seconds)."""
        out = {}
        for p in psutil.process_iter(["cmdline", "name"]):
            try:
                t = p.cpu_times()
                cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])
            except psutil.Error:
                continue
            out[p.pid] = (t.user + t.system, cmd[:80], t.children_user + t.children_system)
        return out

    @staticmethod
    def _busy(c: Any) -> float:
        guest = getattr(c, "guest", 0.0) + getattr(c, "guest_nice", 0.0)
        return sum(c) - guest - c.idle - getattr(c, "iowait", 0.0) - getattr(c, "steal", 0.0)

    def read(self) -> dict[str, Any]:
        c1 = psutil.cpu_times()
        wall = time.monotonic() - self.t0
        all1 = self._all()
        busy = self._busy(c1) - self._busy(self.c0)
        ours = sum(
            all1[p][0] - self.all0[p][0] + all1[p][2] - self.all0[p][2]
            for p in self.pids
            if p in all1 and p in self.all0
        )
        others = sorted(
            (
                (all1[p][0] - self.all0[p][0], all1[p][1])
                for p in all1
                if p in self.all0 and p not in self.pids
            ),
            reverse=True,
        )
        fields = {
            f: (getattr(c1, f) - getattr(self.c0, f)) / wall
            for f in ("user", "system", "irq", "softirq", "steal", "iowait")
            if hasattr(c1, f)
        }
        return {
            "machine_busy_cores": busy / wall,
            "ours_cores": ours / wall,
            "other_cores": max(0.0, busy - ours) / wall,
            "steal_cores": fields.get("steal", 0.0),
            "machine_fields_cores": fields,
            "top_others": [(round(c / wall, 2), cmd) for c, cmd in others[:3] if c > 0],
        }


QUIET_CORES = 0.3  # other processes' CPU below which the machine counts as quiet
DISTURBED_CORES = 0.3  # other processes' CPU during a measurement that marks it disturbed
# never wait longer than this for quiet; measure anyway (run.py --quick: 5 s)
QUIET_MAX_WAIT = float(os.environ.get("TASKFLEET_BENCH_QUIET_WAIT", "30"))


_gate_wait = [QUIET_MAX_WAIT]  # halves after each gate that timed out (min 5 s)


def _gate_done(waited: float, other: float) -> bool:
    limit = _gate_wait[0]
    if other < QUIET_CORES:
        _gate_wait[0] = QUIET_MAX_WAIT
        return True
    if waited >= limit:
        # The machine stays busy: do not keep paying the full wait at every gate.
        _gate_wait[0] = max(min(5.0, QUIET_MAX_WAIT), limit / 2)
        return True
    return False


async def wait_quiet_async(pids: list[int]) -> dict[str, float]:
    """Before a timed measurement, wait (bounded) until other processes are quiet."""
    import asyncio

    t0 = time.monotonic()
    while True:
        meter = LoadMeter(pids)
        await asyncio.sleep(1.0)
        other = meter.read()["other_cores"]
        waited = time.monotonic() - t0
        if _gate_done(waited, other):
            return {"waited_s": waited, "other_cores_before": other}


def wait_quiet(pids: list[int]) -> dict[str, float]:
    t0 = time.monotonic()
    while True:
        meter = LoadMeter(pids)
        time.sleep(1.0)
        other = meter.read()["other_cores"]
        waited = time.monotonic() - t0
        if _gate_done(waited, other):
            return {"waited_s": waited, "other_cores_before": other}


def disturbed(load: dict[str, float]) -> bool:
    return load.get("other_cores", 0.0) > DISTURBED_CORES


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key`` among undisturbed runs (all runs if none is)."""
    pool = [r for r in runs if not r.get("disturbed")] or runs
    pool = sorted(pool, key=lambda r: r[key] if r[key] is not None else float("inf"))
    return pool[(len(pool) - 1) // 2]


# -- metrics ---------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} (comments and bad lines skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def scrape_metrics(url: str, timeout: float = 10.0) -> dict[str, float]:
    """``GET url/metrics`` of a server or relay, parsed (``parse_metrics``)."""
    import httpx

    r = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout)
    r.raise_for_status()
    return parse_metrics(r.text)


def metric_sum(metrics: dict[str, float], prefix: str) -> float:
    """The sum of every series whose key starts with ``prefix`` (all its labels)."""
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


# -- real relays and real agents ---------------------------------------------------------


@dataclass
class RelayProc:
    """A real ``taskfleet relay`` started by ``start_relays``."""

    index: int
    port: int
    tickle_port: int
    state_dir: Path
    log: Path
    popen: subprocess.Popen[bytes]
    pool: Any = None  # relay_sim: the simulated agents' connections to it
    scrape: Any = None  # relay_sim: its /metrics
    computers: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def name(self) -> str:
        return f"relay{self.index}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def start_relays(
    workdir: Path,
    server: ServerProc,
    token: str,
    count: int,
    launcher: str | None = None,
    extra: tuple[str, ...] = (),
) -> list[RelayProc]:
    """``count`` real relays, enrolled with ``token``, serving agents once /healthz is 200.
    ``launcher``: a script run instead of ``-m taskfleet`` (same CLI), e.g.
    benchmarks/experiments/patched_relay.py; ``extra``: more relay options."""
    relays = []
    for i in range(count):
        port = free_port()
        udp = free_port(socket.SOCK_DGRAM)
        state = workdir / f"relay{i}"
        log = workdir / f"relay{i}.log"
        args = [
            sys.executable,
            *([launcher] if launcher else ["-m", "taskfleet"]),
            "relay",
            "--server",
            server.url,
            "--state-dir",
            str(state),
            "--listen",
            f"{HOST}:{port}",
            "--advertise",
            f"http://{HOST}:{port}",
            "--tickle-port",
            str(udp),
            "--tickle-bind",
            HOST,
            "--name",
            f"bench-relay-{i}",
            "--log-format",
            "json",
            *extra,
        ]
        # the token in the environment, not on the command line (visible in ps)
        p = spawn(args, log, env={"TASKFLEET_RELAY_TOKEN": token})
        relays.append(RelayProc(i, port, udp, state, log, p))

    def ready() -> bool:
        for r in relays:
            if r.popen.poll() is not None:
                raise RuntimeError(
                    f"relay {r.index} exited ({r.popen.returncode}):\n{r.log.read_text()[-3000:]}"
                )
        return all(http_status(r.port) == 200 for r in relays)

    wait_until(ready, 90, "relays to enroll")
    return relays


@dataclass
class AgentProc:
    """A real ``taskfleet agent`` started by ``start_agents``."""

    index: int
    state_dir: Path
    log: Path
    tickle_port: int
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid


def start_agents(
    workdir: Path,
    server_url: str,
    token: str,
    count: int,
    *,
    extra: Callable[[int], list[str]] | None = None,
    spawn_gap: float = 0.01,
) -> list[AgentProc]:
    """``count`` real agents, each with its own state folder and UDP tickle port on
    loopback, scripts allowed, enrolling with ``token`` (in the environment, not on the
    command line). ``extra(i)``: more options for agent ``i`` (e.g. ``--relay URL``)."""
    agents: list[AgentProc] = []
    ports: set[int] = set()
    for i in range(count):
        port = free_port(socket.SOCK_DGRAM)
        while port in ports:
            port = free_port(socket.SOCK_DGRAM)
        ports.add(port)
        state = workdir / f"agent-{i}"
        log = workdir / f"agent-{i}.log"
        args = [
            sys.executable,
            "-m",
            "taskfleet",
            "agent",
            "--server",
            server_url,
            "--state-dir",
            str(state),
            "--tickle-port",
            str(port),
            "--tickle-bind",
            HOST,
            "--allow-scripts",
            "--hostname",
            f"bench-{i}",
            "--log-format",
            "json",
            *(extra(i) if extra else []),
        ]
        p = spawn(args, log, env={"TASKFLEET_ENROLL_TOKEN": token})
        agents.append(AgentProc(i, state, log, port, p))
        time.sleep(spawn_gap)
    return agents


def wait_agents_ready(agents: list[AgentProc], timeout: float) -> None:
    """Until every agent logged "agent ready" (an agent that exits fails it at once)."""
    ready: set[int] = set()

    def check() -> bool:
        for a in agents:
            if a.popen.poll() is not None:
                raise RuntimeError(f"agent {a.index} exited:\n{a.log.read_text()[-2000:]}")
            if a.index not in ready and "agent ready" in a.log.read_text(errors="replace"):
                ready.add(a.index)
        return len(ready) == len(agents)

    wait_until(check, timeout, "all agents ready", every=0.5)
