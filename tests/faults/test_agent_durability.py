"""Agent crashes, killed tasks, outages and bad state folders (SPEC 5, 3.1, 10)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import activities_of, enroll_token, request_done, run_request, wait_until


def _record(agent, op):
    return next((r for r in agent.status()["records"] if r["op"] == op), None)


def _activity(server, activity_id):
    with server.api() as api:
        return api.get(f"/activities/{activity_id}").json()


def _working(agent, op):
    return wait_until(
        lambda: (r := _record(agent, op)) is not None and r["status"] == 1 and r,
        60,  # generous: under load each status call is a new process
        f"operation {op} to be Working",
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (no reaper here) is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


ATTEMPT_SCRIPT = (
    'echo "$TASKFLEET_ATTEMPT" >> {marks}\n'
    'if [ "$TASKFLEET_ATTEMPT" = 1 ]; then echo $$ > {pidfile}; sleep 1000; fi\n'
    'echo "done on attempt $TASKFLEET_ATTEMPT"\n'
)


def test_pushed_working_operation_continues_after_agent_kill9(server, start_agent, tmp_path):
    agent = start_agent(server, enroll_token(server))
    marks, pidfile = tmp_path / "marks", tmp_path / "pid"
    script = ATTEMPT_SCRIPT.format(marks=marks, pidfile=pidfile)
    req = run_request(server, f"computer:{agent.computer_id}", {"script": script}, timeout=120)
    (a,) = activities_of(server, req["id"])
    record = _working(agent, a["id"])
    assert record["pushed"] == 1  # it came with a tickle
    wait_until(pidfile.exists, 10, "the first attempt to start")
    leftover = int(pidfile.read_text())
    agent.proc.kill9()
    again = start_agent(server, None, state_dir=agent.state_dir)
    # SPEC 5: pushed and Working -> continue: same operation id, attempt counted.
    done = request_done(server, req["id"])
    assert done["progress"]["counts"] == {"succeeded": 1}
    got = _activity(server, a["id"])
    assert got["stdout"] == "done on attempt 2\n"
    assert marks.read_text().split() == ["1", "2"]
    assert got["agent_attempt"] == 2
    assert "continues (attempt 2): continue: pushed and Working" in again.proc.text()
    wait_until(lambda: not _pid_alive(leftover), 10, "the first attempt's process to be killed")
    assert [h["to_state"] for h in got["history"]] == ["queued", "in_progress", "succeeded"]


@pytest.mark.parametrize("leftover", ["running", "gone"])
def test_pulled_required_working_operation_is_scrubbed_after_agent_kill9(
    start_server, start_agent, tmp_path, leftover
):
    srv = start_server("--no-tickles")
    agent = start_agent(srv, enroll_token(srv), "--poll-interval", "0.3")
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; exec sleep 1000"
    req = run_request(srv, f"computer:{agent.computer_id}", {"script": script}, 600)
    (a,) = activities_of(srv, req["id"])
    record = _working(agent, a["id"])
    assert record["pushed"] == 0  # found at a poll
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the script")
    pgid = int(pidfile.read_text())  # the script leads its own process group
    agent.proc.kill9()
    assert _pid_alive(pgid)  # the agent's death leaves its task running
    if leftover == "gone":
        os.killpg(pgid, signal.SIGKILL)
        wait_until(lambda: not _pid_alive(pgid), 10, "the leftover to die")
    again = start_agent(srv, None, "--poll-interval", "0.3", state_dir=agent.state_dir)
    request_done(srv, req["id"])
    got = _activity(srv, a["id"])
    assert got["state"] == "failed"
    assert "Scrubbed: local status was Working (1)" in got["result_line"]
    assert "scrub: pulled, Required and Working" in got["result_line"]
    if leftover == "running":
        # The scrubber killed it: the line must not claim nothing was running.
        assert "with nothing running" not in got["result_line"]
        assert f"process group {pgid} was still running and was killed" in got["result_line"]
        assert f"killed process group {pgid}" in again.proc.text()
    else:
        assert "with nothing running" in got["result_line"]
        assert "was killed" not in got["result_line"]
    assert f"operation {a['id']} scrubbed: old status Working" in again.proc.text()
    assert "1 scrubbed" in again.proc.text()
    wait_until(lambda: not _pid_alive(pgid), 10, "the leftover to be gone")


def test_a_checkpoint_lets_a_pulled_operation_resume_instead_of_being_scrubbed(
    start_server, start_agent, tmp_path
):
    srv = start_server("--no-tickles")
    agent = start_agent(srv, enroll_token(srv), "--poll-interval", "0.3")
    script = (
        'if [ -s "$TASKFLEET_CHECKPOINT" ]; then\n'
        '  echo "resumed after $(cat "$TASKFLEET_CHECKPOINT")"; exit 0\n'
        "fi\n"
        'echo step-1 > "$TASKFLEET_CHECKPOINT"; sleep 1000\n'
    )
    req = run_request(srv, f"computer:{agent.computer_id}", {"script": script}, 600)
    (a,) = activities_of(srv, req["id"])
    _working(agent, a["id"])
    checkpoint = agent.state_dir / "checkpoints" / str(a["id"])
    wait_until(lambda: checkpoint.exists() and checkpoint.read_text(), 10, "checkpoint")
    agent.proc.kill9()
    start_agent(srv, None, "--poll-interval", "0.3", state_dir=agent.state_dir)
    request_done(srv, req["id"])
    got = _activity(srv, a["id"])
    assert got["state"] == "succeeded"
    assert got["stdout"] == "resumed after step-1\n"
    assert not checkpoint.exists()


def test_max_attempts_stop_continuing(server, start_agent, tmp_path):
    agent = start_agent(server, enroll_token(server), "--max-attempts", "1")
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; exec sleep 1000"
    req = run_request(server, f"computer:{agent.computer_id}", {"script": script}, 600)
    (a,) = activities_of(server, req["id"])
    _working(agent, a["id"])
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the script")
    pgid = int(pidfile.read_text())  # the script leads its own process group
    agent.proc.kill9()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "taskfleet",
            "agent",
            "--state-dir",
            str(agent.state_dir),
            "--max-attempts",
            "1",
            "scrub",
            "--dry-run",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    (decision,) = json.loads(out.stdout)["decisions"]
    assert decision["decision"] == "leave"
    assert "used 1 of 1 attempts" in decision["rule"]
    # End only what this test started: the task the killed agent left running.
    assert _pid_alive(pgid)
    os.killpg(pgid, signal.SIGKILL)
    wait_until(lambda: not _pid_alive(pgid), 10, "the leftover task to end")


def test_killing_only_the_task_process_is_noticed_and_reported(server, start_agent, tmp_path):
    agent = start_agent(server, enroll_token(server))
    pidfile = tmp_path / "pid"
    req = run_request(
        server, f"computer:{agent.computer_id}", {"script": f"echo $$ > {pidfile}; exec sleep 1000"}
    )
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the task to start")
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    request_done(server, req["id"])
    (a,) = activities_of(server, req["id"])
    assert a["state"] == "failed"
    assert "Ended by signal 9" in a["result_line"]


def test_server_outage_with_work_in_flight_loses_and_doubles_nothing(
    start_server, start_agent, tmp_path
):
    srv = start_server()
    agent = start_agent(srv, enroll_token(srv))
    gate = tmp_path / "gate"
    script = f"while [ ! -e {gate} ]; do sleep 0.05; done; echo finished"
    req = run_request(srv, f"computer:{agent.computer_id}", {"script": script}, 120)
    (a,) = activities_of(srv, req["id"])
    _working(agent, a["id"])
    srv.proc.stop()
    gate.touch()  # the script finishes while the server is down
    wait_until(lambda: agent.status()["unsent_results"] == 1, 20, "the result to wait locally")
    wait_until(lambda: "unreachable" in agent.proc.text(), 20, "the agent to notice the outage")
    agent.proc.stop()  # and the agent restarts too, in the other order
    srv.restart()
    start_agent(srv, None, state_dir=agent.state_dir)
    request_done(srv, req["id"])
    got = _activity(srv, a["id"])
    assert got["state"] == "succeeded" and got["stdout"] == "finished\n"
    reports = [h for h in got["history"] if h["cause"] == "agent-report"]
    assert len(reports) == 1
    wait_until(lambda: agent.status()["unsent_results"] == 0, 20, "the ack to clear the outbox")


def test_optional_work_is_deferred_outside_the_run_window(server, start_agent):
    now = time.localtime()
    start = (now.tm_hour * 60 + now.tm_min + 120) % 1440  # opens in two hours
    window = f"{start // 60:02d}:{start % 60:02d}-{(start + 60) // 60 % 24:02d}:{start % 60:02d}"
    agent = start_agent(server, enroll_token(server), "--run-window", window)
    with server.api() as api:
        r = api.post(
            "/requests",
            json={
                "target": f"computer:{agent.computer_id}",
                "params": {"argv": ["true"]},
                "timeout": 1,
                "policy": {"mode": "optional"},
            },
        )
        assert r.status_code == 201, r.text
    (a,) = activities_of(server, r.json()["id"])
    got = wait_until(
        lambda: (x := _activity(server, a["id"]))["agent_status"] == "deferred" and x,
        20,
        "the agent to report Deferred",
    )
    assert got["state"] == "in_progress"
    assert window in got["reason"]
    assert got["deadline_at"] > time.time() + 3600  # not "lost" while it waits
    assert _record(agent, a["id"])["status"] == 7
    # Required work is not held back by the window.
    req = run_request(server, f"computer:{agent.computer_id}", {"argv": ["true"]})
    assert request_done(server, req["id"])["progress"]["succeeded"] == 1


def test_recurring_work_reports_each_run_until_canceled(server, start_agent):
    agent = start_agent(server, enroll_token(server))
    with server.api() as api:
        r = api.post(
            "/requests",
            json={
                "target": f"computer:{agent.computer_id}",
                "params": {"argv": ["echo", "tick"]},
                "policy": {"interval": "recurring", "every": 1},
            },
        )
        assert r.status_code == 201, r.text
        (a,) = activities_of(server, r.json()["id"])
        got = wait_until(
            lambda: (x := _activity(server, a["id"]))["runs"] and x["runs"] >= 3 and x,
            30,
            "three runs",
        )
        assert got["state"] == "in_progress"
        assert got["agent_report"]["stdout"] == "tick\n"
        assert api.post(f"/activities/{a['id']}/cancel", json={}).status_code == 200
    wait_until(lambda: _record(agent, a["id"])["finished"], 20, "the agent to stop it")
    assert _record(agent, a["id"])["status"] == 6  # Canceled locally
    assert _activity(server, a["id"])["state"] == "canceled"


def test_scrubber_skips_a_run_while_an_executor_runs(server, start_agent, tmp_path):
    agent = start_agent(server, enroll_token(server), "--scrub-interval", "0.2")
    req = run_request(server, f"computer:{agent.computer_id}", {"argv": ["sleep", "1000"]}, 600)
    (a,) = activities_of(server, req["id"])
    _working(agent, a["id"])
    wait_until(
        lambda: "scrubber skipped this run: 1 task executor(s) running" in agent.proc.text(),
        10,
        "a skipped scrub",
    )
    out = subprocess.run(
        [sys.executable, "-m", "taskfleet", "agent", "--state-dir", str(agent.state_dir), "scrub"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "the agent is running" in out.stderr
    with server.api() as api:
        api.post(f"/activities/{a['id']}/cancel", json={})


@pytest.mark.parametrize("problem", ["corrupt", "unwritable", "not-a-folder"])
def test_a_bad_state_folder_stops_the_agent_with_a_clear_error(server, tmp_path, problem):
    folder = tmp_path / "state"
    if problem == "corrupt":
        folder.mkdir()
        (folder / "state.db").write_bytes(b"this is not a database" * 100)
        expected = "is corrupt"
    elif problem == "unwritable":
        folder.mkdir()
        folder.chmod(0o500)
        expected = "not writable"
    else:
        folder.write_text("a file")
        expected = "cannot create state folder"
    if problem == "unwritable" and os.geteuid() == 0:
        pytest.skip("root can write anywhere; the check cannot fail for root")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "taskfleet",
            "agent",
            "--server",
            server.url,
            "--state-dir",
            str(folder),
            "--enroll-token",
            enroll_token(server),
            "--tickle-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert expected in out.stderr
    with server.api() as api:
        assert api.get("/computers").json() == []


def _retry_events(activity):
    return [h for h in activity["history"] if h["cause"] == "agent-status"]


@pytest.mark.serial  # timing-sensitive: one at a time (scripts/test)
def test_a_failed_pulled_required_once_operation_is_retried_and_succeeds(
    start_server, start_agent, tmp_path
):
    # SPEC 5: not final while attempts remain. The first run fails, the agent
    # says "failed, will retry", the scrubber's next run continues it. The time
    # limit (1 s) plus grace (2 s) is shorter than the wait for the scrubber
    # (6 s): the retry event must move the server's lost-deadline too.
    srv = start_server("--no-tickles", "--lost-grace", "2", "--reaper-interval", "0.2")
    agent = start_agent(srv, enroll_token(srv), "--poll-interval", "0.3", "--scrub-interval", "6")
    marker, marks = tmp_path / "marker", tmp_path / "marks"
    script = (
        f'echo "$TASKFLEET_ATTEMPT" >> {marks}\n'
        f"if [ -e {marker} ]; then echo second; exit 0; fi\n"
        f"touch {marker}; echo first; exit 3\n"
    )
    req = run_request(srv, f"computer:{agent.computer_id}", {"script": script}, timeout=1)
    (a,) = activities_of(srv, req["id"])

    def retry_told():
        got = _activity(srv, a["id"])
        return _retry_events(got) and got

    during = wait_until(retry_told, 20, "the retry event")
    assert during["state"] == "in_progress"
    (event,) = _retry_events(during)
    assert (event["from_state"], event["to_state"]) == ("in_progress", "in_progress")
    assert event["actor"] == f"computer:{agent.computer_id}"
    assert event["reason"].startswith("failed, will retry (attempt 1 of 3)")
    assert "Exited with code 3" in event["reason"]
    assert _record(agent, a["id"])["status"] == 5  # Failed locally, not finished
    assert not _record(agent, a["id"])["finished"]

    done = request_done(srv, req["id"], timeout=30)
    assert done["progress"]["counts"] == {"succeeded": 1}
    got = _activity(srv, a["id"])
    assert got["stdout"] == "second\n"
    assert got["agent_attempt"] == 2
    assert marks.read_text().split() == ["1", "2"]
    assert [h["to_state"] for h in got["history"]] == [
        "queued",
        "in_progress",
        "in_progress",
        "succeeded",
    ]
    assert "continues (attempt 2): continue: pulled, Required, Once and Failed" in agent.proc.text()


def test_an_always_failing_pulled_operation_is_final_after_its_last_attempt(
    start_server, start_agent, tmp_path
):
    srv = start_server("--no-tickles")
    agent = start_agent(
        srv,
        enroll_token(srv),
        "--poll-interval",
        "0.3",
        "--scrub-interval",
        "0.5",
        "--max-attempts",
        "3",
    )
    marks = tmp_path / "marks"
    script = f'echo "$TASKFLEET_ATTEMPT" >> {marks}; echo "nope $TASKFLEET_ATTEMPT"; exit 7\n'
    req = run_request(srv, f"computer:{agent.computer_id}", {"script": script}, timeout=30)
    (a,) = activities_of(srv, req["id"])
    done = request_done(srv, req["id"], timeout=30)
    assert done["progress"]["counts"] == {"failed": 1}
    got = _activity(srv, a["id"])
    assert marks.read_text().split() == ["1", "2", "3"]
    assert got["stdout"] == "nope 3\n"  # the last attempt's result is the final one
    assert "Exited with code 7" in got["result_line"]
    assert [e["reason"].split(";")[0] for e in _retry_events(got)] == [
        "failed, will retry (attempt 1 of 3)",
        "failed, will retry (attempt 2 of 3)",
    ]
    assert [h["to_state"] for h in got["history"]] == [
        "queued",
        "in_progress",
        "in_progress",
        "in_progress",
        "failed",
    ]
    record = _record(agent, a["id"])
    assert record["finished"] and record["status"] == 5 and record["attempts"] == 3


def test_a_failed_pushed_operation_is_final_at_once(server, start_agent, tmp_path):
    agent = start_agent(server, enroll_token(server), "--scrub-interval", "0.3")
    marks = tmp_path / "marks"
    script = f'echo "$TASKFLEET_ATTEMPT" >> {marks}; exit 4\n'
    req = run_request(server, f"computer:{agent.computer_id}", {"script": script})
    (a,) = activities_of(server, req["id"])
    request_done(server, req["id"])
    got = _activity(server, a["id"])
    assert _record(agent, a["id"])["pushed"] == 1
    assert got["state"] == "failed" and not _retry_events(got)
    assert marks.read_text().split() == ["1"]


def test_canceling_an_operation_that_waits_for_its_retry_ends_it(
    start_server, start_agent, tmp_path
):
    srv = start_server("--no-tickles")
    agent = start_agent(
        srv, enroll_token(srv), "--poll-interval", "0.3", "--scrub-interval", "3600"
    )
    marks = tmp_path / "marks"
    script = f'echo "$TASKFLEET_ATTEMPT" >> {marks}; exit 1\n'
    req = run_request(srv, f"computer:{agent.computer_id}", {"script": script}, timeout=30)
    (a,) = activities_of(srv, req["id"])
    wait_until(lambda: _retry_events(_activity(srv, a["id"])), 20, "the retry event")
    with srv.api() as api:
        assert api.post(f"/activities/{a['id']}/cancel", json={}).status_code == 200
    wait_until(lambda: _record(agent, a["id"])["finished"], 20, "the agent to end it")
    assert _record(agent, a["id"])["status"] == 6
    got = wait_until(
        lambda: (g := _activity(srv, a["id"]))["agent_report"] and g, 20, "the agent's report"
    )
    assert got["state"] == "canceled"
    assert "Canceled before attempt 2" in got["agent_report"]["result_line"]
    assert marks.read_text().split() == ["1"]


def test_a_retry_held_back_by_a_running_task_is_not_declared_lost(
    start_server, start_agent, tmp_path
):
    # The scrubber skips its runs while another task runs (SPEC 5 rule 1), so
    # the retry waits longer than the time limit (1 s) plus grace (2 s): the
    # agent tells the server at each skipped run, and the retry still happens.
    srv = start_server("--no-tickles", "--lost-grace", "2", "--reaper-interval", "0.2")
    agent = start_agent(srv, enroll_token(srv), "--poll-interval", "0.3", "--scrub-interval", "1")
    target = f"computer:{agent.computer_id}"
    gate = tmp_path / "gate"
    long = run_request(
        srv, target, {"script": f"while [ ! -e {gate} ]; do sleep 0.1; done"}, timeout=60
    )
    (b,) = activities_of(srv, long["id"])
    _working(agent, b["id"])
    marker = tmp_path / "marker"
    req = run_request(
        srv,
        target,
        {"script": f"if [ -e {marker} ]; then exit 0; fi; touch {marker}; exit 3"},
        timeout=1,
    )
    (a,) = activities_of(srv, req["id"])
    wait_until(lambda: _retry_events(_activity(srv, a["id"])), 20, "the retry event")
    # Well past the first deadline (time limit + grace) with the retry held back.
    wait_until(
        lambda: agent.proc.text().count("scrubber skipped this run") >= 6, 20, "skipped runs"
    )
    assert _activity(srv, a["id"])["state"] == "in_progress"
    gate.touch()
    assert request_done(srv, req["id"], timeout=30)["progress"]["counts"] == {"succeeded": 1}
    assert request_done(srv, long["id"], timeout=30)["progress"]["counts"] == {"succeeded": 1}
