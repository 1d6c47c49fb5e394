"""taskfleet benchmarks in one command: ``python benchmarks/run.py [--quick]``.

1. Fleet simulator (``fleet_sim.py``): N simulated agents in one process speaking
   the real protocol over real HTTP and UDP against a real server subprocess
   (SQLite): request -> all results with tickles and with 5 s polls, empty
   exchanges per second, tickle latency, server memory.
2. Real agents (``real_agents.py``): M real ``taskfleet agent`` processes:
   request -> all results, idle RSS/USS and CPU per agent.
3. Relays (``relay_sim.py``): simulated agents behind real ``taskfleet relay``
   processes: 10,000 behind 4 relays against 10,000 direct on the same server,
   requests alternating (relays must not be slower), and 100,000 behind 10 relays
   (request -> all results within 60 s).
4. Jobs (``job_bench.py``): a job of 3 items of 5 MB on M real agents behind 2 real
   relays: content bytes the server sent (each item once per relay, none to agents),
   job create -> all Succeeded, terminate -> Terminated in Download and in Install.
5. SaltStack's published figures beside ours, and every target with PASS/MISS.

Full: N = 1,000 and 10,000, M = 200: about 9 minutes on 2 cores, up to ~16 when
other processes keep the machine busy (each timed measurement first waits, bounded,
for other processes to go quiet, and disturbed runs are repeated a bounded number
of times); the relay runs add about 15 minutes more, the job run (200 real agents)
about 5. Quick: N = 2,000, M = 20, short windows, 2,000 behind 2 relays vs 2,000
direct, the job run on 20 agents (about 4 minutes). Results go to benchmarks/out/
(JSON). Every child process is stopped on exit, Ctrl-C and
errors; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_PY = HERE.parent / ".venv" / "bin" / "python"

try:
    import psutil  # noqa: F401

    import taskfleet  # noqa: F401
except ImportError:  # run with a python outside the venv: use the venv's
    if VENV_PY.exists() and Path(sys.prefix).resolve() != VENV_PY.parent.parent.resolve():
        os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])
    raise

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(HERE))
import common  # noqa: E402

SALT = {
    "cmd_run_200_minions_s": 13.9,
    "cmd_run_50_minions_s": 1.6,
    "minion_idle_rss_mb": 80.0,
    "minion_idle_cpu_ms_per_s": 3.8,
}

TARGETS = {
    "request_10k_s": ("<=", 10.0, "s"),
    "empty_exchanges_per_s": (">=", 3000.0, "/s"),
    "server_bytes_per_idle_computer": ("<=", 2048.0, "B"),
    "request_200_real_s": ("<=", 2.0, "s"),
    "agent_idle_rss_mb": ("<=", 30.0, "MB"),
    "agent_idle_cpu_ms_per_s": ("<=", 0.5, "ms/s"),
    "relayed_over_direct": ("<=", 1.0, "x"),
    "request_100k_relays_s": ("<=", 60.0, "s"),
    "job_server_bytes_over_once_per_relay": ("<=", 1.0, "x"),
}


LABELS = {
    "request_10k_s": "largest N: request -> all results (tickles)",
    "empty_exchanges_per_s": "largest N: empty exchanges per second",
    "server_bytes_per_idle_computer": "largest N: server RSS per idle computer",
    "request_200_real_s": "real agents: request -> all results",
    "agent_idle_rss_mb": "real agents: idle RSS (max)",
    "agent_idle_cpu_ms_per_s": "real agents: idle CPU (max)",
    "relayed_over_direct": "relays / direct: request -> all results",
    "request_100k_relays_s": "100,000 behind 10 relays: request -> all results",
    "job_server_bytes_over_once_per_relay": "jobs: server content bytes / once per relay",
}

# relay_sim.py runs: (arguments, time budget in seconds)
RELAY_RUNS = [
    (["--n", "10000", "--relays", "4", "--compare-direct", "--repeats", "3"], 1200),
    (["--n", "100000", "--relays", "10", "--repeats", "2"], 2400),
]
RELAY_RUNS_QUICK = [(["--n", "2000", "--relays", "2", "--compare-direct", "--repeats", "2"], 420)]


def verdict(key: str, value: float | None) -> str:
    op, limit, _unit = TARGETS[key]
    if value is None:
        return "MISS (no result)"
    ratio = value / limit
    ok = value <= limit if op == "<=" else value >= limit
    word = "PASS" if ok else "MISS"
    if op == "<=":
        return f"{word} {ratio:.2f}x of limit"
    return f"{word} {ratio:.2f}x target"


def code_version() -> dict[str, Any]:
    """The commit measured, and whether src/ had uncommitted changes (read-only git)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(HERE.parent), *args],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    status = git("status", "--porcelain", "--", "src")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "src_dirty": bool(status),
        "src_status_digest": str(hash(status)) if status else "",
    }


