"""Real agents: M real ``taskfleet agent`` processes against a real server on loopback.

Each agent has its own state folder and its own UDP tickle port, enrolls with
an enrollment token, and runs scripts for real (``--allow-scripts``). Steps:

1. start the server (``--poll-interval 1800``, the default: idle means idle);
2. start M agents, wait until every one logged "agent ready" and made its
   first exchange;
3. time a script request (target all, argv ["true"]) from POST to
   ``progress.done`` (polled every 50 ms), and the server-side span
   (request created -> last activity finished);
4. after a settle pause, measure each agent over an idle window: RSS and USS
   (psutil) and CPU (cpu_times delta / seconds, as ms of CPU per second).

Run alone: ``python benchmarks/real_agents.py --agents 200``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "max": None, "min": None}
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "max": max(values),
        "min": min(values),
    }


def run(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"agents": opts.agents}

    def log(msg: str) -> None:
        print(f"[real agents m={opts.agents}] {msg}", file=sys.stderr, flush=True)

    server = common.start_server(workdir, "--poll-interval", "1800")
    api = httpx.Client(
        base_url=server.url + "/api/v1",
        headers={"Authorization": f"Bearer {server.admin_token}"},
        timeout=60,
    )
    procs = []
    try:
        r = api.post("/tokens", json={"kind": "enroll", "name": "bench-real"})
        r.raise_for_status()
        token = r.json()["token"]
        log(f"starting {opts.agents} agents ...")
        t_start = time.monotonic()
        agents = common.start_agents(
            workdir, server.url, token, opts.agents, spawn_gap=opts.spawn_gap
        )
        procs = [a.popen for a in agents]
        common.wait_agents_ready(agents, opts.ready_timeout)
        # every agent exchanges once at start: wait for those too
        common.wait_until(
            lambda: (
                common.metric_sum(common.scrape_metrics(server.url), "taskfleet_exchanges_total")
                >= opts.agents
            ),
            60,
            "first exchanges",
            every=0.25,
        )
        out["seconds_to_all_ready"] = time.monotonic() - t_start
        n = len(api.get("/computers").json())
        out["enrolled"] = n
        if n != opts.agents:
            raise RuntimeError(f"{n} computers enrolled, expected {opts.agents}")
        log(f"all {n} ready after {out['seconds_to_all_ready']:.1f}s; settling ...")
        time.sleep(opts.settle)

        runs: list[dict[str, Any]] = []
        for k in range(opts.repeats + opts.extra_runs):
            if sum(not r["disturbed"] for r in runs) >= opts.repeats:
                break
            if k:
                time.sleep(2)  # > tickle min interval
            ours = [os.getpid(), server.pid, *(p.pid for p in procs)]
            quiet = common.wait_quiet(ours)
            load = common.LoadMeter(ours)
            t0 = time.monotonic()
            r = api.post(
                "/requests",
                json={"type": "execute-script", "target": "all", "params": {"argv": ["true"]}},
            )
            r.raise_for_status()
            req = r.json()
            done_at = None
            last: dict[str, Any] = {}
            while time.monotonic() - t0 < opts.request_timeout:
                last = api.get(f"/requests/{req['id']}").json()
                if last["progress"]["done"]:
                    done_at = time.monotonic()
                    break
                time.sleep(0.05)
            acts = api.get("/activities", params={"request_id": req["id"], "limit": 100000}).json()
            finished = [a["finished_at"] for a in acts if a.get("finished_at")]
            states: dict[str, int] = {}
            for a in acts:
                states[a["state"]] = states.get(a["state"], 0) + 1
            runs.append(
                {
                    "request_id": req["id"],
                    "done": done_at is not None,
                    "seconds_to_done_api": None if done_at is None else done_at - t0,
                    "server_span_created_to_last_finished": (
                        max(finished) - req["created_at"] if finished else None
                    ),
                    "states": states,
                    "progress": last.get("progress"),
                    "load": load.read(),
                    "quiet_gate": quiet,
                }
            )
            runs[-1]["disturbed"] = common.disturbed(runs[-1]["load"])
            log(f"request {k + 1}: done in {runs[-1]['seconds_to_done_api']}s ({states})")
        out["request_runs"] = runs
        done_times = [r["seconds_to_done_api"] for r in runs if r["done"] and not r["disturbed"]]
        done_times = done_times or [r["seconds_to_done_api"] for r in runs if r["done"]]
        out["request_seconds_median"] = statistics.median(done_times) if done_times else None
        out["request_seconds_first"] = runs[0]["seconds_to_done_api"]

        log(f"idle: settling {opts.settle:g}s, then measuring {opts.idle_window:g}s ...")
        time.sleep(opts.settle)
        ps = [psutil.Process(p.pid) for p in procs]
        srv = psutil.Process(server.pid)

        def cpu(p: psutil.Process) -> float:
            t = p.cpu_times()
            return t.user + t.system

        c0 = [cpu(p) for p in ps]
        n0 = [common.sched_cpu_ns(p.pid) for p in ps]
        out["idle_quiet_gate"] = common.wait_quiet(
            [os.getpid(), server.pid, *(p.pid for p in procs)]
        )
        s0 = cpu(srv)
        load = common.LoadMeter([os.getpid(), server.pid, *(p.pid for p in procs)])
        w0 = time.monotonic()
        time.sleep(opts.idle_window)
        c1 = [cpu(p) for p in ps]
        n1 = [common.sched_cpu_ns(p.pid) for p in ps]
        s1 = cpu(srv)
        wall = time.monotonic() - w0
        ticks_ms_per_s = [(b - a) * 1000 / wall for a, b in zip(c0, c1, strict=True)]
        exact = all(a is not None and b is not None for a, b in zip(n0, n1, strict=True))
        ms_per_s = (
            [(b - a) / 1e6 / wall for a, b in zip(n0, n1, strict=True)]  # type: ignore[operator]
            if exact
            else ticks_ms_per_s
        )
        rss, uss = [], []
        for p in ps:
            m = p.memory_full_info()
            rss.append(m.rss)
            uss.append(m.uss)
        out["idle_window_seconds"] = wall
        out["idle_load"] = load.read()
        out["agent_idle_cpu_ms_per_s"] = _stats(ms_per_s)
        out["agent_idle_cpu_source"] = "schedstat (ns)" if exact else "psutil cpu_times (10 ms)"
        out["agent_idle_cpu_ms_per_s_psutil_ticks"] = _stats(ticks_ms_per_s)
        out["agent_idle_rss_bytes"] = _stats(rss)
        out["agent_idle_uss_bytes"] = _stats(uss)
        out["server_idle_cpu_ms_per_s"] = (s1 - s0) * 1000 / wall
        out["server_rss_bytes"] = srv.memory_info().rss
        out["agent_children_after"] = sum(len(p.children(recursive=True)) for p in ps)
        out["server_log_errors"] = common.server_log_problems(server.log)
        log(
            "idle: RSS mean {:.1f} MB, USS mean {:.1f} MB, CPU mean {:.3f} max {:.3f} ms/s".format(
                out["agent_idle_rss_bytes"]["mean"] / 1e6,
                out["agent_idle_uss_bytes"]["mean"] / 1e6,
                out["agent_idle_cpu_ms_per_s"]["mean"],
                out["agent_idle_cpu_ms_per_s"]["max"],
            )
        )
    finally:
        api.close()
        log("stopping agents ...")
        common.stop_many(procs)
        common.stop(server.popen)
    out["agents_left_running"] = sum(p.poll() is None for p in procs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--idle-window", type=float, default=20.0)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3, help="undisturbed request runs")
    ap.add_argument("--extra-runs", type=int, default=2, help="more runs if some disturbed")
    ap.add_argument("--spawn-gap", type=float, default=0.01, help="seconds between spawns")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    opts = ap.parse_args()
    out_limits = common.raise_nofile()
    common.install_cleanup()
    base = Path(
        tempfile.mkdtemp(prefix=f"taskfleet-{os.environ.get('TASKFLEET_BENCH_TAG', 'bench')}-real-")
    )
    try:
        res = run(opts, base)
        res["rlimit_nofile"] = out_limits
    finally:
        common.stop_all()
        if opts.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    text = json.dumps(res, indent=2, default=str)
    if opts.json_out:
        opts.json_out.parent.mkdir(parents=True, exist_ok=True)
        opts.json_out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
