"""The job benchmark's reading of a job (``job_bench.py``): what the steps say, the verdicts
and the table.

Steps come from ``GET /api/v1/jobs/{id}``: per computer, per (phase, item) the LAST report
(status and the agent's time ``at``), so a step's end is known, not its start. The
agents run on this machine, so their clocks and the server's are the same clock.
"""

from __future__ import annotations

from typing import Any

import common

PHASE_ORDER = {"analyze": 0, "download": 1, "install": 2}


def phase_ends(comp: dict[str, Any]) -> dict[str, float]:
    """Per phase, when this computer's last report of it was made (its end)."""
    ends: dict[str, float] = {}
    for s in comp["steps"]:
        ends[s["phase"]] = max(ends.get(s["phase"], 0.0), s["at"])
    return ends


def phase_at(comp: dict[str, Any], t: float) -> str:
    """The phase this computer was in at ``t``: that of its first step (in run order)
    last reported after ``t`` ("done" if every report is older; "not started" if it
    was not delivered then)."""
    delivered = comp.get("delivered_at")
    if delivered is None or delivered > t:
        return "not started"
    steps = sorted(comp["steps"], key=lambda s: (PHASE_ORDER.get(s["phase"], 9), s["item"]))
    for s in steps:
        if s["at"] > t:
            return str(s["phase"])
    return "done" if comp.get("finished_at") and comp["finished_at"] <= t else "between steps"


def spread(values: list[float]) -> dict[str, float | None]:
    return {
        "min": min(values) if values else None,
        "p50": common.percentile(values, 50),
        "max": max(values) if values else None,
    }


def where_time_goes(job: dict[str, Any], relays: int) -> dict[str, Any]:
    """From the steps: when each phase ended on each computer, relative to the job's
    creation, and how long each phase took per computer; when computers finished,
    per relay (agent i is behind relay i mod R)."""
    created = job["created_at"]
    delivered, ends = [], {p: [] for p in PHASE_ORDER}
    took: dict[str, list[float]] = {p: [] for p in PHASE_ORDER}
    finished = []
    by_relay: list[list[float]] = [[] for _ in range(relays)]
    for c in job["computers"]:
        if c.get("finished_at"):
            idx = int(str(c["hostname"]).rsplit("-", 1)[-1])
            by_relay[idx % relays].append(c["finished_at"] - created)
        if c.get("delivered_at") is None:
            continue
        delivered.append(c["delivered_at"] - created)
        pe = phase_ends(c)
        prev = c["delivered_at"]
        for p in PHASE_ORDER:
            if p in pe:
                ends[p].append(pe[p] - created)
                took[p].append(pe[p] - prev)
                prev = pe[p]
        if c.get("finished_at"):
            finished.append(c["finished_at"] - created)
    return {
        "delivered_s": spread(delivered),
        "phase_end_s": {p: spread(v) for p, v in ends.items()},
        "phase_took_s": {p: spread(v) for p, v in took.items()},
        "finished_s": spread(finished),
        "finished_s_by_relay": [spread(v) for v in by_relay],
    }