def _child_setup() -> None:
    common._child_setup()


def run_child(args: list[str], budget: float) -> int:
    """Run a benchmark script in our process group (Ctrl-C reaches it), bounded in time."""
    p = subprocess.Popen([sys.executable, *args], preexec_fn=_child_setup)
    try:
        return p.wait(budget)
    except subprocess.TimeoutExpired:
        print(f"!! {args[0]} exceeded its {budget:g}s budget; stopping it", file=sys.stderr)
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        return 124
    except BaseException:
        # Ctrl-C: the child got SIGINT too; give it time to stop its own children.
        try:
            p.wait(40)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        raise


def fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def median(vals: list[float]) -> float | None:
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return None
    m = len(vals) // 2
    return vals[m] if len(vals) % 2 else (vals[m - 1] + vals[m]) / 2


def undisturbed(runs: list[dict[str, Any]], key: str) -> list[float]:
    """Values of the undisturbed runs, or of all runs when every run was disturbed."""
    pool = [r for r in runs if not r.get("disturbed")] or runs
    return [r[key] for r in pool if r[key] is not None]


def runs_text(runs: list[dict[str, Any]], key: str) -> str:
    return " / ".join(
        ("-" if r[key] is None else f"{r[key]:.2f}") + ("*" if r.get("disturbed") else "")
        for r in runs
    )


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    for r in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(out)


