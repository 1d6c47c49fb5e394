"""Kill -9 of RabbitMQ workers at random points under a steady load of server tasks
(issue 15), in a seeded random order, a new worker started after each kill. Then the
invariants (tests/fault_checks.py) for every task the API acknowledged: it ends, each
history one chain; Succeeded exactly when its command ran; a task of a type that is
not retry-safe never runs twice nor is submitted again (a killed one fails with
"worker heartbeat lost"); one of a retry-safe type lost with its worker is submitted
again, and that retry ends.

Real processes: one server on this test's queue of the machine's RabbitMQ, two
``taskfleet worker`` processes at any time. Bounded: ``KILLS`` kills.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Proc, Server, spawn_worker
from tests.fault_checks import TaskLoad, check_tasks

SEED = 20261201
KILLS = 4
# Each run takes a moment, so that kills land mid-run as well as between runs; the
# command runs on in its own process group after its worker dies (and may still mark).
TYPES = """
[types.once]
scope = "none"
command = "sh -c 'sleep 0.3; echo {{n}} >> {marks}'"
retry_safe = false
time_limit = 20
[types.once.params]
n = "int"

[types.again]
scope = "none"
command = "sh -c 'sleep 0.3; echo {{n}} >> {marks}'"
retry_safe = true
time_limit = 20
[types.again.params]
n = "int"
"""


def test_random_kill_9s_of_workers_under_load_run_each_task_once_unless_retry_safe(
    start_server: Callable[..., Server], amqp_url: str, tmp_path: Path, database_url: str
) -> None:
    rng = random.Random(SEED)
    marks = tmp_path / "marks"
    types = tmp_path / "types.toml"
    types.write_text(TYPES.format(marks=marks))
    server = start_server(
        "--task-types", str(types), "--queue", amqp_url, "--heartbeat-timeout", "2"
    )
    count = iter(range(100))

    def worker() -> Proc:
        log = tmp_path / f"worker-{next(count)}.log"
        return spawn_worker(
            amqp_url, database_url, types, log, "--heartbeat-interval", "0.4", "--concurrency", "4"
        )

    workers = [worker(), worker()]
    try:
        with TaskLoad(server, types=("once", "again"), every=0.15) as load:
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.5, 2.0))  # a random point of the load, not a wait
                i = rng.randrange(len(workers))
                workers[i].kill9()
                workers[i] = worker()
            time.sleep(1.0)  # a last stretch of load with every worker up
        assert len(load.acknowledged) >= 20, "the load did not get through"
        assert not load.refused, load.refused
        ended = check_tasks(server, load, marks, retry_safe=frozenset({"again"}), lost_ok=True)
        lost = [t for t in ended.values() if t["result_line"] == "worker heartbeat lost"]
        assert lost, "no kill landed on a running task: the test proves nothing"
    finally:
        for w in workers:
            w.stop()
