"""benchmarks/bench_scale_out.py cannot rot unseen: it imports, the parts of fleet_sim.py and
bench_tasks.py it drives still exist, its options parse, and its table computes the 2/1
ratio and the verdict (2 processes below 0.9 of 1 is a MISS). Running it needs PostgreSQL,
RabbitMQ and ~1 minute (``--quick``): that is the benchmark's own job, not a test's."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from benchmarks import bench_scale_out as b


def _runs(*rates: float) -> list[dict[str, Any]]:
    return [{"per_second": r, "other_cores": 0.1} for r in rates]


def test_the_simulator_and_task_parts_it_drives_still_exist() -> None:
    for name in ("Sim", "Pool", "Admin", "enroll_all", "exchange_round", "run_request"):
        assert hasattr(b.fleet_sim, name), name
    assert "start" in inspect.signature(b.fleet_sim.enroll_all).parameters
    for name in ("CpuMeter", "pct", "CLEAN"):
        assert hasattr(b.bench_tasks, name), name


def test_quick_options_are_small() -> None:
    o = b.parse(["--quick"])
    assert (o.agents, o.tasks, o.repeats) == (100, 200, 1)
    full = b.parse([])
    assert (full.agents, full.tasks, full.repeats) == (1000, 3000, 3)


def test_table_shows_medians_ratio_and_verdict() -> None:
    configs = [b.Config(1, Path("/nonexistent"), b.parse([])), b.Config(2, Path("/x"), b.parse([]))]
    results = {
        1: {"exchanges": _runs(100, 300, 200), "activities": _runs(50), "tasks": _runs(10)},
        2: {"exchanges": _runs(250, 150, 210), "activities": _runs(40), "tasks": _runs(12)},
    }
    text = b.table(configs, results)
    ex = next(line for line in text.splitlines() if line.startswith("| agent exchanges"))
    assert "| 200 | 210 | **1.05** | PASS" in ex  # medians, not means or first runs
    act = next(line for line in text.splitlines() if line.startswith("| activities"))
    assert "**0.80** | MISS" in act
    tasks = next(line for line in text.splitlines() if line.startswith("| server tasks"))
    assert "**1.20** | PASS" in tasks
