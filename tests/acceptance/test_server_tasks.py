"""Server tasks under the batch scheduler, embedded default (SPEC 4), real server process."""

from __future__ import annotations

import time

import pytest

from tests.conftest import wait_until
from tests.server_tasks import TYPES, finished, submit, task


@pytest.fixture
def tasks_server(start_server, tmp_path):
    path = tmp_path / "types.toml"
    path.write_text(TYPES)
    return start_server("--task-types", str(path))


def test_a_task_runs_and_its_steps_are_logged_by_name(tasks_server):
    out = submit(tasks_server, "echo", params={"msg": "hello; rm -rf /"})
    tid = out["task"]["id"]
    assert out["duplicate_of"] is None
    t = finished(tasks_server, tid)
    assert t["state"] == "succeeded"
    assert t["stdout"] == "hello; rm -rf /\n"  # one argument, no shell
    assert t["exit_code"] == 0 and t["claimed_by"]
    log = tasks_server.proc.text()
    for step in (
        f"echo[{tid}] submitted",
        f"echo[{tid}] dispatched",
        f"echo[{tid}] taken by",
        f"echo[{tid}] running: echo",
        f"echo[{tid}] status update sent: Succeeded",
    ):
        assert step in log, step


def test_a_duplicate_of_a_waiting_task_is_not_queued_again(tasks_server):
    later = time.time() + 3600
    first = submit(tasks_server, "echo", params={"msg": "x"}, not_before=later)
    dup = submit(tasks_server, "echo", expect=200, params={"msg": "x"}, not_before=later)
    assert dup["duplicate_of"] == first["task"]["id"]
    other = submit(tasks_server, "echo", params={"msg": "y"}, not_before=later)
    assert other["duplicate_of"] is None
    with tasks_server.api() as api:
        assert len(api.get("/tasks").json()) == 2
    assert "duplicate of a task not yet dispatched" in tasks_server.proc.text()


def test_a_type_limit_of_one_makes_the_second_wait_not_fail(tasks_server, tmp_path):
    gate1, gate2 = tmp_path / "g1", tmp_path / "g2"
    a = submit(tasks_server, "gate", params={"path": str(gate1)})["task"]["id"]
    b = submit(tasks_server, "gate", params={"path": str(gate2)})["task"]["id"]
    wait_until(lambda: task(tasks_server, a)["state"] == "in_progress", 20, "a to run")
    waiting = task(tasks_server, b)
    assert waiting["state"] == "queued" and waiting["dispatched_at"] is None
    assert "limit" in waiting["waiting_for"]
    gate2.touch()  # b could finish at once, but it must not even start before a ends
    gate1.touch()
    ta, tb = finished(tasks_server, a), finished(tasks_server, b)
    assert ta["state"] == tb["state"] == "succeeded"
    assert tb["delivered_at"] >= ta["finished_at"]


def test_exclusions_and_per_tenant_limits_make_conflicting_work_wait(tasks_server, tmp_path):
    r_gate, i_gate = tmp_path / "r", tmp_path / "i"
    report = submit(tasks_server, "report", params={"path": str(r_gate)})["task"]["id"]
    wait_until(lambda: task(tasks_server, report)["state"] == "in_progress", 20, "report")
    imp = submit(tasks_server, "import", params={"path": str(i_gate)})["task"]["id"]
    second = submit(tasks_server, "report", params={"path": str(i_gate)})["task"]["id"]
    i_gate.touch()
    for tid, word in ((imp, "exclu"), (second, "limit")):
        t = task(tasks_server, tid)
        assert t["state"] == "queued" and word in t["waiting_for"], t
    r_gate.touch()
    for tid in (report, imp, second):
        assert finished(tasks_server, tid)["state"] == "succeeded"