def step_counts(job: dict[str, Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for c in job["computers"]:
        for s in c["steps"]:
            d = out.setdefault(f"{s['phase']} {s['item']}", {})
            d[s["status"]] = d.get(s["status"], 0) + 1
    return out


def ran_after(comp: dict[str, Any], received: float) -> list[str]:
    """Steps that ended (succeeded or failed) after this computer got the order, other
    than Analyze steps when it got it in Analyze (that phase is finished as a whole):
    SPEC 6 allows one, the step in hand; more means it started another."""
    in_analyze = phase_at(comp, received) == "analyze"
    return [
        f"{s['phase']} {s['item']} {s['status']}"
        for s in comp["steps"]
        if s["at"] > received
        and s["status"] in ("succeeded", "failed")
        and not (in_analyze and s["phase"] == "analyze")
    ]


def later_phase(comp: dict[str, Any], received: float) -> list[str]:
    """Steps of a phase later than the one this computer was in when it got the order,
    that ran (succeeded or failed) all the same."""
    now = phase_at(comp, received)
    if now not in PHASE_ORDER:
        return []
    return [
        f"{s['phase']} {s['item']} {s['status']}"
        for s in comp["steps"]
        if PHASE_ORDER.get(s["phase"], 0) > PHASE_ORDER[now]
        and s["status"] in ("succeeded", "failed", "started")
    ]


def fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def fmt_spread(s: dict[str, float | None]) -> str:
    if s.get("p50") is None:
        return "-"
    return f"{s['min']:.2f} / {s['p50']:.2f} / {s['max']:.2f} s"


def fsync_text(f: dict[str, Any]) -> str:
    if not f.get("count"):
        return "-"
    return f"{f['p50_ms']:.1f} / {f['max_ms']:.0f} ms ({f['count']} fsyncs)"


def counts_text(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"


def verdicts(out: dict[str, Any]) -> dict[str, str]:
    """PASS/MISS per target (issue 12's benchmark)."""
    v: dict[str, str] = {}
    full = out.get("full")
    if full:
        by = full["bytes"]
        v["once_per_relay"] = (
            "PASS" if by["server_to_relay"] == full["bytes_expected_to_relays"] else "MISS"
        )
        v["none_to_agents"] = "PASS" if by["server_to_agent"] == 0 else "MISS"
        v["all_succeeded"] = "PASS" if full["counts"].get("succeeded") == out["agents"] else "MISS"
    for key in ("terminate_download", "terminate_install"):
        t = out.get(key)
        if t:
            ok = (
                t["state"] == "terminated"
                and not t["later_phase_after_order"]
                and not t["more_than_step_in_hand"]
                and t["orders_received_logged"] == out["agents"]
            )
            if key == "terminate_install":
                ok = ok and not t["later_items_started"]
            v[key] = "PASS" if ok and not t["staged_files_left"] else "MISS"
    return v


def report(out: dict[str, Any]) -> str:
    m, r = out["agents"], out["relays"]
    v = verdicts(out)
    rows: list[list[str]] = []
    full = out.get("full")
    if full:
        by = full["bytes"]
        t = full["time"]
        rows += [
            [
                "server -> relays, content bytes",
                f"{by['server_to_relay']:,.0f} B",
                f"= {out['items']} x {common.mb(full['item_sizes'][0])} x {r} relays "
                f"({full['bytes_expected_to_relays']:,} B)",
                v["once_per_relay"],
            ],
            [
                "server -> agents, content bytes",
                f"{by['server_to_agent']:,.0f} B",
                "0",
                v["none_to_agents"],
            ],
            [
                "    agents that left their relay: at enrolling / in the job",
                f"{len(out.get('start', {}).get('agents_direct_after_enrolling', []))} / "
                f"{full['agents_left_relay']}",
                "- / 0",
                "",
            ],
            [
                "    per relay: fetched / served (hits, misses)",
                "; ".join(
                    f"{common.mb(x['fetched'])} / {common.mb(x['served'])} "
                    f"({x['hits']:.0f}, {x['misses']:.0f})"
                    for x in by["relays"]
                ),
                "",
                "",
            ],
            [
                "job created -> every computer Succeeded (polled)",
                fmt_s(full["seconds_create_to_done"]) + (" *" if full["disturbed"] else ""),
                "(no target in issue 12)",
                v["all_succeeded"] + f" ({counts_text(full['counts'])})",
            ],
            [
                "    `job create` command itself / its start -> done",
                f"{fmt_s(full['seconds_cli_create'])} / {fmt_s(full['seconds_cli_start_to_done'])}",
                "",
                "",
            ],
            [
                "    server: created -> last finished",
                fmt_s(full["server_span_created_to_last_finished"]),
                "",
                "",
            ],
            [
                "    delivered (min / p50 / max after create)",
                fmt_spread(t["delivered_s"]),
                "",
                "",
            ],
            *[
                [
                    f"    finished behind relay {i} (min / p50 / max)",
                    fmt_spread(x),
                    "",
                    "",
                ]
                for i, x in enumerate(t["finished_s_by_relay"])
            ],
            *[
                [
                    f"    relay {i}: agents' messages last in / forwarded",
                    f"{fmt_s(x['last_received_s'])} / {fmt_s(x['last_forwarded_s'])}",
                    f"(after `job create` started; max {x['max_spooled']:.0f} spooled, "
                    f"{x['upstream_exchanges']:.0f} upstream exchanges)",
                    "",
                ]
                for i, x in enumerate(full.get("relay_timeline", []))
            ],
            *[
                [
                    f"    {p} ended (min / p50 / max)",
                    fmt_spread(t["phase_end_s"][p]),
                    f"took per computer p50 {fmt_s(t['phase_took_s'][p]['p50'])}",
                    "",
                ]
                for p in PHASE_ORDER
            ],
            [
                "    CPU: server + relays / agents (with scripts)",
                f"{full['server_relays_cpu_seconds']:.1f} / {full['agents_cpu_seconds']:.1f} s",
                "",
                "",
            ],
            [
                f"    CPU meanwhile: ours / others (cores of {out.get('cpus')})",
                f"{full['load']['ours_cores']:.2f} / {full['load']['other_cores']:.2f}",
                "",
                "",
            ],
            ["    fsync of 1 byte meanwhile p50 / max", fsync_text(full["fsync"]), "", ""],
            ["    staging files left on agents", str(full["staged_files_left"]), "0", ""],
        ]
    for key, label in (("terminate_download", "Download"), ("terminate_install", "Install")):
        t = out.get(key)
        if not t:
            continue
        rows += [
            [
                f"terminate in {label} -> Terminated",
                fmt_s(t["seconds_terminate_to_terminated"]) + (" *" if t["disturbed"] else ""),
                "Terminated; no later phase; staging removed",
                v[key] + ("" if t["state"] == "terminated" else f" ({t['state']})"),
            ],
            [
                "    server: terminate.at -> terminated_at",
                fmt_s(t["server_terminate_to_terminated"]),
                "",
                "",
            ],
            [
                "    order logged by agents (min / p50 / max after POST)",
                fmt_spread(t["order_received_after_post_s"])
                + f" ({t['orders_received_logged']} of {m})",
                "",
                "",
            ],
            ["    outcomes", counts_text(t["counts"]), "", ""],
            ["    fsync of 1 byte meanwhile p50 / max", fsync_text(t["fsync"]), "", ""],
            [
                f"    CPU meanwhile: ours / others (cores of {out.get('cpus')})",
                f"{t['load_terminate_window']['ours_cores']:.2f} / "
                f"{t['load_terminate_window']['other_cores']:.2f}",
                "",
                "",
            ],
            ["    phase at the POST", counts_text(t["phase_at_terminate_post"]), "", ""],
            [
                "    phase when the order arrived",
                counts_text(t["phase_at_order_received"]),
                "",
                "",
            ],
            [
                "    ran a later phase / > 1 step after the order",
                f"{len(t['later_phase_after_order'])} / {len(t['more_than_step_in_hand'])} "
                "computers",
                "0 / 0",
                "",
            ],
            ["    staging files left on agents", str(t["staged_files_left"]), "0", ""],
        ]
        if key == "terminate_install":
            rows += [
                [
                    "    POST -> gate opened -> Terminated",
                    f"{t['seconds_post_to_gate']:.2f} + {t['seconds_gate_to_terminated']:.2f} s",
                    "",
                    "",
                ],
                [
                    "    install item >= 1 run after the order",
                    str(len(t["later_items_started"])),
                    "0",
                    "",
                ],
            ]
        if key == "terminate_download":
            rows.append(
                [
                    "    agents downloading at the POST",
                    f"{t['agents_downloading_at_post']} (trigger {t['trigger']})",
                    "",
                    "",
                ]
            )
    header = [f"jobs: {m} real agents behind {r} relays", "measured", "target", "verdict"]
    parts = [common_table(rows, header)]
    if out.get("error"):
        parts.append(f"  FAILED: {out['error']}")
    if out.get("problems"):
        parts.append(f"  problems: {out['problems']}")
    if out.get("log_errors"):
        parts.append(f"  log errors: {out['log_errors']}")
    if out.get("agent_log_errors"):
        parts.append(f"  agent log error lines: {out['agent_log_errors']}")
    parts.append("  * = disturbed: other processes used > 0.3 cores meanwhile")
    return "\n".join(parts)


def common_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)
