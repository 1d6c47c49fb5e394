"""A real server and real agents over real sockets: what an administrator sees."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from tests.conftest import (
    activities_of,
    enroll_token,
    request_done,
    run_request,
    wait_until,
)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not reaped after its agent died, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def test_script_runs_on_every_computer_of_a_group_with_true_results(server, start_agent):
    token = enroll_token(server)
    agents = [start_agent(server, token) for _ in range(3)]
    ids = [a.computer_id for a in agents]
    with server.api() as api:
        assert api.post("/groups", json={"name": "web"}).status_code == 201
        assert api.post("/groups/web/members", json={"computer_ids": ids}).status_code == 200
    script = (
        'echo "hi from $TASKFLEET_COMPUTER_ID"; echo oops >&2; exit $((TASKFLEET_COMPUTER_ID % 2))'
    )
    req = run_request(server, "group:web", {"script": script})
    assert req["total"] == 3
    done = request_done(server, req["id"])
    rows = activities_of(server, req["id"])
    assert [a["computer_id"] for a in rows] == sorted(ids)
    for a in rows:
        expected = a["computer_id"] % 2
        assert a["exit_code"] == expected
        assert a["state"] == ("succeeded" if expected == 0 else "failed")
        assert a["stdout"] == f"hi from {a['computer_id']}\n"
        assert a["stderr"] == "oops\n"
        assert a["result_line"].startswith("Stage: Completed, Status: ")
        assert a["result_line"].endswith(f"Return code: {expected}")
        assert a["agent_started_at"] <= a["agent_ended_at"]
    assert done["progress"]["finished"] == 3
    assert done["progress"]["succeeded"] == sum(1 for i in ids if i % 2 == 0)


def test_every_transition_is_recorded_with_cause_actor_and_time(server, start_agent):
    agent = start_agent(server, enroll_token(server))
    req = run_request(server, f"computer:{agent.computer_id}", {"argv": ["true"]})
    request_done(server, req["id"])
    (a,) = activities_of(server, req["id"])
    with server.api() as api:
        history = api.get(f"/activities/{a['id']}").json()["history"]
    assert [(h["from_state"], h["to_state"], h["cause"]) for h in history] == [
        (None, "queued", "created"),
        ("queued", "in_progress", "delivered"),
        ("in_progress", "succeeded", "agent-report"),
    ]
    assert history[0]["actor"].startswith("token:")
    assert history[2]["actor"] == f"computer:{agent.computer_id}"
    assert all(h["at"] > 0 for h in history)


def test_targets_by_tag_computer_and_all(server, start_agent):
    token = enroll_token(server)
    a1, a2 = start_agent(server, token), start_agent(server, token)
    with server.api() as api:
        r = api.put(f"/computers/{a2.computer_id}/tags", json={"key": "role", "value": "db"})
        assert r.status_code == 200, r.text
    by_tag = run_request(server, "tag:role=db", {"argv": ["true"]})
    assert by_tag["total"] == 1
    assert [a["computer_id"] for a in activities_of(server, by_tag["id"])] == [a2.computer_id]
    everyone = run_request(server, "all", {"argv": ["true"]})
    assert everyone["total"] == 2
    one = run_request(server, f"computer:{a1.computer_id}", {"argv": ["true"]})
    for r in (by_tag, everyone, one):
        assert request_done(server, r["id"])["progress"]["succeeded"] == r["total"]


def test_script_that_never_exits_is_killed_at_its_time_limit(server, start_agent):
    agent = start_agent(server, enroll_token(server))
    req = run_request(
        server, f"computer:{agent.computer_id}", {"argv": ["sleep", "1000"]}, timeout=1
    )
    request_done(server, req["id"], timeout=30)
    (a,) = activities_of(server, req["id"])
    assert a["state"] == "failed"
    assert "Killed at its time limit of 1 s" in a["result_line"]


def test_output_far_beyond_the_cap_is_truncated_and_marked(server, start_agent):
    agent = start_agent(server, enroll_token(server))
    params = {"argv": [sys.executable, "-c", "print('x' * 2_000_000)"], "output_cap": 1000}
    req = run_request(server, f"computer:{agent.computer_id}", params)
    request_done(server, req["id"])
    (a,) = activities_of(server, req["id"])
    assert a["state"] == "succeeded"
    assert a["stdout"].startswith("x" * 1000)
    assert "output truncated, 1999001 bytes dropped" in a["stdout"]
    with server.api() as api:
        full = api.get(f"/activities/{a['id']}").json()
    assert full["stdout_dropped"] == 1_999_001


def test_cancel_in_progress_stays_canceled_and_records_the_agent_report(server, start_agent):
    agent = start_agent(server, enroll_token(server))
    req = run_request(server, f"computer:{agent.computer_id}", {"argv": ["sleep", "1000"]}, 60)
    (a,) = activities_of(server, req["id"])
    wait_until(
        lambda: any(r["status"] == 1 for r in agent.status()["records"]), 20, "script to start"
    )
    with server.api() as api:
        r = api.post(f"/activities/{a['id']}/cancel", json={"reason": "changed my mind"})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "canceled"

        def reported():
            got = api.get(f"/activities/{a['id']}").json()
            return got if got["agent_report"] else None

        got = wait_until(reported, 30, "the agent's report")
    assert got["state"] == "canceled"
    assert got["agent_report"]["status"] == "canceled"
    assert "Killed by cancel" in got["agent_report"]["result_line"]
    assert got["history"][-1]["to_state"] == "canceled"
    assert got["history"][-1]["reason"] == "changed my mind"


def test_cancel_of_queued_work_never_reaches_the_agent(server, start_agent, tmp_path):
    token = enroll_token(server)
    agent = start_agent(server, token)
    cid = agent.computer_id
    agent.proc.stop()
    req = run_request(server, f"computer:{cid}", {"argv": ["touch", str(tmp_path / "ran")]})
    with server.api() as api:
        r = api.post(f"/requests/{req['id']}/cancel", json={})
        assert r.status_code == 200 and len(r.json()["canceled"]) == 1
    restarted = start_agent(server, None, state_dir=agent.state_dir)
    # A later request goes through: by then the canceled one had its chance.
    later = run_request(server, f"computer:{cid}", {"argv": ["true"]})
    request_done(server, later["id"])
    assert not (tmp_path / "ran").exists()
    ops = {r["op"] for r in restarted.status()["records"]}
    assert activities_of(server, req["id"])[0]["id"] not in ops


def test_illegal_transition_is_refused_and_changes_nothing(server, start_agent):
    agent = start_agent(server, enroll_token(server))
    req = run_request(server, f"computer:{agent.computer_id}", {"argv": ["true"]})
    request_done(server, req["id"])
    (a,) = activities_of(server, req["id"])
    with server.api() as api:
        before = api.get(f"/activities/{a['id']}").json()
        r = api.post(f"/activities/{a['id']}/cancel", json={})
        assert r.status_code == 409
        assert "illegal transition" in r.json()["error"]
        assert "Succeeded -> Canceled" in r.json()["error"]
        assert api.get(f"/activities/{a['id']}").json() == before


def test_activity_is_failed_as_lost_when_the_agent_dies_mid_run(server, start_agent, tmp_path):
    agent = start_agent(server, enroll_token(server))
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; exec sleep 1000"
    req = run_request(server, f"computer:{agent.computer_id}", {"script": script}, 1)
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, "script to start")
    pgid = int(pidfile.read_text())  # the script leads its own process group
    agent.proc.kill9()
    # Agent limit 1 s + server grace 2 s (fixture), then the reaper.
    done = request_done(server, req["id"], timeout=30)
    (a,) = activities_of(server, req["id"])
    assert a["state"] == "failed"
    assert "lost" in a["reason"]
    assert done["progress"]["counts"] == {"failed": 1}
    # The agent's kill -9 leaves its task's process group behind (the agent is
    # not there to kill it at its time limit): end it, and only it, by its group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    wait_until(lambda: not _running(pgid), 10, "the leftover task to end")


def test_reenrolling_a_computer_cancels_its_queued_work(server, start_agent):
    token = enroll_token(server)
    agent = start_agent(server, token)
    cid = agent.computer_id
    agent.proc.stop()
    req = run_request(server, f"computer:{cid}", {"argv": ["true"]})
    again = start_agent(server, token, "--reenroll", state_dir=agent.state_dir)
    assert again.computer_id == cid
    (a,) = activities_of(server, req["id"])
    assert a["state"] == "canceled"
    assert a["reason"] == "re-enrolled"


def test_agent_started_while_server_is_down_retries_and_enrolls(start_server, start_agent):
    srv = start_server()
    token = enroll_token(srv)
    srv.proc.stop()
    agent = start_agent(srv, token, wait_enrolled=False)
    wait_until(lambda: "unreachable" in agent.proc.text(), 20, "the agent to say so")
    srv.restart()
    wait_until(lambda: "agent ready" in agent.proc.text(), 30, "enrollment after the outage")
    req = run_request(srv, f"computer:{agent.computer_id}", {"argv": ["true"]})
    assert request_done(srv, req["id"])["progress"]["succeeded"] == 1


def test_poll_only_agent_gets_work_without_tickles(start_server, start_agent):
    srv = start_server("--no-tickles")
    agent = start_agent(srv, enroll_token(srv), "--poll-interval", "0.5")
    req = run_request(srv, f"computer:{agent.computer_id}", {"argv": ["true"]})
    assert request_done(srv, req["id"])["progress"]["succeeded"] == 1
    assert srv.metric("taskfleet_tickles_sent_total") == 0


def test_long_poll_agent_without_udp_gets_work_within_seconds(start_server, start_agent):
    srv = start_server("--no-tickles")
    agent = start_agent(srv, enroll_token(srv), tickle_port=0)
    cid = agent.computer_id
    # The agent is holding a long poll now; work must arrive without its 30 min poll.
    req = run_request(srv, f"computer:{cid}", {"argv": ["true"]})
    assert request_done(srv, req["id"], timeout=15)["progress"]["succeeded"] == 1


def test_agent_refuses_scripts_unless_its_own_configuration_allows_them(server, start_agent):
    agent = start_agent(server, enroll_token(server), allow_scripts=False)
    with server.api() as api:
        r = api.post(
            "/requests",
            json={"target": f"computer:{agent.computer_id}", "params": {"argv": ["true"]}},
        )
        assert r.status_code == 409
        assert "scripts are disabled in its configuration" in r.json()["error"]
        assert api.get("/requests").json() == []


def test_idle_exchange_takes_the_fast_path(server, start_agent):
    agent = start_agent(server, enroll_token(server), "--poll-interval", "0.2")
    cid = agent.computer_id
    req = run_request(server, f"computer:{cid}", {"argv": ["true"]})
    request_done(server, req["id"])
    slow = server.metric("taskfleet_exchanges_total", 'path="slow"')
    fast = server.metric("taskfleet_exchanges_total", 'path="fast"')
    wait_until(
        lambda: server.metric("taskfleet_exchanges_total", 'path="fast"') >= fast + 5,
        20,
        "idle polls",
    )
    # A few idle polls later, none of them needed the database.
    assert server.metric("taskfleet_exchanges_total", 'path="slow"') <= slow + 1


def test_demo_command_runs_a_real_fleet(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "taskfleet",
            "demo",
            "--agents",
            "3",
            "--no-stay",
            "--dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3/3 succeeded" in out.stdout
    assert "hello from computer" in out.stdout
    assert "/api/v1" in out.stdout
    assert "dashboard: http://127.0.0.1:" in out.stdout and "/ui/  (log in with" in out.stdout
    assert "one-time login link (valid 10 min, once): http://127.0.0.1:" in out.stdout
    assert "/ui/login/link?code=" in out.stdout


def test_rerun_runs_again_only_where_it_failed(server, start_agent):
    token = enroll_token(server)
    agents = [start_agent(server, token) for _ in range(3)]
    ids = sorted(a.computer_id for a in agents)
    script = "exit $((TASKFLEET_COMPUTER_ID % 2))"
    req = run_request(server, "all", {"script": script})
    request_done(server, req["id"])
    failed = [a["computer_id"] for a in activities_of(server, req["id"]) if a["state"] == "failed"]
    assert failed == [i for i in ids if i % 2]
    with server.api() as api:
        r = api.post(f"/requests/{req['id']}/rerun-failed")
        assert r.status_code == 201, r.text
        again = r.json()
    assert again["total"] == len(failed) and again["target"] == f"failed of request {req['id']}"
    request_done(server, again["id"])
    assert [a["computer_id"] for a in activities_of(server, again["id"])] == failed
    ok = run_request(
        server, f"computer:{ids[1] if ids[1] % 2 == 0 else ids[0]}", {"argv": ["true"]}
    )
    request_done(server, ok["id"])
    with server.api() as api:
        r = api.post(f"/requests/{ok['id']}/rerun-failed")
        assert r.status_code == 409 and "no computer failed" in r.json()["error"]


def test_bulk_cancel_counts_first_then_cancels_only_what_matches(server, start_agent):
    token = enroll_token(server)
    a1, a2 = start_agent(server, token), start_agent(server, token)
    with server.api() as api:
        api.post("/groups", json={"name": "web"})
        api.post("/groups/web/members", json={"computer_ids": [a1.computer_id]})
    a1.proc.stop()
    a2.proc.stop()
    reqs = [run_request(server, "all", {"argv": ["true"]}) for _ in range(3)]
    with server.api() as api:
        bad = api.post("/activities/cancel", json={"state": "succeeded"})
        assert bad.status_code == 400 and "finished" in bad.json()["error"]
        preview = api.post("/activities/cancel", json={"group": "web", "dry_run": True}).json()
        assert preview["count"] == 3
        assert all(a["state"] == "queued" for r in reqs for a in activities_of(server, r["id"]))
        done = api.post("/activities/cancel", json={"group": "web", "reason": "freeze"}).json()
        assert done["count"] == 3 and sorted(done["ids"]) == sorted(preview["ids"])
    for r in reqs:
        states = {a["computer_id"]: a["state"] for a in activities_of(server, r["id"])}
        assert states == {a1.computer_id: "canceled", a2.computer_id: "queued"}


def test_queued_work_expires_and_never_reaches_the_agent(server, start_agent, tmp_path):
    agent = start_agent(server, enroll_token(server))
    cid = agent.computer_id
    agent.proc.stop()
    marker = tmp_path / "ran"
    with server.api() as api:
        r = api.post(
            "/requests",
            json={
                "target": f"computer:{cid}",
                "expires_in": 0.5,
                "params": {"argv": ["touch", str(marker)]},
            },
        )
        assert r.status_code == 201, r.text
        bad = api.post(
            "/requests",
            json={"target": f"computer:{cid}", "expires_in": -1, "params": {"argv": ["true"]}},
        )
        assert bad.status_code == 400 and "expires_in" in bad.json()["error"]
    req = request_done(server, r.json()["id"], timeout=20)
    (a,) = activities_of(server, req["id"])
    assert a["state"] == "canceled" and a["reason"] == "expired"
    assert "Expired before the computer picked it up" in a["result_line"]
    start_agent(server, None, state_dir=agent.state_dir)
    later = run_request(server, f"computer:{cid}", {"argv": ["true"]})
    request_done(server, later["id"])
    assert not marker.exists()
