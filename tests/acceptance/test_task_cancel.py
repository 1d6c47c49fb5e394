"""Canceling a running server task stops it and holds its slot until it stopped (issue 9).

Embedded queue, real server process: a ``concurrency = 1`` command type whose
shell ignores SIGTERM (so the stop takes the kill grace, about 2 s), an async
callable and a plain (threaded) callable. The RabbitMQ cases, with separate
``taskfleet worker`` processes, are in test_rabbitmq_workers.py and
faults/test_rabbitmq_faults.py; a lost cancel message in faults/test_lost_cancel_message.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from tests.conftest import wait_until
from tests.server_tasks import (
    CALLABLES,
    STUBBORN,
    confirmed,
    group_alive,
    held_while_alive,
    kill_group,
    read_pid,
    task,
)


def submit(server, type_, **params):
    with server.api() as api:
        r = api.post("/tasks", json={"type": type_, "params": params})
    assert r.status_code == 201, r.text
    return r.json()["task"]["id"]


def history(server, tid):
    with server.api() as api:
        return api.get(f"/activities/{tid}").json()["history"]


def cancel(server, tid):
    with server.api() as api:
        r = api.post(f"/tasks/{tid}/cancel", json={})
    assert r.status_code == 200, r.text
    return r.json()


def cli(server, *args):
    env = {**os.environ, "TASKFLEET_SERVER": server.url, "TASKFLEET_TOKEN": server.admin_token}
    out = subprocess.run(
        [sys.executable, "-m", "taskfleet", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "COLUMNS": "300"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.serial  # timing-sensitive: one at a time (scripts/test)
def test_cancel_kills_the_process_group_and_the_next_task_waits_until_it_is_gone(
    start_server, tmp_path
):
    types = tmp_path / "types.toml"
    types.write_text(STUBBORN)
    srv = start_server("--task-types", str(types))
    p1, p2 = tmp_path / "first.pid", tmp_path / "second.pid"
    pg1 = pg2 = None
    try:
        first = submit(srv, "stubborn", pidfile=str(p1))
        pg1 = wait_until(lambda: read_pid(p1), 20, "the first task's process")
        assert task(srv, first)["state"] == "in_progress" and group_alive(pg1)
        second = submit(srv, "stubborn", pidfile=str(p2))
        assert task(srv, second)["state"] == "queued"

        out = cli(srv, "task", "cancel", str(first))
        assert f"stubborn[{first}]: Canceled" in out and "stop requested from worker" in out
        t = task(srv, first)
        assert t["state"] == "canceled" and t["stop_requested_at"] is not None

        # While the first task's processes live, the second must not run (limit 1).
        assert "held" in cli(srv, "task", "show", str(first)) or not group_alive(pg1)
        assert held_while_alive(srv, pg1, second)  # the window was observed, not skipped
        t1 = confirmed(srv, first)
        with contextlib.suppress(ProcessLookupError):  # gone, and reaped by its worker
            os.kill(pg1, 0)
            raise AssertionError(f"process {pg1} outlived the cancel")
        pg2 = wait_until(lambda: read_pid(p2), 20, "the second task to start")
        t2 = task(srv, second)
        assert t2["state"] == "in_progress"
        assert t2["delivered_at"] >= t1["stopped_at"]  # only after the stop was confirmed
        # The stored state stays Canceled; what happened is recorded on the task.
        assert t1["state"] == "canceled" and not t1["stopping"]
        assert "stopped before completion" in t1["reason"]
        assert "stopped by cancel; process group killed" in t1["result_line"]
        notes = [h for h in history(srv, first) if h["from_state"] == "canceled"]
        assert [n["to_state"] for n in notes] == ["canceled"]
        assert "stopped before completion" in notes[0]["reason"]
        # Logged around the commits the API already shows: polled, not read at once.
        wanted = (
            f"task[{first}] cancel received: stopping its handler",
            f"stubborn[{first}] status update sent: Canceled (stopped)",
        )
        wait_until(lambda: all(w in srv.proc.text() for w in wanted), 10, "the cancel's logs")
        shown = cli(srv, "task", "show", str(first))
        assert "stopped before completion" in shown and "held" not in shown

        cancel(srv, second)
        confirmed(srv, second)
        assert not group_alive(pg2)
    finally:
        # The commands run in their own sessions: stopping the server leaves them. The
        # server goes first, so that it starts nothing after the pidfiles are read.
        srv.proc.stop()
        kill_group(pg1 or read_pid(p1))
        kill_group(pg2 or read_pid(p2))


def test_cancel_cancels_an_async_callable_before_the_next_one_starts(start_server, tmp_path):
    types = tmp_path / "types.toml"
    types.write_text(CALLABLES)
    srv = start_server("--task-types", str(types))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = submit(srv, "async-wait", dir=str(a))
    wait_until(lambda: (a / "started").exists(), 20, "the coroutine to start")
    second = submit(srv, "async-wait", dir=str(b))
    assert cancel(srv, first)["state"] == "canceled"
    t1 = confirmed(srv, first)
    assert (a / "ended").read_text() == "cancelled"  # the coroutine was cancelled
    assert t1["state"] == "canceled"
    assert "stopped before completion" in t1["reason"]
    assert "handler cancelled" in t1["result_line"]
    wait_until(lambda: (b / "started").exists(), 20, "the next one to start")
    assert task(srv, second)["delivered_at"] >= t1["stopped_at"]
    cancel(srv, second)
    confirmed(srv, second)


def test_a_threaded_callable_cannot_be_stopped_and_keeps_its_slot_until_it_returns(
    start_server, tmp_path
):
    types = tmp_path / "types.toml"
    types.write_text(CALLABLES)
    srv = start_server("--task-types", str(types))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    try:
        first = submit(srv, "sync-wait", dir=str(a))
        wait_until(lambda: (a / "started").exists(), 20, "the thread to start")
        second = submit(srv, "sync-wait", dir=str(b))
        assert cancel(srv, first)["state"] == "canceled"
        held = wait_until(
            lambda: "cannot be interrupted" in (t := task(srv, first))["reason"] and t,
            20,
            "the worker to say the thread cannot be stopped",
        )
        assert held["reason"] == (
            "cancel requested; handler cannot be interrupted, slot held until it returns"
        )
        assert held["stopping"] and held["stopped_at"] is None
        # The thread runs on, so the slot stays taken: the next task waits.
        t2 = task(srv, second)
        assert t2["state"] == "queued" and "limit" in t2["waiting_for"], t2
        assert "slot" in cli(srv, "task", "show", str(first))

        (a / "gate").touch()  # the thread returns on its own
        t1 = confirmed(srv, first)
        assert t1["state"] == "canceled"  # never overwritten by the late Succeeded
        assert "not stopped: it finished on its own (Succeeded" in t1["reason"]
        assert t1["stdout"] == "returned after the gate opened"
        assert t1["agent_report"]["ok"] is True and t1["agent_report"]["stopped"] is False
        wait_until(lambda: (b / "started").exists(), 20, "the next one to start")
        assert task(srv, second)["delivered_at"] >= t1["stopped_at"]
    finally:
        (a / "gate").touch()
        (b / "gate").touch()
