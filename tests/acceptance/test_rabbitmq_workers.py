"""Server tasks on the real RabbitMQ with separate `taskfleet worker` processes (SPEC 4):
they run and report, racing workers claim each task once, a cancel reaches the worker
that runs the task. What happens when workers die or links drop is in
faults/test_rabbitmq_faults.py."""

from __future__ import annotations

import sys

from tests.conftest import spawn, wait_until
from tests.server_tasks import finished, submit, task


def test_workers_on_rabbitmq_run_tasks_and_report(rabbit_fleet):
    srv, worker, marks = rabbit_fleet()
    w = worker("--name", "w1")
    ids = [submit(srv, "mark", params={"n": i})["task"]["id"] for i in range(10)]
    for i in ids:
        t = finished(srv, i)
        assert t["state"] == "succeeded" and t["claimed_by"]
    assert sorted(int(x) for x in marks.read_text().split()) == list(range(10))
    assert f"mark[{ids[0]}] running: sh -c" in w.text()
    with srv.api() as api:
        (row,) = api.get("/workers").json()
    assert row["name"] == "w1" and "guest" not in row["queue"]


def test_two_workers_racing_claim_each_task_once(rabbit_fleet):
    srv, worker, marks = rabbit_fleet()
    worker("--concurrency", "8")
    worker("--concurrency", "8")
    ids = [submit(srv, "mark", params={"n": i})["task"]["id"] for i in range(60)]
    for i in ids:
        assert finished(srv, i)["state"] == "succeeded"
    assert sorted(int(x) for x in marks.read_text().split()) == list(range(60))
    with srv.api() as api:
        for i in ids[:10]:
            history = api.get(f"/activities/{i}").json()["history"]
            assert [h["to_state"] for h in history] == ["queued", "in_progress", "succeeded"]


def test_cancel_reaches_a_remote_worker_which_kills_the_process_group_before_the_next_starts(
    start_server, amqp_url, tmp_path, database_url
):
    """Issue 9 on RabbitMQ: the cancel travels over the control exchange (the worker's
    heartbeat, its other way to learn of it, is 60 s apart), the worker kills the
    process group, and the next task of the concurrency-1 type starts only after that."""
    from tests.server_tasks import (
        STUBBORN,
        confirmed,
        group_alive,
        held_while_alive,
        kill_group,
        read_pid,
    )

    types = tmp_path / "types.toml"
    types.write_text(STUBBORN)
    srv = start_server("--task-types", str(types), "--queue", amqp_url)
    w = spawn(
        [
            sys.executable, "-m", "taskfleet", "worker", "--queue", amqp_url,
            "--database", database_url, "--task-types", str(types),
            "--heartbeat-interval", "60",
        ],
        tmp_path / "worker.log",
    )  # fmt: skip
    p1, p2 = tmp_path / "first.pid", tmp_path / "second.pid"
    pg1 = pg2 = None
    try:
        wait_until(lambda: "consuming" in w.text() or not w.alive(), 30, "worker")
        first = submit(srv, "stubborn", params={"pidfile": str(p1)})["task"]["id"]
        pg1 = wait_until(lambda: read_pid(p1), 20, "the first task's process")
        second = submit(srv, "stubborn", params={"pidfile": str(p2)})["task"]["id"]
        with srv.api() as api:
            r = api.post(f"/tasks/{first}/cancel", json={})
        assert r.status_code == 200 and r.json()["state"] == "canceled", r.text
        assert r.json()["stopping"] is True
        assert held_while_alive(srv, pg1, second)  # the ~2 s of kill grace was observed
        t1 = confirmed(srv, first)
        assert t1["stopped_at"] - t1["stop_requested_at"] < 30  # not the 60 s heartbeat
        assert f"task[{first}] cancel received: stopping its handler" in w.text()
        assert t1["state"] == "canceled" and "stopped before completion" in t1["reason"]
        assert "process group killed" in t1["result_line"]
        pg2 = wait_until(lambda: read_pid(p2), 30, "the second task to start")
        assert task(srv, second)["delivered_at"] >= t1["stopped_at"]
        with srv.api() as api:
            api.post(f"/tasks/{second}/cancel", json={})
        confirmed(srv, second)
        assert not group_alive(pg2)
    finally:
        w.stop()
        kill_group(pg1 or read_pid(p1))
        kill_group(pg2 or read_pid(p2))
