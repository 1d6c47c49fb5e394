"""Server tasks on the embedded queue when the server process is killed (-9): what was
acknowledged runs exactly once after a restart; the embedded worker dies with its server,
so its running task fails as lost instead of waiting for a worker that is gone."""

from __future__ import annotations

from tests.conftest import BACKEND, wait_until
from tests.server_tasks import TYPES, finished, submit, task


def test_acknowledged_tasks_survive_a_kill9_of_the_server_and_run_exactly_once(
    start_server, tmp_path
):
    types = tmp_path / "types.toml"
    types.write_text(TYPES)
    marks = tmp_path / "marks"
    types.write_text(
        TYPES
        + f"""
[types.mark]
scope = "none"
command = "sh -c 'echo {{n}} >> {marks}'"
[types.mark.params]
n = "int"
"""
    )
    # No workers: tasks are persisted and dispatched, but nothing takes them.
    srv = start_server("--task-types", str(types), "--workers", "0")
    ids = [submit(srv, "mark", params={"n": i})["task"]["id"] for i in range(20)]
    wait_until(lambda: all(task(srv, i)["dispatched_at"] for i in ids), 20, "dispatch")
    srv.proc.kill9()
    srv.args = ["--task-types", str(types)]
    srv.restart()
    for i in ids:
        assert finished(srv, i)["state"] == "succeeded"
    assert sorted(int(x) for x in marks.read_text().split()) == list(range(20))


def test_a_killed_servers_embedded_worker_is_lost_not_idle_and_its_task_fails(
    start_server, tmp_path
):
    types = tmp_path / "types.toml"
    types.write_text(TYPES)
    # (beats of 0.5 s: on PostgreSQL the killed process is taken for gone after 6 beats)
    srv = start_server("--task-types", str(types), "--cluster-heartbeat", "0.5")
    gate = tmp_path / "gate"
    try:
        tid = submit(srv, "gate", params={"path": str(gate)})["task"]["id"]
        wait_until(lambda: task(srv, tid)["state"] == "in_progress", 20, "the task to run")
        with srv.api() as api:
            (before,) = api.get("/workers").json()
        assert before["status"] in ("idle", "busy")
        srv.proc.kill9()
        # The workers' heartbeat timeout is 5 hours: what fails the task is the embedded
        # worker's server process being gone (SQLite: at the restart, which is the one
        # process; PostgreSQL: once the killed one has missed its beats).
        srv.restart()
        if BACKEND == "sqlite":  # reaped before the restarted process answers
            assert task(srv, tid)["state"] == "failed"
        t = wait_until(lambda: (t := task(srv, tid))["state"] != "in_progress" and t, 20, "fail")
        assert t["state"] == "failed" and t["reason"] == "worker heartbeat lost", t
        with srv.api() as api:
            listed = {w["id"]: w for w in api.get("/workers").json()}
        assert listed[before["id"]]["status"] == "lost"
        assert [w["status"] for i, w in listed.items() if i != before["id"]] in (["idle"], [])
    finally:
        gate.touch()  # the killed server's command ends by itself
