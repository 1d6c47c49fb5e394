"""Jobs benchmark (issue 12): a job of 3 items of 5 MB on M real agents behind 2 real relays.

Real processes on loopback: one ``taskfleet server`` (embedded SQLite), R real
``taskfleet relay`` processes, M real ``taskfleet agent`` processes (M / R behind each
relay, ``--relay URL``; scripts allowed), each with its own state folder and UDP
tickle port (``common.start_agents``). Content is added with ``taskfleet content add``
(random bytes), jobs are created with ``taskfleet job create --items items.toml
--target all`` and followed through ``GET /api/v1/jobs`` (polled, with deadlines).

Three runs, in this order:

1. **full**: 3 items (detect ``true``; download; install ``test -s FILE`` in the
   staging folder) on every computer, fresh content (the relays' caches are cold):
   job create -> every computer Succeeded; the server's
   ``taskfleet_content_served_bytes_total{to="relay"|"agent"}`` against items x size
   x relays (each item fetched once per relay, none by an agent from the server);
   each relay's fetched / served bytes; per-phase spans from the steps the agents
   reported; staging folders left behind.
2. **terminate in Download**: another fresh content set of the same shape, so each
   computer's Download fetches through a cold relay cache; the benchmark watches the
   agents' staging folders (``STATE/jobs/<op>/<item>/``) and POSTs the terminate as
   soon as ``--download-trigger`` of the agents have begun downloading (nothing is
   slowed down artificially: what is caught is whatever the fleet does at that
   moment, and the phase every computer was in is reported from its steps).
3. **terminate in Install**: the full run's content (cached); item 0's install is
   ``flock -s GATE0 test -s FILE`` and items 1.. wait on GATE1: the benchmark holds
   both locks, waits until every computer reports install item 0 started, POSTs the
   terminate, waits (bounded) until every agent logged that it got the order, then
   releases GATE0 so the item in hand finishes. GATE1 is released only at the end: a
   computer that starts item 1 after the terminate would block there and show.

Reported for 2 and 3: terminate -> Terminated (client, polled every ``--poll``; and
the server's own terminate.at -> terminated_at), outcomes per computer, steps per
status, computers that ran a step of a later phase than the one they were in when
the order reached them, staging folders left.

Run alone: ``python benchmarks/job_bench.py [--agents 200] [--quick]``; prints the
table on stderr and JSON (``--json-out``, else benchmarks/out/jobs-<stamp>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import AgentProc, RelayProc
from job_report import (
    later_phase,
    phase_at,
    ran_after,
    report,
    spread,
    step_counts,
    verdicts,
    where_time_goes,
)

# The agent's log line once a terminate order is stored and reaches the running job
# (agent/operations.py: "operation N: terminate received, finishing the step in hand").
RECEIPT_RE = re.compile(r"terminate received")
# The agent's log lines when it leaves its relay for the server, and when it is back
# (agent/main.py): an agent that is direct fetches content from the server.
DIRECT_RE = re.compile(r"no longer serves this computer|exchanging with the server .* directly")
BACK_RE = re.compile(r"answers again")
TOKEN_ENV = "TASKFLEET_TOKEN"
SETTLED_CORES = 0.1  # our processes together below this: the fleet is idle


RELAY_SERIES = {
    "received": "taskfleet_relay_received_total",  # messages from its agents
    "forwarded": "taskfleet_relay_forwarded_total",  # of those, taken by the server
    "spooled": "taskfleet_relay_spool_messages",
    "agent_exchanges": "taskfleet_relay_agent_exchanges_total",
    "upstream_exchanges": "taskfleet_relay_upstream_exchanges_total",
    "refused": "taskfleet_relay_refused_total",
    "upstream_failures": "taskfleet_relay_upstream_failures_total",
}


class Timeline:
    """Every ``interval`` s in a thread: each relay's message counters (``RELAY_SERIES``),
    to see when agents' reports reached their relay and when the server took them."""

    def __init__(self, relays: list[RelayProc], interval: float = 0.5) -> None:
        self.relays = relays
        self.interval = interval
        self.t0 = time.monotonic()
        self.rows: list[tuple[float, list[dict[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="timeline", daemon=True)

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic() - self.t0
            try:
                ms = [common.scrape_metrics(r.url, timeout=5) for r in self.relays]
            except httpx.HTTPError:
                ms = []
            if ms:
                self.rows.append(
                    (t, [{k: common.metric_sum(m, v) for k, v in RELAY_SERIES.items()} for m in ms])
                )
            self._stop.wait(self.interval)

    def summary(self) -> list[dict[str, Any]]:
        """Per relay: when (s after the start) its received / forwarded counters last
        grew, and the most messages it held for the server."""
        out = []
        for i in range(len(self.relays)):
            series = [(t, row[i]) for t, row in self.rows if len(row) > i]
            if not series:
                continue

            def last_growth(key: str, series: list[tuple[float, dict[str, float]]] = series):
                last, prev = None, series[0][1][key]
                for t, r in series[1:]:
                    if r[key] > prev:
                        last = t
                    prev = r[key]
                return last

            out.append(
                {
                    "last_received_s": last_growth("received"),
                    "last_forwarded_s": last_growth("forwarded"),
                    "max_spooled": max(r["spooled"] for _, r in series),
                    "upstream_exchanges": series[-1][1]["upstream_exchanges"]
                    - series[0][1]["upstream_exchanges"],
                    "agent_exchanges": series[-1][1]["agent_exchanges"]
                    - series[0][1]["agent_exchanges"],
                    "refused": series[-1][1]["refused"] - series[0][1]["refused"],
                    "upstream_failures": series[-1][1]["upstream_failures"]
                    - series[0][1]["upstream_failures"],
                }
            )
        return out


class Bench:
    """The server, relays and agents of one benchmark, and the ways to drive them."""

    def __init__(self, opts: argparse.Namespace, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.server: common.ServerProc | None = None
        self.relays: list[RelayProc] = []
        self.agents: list[AgentProc] = []
        self.api: httpx.Client | None = None
        self.problems: list[str] = []
        self.probe = common.FsyncProbe(workdir)

    def log(self, msg: str) -> None:
        print(f"[jobs m={self.opts.agents}] {msg}", file=sys.stderr, flush=True)

    # -- setup -----------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        opts = self.opts
        t0 = time.monotonic()
        self.server = s = common.start_server(self.workdir, "--poll-interval", "1800")
        self.api = api = httpx.Client(
            base_url=s.url + "/api/v1",
            headers={"Authorization": f"Bearer {s.admin_token}"},
            timeout=60,
        )
        r = api.post("/tokens", json={"kind": "relay", "name": "bench-jobs"})
        r.raise_for_status()
        self.relays = common.start_relays(self.workdir, s, r.json()["token"], opts.relays)
        r = api.post("/tokens", json={"kind": "enroll", "name": "bench-jobs"})
        r.raise_for_status()
        self.log(f"starting {opts.agents} agents behind {opts.relays} relays ...")
        self.agents = common.start_agents(
            self.workdir,
            s.url,
            r.json()["token"],
            opts.agents,
            extra=lambda i: ["--relay", self.relays[i % opts.relays].url],
        )
        common.wait_agents_ready(self.agents, opts.ready_timeout)

        def enrolled() -> bool:
            seen = [c for c in api.get("/computers").json() if c.get("last_seen_at")]
            return len(seen) == opts.agents

        common.wait_until(enrolled, 120, "every computer enrolled and seen", every=0.5)
        behind = {x["name"]: x["computers"] for x in api.get("/relays").json()}
        ready = time.monotonic() - t0
        self.log(f"all {opts.agents} agents ready after {ready:.1f} s: {behind}; settling ...")
        # Each agent's first inventory (on by default) and its storage on the server are
        # a one-time burst at start, not part of what a job costs.
        settled = common.settle(self.pids[1:], SETTLED_CORES, opts.ready_timeout)
        self.log(f"settled after {settled:.1f} s")
        # Agents that went to the server right after enrolling (their relay answered
        # 410: see the report) come back at their next relay probe: the job is measured
        # on a fleet where every agent is behind its relay.
        went_direct = [a.index for a in self.agents if self.relay_events(a)[0]]
        t1 = time.monotonic()
        if went_direct:
            self.log(f"{len(went_direct)} agents went direct after enrolling; waiting ...")
            common.wait_until(
                lambda: not self.direct_agents(), opts.direct_timeout, "agents back on relays", 1
            )
        self.probe.start()
        return {
            "seconds_to_ready": ready,
            "seconds_to_settle": settled,
            "computers_per_relay": behind,
            "agents_direct_after_enrolling": went_direct,
            "seconds_until_back_behind_relays": time.monotonic() - t1,
        }

    def relay_events(self, a: AgentProc) -> tuple[int, bool]:
        """(times this agent left its relay for the server, whether it is direct now)."""
        left, direct = 0, False
        for line in a.log.read_text(errors="replace").splitlines():
            if DIRECT_RE.search(line):
                left, direct = left + 1, True
            elif BACK_RE.search(line):
                direct = False
        return left, direct

    def direct_agents(self) -> list[int]:
        return [a.index for a in self.agents if self.relay_events(a)[1]]

    def left_relays(self) -> int:
        """How many times agents left their relay for the server, so far."""
        return sum(self.relay_events(a)[0] for a in self.agents)

    @property
    def pids(self) -> list[int]:
        assert self.server is not None
        return [
            os.getpid(),
            self.server.pid,
            *(r.pid for r in self.relays),
            *(a.pid for a in self.agents),
        ]

    def cli(self, *args: str) -> Any:
        """``taskfleet ARGS --json`` as an administrator types it; its parsed output."""
        assert self.server is not None
        env = {
            **os.environ,
            "TASKFLEET_SERVER": self.server.url,
            TOKEN_ENV: self.server.admin_token,
        }
        p = subprocess.run(
            [sys.executable, "-m", "taskfleet", *args, "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        if p.returncode != 0:
            raise RuntimeError(f"taskfleet {' '.join(args)}: exit {p.returncode}: {p.stderr}")
        return json.loads(p.stdout)

    def add_content(self, tag: str) -> list[dict[str, Any]]:
        """``--items`` files of ``--item-mb`` random bytes, added with ``content add``."""
        out = []
        size = int(self.opts.item_mb * 1_000_000)
        for i in range(self.opts.items):
            path = self.workdir / f"{tag}-item-{i}.bin"
            with open(path, "wb") as f:
                left = size
                while left:
                    chunk = os.urandom(min(left, 1 << 20))
                    f.write(chunk)
                    left -= len(chunk)
            added = self.cli("content", "add", str(path))
            out.append({"sha256": added["sha256"], "size": added["size"], "name": path.name})
            path.unlink()
        return out

    def create_job(self, name: str, items: list[dict[str, Any]]) -> tuple[dict[str, Any], float]:
        """``taskfleet job create``; (the job, the client's seconds for the command)."""
        path = self.workdir / f"{name}.toml"
        path.write_text(items_toml(items))
        t0 = time.monotonic()
        job = self.cli("job", "create", "--name", name, "--target", "all", "--items", str(path))
        return job, time.monotonic() - t0

    # -- reads -------------------------------------------------------------------------

    def summary(self, job_id: int) -> dict[str, Any]:
        """The job's summary from the list (cheap: no per-computer rows)."""
        assert self.api is not None
        for j in self.api.get("/jobs", params={"limit": 20}).json():
            if j["id"] == job_id:
                return dict(j)
        raise RuntimeError(f"job {job_id} is not in the list")

    def detail(self, job_id: int) -> dict[str, Any]:
        assert self.api is not None
        r = self.api.get(f"/jobs/{job_id}")
        r.raise_for_status()
        return dict(r.json())

    def wait_state(self, job_id: int, states: set[str], timeout: float) -> tuple[str, float]:
        """Poll the job until its state is one of ``states``; (state, monotonic when seen).
        A job that ends otherwise, or the deadline, ends the wait too."""
        final = {"succeeded", "failed", "canceled", "terminated"}
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.summary(job_id)["state"]
            if state in states or state in final:
                return state, time.monotonic()
            time.sleep(self.opts.poll)
        return f"timeout ({state})", time.monotonic()

    def check_running(self, job_id: int) -> None:
        """Raise if the job has ended (what we wait for will not come)."""
        j = self.summary(job_id)
        if j["state"] in ("succeeded", "failed", "canceled", "terminated"):
            raise RuntimeError(f"job {job_id} ended {j['state']} ({j['counts']})")

    def metrics(self) -> dict[str, Any]:
        assert self.server is not None
        return {
            "server": common.scrape_metrics(self.server.url),
            "relays": [common.scrape_metrics(r.url) for r in self.relays],
        }

    def staged_files(self) -> list[str]:
        """Files left in the agents' job staging folders."""
        return [
            str(p)
            for a in self.agents
            if (a.state_dir / "jobs").is_dir()
            for p in (a.state_dir / "jobs").rglob("*")
            if p.is_file()
        ]

    def downloading(self) -> int:
        """Agents with a download begun: a file in one of their item staging folders."""
        n = 0
        for a in self.agents:
            jobs = a.state_dir / "jobs"
            try:
                if any(any(item.iterdir()) for op in jobs.iterdir() for item in op.iterdir()):
                    n += 1
            except OSError:
                continue  # not there yet, or removed meanwhile
        return n

    def receipts(self, since: float) -> dict[int, float]:
        """Agent index -> when it logged that it got a terminate order (after ``since``)."""
        out = {}
        for a in self.agents:
            for line in a.log.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("ts", 0) >= since and RECEIPT_RE.search(str(rec.get("msg", ""))):
                    out[a.index] = float(rec["ts"])
                    break
        return out

    def close(self) -> None:
        self.probe.stop()
        if self.api is not None:
            self.api.close()
        common.stop_many([a.popen for a in self.agents])
        common.stop_many([r.popen for r in self.relays])
        if self.server is not None:
            common.stop(self.server.popen)


def toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def items_toml(items: list[dict[str, Any]]) -> str:
    out = []
    for it in items:
        c = it["content"]
        out += [
            "[[items]]",
            f"name = {toml_str(it['name'])}",
            'detect = { argv = ["true"] }',
            f"content = [{{ sha256 = {toml_str(c['sha256'])}, name = {toml_str(c['name'])} }}]",
            "install = { argv = [" + ", ".join(toml_str(a) for a in it["install"]) + "] }",
            "",
        ]
    return "\n".join(out)


def plain_items(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"name": f"item {i}", "content": c, "install": ["test", "-s", c["name"]]}
        for i, c in enumerate(content)
    ]


# -- the runs ----------------------------------------------------------------------------


def bytes_delta(m0: dict[str, Any], m1: dict[str, Any]) -> dict[str, Any]:
    def d(a: dict[str, float], b: dict[str, float], key: str) -> float:
        return b.get(key, 0.0) - a.get(key, 0.0)

    key = "taskfleet_content_served_bytes_total"
    rk = "taskfleet_relay_content_"
    return {
        "server_to_relay": d(m0["server"], m1["server"], key + '{to="relay"}'),
        "server_to_agent": d(m0["server"], m1["server"], key + '{to="agent"}'),
        "relays": [
            {
                "fetched": d(a, b, rk + "fetched_bytes_total"),
                "served": d(a, b, rk + "served_bytes_total"),
                "hits": d(a, b, rk + "hits_total"),
                "misses": d(a, b, rk + "misses_total"),
                "evicted": d(a, b, rk + "evicted_total"),
                "fetch_failures": common.metric_sum(b, rk + "fetch_failures_total")
                - common.metric_sum(a, rk + "fetch_failures_total"),
            }
            for a, b in zip(m0["relays"], m1["relays"], strict=True)
        ],
    }


def run_full(b: Bench) -> dict[str, Any]:
    opts = b.opts
    content = b.add_content("full")
    expected = sum(c["size"] for c in content) * opts.relays
    quiet = common.wait_quiet(b.pids)
    m0 = b.metrics()
    cpu_pids = [b.server.pid, *(r.pid for r in b.relays)] if b.server else []
    cpu0 = common.cpu_seconds(cpu_pids)
    agents_cpu0 = common.cpu_seconds([a.pid for a in b.agents], children=True)
    left0 = b.left_relays()
    load = common.LoadMeter(b.pids)
    with contextlib.ExitStack() as stack:
        timeline = stack.enter_context(Timeline(b.relays))
        if opts.profile_dir and b.server:
            # py-spy takes CPU of its own: a profiled run's times are not comparable
            for name, pid in (
                ("server", b.server.pid),
                ("relay0", b.relays[0].pid),
                ("agent0", b.agents[0].pid),
            ):
                stack.enter_context(common.PySpy(pid, opts.profile_dir / f"jobs-{name}.txt"))
        t0 = time.monotonic()
        job, cli_s = b.create_job("bench full", plain_items(content))
        b.log(f"full: job {job['id']} created ({cli_s:.2f} s); waiting for every computer ...")
        state, t1 = b.wait_state(job["id"], {"succeeded"}, opts.job_timeout)
    seen_wall = time.time() - (time.monotonic() - t1)
    out: dict[str, Any] = {
        "job_id": job["id"],
        "state": state,
        # from the server's created_at (the command's Python start-up is not the job's)
        "seconds_create_to_done": seen_wall - job["created_at"],
        "seconds_cli_start_to_done": t1 - t0,
        "seconds_cli_create": cli_s,
        "load": load.read(),
        "quiet_gate": quiet,
        "server_relays_cpu_seconds": common.cpu_seconds(cpu_pids) - cpu0,
        "agents_cpu_seconds": common.cpu_seconds([a.pid for a in b.agents], children=True)
        - agents_cpu0,
        "fsync": b.probe.window(t0, t1),
        "agents_left_relay": b.left_relays() - left0,
        "profiled": bool(opts.profile_dir),
        # seconds after the `job create` command started, like t0
        "relay_timeline": timeline.summary(),
        "relay_timeline_rows": timeline.rows,
    }
    out["disturbed"] = common.disturbed(out["load"])
    d = b.detail(job["id"])
    ends = [c["finished_at"] for c in d["computers"] if c.get("finished_at")]
    out["server_span_created_to_last_finished"] = max(ends) - d["created_at"] if ends else None
    out["counts"] = d["counts"]
    out["steps"] = step_counts(d)
    out["time"] = where_time_goes(d, b.opts.relays)
    out["bytes"] = bytes_delta(m0, b.metrics())
    out["bytes_expected_to_relays"] = expected
    out["item_sizes"] = [c["size"] for c in content]
    out["staged_files_left"] = len(b.staged_files())
    out["content"] = content
    b.log(
        f"full: {state} in {out['seconds_create_to_done']:.2f} s, {d['counts']}; server -> "
        f"relays {out['bytes']['server_to_relay']:,.0f} B (expected {expected:,}), -> agents "
        f"{out['bytes']['server_to_agent']:,.0f} B"
    )
    return out


def terminate(b: Bench, job_id: int, reason: str) -> tuple[dict[str, Any], float, float]:
    """POST the terminate; (its answer, epoch and monotonic just before sending)."""
    assert b.api is not None
    wall, mono = time.time(), time.monotonic()
    r = b.api.post(f"/jobs/{job_id}/terminate", json={"reason": reason})
    r.raise_for_status()
    return dict(r.json()), wall, mono


def termination_report(
    b: Bench, job_id: int, t_wall: float, t_mono: float, state: str, t_seen: float
) -> dict[str, Any]:
    d = b.detail(job_id)
    term = d.get("terminate") or {}
    received = b.receipts(t_wall - 1.0)
    at_post = {}
    at_receipt = {}
    later = {}
    more = {}
    for c in d["computers"]:
        idx = int(str(c["hostname"]).rsplit("-", 1)[-1])  # bench-<agent index>
        p0 = phase_at(c, t_wall)
        at_post[p0] = at_post.get(p0, 0) + 1
        when = received.get(idx)
        if when is not None:
            p1 = phase_at(c, when)
            at_receipt[p1] = at_receipt.get(p1, 0) + 1
            bad = later_phase(c, when)
            if bad:
                later[c["hostname"]] = bad
            ran = ran_after(c, when)
            if len(ran) > 1:
                more[c["hostname"]] = ran
    server_latency = (
        term["terminated_at"] - term["at"] if term.get("terminated_at") and term.get("at") else None
    )
    rx = sorted(v - t_wall for v in received.values())
    return {
        "fsync": b.probe.window(t_mono, t_seen),
        "state": state,
        "seconds_terminate_to_terminated": t_seen - t_mono,
        "server_terminate_to_terminated": server_latency,
        "counts": d["counts"],
        "steps": step_counts(d),
        "phase_at_terminate_post": at_post,
        "phase_at_order_received": at_receipt,
        "orders_received_logged": len(received),
        "order_received_after_post_s": spread(rx),
        "later_phase_after_order": later,
        "more_than_step_in_hand": more,
        "time": where_time_goes(d, b.opts.relays),
        "terminate": term,
        "waiting_for": d.get("waiting_for"),
    }


def run_terminate_download(b: Bench) -> dict[str, Any]:
    opts = b.opts
    content = b.add_content("dl")
    want = max(1, math.ceil(opts.download_trigger * opts.agents))
    common.wait_quiet(b.pids)
    m0 = b.metrics()
    left0 = b.left_relays()
    load = common.LoadMeter(b.pids)
    job, _ = b.create_job("bench terminate in download", plain_items(content))
    b.log(f"download: job {job['id']}; terminating once {want} agents are downloading ...")
    deadline = time.monotonic() + opts.job_timeout
    seen, k = 0, 0
    while time.monotonic() < deadline:
        seen = b.downloading()
        if seen >= want:
            break
        k += 1
        if k % 50 == 0:  # every ~0.5 s: a job that ended never downloads
            b.check_running(job["id"])
        time.sleep(0.01)
    else:
        raise RuntimeError(f"only {seen} agents began downloading in {opts.job_timeout:g} s")
    window = common.LoadMeter(b.pids)
    answer, t_wall, t_mono = terminate(b, job["id"], "bench: terminate in download")
    state, t_seen = b.wait_state(job["id"], {"terminated"}, opts.term_timeout)
    out = termination_report(b, job["id"], t_wall, t_mono, state, t_seen)
    out["load_terminate_window"] = window.read()
    out.update(
        {
            "job_id": job["id"],
            "agents_downloading_at_post": seen,
            "trigger": want,
            "terminate_call": answer.get("terminate_call"),
            "load": load.read(),
            "bytes": bytes_delta(m0, b.metrics()),
            "agents_left_relay": b.left_relays() - left0,
            "staged_files_left": len(b.staged_files()),
        }
    )
    out["disturbed"] = common.disturbed(out["load"])
    b.log(
        f"download: {state} {out['seconds_terminate_to_terminated']:.2f} s after the POST; "
        f"{out['counts']}; phase at POST {out['phase_at_terminate_post']}"
    )
    return out


class Gate:
    """A file whose exclusive flock we hold: ``flock -s FILE CMD`` blocks until ``open``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.opened_at: float | None = None

    def open(self) -> None:
        if self.opened_at is None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.opened_at = time.monotonic()


def run_terminate_install(b: Bench, content: list[dict[str, Any]]) -> dict[str, Any]:
    opts = b.opts
    gates = [Gate(b.workdir / "gate0"), Gate(b.workdir / "gate1")]
    try:
        items = [
            {
                "name": f"item {i}",
                "content": c,
                "install": ["flock", "-s", str(gates[min(i, 1)].path), "test", "-s", c["name"]],
            }
            for i, c in enumerate(content)
        ]
        common.wait_quiet(b.pids)
        load = common.LoadMeter(b.pids)
        job, _ = b.create_job("bench terminate in install", items)
        b.log(f"install: job {job['id']}; waiting until every computer is on install item 0")

        def all_in_install() -> bool:
            b.check_running(job["id"])
            cs = b.detail(job["id"])["computers"]
            return all(
                any(s["phase"] == "install" and s["item"] == 0 for s in c["steps"]) for c in cs
            )

        common.wait_until(all_in_install, opts.job_timeout, "every computer on install 0", 0.25)
        window = common.LoadMeter(b.pids)
        answer, t_wall, t_mono = terminate(b, job["id"], "bench: terminate in install")
        # Open the gate once every agent has the order, so that the item in hand finishes
        # AFTER the order is known and the computer cannot race on to item 1.
        try:
            common.wait_until(
                lambda: len(b.receipts(t_wall - 1.0)) >= opts.agents,
                opts.receipt_timeout,
                "every agent to log the terminate order",
                every=0.05,
            )
            receipt_note = "every agent logged the order"
        except TimeoutError as exc:
            receipt_note = f"{exc}: gate opened anyway"
            b.problems.append(receipt_note)
        gates[0].open()
        t_gate = time.monotonic()
        state, t_seen = b.wait_state(job["id"], {"terminated"}, opts.term_timeout)
        load_window = window.read()
    finally:
        for g in gates:
            g.open()
    out = termination_report(b, job["id"], t_wall, t_mono, state, t_seen)
    out["load_terminate_window"] = load_window
    later_items = [
        c["hostname"]
        for c in b.detail(job["id"])["computers"]
        for s in c["steps"]
        if s["phase"] == "install" and s["item"] > 0 and s["status"] != "skipped"
    ]
    out.update(
        {
            "job_id": job["id"],
            "terminate_call": answer.get("terminate_call"),
            "seconds_post_to_gate": t_gate - t_mono,
            "seconds_gate_to_terminated": t_seen - t_gate,
            "receipt": receipt_note,
            "later_items_started": later_items,
            "load": load.read(),
            "staged_files_left": len(b.staged_files()),
        }
    )
    out["disturbed"] = common.disturbed(out["load"])
    b.log(
        f"install: {state} {out['seconds_terminate_to_terminated']:.2f} s after the POST "
        f"(gate at {out['seconds_post_to_gate']:.2f} s); {out['counts']}"
    )
    return out


def run(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    b = Bench(opts, workdir)
    out: dict[str, Any] = {
        "agents": opts.agents,
        "relays": opts.relays,
        "items": opts.items,
        "item_mb": opts.item_mb,
        "cpus": os.cpu_count(),
    }
    try:
        out["start"] = b.start()
        out["full"] = full = run_full(b)
        if not opts.skip_terminate:
            out["terminate_download"] = run_terminate_download(b)
            out["terminate_install"] = run_terminate_install(b, full["content"])
    except Exception as exc:  # keep what was measured, say what failed
        out["error"] = f"{type(exc).__name__}: {exc}"
        b.log(f"FAILED: {out['error']}")
    finally:
        out["problems"] = b.problems
        logs = {"server": b.server.log} if b.server else {}
        logs.update({r.name: r.log for r in b.relays})
        out["log_errors"] = {
            k: v for k, v in ((k, common.server_log_problems(p)) for k, p in logs.items()) if v
        }
        out["agent_log_errors"] = sum(len(common.server_log_problems(a.log)) for a in b.agents)
        b.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=None, help="real agents [200; quick 20]")
    ap.add_argument("--quick", action="store_true", help="20 agents: a smoke run (~1 min)")
    ap.add_argument("--relays", type=int, default=2)
    ap.add_argument("--items", type=int, default=3)
    ap.add_argument("--item-mb", type=float, default=5.0, help="MB (10^6 B) per item")
    ap.add_argument(
        "--download-trigger",
        type=float,
        default=0.5,
        help="share of agents that have begun downloading when the terminate is sent",
    )
    ap.add_argument("--poll", type=float, default=0.1, help="seconds between job polls")
    ap.add_argument("--job-timeout", type=float, default=600.0)
    ap.add_argument("--term-timeout", type=float, default=180.0)
    ap.add_argument("--receipt-timeout", type=float, default=60.0)
    ap.add_argument(
        "--direct-timeout",
        type=float,
        default=150.0,
        help="seconds to wait for agents that left their relay to come back (their relay "
        "probe: 60 s by default)",
    )
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--skip-terminate", action="store_true", help="only the full run")
    ap.add_argument(
        "--profile-dir", type=Path, default=None, help="py-spy server, relay 0, agent 0 (full)"
    )
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs, state)")
    opts = ap.parse_args()
    opts.agents = opts.agents or (20 if opts.quick else 200)
    if opts.agents < opts.relays or opts.relays < 1 or opts.items < 2:
        ap.error("need a relay, an agent per relay and at least 2 items")
    common.raise_nofile()
    common.install_cleanup()
    base = Path(
        tempfile.mkdtemp(prefix=f"taskfleet-{os.environ.get('TASKFLEET_BENCH_TAG', 'bench')}-jobs-")
    )
    results: dict[str, Any] = {"started": time.time(), "quick": opts.quick}
    try:
        results.update(run(opts, base))
    finally:
        common.stop_all()
        if opts.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    results["finished"] = time.time()
    results["verdicts"] = verdicts(results)
    results["table"] = report(results)
    print(results["table"], file=sys.stderr)
    if opts.json_out:
        opts.json_out.parent.mkdir(parents=True, exist_ok=True)
        opts.json_out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    else:
        print(f"JSON: {common.write_json(time.strftime('jobs-%Y%m%d-%H%M%S.json'), results)}")
    return 0 if "error" not in results else 1


if __name__ == "__main__":
    raise SystemExit(main())