def test_not_before_is_never_early(tasks_server):
    at = time.time() + 1.5
    out = submit(tasks_server, "echo", params={"msg": "later"}, not_before=at)
    assert out["task"]["state"] == "scheduled"
    t = finished(tasks_server, out["task"]["id"])
    assert t["state"] == "succeeded" and t["delivered_at"] >= at


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"type": "nope"}, "unknown task type 'nope'"),
        ({"type": "echo", "params": {}}, "msg"),
        ({"type": "echo", "params": {"msg": "x", "extra": "1"}}, "extra"),
        ({"type": "echo", "params": {"msg": "x"}, "group": "web"}, "neither a tenant nor"),
        ({"type": "report", "params": {"path": "x"}, "group": "web"}, "tenant-scoped"),
        ({"type": "report", "params": {"path": "x"}, "tenant": "other"}, "its own tenant"),
    ],
)
def test_bad_submissions_are_refused_with_the_reason_and_logged(tasks_server, body, message):
    with tasks_server.api() as api:
        r = api.post("/tasks", json=body)
        assert r.status_code in (400, 403, 404), r.text
        assert message in r.json()["error"]
        assert api.get("/tasks").json() == []
    assert "task submission refused" in tasks_server.proc.text()


@pytest.mark.parametrize(
    ("type_", "words"),
    [
        ("broken-callable", "no_such_module"),
        ("broken-command", "not found"),
        ("slow", "time limit"),
    ],
)
def test_handlers_that_cannot_run_or_overrun_fail_with_a_clear_reason(tasks_server, type_, words):
    tid = submit(tasks_server, type_)["task"]["id"]
    t = finished(tasks_server, tid)
    assert t["state"] == "failed"
    assert words in t["result_line"].lower() or words in (t["stdout"] or "").lower(), t


def test_cancel_a_waiting_task_and_refuse_an_illegal_cancel(tasks_server):
    tid = submit(tasks_server, "echo", params={"msg": "x"}, not_before=time.time() + 3600)
    tid = tid["task"]["id"]
    with tasks_server.api() as api:
        assert api.post(f"/tasks/{tid}/cancel", json={}).json()["state"] == "canceled"
        r = api.post(f"/tasks/{tid}/cancel", json={})
        assert r.status_code == 409 and "Canceled -> Canceled" in r.json()["error"]


def test_a_batch_is_checked_whole_then_persisted_together(tasks_server):
    with tasks_server.api() as api:
        bad = [{"type": "echo", "params": {"msg": str(i)}} for i in range(3)]
        bad.append({"type": "echo", "params": {}})
        r = api.post("/tasks/batch", json={"tasks": bad})
        assert r.status_code == 400 and r.json()["error"].startswith("task 3: ")
        assert api.get("/tasks").json() == []
        good = [{"type": "echo", "params": {"msg": str(i)}} for i in range(30)]
        r = api.post("/tasks/batch", json={"tasks": good})
        assert r.status_code == 201, r.text
        ids = [t["id"] for t in r.json()]
    outputs = sorted(finished(tasks_server, i)["stdout"] for i in ids)
    assert outputs == sorted(f"{i}\n" for i in range(30))
    later = time.time() + 3600
    twice = [{"type": "echo", "params": {"msg": "same"}, "not_before": later}] * 2
    with tasks_server.api() as api:
        first, second = api.post("/tasks/batch", json={"tasks": twice}).json()
        assert first["duplicate_of"] is None and second["duplicate_of"] == first["id"]
        again = api.post("/tasks/batch", json={"tasks": twice[:1]}).json()
        assert again[0]["duplicate_of"] == first["id"]


def test_purge_history_removes_only_finished_work_older_than_the_retention(tasks_server):
    old = [submit(tasks_server, "echo", params={"msg": str(i)})["task"]["id"] for i in range(3)]
    for i in old:
        finished(tasks_server, i)
    waiting = submit(tasks_server, "echo", params={"msg": "w"}, not_before=time.time() + 3600)
    keep = submit(tasks_server, "purge-history", params={"older_than_days": 1})["task"]["id"]
    assert "purged 0 activities" in finished(tasks_server, keep)["stdout"]
    purge = submit(tasks_server, "purge-history", params={"older_than_days": 0})["task"]["id"]
    t = finished(tasks_server, purge)
    assert t["state"] == "succeeded" and "purged 4 activities" in t["stdout"], t
    with tasks_server.api() as api:
        for i in old:
            assert api.get(f"/tasks/{i}").status_code == 404
        assert api.get(f"/tasks/{waiting['task']['id']}").json()["state"] == "scheduled"
