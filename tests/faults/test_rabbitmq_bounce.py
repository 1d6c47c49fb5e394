"""The RabbitMQ broker stopped and started again under a steady load of server tasks
(issue 15): the server and the ``taskfleet worker`` processes reconnect by themselves,
tasks submitted while the broker is down are acknowledged (they wait in the database)
and dispatched once it is back, and every acknowledged task ends once, succeeded,
none run twice (tests/fault_checks.py).

A private RabbitMQ node of the test's own (tests/private_services.py): the broker in
it is stopped (``rabbitmqctl stop_app``: every connection closed, the port shut) and
started again on the same data, so durable queues and their messages survive. Not the
whole node: its boot takes 15-30 s on a loaded test machine, the broker's seconds. The
machine's shared broker is never stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Proc, Server, spawn_worker, wait_until
from tests.fault_checks import TaskLoad, check_tasks
from tests.private_services import PrivateRabbit, private_rabbit

TYPES = """
[types.once]
scope = "none"
command = "sh -c 'sleep 0.1; echo {{n}} >> {marks}'"
retry_safe = false
time_limit = 30
[types.once.params]
n = "int"
"""


@pytest.fixture
def rabbit(tmp_path: Path) -> Iterator[PrivateRabbit]:
    with private_rabbit(tmp_path) as node:
        yield node


def test_a_broker_bounce_under_load_loses_nothing_and_runs_nothing_twice(
    rabbit: PrivateRabbit,
    start_server: Callable[..., Server],
    tmp_path: Path,
    database_url: str,
) -> None:
    marks = tmp_path / "marks"
    types = tmp_path / "types.toml"
    types.write_text(TYPES.format(marks=marks))
    queue = rabbit.url + "?queue=tf_bounce"
    server = start_server("--task-types", str(types), "--queue", queue)
    workers: list[Proc] = []
    try:
        for i in range(2):
            workers.append(spawn_worker(queue, database_url, types, tmp_path / f"worker-{i}.log"))
        with TaskLoad(server, types=("once",), every=0.15) as load:
            wait_until(lambda: marks.exists() and len(marks.read_text().split()) >= 5, 20, "runs")
            rabbit.stop_app()
            n = len(load.acknowledged)
            wait_until(lambda: len(load.acknowledged) >= n + 3, 10, "submits while it is down")
            rabbit.start_app()
            ran = len(marks.read_text().split())
            wait_until(lambda: len(marks.read_text().split()) >= ran + 5, 30, "runs again")
        assert not load.refused, load.refused  # a submit needs the database only
        check_tasks(server, load, marks)
        for w in workers:
            assert w.alive(), w.text()[-3000:]
    finally:
        for w in workers:
            w.stop()