def report(
    fleet: dict[str, Any] | None,
    real: dict[str, Any] | None,
    quick: bool,
    relays: list[dict[str, Any]] | None = None,
    jobs: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    parts: list[str] = []
    summary: dict[str, Any] = {}
    if fleet:
        runs = fleet["runs"]
        ns = [r["n"] for r in runs]
        big = max(runs, key=lambda r: r["n"])
        hdr = ["fleet simulator", *[f"N={n:,}" for n in ns], "target", "verdict"]

        def row(label: str, fn: Any, target: str = "", verdict_s: str = "") -> list[str]:
            return [label, *[fn(r) for r in runs], target, verdict_s]

        def tick_med(r: dict[str, Any]) -> float | None:
            return median(undisturbed(r["tickled_runs"], "seconds_to_done_api"))

        def tick_all(r: dict[str, Any]) -> str:
            return runs_text(r["tickled_runs"], "seconds_to_done_api")

        req_big = tick_med(big)
        summary["request_10k_s"] = req_big
        ex_big = big["hammer"]["per_second"]
        summary["empty_exchanges_per_s"] = ex_big
        mem_big = big["rss_per_idle_computer_bytes"]
        summary["server_bytes_per_idle_computer"] = mem_big
        big_label = f"@N={big['n']:,}"
        rows = [
            row(
                "(a) request -> all results, tickles (median)",
                lambda r: fmt_s(tick_med(r)),
                f"<= 10 s {big_label}",
                verdict("request_10k_s", req_big),
            ),
            row("    runs (s)", tick_all),
            row(
                "    first op delivered / all results acked (sim)",
                lambda r: (
                    f"{r['tickled']['sim_first_op']:.2f} / "
                    f"{r['tickled']['sim_all_results_acked']:.2f} s"
                ),
            ),
            row("    POST /requests itself", lambda r: fmt_s(r["tickled"]["seconds_post"])),
            row(
                "    server / simulator CPU (cores)",
                lambda r: (
                    f"{r['tickled']['server_cpu_cores']:.2f} / "
                    f"{r['tickled']['simulator_cpu_cores']:.2f}"
                ),
            ),
            row(
                "    server CPU for the whole request (median)",
                lambda r: fmt_s(median(undisturbed(r["tickled_runs"], "server_cpu_seconds"))),
            ),
            row(
                "    other processes' CPU meanwhile (cores)",
                lambda r: " / ".join(f"{x['load']['other_cores']:.2f}" for x in r["tickled_runs"]),
            ),
            row(
                "(b) request -> all results, polls every 5 s",
                lambda r: (
                    fmt_s(r["polled"]["seconds_to_done_api"])
                    + (" *" if r["polled"].get("disturbed") else "")
                ),
            ),
            row(
                "(c) empty exchanges/s (256 in flight)",
                lambda r: (
                    f"{r['hammer']['per_second']:,.0f}"
                    + (" *" if r["hammer"].get("disturbed") else "")
                ),
                ">= 3,000/s",
                verdict("empty_exchanges_per_s", ex_big),
            ),
            row(
                "    server CPU per empty exchange",
                lambda r: f"{r['hammer']['server_cpu_us_per_exchange']:.0f} us",
            ),
            row(
                "    latency p50 / p99 (ms)",
                lambda r: (
                    f"{r['hammer']['latency_ms_p50']:.1f} / {r['hammer']['latency_ms_p99']:.1f}"
                ),
            ),
            row(
                "    server / simulator CPU (cores)",
                lambda r: (
                    f"{r['hammer']['server_cpu_cores']:.2f} / "
                    f"{r['hammer']['simulator_cpu_cores']:.2f}"
                ),
            ),
            row(
                "    other processes' CPU meanwhile (cores)",
                lambda r: f"{r['hammer']['load']['other_cores']:.2f}",
            ),
            row(
                "(d) tickle -> exchange sent p50 / p99 (ms)",
                lambda r: (
                    f"{fmt_ms(r['tickled']['tickle_to_exchange_ms_p50'])} / "
                    f"{fmt_ms(r['tickled']['tickle_to_exchange_ms_p99'])}"
                ),
            ),
            row(
                "    tickle -> received+verified p50 / p99 (ms)",
                lambda r: (
                    f"{fmt_ms(r['tickled']['tickle_received_ms_p50'])} / "
                    f"{fmt_ms(r['tickled']['tickle_received_ms_p99'])}"
                ),
            ),
            row(
                "    tickle -> operation received p50 / p99 (ms)",
                lambda r: (
                    f"{fmt_ms(r['tickled']['tickle_to_operation_ms_p50'])} / "
                    f"{fmt_ms(r['tickled']['tickle_to_operation_ms_p99'])}"
                ),
            ),
            row(
                "    tickles sent / received / kernel drops",
                lambda r: (
                    f"{r['tickled']['tickles_sent_by_server']:.0f} / "
                    f"{r['tickled']['tickles_received']} / {r['tickled']['udp_kernel_drops']}"
                ),
            ),
            row("(e) server peak RSS", lambda r: common.mb(r["server_peak_rss"])),
            row(
                "    RSS fresh (0 computers) -> N idle",
                lambda r: (
                    f"{r['server_rss_fresh_0_computers'] / 1e6:.1f} -> "
                    f"{r['server_rss_idle_n'] / 1e6:.1f} MB"
                ),
            ),
            row(
                "    RSS per idle computer",
                lambda r: f"{r['rss_per_idle_computer_bytes']:,.0f} B",
                "<= 2 KB",
                verdict("server_bytes_per_idle_computer", mem_big),
            ),
            row(
                "    same, after restart (fleet loaded from DB)",
                lambda r: f"{r['rss_per_idle_computer_bytes_loaded']:,.0f} B",
            ),
            row(
                "enrollment (64 concurrent)",
                lambda r: f"{r['enroll']['per_second']:,.0f}/s ({r['enroll']['seconds']:.0f} s)",
            ),
        ]
        if len(runs) > 1:
            small = min(runs, key=lambda r: r["n"])
            slope = (big["server_rss_idle_n"] - small["server_rss_idle_n"]) / (
                big["n"] - small["n"]
            )
            rows.insert(
                -2,
                [
                    f"    marginal N={small['n']:,} -> {big['n']:,}",
                    *["" for _ in runs[:-1]],
                    f"{slope:,.0f} B",
                    "",
                    "",
                ],
            )
        parts.append(table(rows, hdr))
        sim_max = max(
            max(r["hammer"]["simulator_cpu_cores"], r["tickled"]["simulator_cpu_cores"])
            for r in runs
        )
        srv_min = min(
            min(r["hammer"]["server_cpu_cores"], r["tickled"]["server_cpu_cores"]) for r in runs
        )
        bottleneck = (
            f"the server is the bottleneck (it used {srv_min:.2f}+ cores of its one event loop "
            f"while the simulator used at most {sim_max:.2f})"
            if sim_max < 0.8 and srv_min > sim_max
            else f"CHECK: the simulator used up to {sim_max:.2f} cores - it may be a bottleneck"
        )
        parts.append(
            "  simulator: 1 process (uvloop), "
            f"{runs[0]['pool_connections']} keep-alive HTTP connections shared by all agents, "
            "1 UDP socket (all agents report the same tickle port; demultiplexed by computer\n"
            "  id, each datagram checked with its computer's TickleVerifier); "
            f"{bottleneck}."
        )
        parts.append(
            "  (d) 'exchange sent' includes waiting for a free pooled connection while the "
            "server works through the burst; 'received+verified' is the UDP path alone.\n"
            "  * = disturbed: processes not started by this benchmark used more than "
            f"{common.DISTURBED_CORES} cores meanwhile (the machine is shared);\n"
            "  disturbed runs are repeated (bounded) and medians use undisturbed runs when any."
        )
    if real:
        m = real["agents"]
        runs = real["request_runs"]
        med = median(undisturbed(runs, "seconds_to_done_api"))
        rss_max = real["agent_idle_rss_bytes"]["max"] / 1e6
        cpu_max = real["agent_idle_cpu_ms_per_s"]["max"]
        summary["request_200_real_s"] = med
        summary["agent_idle_rss_mb"] = rss_max
        summary["agent_idle_cpu_ms_per_s"] = cpu_max
        rows = [
            [
                "request -> all results (median)",
                fmt_s(med),
                "<= 2 s" + ("" if m == 200 else f" (@200; ran {m})"),
                verdict("request_200_real_s", med),
            ],
            ["    runs (s)", runs_text(runs, "seconds_to_done_api"), "", ""],
            [
                "    other processes' CPU meanwhile (cores)",
                " / ".join(f"{r['load']['other_cores']:.2f}" for r in runs),
                "",
                "",
            ],
            [
                "agent idle RSS mean / max",
                f"{real['agent_idle_rss_bytes']['mean'] / 1e6:.1f} / {rss_max:.1f} MB",
                "<= 30 MB (max)",
                verdict("agent_idle_rss_mb", rss_max),
            ],
            [
                "agent idle USS mean / max",
                f"{real['agent_idle_uss_bytes']['mean'] / 1e6:.1f} / "
                f"{real['agent_idle_uss_bytes']['max'] / 1e6:.1f} MB",
                "",
                "",
            ],
            [
                f"agent idle CPU mean / max ({real['idle_window_seconds']:.0f} s window)",
                f"{real['agent_idle_cpu_ms_per_s']['mean']:.3f} / {cpu_max:.3f} ms/s",
                "<= 0.5 ms/s (max)",
                verdict("agent_idle_cpu_ms_per_s", cpu_max),
            ],
            [
                "    source",
                real["agent_idle_cpu_source"],
                "",
                "",
            ],
            [
                "all agents enrolled and ready after",
                fmt_s(real["seconds_to_all_ready"]),
                "",
                "",
            ],
            [
                "server idle CPU / RSS with these agents",
                f"{real['server_idle_cpu_ms_per_s']:.1f} ms/s / "
                f"{real['server_rss_bytes'] / 1e6:.1f} MB",
                "",
                "",
            ],
        ]
        parts.append(
            table(rows, [f"real agents (M={m} processes)", "measured", "target", "verdict"])
        )
        peer = [
            [
                "script on all computers",
                f"{SALT['cmd_run_200_minions_s']} s on 200 minions "
                f"({SALT['cmd_run_50_minions_s']} s on 50)",
                f"{fmt_s(med)} on {m} agents",
            ],
            [
                "idle RSS per minion / agent",
                f"~{SALT['minion_idle_rss_mb']:.0f} MB",
                f"{real['agent_idle_rss_bytes']['mean'] / 1e6:.1f} MB mean "
                f"(USS {real['agent_idle_uss_bytes']['mean'] / 1e6:.1f} MB)",
            ],
            [
                "idle CPU per minion / agent",
                f"~{SALT['minion_idle_cpu_ms_per_s']} ms/s",
                f"{real['agent_idle_cpu_ms_per_s']['mean']:.3f} ms/s mean",
            ],
        ]
        parts.append(
            table(peer, ["peer comparison", "SaltStack (published, not run here)", "taskfleet"])
        )
    for data in relays or []:
        import relay_sim  # the simulator's own table

        parts.append(relay_sim.report(data))
        summ = data["summary"]
        if "relayed_over_direct" in summ:
            summary["relayed_over_direct"] = summ["relayed_over_direct"]
        if data["n"] >= 100_000 and not data["compare_direct"]:
            summary["request_100k_relays_s"] = summ["relayed"]["seconds_to_done_api"]
    if jobs:
        import job_bench  # the job benchmark's own table

        parts.append(job_bench.report(jobs))
        full = jobs.get("full")
        if full and full["counts"].get("succeeded") == jobs["agents"]:
            by = full["bytes"]
            summary["job_server_bytes_over_once_per_relay"] = (
                by["server_to_relay"] + by["server_to_agent"]
            ) / full["bytes_expected_to_relays"]
    if summary:
        rows = [
            [
                LABELS[k],
                "-" if v is None else f"{v:,.2f} {TARGETS[k][2]}",
                f"{TARGETS[k][0]} {TARGETS[k][1]:,g} {TARGETS[k][2]}",
                verdict(k, v),
            ]
            for k, v in summary.items()
        ]
        parts.append(table(rows, ["targets", "measured", "target", "verdict"]))
        if quick:
            parts.append("  (--quick: small N and M; the verdicts are indicative only)")
    return "\n\n".join(parts), summary


def run_jobs(opts: argparse.Namespace, stamp: str) -> tuple[int, dict[str, Any] | None]:
    """``job_bench.py`` with M real agents; (its exit code, its JSON)."""
    jobs_json = common.OUT_DIR / f"jobs-{stamp}.json"
    m = opts.agents or (20 if opts.quick else 200)
    args = [str(HERE / "job_bench.py"), "--agents", str(m), "--json-out", str(jobs_json)]
    if opts.quick:
        args.append("--quick")
    rc = run_child(args, 300 if opts.quick else 1200)
    return rc, json.loads(jobs_json.read_text()) if jobs_json.exists() else None


def main() -> int:
    ap = argparse.ArgumentParser(description="taskfleet benchmarks")
    ap.add_argument("--quick", action="store_true", help="small N, smoke run (~1 min)")
    ap.add_argument("--skip-fleet", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-relays", action="store_true")
    ap.add_argument("--skip-jobs", action="store_true")
    ap.add_argument("--agents", type=int, default=None, help="real agents [200; quick 20]")
    ap.add_argument("--n", type=int, action="append", help="simulated computers (repeatable)")
    ap.add_argument("--profile", action="store_true", help="py-spy the server (fleet phases)")
    opts = ap.parse_args()
    common.raise_nofile()
    common.install_cleanup()
    t_start = time.monotonic()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # Every folder our children make carries this tag, so their processes are findable.
    tag = f"bench{os.getpid()}"
    os.environ["TASKFLEET_BENCH_TAG"] = tag
    # Before each timed measurement, wait (bounded) for other processes to go quiet.
    os.environ.setdefault("TASKFLEET_BENCH_QUIET_WAIT", "5" if opts.quick else "30")
    common.OUT_DIR.mkdir(parents=True, exist_ok=True)
    fleet_json = common.OUT_DIR / f"fleet-{stamp}.json"
    real_json = common.OUT_DIR / f"real-{stamp}.json"
    fleet = real = None
    relays: list[dict[str, Any]] = []
    jobs: dict[str, Any] | None = None
    rc = 0
    version_before = code_version()
    try:
        if not opts.skip_fleet:
            args = [str(HERE / "fleet_sim.py"), "--json-out", str(fleet_json)]
            if opts.quick:
                args.append("--quick")
            for n in opts.n or []:
                args += ["--n", str(n)]
            if opts.profile:
                args += ["--profile-dir", str(common.OUT_DIR / f"profiles-{stamp}")]
            rc |= run_child(args, 300 if opts.quick else 1200)
            if fleet_json.exists():
                fleet = json.loads(fleet_json.read_text())
        if not opts.skip_real:
            m = opts.agents or (20 if opts.quick else 200)
            args = [str(HERE / "real_agents.py"), "--agents", str(m), "--json-out", str(real_json)]
            if opts.quick:
                args += ["--idle-window", "5", "--settle", "2", "--repeats", "2"]
                args += ["--extra-runs", "0"]
            rc |= run_child(args, 300 if opts.quick else 900)
            if real_json.exists():
                real = json.loads(real_json.read_text())
        if not opts.skip_relays:
            relay_runs = RELAY_RUNS_QUICK if opts.quick else RELAY_RUNS
            for i, (relay_args, budget) in enumerate(relay_runs):
                relay_json = common.OUT_DIR / f"relay{i}-{stamp}.json"
                args = [str(HERE / "relay_sim.py"), *relay_args, "--json-out", str(relay_json)]
                if opts.profile:
                    args += ["--profile-dir", str(common.OUT_DIR / f"profiles-{stamp}")]
                rc |= run_child(args, budget)
                if relay_json.exists():
                    relays.append(json.loads(relay_json.read_text()))
        if not opts.skip_jobs:
            job_rc, jobs = run_jobs(opts, stamp)
            rc |= job_rc
    finally:
        common.stop_all()
    elapsed = time.monotonic() - t_start
    version_after = code_version()
    text, summary = report(fleet, real, opts.quick, relays, jobs)
    print()
    print(
        f"taskfleet benchmarks ({'quick' if opts.quick else 'full'}) on "
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    changed = version_before != version_after
    print(
        f"code measured: commit {version_before['commit']}"
        + (" + uncommitted changes in src/" if version_before["src_dirty"] else "")
        + (
            f"; WARNING: src/ changed during the run (now {version_after['commit']})"
            if changed
            else ""
        )
    )
    print()
    print(text)
    print()
    print(f"total time {elapsed:.0f} s; JSON in {common.OUT_DIR}")
    combined = {
        "quick": opts.quick,
        "elapsed_seconds": elapsed,
        "cpus": os.cpu_count(),
        "code_before": version_before,
        "code_after": version_after,
        "python": platform.python_version(),
        "summary": summary,
        "targets": TARGETS,
        "salt": SALT,
        "fleet": fleet,
        "real_agents": real,
        "relays": relays,
        "jobs": jobs,
        "table": text,
    }
    common.write_json(f"results-{stamp}.json", combined)
    common.write_json("results-latest.json", combined)
    time.sleep(0.5)
    mine = subprocess.run(
        ["pgrep", "-f", f"taskfleet-{tag}-"], capture_output=True, text=True
    ).stdout.split()
    others = subprocess.run(
        ["pgrep", "-f", "taskfleet agent"], capture_output=True, text=True
    ).stdout.split()
    print(f"processes left from this run: {mine or 'none'}")
    if others:
        print(f"(pgrep -f 'taskfleet agent' sees {len(others)} processes not started here)")
    return rc or (1 if mine else 0)


if __name__ == "__main__":
    raise SystemExit(main())
