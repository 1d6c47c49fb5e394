"""Fleet simulator: N lightweight simulated agents in one process against a real server.

The simulated agents speak the real protocol (``taskfleet.protocol.exchange``)
over real HTTP/1.1 and real UDP, against a real ``taskfleet server`` subprocess
with embedded SQLite in a temp folder:

* enrollment: ``POST /agent/v1/enroll`` with an enrollment token made through
  the admin API with the bootstrap admin token;
* exchanges: ``POST /agent/v1/exchange`` with ``ack`` = highest server seq
  stored, results resent until the server acks their seq, server messages at
  or below our ack ignored (at-least-once, exactly-once effect);
* tickles: every simulated agent reports the SAME tickle port; one UDP socket
  here demultiplexes by the computer id in the datagram header and checks
  each datagram with that computer's ``TickleVerifier`` (MAC, skew, replay,
  rate limit) before the agent exchanges.

HTTP goes over a bounded pool of keep-alive connections (``--pool``, default
256) shared by all simulated agents, not one connection per agent: the server
authenticates every exchange by its headers, not by its connection.

Phases per N (see ``run_n``): enroll; idle RSS; (c) empty-exchange hammer;
(a) request -> all results with tickles; restart the server with
``--no-tickles``; (b) the same request with agents polling every 5 s.

Run alone: ``python benchmarks/fleet_sim.py --n 1000 [--quick]``; prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from taskfleet.protocol.exchange import ENROLL_PATH, EXCHANGE_PATH
from taskfleet.protocol.tickle import TICKLE_SIZE, TickleVerifier
from taskfleet.settings import TICKLE_MAX_SKEW, TICKLE_MIN_INTERVAL

# Python's socket module has no SO_RCVBUFFORCE (Linux: 33): without it the buffer is
# capped at net.core.rmem_max (often 4 MiB, ~5,000 queued tickles). Needs CAP_NET_ADMIN.
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform == "linux" else None)
POLICY = {"scripts": True, "users": ["root"], "types": ["execute-script"]}
RESULT_LINE = "Stage: Completed, Status: Succeeded, Result: Exited with code 0, Return code: 0"


# -- a lean keep-alive HTTP/1.1 client pool -------------------------------------------------


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time, Content-Length framing."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.fut: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost = False
        self.hlen = -1
        self.total = -1
        self.status = 0
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionResetError("server closed the connection"))

    def _fail(self, exc: Exception) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.fut is None:
            return
        if self.total < 0:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = bytes(self.buf[:i]).lower()
            j = head.find(b"\r\ncontent-length:")
            if not head.startswith(b"http/1.1 ") or j < 0:
                self._fail(ConnectionError(f"unsupported response head {head[:200]!r}"))
                return
            k = head.find(b"\r\n", j + 17)
            self.status = int(head[9:12])
            self.hlen = i + 4
            self.total = self.hlen + int(head[j + 17 : k if k >= 0 else len(head)])
            self.close_after = b"\r\nconnection: close" in head
        if len(self.buf) >= self.total:
            body = bytes(self.buf[self.hlen : self.total])
            del self.buf[: self.total]
            fut, self.fut, self.total = self.fut, None, -1
            if self.close_after:
                self.lost = True
                assert self.transport is not None
                self.transport.close()
            if not fut.done():
                fut.set_result((self.status, body))

    def send(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.fut = self.loop.create_future()
        self.total = -1
        self.buf.clear()
        self.transport.write(data)
        return self.fut


def _timeout(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("HTTP request timed out"))


class Pool:
    """A bounded pool of keep-alive connections shared by many simulated agents."""

    def __init__(self, port: int, size: int, timeout: float = 60.0) -> None:
        self.port = port
        self.size = size
        self.timeout = timeout
        self.q: asyncio.Queue[_Conn | None] = asyncio.Queue()
        for _ in range(size):
            self.q.put_nowait(None)
        self.connects = 0
        self.retries = 0

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: _Conn(loop), common.HOST, self.port)
        self.connects += 1
        return proto

    async def acquire(self) -> _Conn | None:
        return await self.q.get()

    def release(self, conn: _Conn | None) -> None:
        self.q.put_nowait(conn)

    async def roundtrip(self, conn: _Conn | None, data: bytes) -> tuple[_Conn | None, int, bytes]:
        """Send ``data`` on ``conn`` (reconnecting if needed; one retry if a kept-alive
        connection was closed under us). Returns the connection to release."""
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            if conn is None or conn.lost:
                conn = await asyncio.wait_for(self._connect(), self.timeout)
                fresh = True
            else:
                fresh = False
            fut = conn.send(data)
            handle = loop.call_later(self.timeout, _timeout, fut)
            try:
                status, body = await fut
                return conn, status, body
            except ConnectionResetError:
                conn = None
                if fresh or attempt == 2:
                    raise
                self.retries += 1
            except BaseException:
                # timeout, cancel: the stream is in an unknown place
                if conn.transport is not None:
                    conn.transport.close()
                raise
            finally:
                handle.cancel()
        raise ConnectionError("unreachable")

    async def request(self, data: bytes) -> tuple[int, bytes]:
        conn = await self.acquire()
        try:
            conn, status, body = await self.roundtrip(conn, data)
        except BaseException:
            conn = None
            raise
        finally:
            self.release(conn)
        return status, body

    async def warm(self) -> None:
        """Open every connection (so a baseline RSS already includes them)."""
        conns = [await self.acquire() for _ in range(self.size)]
        try:
            for i, c in enumerate(conns):
                conns[i], _, _ = await self.roundtrip(
                    c, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                )
        finally:
            for c in conns:
                self.release(c)

    def close(self) -> None:
        while not self.q.empty():
            c = self.q.get_nowait()
            if c is not None and c.transport is not None:
                c.transport.close()


def http_request(method: str, path: str, body: Any = None, token: str | None = None) -> bytes:
    raw = b"" if body is None else orjson.dumps(body)
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(raw)}"]
    if body is not None:
        head.append("Content-Type: application/json")
    if token:
        head.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + raw


class Admin:
    """Admin API over its own two connections (so it never queues behind agents)."""

    def __init__(self, port: int, token: str) -> None:
        self.pool = Pool(port, 2, timeout=120)
        self.token = token

    async def call(self, method: str, path: str, body: Any = None, ok: int = 200) -> Any:
        status, raw = await self.pool.request(http_request(method, path, body, self.token))
        if status != ok:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {raw[:300]!r}")
        return orjson.loads(raw) if raw else None

    async def metrics(self) -> dict[str, float]:
        _status, raw = await self.pool.request(http_request("GET", "/metrics"))
        return common.parse_metrics(raw.decode())

    def close(self) -> None:
        self.pool.close()


# -- simulated agents --------------------------------------------------------------------------


class SimAgent:
    __slots__ = (
        "again",
        "busy",
        "cid",
        "head",
        "out_seq",
        "pending",
        "pool",
        "retickle",
        "server_seq",
        "tickle_ms",
        "verifier",
        "woke_ms",
    )

    def __init__(self, cid: int, secret: str, tickle_key: bytes, pool: Pool | None = None) -> None:
        self.cid = cid
        self.pool = pool  # the connections to its peer (a relay); None: the server's
        self.head = (
            f"POST {EXCHANGE_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nX-Taskfleet-Computer: {cid}\r\n"
            f"Authorization: Bearer {secret}\r\nContent-Length: "
        ).encode()
        self.verifier = TickleVerifier(
            tickle_key, cid, max_skew=TICKLE_MAX_SKEW, min_interval=TICKLE_MIN_INTERVAL
        )
        self.server_seq = 0  # highest server message seq stored (our ack)
        self.out_seq = 0  # last result seq used
        self.pending: list[dict[str, Any]] = []  # results not yet acked by the server
        self.busy = False
        self.again = False
        self.tickle_ms: int | None = None  # timestamp of the tickle that woke us
        self.woke_ms: int | None = None  # same, kept until the operation arrives
        self.retickle = False


class Sim:
    def __init__(self, port: int, pool_size: int) -> None:
        self.port = port
        self.pool = Pool(port, pool_size)
        self.agents: dict[int, SimAgent] = {}
        self.stats: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.tickle_lat_ms: list[float] = []  # tickle timestamp -> exchange written
        self.tickle_recv_ms: list[float] = []  # tickle timestamp -> received and verified
        self.tickle_op_ms: list[float] = []  # tickle timestamp -> operation received
        self.ops_at: dict[int, float] = {}  # op id -> when its operation arrived (monotonic)
        self.results_at: dict[int, float] = {}  # op id -> when the server acked its result
        self.udp: asyncio.DatagramTransport | None = None
        self.tickle_port = 0
        self.udp_rcvbuf = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.record_latency = False

    # UDP: one socket for every simulated agent.
    async def open_udp(self, rcvbuf: int = 32 * 1024 * 1024) -> None:
        """``rcvbuf``: the socket's receive buffer (every agent's tickles queue in it
        while the simulator is busy; the kernel drops what does not fit)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt in (_SO_RCVBUFFORCE, socket.SO_RCVBUF):
            if opt is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, rcvbuf)
                break
            except OSError:
                continue
        self.udp_rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # as granted
        sock.bind((common.HOST, 0))
        sock.setblocking(False)
        self.tickle_port = sock.getsockname()[1]
        sim = self

        class _Udp(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                sim.on_tickle(data)

        self.udp, _ = await loop.create_datagram_endpoint(_Udp, sock=sock)

    def udp_kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped on our socket (/proc/net/udp 'drops' column)."""
        hexport = f"{self.tickle_port:04X}"
        with contextlib.suppress(OSError):
            for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
                f = line.split()
                if f[1].endswith(":" + hexport):
                    return int(f[-1])
        return None

    def on_tickle(self, data: bytes) -> None:
        self.stats["tickles_received"] += 1
        if len(data) != TICKLE_SIZE:
            self.stats["tickles_malformed"] += 1
            return
        cid = int.from_bytes(data[3:11], "big")
        a = self.agents.get(cid)
        if a is None:
            self.stats["tickles_unknown_computer"] += 1
            return
        before = a.verifier.drops["rate-limited"]
        if not a.verifier.accept(data, time.time()):
            self.stats["tickles_rejected"] += 1
            if a.verifier.drops["rate-limited"] != before and not a.retickle:
                # as the real agent: a valid tickle inside the interval -> exchange after it
                a.retickle = True
                asyncio.get_running_loop().call_later(TICKLE_MIN_INTERVAL, self._retickle, a)
            return
        self.stats["tickles_accepted"] += 1
        a.tickle_ms = a.woke_ms = int.from_bytes(data[11:19], "big")
        if self.record_latency:
            self.tickle_recv_ms.append(time.time() * 1000 - a.tickle_ms)
        self.trigger(a)

    def _retickle(self, a: SimAgent) -> None:
        a.retickle = False
        self.trigger(a)

    def trigger(self, a: SimAgent) -> None:
        if a.busy:
            a.again = True
            return
        t = asyncio.get_running_loop().create_task(self.exchange(a))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def exchange(self, a: SimAgent, max_rounds: int = 8) -> None:
        """What a real agent does when woken: exchange until nothing is left to say."""
        if a.busy:
            a.again = True
            return
        a.busy = True
        try:
            for _ in range(max_rounds):
                a.again = False
                body: dict[str, Any] = {"ack": a.server_seq}
                if a.pending:
                    body["messages"] = a.pending
                raw = orjson.dumps(body)
                data = a.head + b"%d\r\n\r\n" % len(raw) + raw
                pool = a.pool or self.pool
                conn = await pool.acquire()
                try:
                    if a.tickle_ms is not None:
                        if self.record_latency:
                            self.tickle_lat_ms.append(time.time() * 1000 - a.tickle_ms)
                        a.tickle_ms = None
                    conn, status, resp = await pool.roundtrip(conn, data)
                except BaseException as exc:
                    conn = None
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    self.errors[type(exc).__name__] += 1
                    return
                finally:
                    pool.release(conn)
                self.stats["exchanges"] += 1
                if status != 200:
                    self.errors[f"http-{status}"] += 1
                    if len(self.errors) < 50:
                        self.errors[f"http-{status}: {resp[:120]!r}"] += 1
                    return
                more = self._apply(a, orjson.loads(resp), sent=len(a.pending))
                if not (more or a.again):
                    return
        finally:
            a.busy = False

    def _apply(self, a: SimAgent, reply: dict[str, Any], sent: int) -> bool:
        now = time.monotonic()
        ack = reply["ack"]
        if a.pending:
            kept = []
            for m in a.pending:
                if m["seq"] <= ack:
                    self.results_at.setdefault(m["op"], now)
                else:
                    kept.append(m)
            a.pending = kept
        new_ops = 0
        for m in reply["messages"]:
            seq = m["seq"]
            if seq <= a.server_seq:
                continue  # a resend of something already stored
            a.server_seq = seq
            if m["type"] == "operation":
                op = m["op"]
                self.ops_at.setdefault(op, now)
                if a.woke_ms is not None:
                    if self.record_latency:
                        self.tickle_op_ms.append(time.time() * 1000 - a.woke_ms)
                    a.woke_ms = None
                t = time.time()
                a.out_seq += 1
                a.pending.append(
                    {
                        "type": "operation-result",
                        "seq": a.out_seq,
                        "op": op,
                        "status": "succeeded",
                        "exit_code": 0,
                        "stdout": "ok\n",
                        "stderr": "",
                        "started_at": t,
                        "ended_at": t,
                        "result_line": RESULT_LINE,
                    }
                )
                new_ops += 1
        # results to send, or the ones just sent came back unacked: go again now
        return bool(new_ops) or (bool(a.pending) and sent == 0)

    async def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self.udp is not None:
            self.udp.close()
        self.pool.close()


# -- phases --------------------------------------------------------------------------------


async def enroll_all(
    sim: Sim,
    token: str,
    n: int,
    concurrency: int,
    tag: str,
    pool: Pool | None = None,
    start: int = 0,
) -> dict[str, Any]:
    """Enroll computers ``start`` .. ``start + n - 1`` through ``pool`` (a relay's
    connections; default the server's); their agents then exchange through it too."""
    counter = iter(range(start, start + n))
    failures: Counter[str] = Counter()
    via = pool or sim.pool
    enrolled = [0]
    t0 = time.monotonic()

    async def worker() -> None:
        for i in counter:
            body = orjson.dumps(
                {
                    "token": token,
                    "hostname": f"sim-{i}",
                    "machine_id": f"{tag}-{i:06d}",
                    "tickle_port": sim.tickle_port,
                    "version": "sim",
                    "policy": POLICY,
                }
            )
            data = (
                f"POST {ENROLL_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            try:
                status, raw = await via.request(data)
            except (OSError, TimeoutError) as exc:
                failures[type(exc).__name__] += 1
                continue
            if status != 201:
                failures[f"http-{status}"] += 1
                if len(failures) < 20:
                    failures[f"http-{status}: {raw[:120]!r}"] += 1
                continue
            d = orjson.loads(raw)
            cid = d["computer_id"]
            sim.agents[cid] = SimAgent(cid, d["secret"], bytes.fromhex(d["tickle_key"]), pool)
            enrolled[0] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    dt = time.monotonic() - t0
    return {
        "enrolled": enrolled[0],
        "seconds": dt,
        "per_second": enrolled[0] / dt if dt else None,
        "failures": dict(failures),
        "concurrency": concurrency,
    }


async def exchange_round(sim: Sim, concurrency: int, timeout: float) -> float:
    """Every agent exchanges once (bounded concurrency); returns seconds taken."""
    agents = list(sim.agents.values())
    it = iter(agents)
    t0 = time.monotonic()
    deadline = t0 + timeout

    async def worker() -> None:
        for a in it:
            if time.monotonic() > deadline:
                return
            await sim.exchange(a, max_rounds=2)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.monotonic() - t0


async def hammer(sim: Sim, admin: Admin, server_pid: int, seconds: float, concurrency: int):
    """(c) Idle agents, ack up to date, empty exchanges as fast as the server answers."""
    agents = list(sim.agents.values())
    idx = [0]
    lat: list[float] = []
    codes: Counter[int] = Counter()
    m0 = await admin.metrics()
    stop_at = time.monotonic() + seconds
    sim_cpu = common.CpuMeter(os.getpid())
    srv_cpu = common.CpuMeter(server_pid)
    load = common.LoadMeter([os.getpid(), server_pid])
    t0 = time.monotonic()
    errors: Counter[str] = Counter()

    async def worker() -> None:
        while time.monotonic() < stop_at:
            i = idx[0]
            idx[0] = (i + 1) % len(agents)
            a = agents[i]
            if a.busy:
                await asyncio.sleep(0)
                continue
            raw = b'{"ack":%d}' % a.server_seq
            data = a.head + b"%d\r\n\r\n" % len(raw) + raw
            a.busy = True
            s = time.perf_counter()
            try:
                status, _ = await sim.pool.request(data)
            except (OSError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                continue
            finally:
                a.busy = False
            lat.append((time.perf_counter() - s) * 1000)
            codes[status] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.monotonic() - t0
    sim_s, _ = sim_cpu.read()
    srv_s, _ = srv_cpu.read()
    srv_split = srv_cpu.split()
    m1 = await admin.metrics()
    key_fast = 'taskfleet_exchanges_total{path="fast"}'
    key_slow = 'taskfleet_exchanges_total{path="slow"}'
    ok = codes.get(200, 0)
    return {
        "seconds": wall,
        "concurrency": concurrency,
        "exchanges_ok": ok,
        "per_second": ok / wall,
        "status_codes": {str(k): v for k, v in codes.items()},
        "errors": dict(errors),
        "latency_ms_p50": common.percentile(lat, 50),
        "latency_ms_p99": common.percentile(lat, 99),
        "server_fast_path": m1.get(key_fast, 0) - m0.get(key_fast, 0),
        "server_slow_path": m1.get(key_slow, 0) - m0.get(key_slow, 0),
        "server_cpu_cores": srv_s / wall,
        "server_cpu_split": srv_split,
        # CPU per unit of work barely moves when other processes compete for the
        # machine, unlike wall-clock rates: compare builds with this.
        "server_cpu_us_per_exchange": srv_s * 1e6 / ok if ok else None,
        "simulator_cpu_cores": sim_s / wall,
        "load": load.read(),
    }


async def run_request(
    sim: Sim,
    admin: Admin,
    server_pid: int,
    timeout: float,
    poll_every: float = 0.2,
    target: str = "all",
    extra_pids: dict[str, int] | None = None,
    stall_after: float | None = None,
) -> dict[str, Any]:
    """POST a request to ``target``, poll it until progress.done; sim-side timings beside
    it. ``extra_pids``: more processes under test (relays): their CPU is reported
    (``extra_cpu_seconds``) and counted as ours, not as other processes' load.
    ``stall_after``: give up when no activity finished for that many seconds."""
    extra = extra_pids or {}
    sim.ops_at.clear()
    sim.results_at.clear()
    sim.tickle_lat_ms.clear()
    sim.tickle_recv_ms.clear()
    sim.tickle_op_ms.clear()
    sim.record_latency = True
    sim_cpu = common.CpuMeter(os.getpid())
    srv_cpu = common.CpuMeter(server_pid)
    extra_cpu = {name: common.CpuMeter(pid) for name, pid in extra.items()}
    load = common.LoadMeter([os.getpid(), server_pid, *extra.values()])
    t0 = time.monotonic()
    req = await admin.call(
        "POST",
        "/api/v1/requests",
        {"type": "execute-script", "target": target, "params": {"argv": ["true"]}},
        ok=201,
    )
    t_created = time.monotonic()
    rid = req["id"]
    deadline = t0 + timeout
    polls = 0
    last: dict[str, Any] = {}
    done_at = None
    moved_at, finished = time.monotonic(), -1
    while time.monotonic() < deadline:
        last = await admin.call("GET", f"/api/v1/requests/{rid}")
        polls += 1
        if last["progress"]["finished"] != finished:
            moved_at, finished = time.monotonic(), last["progress"]["finished"]
        elif stall_after is not None and time.monotonic() - moved_at > stall_after:
            break
        if last["progress"]["done"]:
            done_at = time.monotonic()
            break
        await asyncio.sleep(poll_every)
    sim.record_latency = False
    sim_s, wall = sim_cpu.read()
    srv_s, _ = srv_cpu.read()
    srv_split = srv_cpu.split()
    extra_s = {name: m.read()[0] for name, m in extra_cpu.items()}
    load_r = load.read()
    ops = sorted(sim.ops_at.values())
    res = sorted(sim.results_at.values())
    acts = await admin.call("GET", f"/api/v1/activities?request_id={rid}&limit=100000")
    finished = [a["finished_at"] for a in acts if a.get("finished_at")]
    states = Counter(a["state"] for a in acts)
    lat = sim.tickle_lat_ms
    return {
        "request_id": rid,
        "total": last.get("progress", {}).get("total"),
        "done": done_at is not None,
        "seconds_to_done_api": None if done_at is None else done_at - t0,
        "seconds_post": t_created - t0,
        "api_polls": polls,
        "api_poll_interval": poll_every,
        "progress": last.get("progress"),
        "states": dict(states),
        "server_span_created_to_last_finished": (
            max(finished) - req["created_at"] if finished else None
        ),
        "sim_first_op": ops[0] - t0 if ops else None,
        "sim_all_ops": ops[-1] - t0 if ops else None,
        "sim_ops_received": len(ops),
        "sim_all_results_acked": res[-1] - t0 if res else None,
        "sim_results_acked": len(res),
        "tickle_to_exchange_ms_p50": common.percentile(lat, 50),
        "tickle_to_exchange_ms_p99": common.percentile(lat, 99),
        "tickle_to_exchange_ms_max": max(lat) if lat else None,
        "tickle_latency_samples": len(lat),
        "tickle_received_ms_p50": common.percentile(sim.tickle_recv_ms, 50),
        "tickle_received_ms_p99": common.percentile(sim.tickle_recv_ms, 99),
        "tickle_to_operation_ms_p50": common.percentile(sim.tickle_op_ms, 50),
        "tickle_to_operation_ms_p99": common.percentile(sim.tickle_op_ms, 99),
        "server_cpu_cores": srv_s / wall,
        "server_cpu_split": srv_split,
        "server_cpu_seconds": srv_s,  # whole request: create, hand out, results, polls
        "simulator_cpu_cores": sim_s / wall,
        "simulator_cpu_seconds": sim_s,
        "extra_cpu_seconds": extra_s,
        "target": target,
        "load": load_r,
    }


async def start_pollers(sim: Sim, period: float, stop: asyncio.Event) -> asyncio.Task[None]:
    """Every agent exchanges every ``period`` s, phases spread uniformly over the period."""
    loop = asyncio.get_running_loop()
    agents = list(sim.agents.values())
    n = len(agents)
    start = loop.time() + 0.05

    def fire(a: SimAgent, at: float) -> None:
        if stop.is_set():
            return
        sim.trigger(a)
        loop.call_at(at + period, fire, a, at + period)

    for i, a in enumerate(agents):
        at = start + period * i / n
        loop.call_at(at, fire, a, at)

    async def waiter() -> None:
        await stop.wait()

    return asyncio.create_task(waiter())


def batch_stats(m0: dict[str, float], m1: dict[str, float]) -> dict[str, Any]:
    """Writer batches (transactions of exchanges) between two /metrics scrapes."""

    def d(key: str) -> float:
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    count = d("taskfleet_write_batch_exchanges_count")
    total = d("taskfleet_write_batch_exchanges_sum")
    return {
        "writer_batches": count,
        "writer_batch_mean_exchanges": total / count if count else None,
        "slow_exchanges": d('taskfleet_exchanges_total{path="slow"}'),
        "fast_exchanges": d('taskfleet_exchanges_total{path="fast"}'),
    }


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def settle_rss(pid: int, seconds: float = 1.0) -> int:
    await asyncio.sleep(seconds)
    return rss(pid)


_CREATED: list[tuple[str, str]] = []  # (server URL, database) made by --database


def _database(opts: argparse.Namespace, workdir: Path, n: int) -> str | None:
    """None (embedded SQLite in ``workdir``), or a fresh PostgreSQL database (--database)."""
    if opts.database is None:
        return None
    import psycopg

    name = f"tfsim_{n}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(opts.database + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    _CREATED.append((opts.database, name))
    return f"{opts.database}/{name}"


def _drop_databases() -> None:
    import psycopg

    for server, name in _CREATED:
        try:
            with psycopg.connect(server + "/postgres", autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        except Exception as exc:
            print(f"warning: could not drop database {name}: {exc!r}", file=sys.stderr)


async def run_n(n: int, opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n, "pool_connections": opts.pool, "simulator_processes": 1}
    log = lambda msg: print(f"[fleet n={n}] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    def prof(phase: str) -> Path | None:
        return opts.profile_dir / f"n{n}-{phase}.txt" if opts.profile_dir else None

    # ---- server 1: tickles on -------------------------------------------------------------
    s1 = common.start_server(
        workdir,
        "--poll-interval",
        "1800",
        launcher=opts.server_cmd,
        database=_database(opts, workdir, n),
    )
    sampler = common.RssSampler(s1.pid).start()
    sim = Sim(s1.port, opts.pool)
    admin = Admin(s1.port, s1.admin_token)
    try:
        await sim.open_udp()
        await sim.pool.warm()
        await admin.call("GET", "/api/v1/whoami")
        await admin.metrics()
        rss0 = await settle_rss(s1.pid, 1.5)
        out["server_rss_fresh_0_computers"] = rss0
        tok = await admin.call(
            "POST", "/api/v1/tokens", {"kind": "enroll", "name": "bench"}, ok=201
        )
        log(f"enrolling {n} computers ...")
        srv_cpu = common.CpuMeter(s1.pid)
        load = common.LoadMeter([os.getpid(), s1.pid])
        with common.PySpy(s1.pid, prof("enroll")):
            out["enroll"] = await enroll_all(sim, tok["token"], n, opts.enroll_concurrency, "bench")
        out["enroll"]["server_cpu_cores"] = srv_cpu.read()[0] / out["enroll"]["seconds"]
        out["enroll"]["server_cpu_split"] = srv_cpu.split()
        out["enroll"]["load"] = load.read()
        log(f"enrolled {out['enroll']['enrolled']} in {out['enroll']['seconds']:.1f}s")
        if out["enroll"]["enrolled"] != n:
            raise RuntimeError(f"only {out['enroll']['enrolled']}/{n} enrolled")
        rounds = [await exchange_round(sim, opts.pool, 120) for _ in range(3)]
        out["idle_rounds_seconds"] = rounds
        rss1 = await settle_rss(s1.pid, 1.5)
        out["server_rss_idle_n"] = rss1
        out["rss_per_idle_computer_bytes"] = (rss1 - rss0) / n
        log(f"idle RSS {rss1 / 1e6:.1f} MB, {(rss1 - rss0) / n:.0f} B/computer")

        hammers = []
        for k in range(1 + opts.retries):  # retry only if other processes disturbed it
            log(f"hammering empty exchanges for {opts.hammer_seconds:g}s ...")
            quiet = await common.wait_quiet_async([os.getpid(), s1.pid])
            with common.PySpy(s1.pid, prof("hammer") if k == 0 else None):
                h = await hammer(sim, admin, s1.pid, opts.hammer_seconds, opts.pool)
            h["quiet_gate"] = quiet
            h["disturbed"] = common.disturbed(h["load"])
            hammers.append(h)
            log(f"hammer {h['per_second']:.0f}/s{' (disturbed)' if h['disturbed'] else ''}")
            if not h["disturbed"]:
                break
        out["hammer_runs"] = hammers
        out["hammer"] = min(hammers, key=lambda h: h["load"]["other_cores"])

        for k in range(opts.repeats + opts.extra_runs):
            clean = [r for r in out.get("tickled_runs", []) if not r["disturbed"]]
            if len(clean) >= opts.repeats:
                break
            await asyncio.sleep(1.5)  # > tickle min interval since the last tickle
            quiet = await common.wait_quiet_async([os.getpid(), s1.pid])
            log(f"request with tickles (run {k + 1}) ...")
            m0 = await admin.metrics()
            drops0 = sim.udp_kernel_drops()
            recv0 = sim.stats["tickles_received"]
            with common.PySpy(s1.pid, prof("tickled") if k == 0 else None):
                r = await run_request(sim, admin, s1.pid, opts.request_timeout)
            await sim.wait_idle(10)
            m1 = await admin.metrics()
            r["tickles_sent_by_server"] = m1.get("taskfleet_tickles_sent_total", 0) - m0.get(
                "taskfleet_tickles_sent_total", 0
            )
            r["tickles_received"] = sim.stats["tickles_received"] - recv0
            r["quiet_gate"] = quiet
            r.update(batch_stats(m0, m1))
            d1 = sim.udp_kernel_drops()
            r["udp_kernel_drops"] = None if d1 is None or drops0 is None else d1 - drops0
            r["disturbed"] = common.disturbed(r["load"])
            out.setdefault("tickled_runs", []).append(r)
            note = (
                f" (disturbed: other processes used {r['load']['other_cores']:.2f} cores)"
                if r["disturbed"]
                else ""
            )
            log(
                f"tickled: done in {r['seconds_to_done_api']}s "
                f"(sim acked {r['sim_all_results_acked']}), "
                f"tickle p50 {r['tickle_to_exchange_ms_p50']} ms{note}"
            )
        out["tickled"] = common.median_run(out["tickled_runs"], "seconds_to_done_api")
        out["server1_peak_rss"] = sampler.peak
        out["server1_rss_samples"] = sampler.samples
        out["sim_stats"] = dict(sim.stats)
        out["sim_errors"] = dict(sim.errors)
        out["server1_log_errors"] = common.server_log_problems(s1.log)
    finally:
        sampler.stop()
        admin.close()
        sim.close()
        common.stop(s1.popen)
    out["pool_reconnects"] = sim.pool.connects

    # ---- server 2: same database, --no-tickles, agents poll every 5 s ---------------------
    log("restarting the server with --no-tickles; agents poll every 5 s ...")
    s2 = common.start_server(
        workdir,
        "--no-tickles",
        "--poll-interval",
        "1800",
        launcher=opts.server_cmd,
        database=s1.database,
    )
    sampler2 = common.RssSampler(s2.pid).start()
    old = sim.agents
    sim = Sim(s2.port, opts.pool)
    sim.agents = old
    admin = Admin(s2.port, s1.admin_token)
    stop = asyncio.Event()
    try:
        await sim.pool.warm()
        await admin.call("GET", "/api/v1/whoami")
        out["server2_rss_loaded_n_before_exchanges"] = await settle_rss(s2.pid, 1.0)
        poller = await start_pollers(sim, opts.poll_period, stop)
        # first poll of each computer after a restart looks at the database once
        await asyncio.sleep(opts.poll_period * 2 + 1)
        out["server2_rss_loaded_n_idle_polling"] = rss(s2.pid)
        out["rss_per_idle_computer_bytes_loaded"] = (
            out["server2_rss_loaded_n_idle_polling"] - out["server_rss_fresh_0_computers"]
        ) / n
        polled = []
        for k in range(1 + opts.retries):  # retry only if other processes disturbed it
            quiet = await common.wait_quiet_async([os.getpid(), s2.pid])
            m0 = await admin.metrics()
            with common.PySpy(s2.pid, prof("polled") if k == 0 else None):
                r = await run_request(sim, admin, s2.pid, opts.request_timeout)
            m1 = await admin.metrics()
            r["exchanges_during"] = sum(
                m1.get(k, 0) - m0.get(k, 0)
                for k in (
                    'taskfleet_exchanges_total{path="fast"}',
                    'taskfleet_exchanges_total{path="slow"}',
                )
            )
            r["poll_period"] = opts.poll_period
            r["quiet_gate"] = quiet
            r["disturbed"] = common.disturbed(r["load"])
            r.update(batch_stats(m0, m1))
            polled.append(r)
            if not r["disturbed"]:
                break
            log(f"polled: disturbed (other processes used {r['load']['other_cores']:.2f} cores)")
        out["polled_runs"] = polled
        out["polled"] = r = min(polled, key=lambda x: x["load"]["other_cores"])
        log(f"polled: done in {r['seconds_to_done_api']}s")
        stop.set()
        await poller
        await sim.wait_idle(10)
        out["server2_peak_rss"] = sampler2.peak
        out["server2_log_errors"] = common.server_log_problems(s2.log)
        out["sim_errors_polled"] = dict(sim.errors)
    finally:
        stop.set()
        sampler2.stop()
        admin.close()
        sim.close()
        common.stop(s2.popen)
    out["server_peak_rss"] = max(out.get("server1_peak_rss", 0), out.get("server2_peak_rss", 0))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, action="append", help="computers (repeatable)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pool", type=int, default=256, help="keep-alive HTTP connections")
    ap.add_argument("--enroll-concurrency", type=int, default=64)
    ap.add_argument("--hammer-seconds", type=float, default=None)
    ap.add_argument("--poll-period", type=float, default=5.0)
    ap.add_argument("--request-timeout", type=float, default=180.0)
    ap.add_argument(
        "--repeats", type=int, default=None, help="undisturbed tickled request runs per N"
    )
    ap.add_argument(
        "--extra-runs",
        type=int,
        default=None,
        help="more tickled runs allowed when other processes disturbed some [2; quick 0]",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=None,
        help="hammer / polled runs repeated when disturbed [1; quick 0]",
    )
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument(
        "--profile-dir", type=Path, default=None, help="py-spy the server in each phase"
    )
    ap.add_argument(
        "--server-cmd",
        default=None,
        help="script run instead of -m taskfleet (e.g. benchmarks/experiments/patched_server.py)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs, database)")
    ap.add_argument(
        "--database",
        default=None,
        help="a PostgreSQL server URL (postgresql://USER@HOST:PORT): a fresh database "
        "is created on it per run (default: embedded SQLite)",
    )
    opts = ap.parse_args()
    opts.n = opts.n or ([2000] if opts.quick else [1000, 10_000])
    if opts.hammer_seconds is None:
        opts.hammer_seconds = 3.0 if opts.quick else 10.0
    if opts.extra_runs is None:
        opts.extra_runs = 0 if opts.quick else 2
    if opts.retries is None:
        opts.retries = 0 if opts.quick else 1
    if opts.repeats is None:
        opts.repeats = 1 if opts.quick else 3
    common.raise_nofile()
    common.install_cleanup()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    results: dict[str, Any] = {"runs": [], "started": time.time()}
    base = Path(
        tempfile.mkdtemp(
            prefix=f"taskfleet-{os.environ.get('TASKFLEET_BENCH_TAG', 'bench')}-fleet-"
        )
    )
    try:
        for n in opts.n:
            workdir = base / f"n{n}"
            workdir.mkdir()
            results["runs"].append(asyncio.run(run_n(n, opts, workdir)))
    finally:
        common.stop_all()
        _drop_databases()
        if opts.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    results["finished"] = time.time()
    text = json.dumps(results, indent=2, default=str)
    if opts.json_out:
        opts.json_out.parent.mkdir(parents=True, exist_ok=True)
        opts.json_out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
