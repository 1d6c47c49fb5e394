"""The taskfleet command as an administrator uses it: env defaults, tables, --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import enroll_token


def tf(server, *args, token=None, check=True):
    env = {
        **os.environ,
        "TASKFLEET_SERVER": server.url,
        "TASKFLEET_TOKEN": token or server.admin_token,
        "COLUMNS": "200",
    }
    out = subprocess.run(
        [sys.executable, "-m", "taskfleet", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_cli_runs_a_command_and_shows_results_as_table_and_json(server, start_agent, tmp_path):
    token = json.loads(tf(server, "token", "create", "--enroll", "--name", "t", "--json").stdout)
    assert token["token"].startswith("tfe_")
    agent = start_agent(server, token["token"])
    cid = agent.computer_id
    tf(server, "group", "create", "web")
    tf(server, "group", "add", "web", str(cid))
    tf(server, "group", "tag", str(cid), "role=db")
    computers = json.loads(tf(server, "computer", "list", "--json").stdout)
    assert computers[0]["groups"] == ["web"] and computers[0]["tags"] == {"role": "db"}

    out = tf(server, "run", "--target", "group:web", "--wait", "--", "echo", "hello fleet")
    assert "hello fleet" in out.stdout and "Succeeded" in out.stdout

    script = tmp_path / "s.sh"
    script.write_text('echo "$GREETING from $(pwd)"; exit 4\n')
    out = tf(
        server,
        "run",
        "--target",
        "tag:role=db",
        "--script",
        str(script),
        "--env",
        "GREETING=hey",
        "--cwd",
        str(tmp_path),
        "--wait",
        "--json",
        check=False,
    )
    assert out.returncode == 1  # not every computer succeeded
    result = json.loads(out.stdout)
    (a,) = result["activities"]
    assert a["stdout"] == f"hey from {tmp_path}\n" and a["exit_code"] == 4

    shown = json.loads(tf(server, "activity", "show", str(a["id"]), "--json").stdout)
    assert [h["to_state"] for h in shown["history"]] == ["queued", "in_progress", "failed"]
    table = tf(server, "activity", "show", str(a["id"])).stdout
    assert "Exited with code 4" in table and "hey from" in table
    listed = json.loads(tf(server, "request", "list", "--json").stdout)
    assert [r["progress"]["finished"] for r in listed] == [1, 1]


def test_cli_errors_are_clear_and_exit_nonzero(server):
    out = tf(server, "run", "--target", "group:nope", "--", "true", check=False)
    assert out.returncode == 2
    assert "unknown group 'nope'" in out.stderr
    out = tf(server, "computer", "list", token="tfa_wrong", check=False)
    assert out.returncode == 2 and "invalid, expired or revoked token" in out.stderr
    viewer = json.loads(
        tf(server, "token", "create", "--name", "v", "--role", "viewer", "--json").stdout
    )["token"]
    out = tf(server, "group", "create", "x", token=viewer, check=False)
    assert out.returncode == 2 and "needs the operator role" in out.stderr


def test_every_command_has_help():
    for args in (
        ["server"],
        ["agent"],
        ["run"],
        ["token", "create"],
        ["activity", "list"],
        ["request", "show"],
        ["computer", "show"],
        ["group", "add"],
        ["demo"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "taskfleet", *args, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "Usage:" in out.stdout, args


def test_agent_status_shows_local_records(server, start_agent):
    agent = start_agent(server, enroll_token(server))
    tf(server, "run", "--target", f"computer:{agent.computer_id}", "--wait", "--", "true")
    status = agent.status()
    assert status["computer_id"] == agent.computer_id
    assert [r["status"] for r in status["records"]] == [4]  # Success


def test_bulk_cancel_shows_the_count_and_needs_yes_when_not_interactive(server, start_agent):
    agent = start_agent(server, enroll_token(server))
    cid = agent.computer_id
    agent.proc.stop()
    tf(server, "run", "--target", f"computer:{cid}", "--", "true")
    out = tf(server, "activity", "cancel-bulk", "--state", "queued", check=False)
    assert out.returncode == 2 and "1 activities match; add --yes" in out.stderr
    out = tf(server, "activity", "cancel-bulk", "--state", "queued", "--yes")
    assert "1 activities canceled" in out.stdout
    listed = json.loads(tf(server, "activity", "list", "--json").stdout)
    assert [a["state"] for a in listed] == ["canceled"]


def test_cli_lifecycle_approval_dependency_window_and_schedule(server, start_agent):
    """An administrator's day: approval with separation, a chained run, a window, a schedule."""
    agent = start_agent(server, enroll_token(server))
    alice = json.loads(
        tf(server, "token", "create", "--name", "alice", "--role", "admin", "--json").stdout
    )["token"]
    out = tf(
        server,
        "run",
        "--target",
        "all",
        "--approval",
        "--separate-approver",
        "--approval-expires-in",
        "2h",
        "--json",
        "--",
        "echo",
        "approved work",
        token=alice,
    )
    first = json.loads(out.stdout)["id"]
    listed = json.loads(tf(server, "approval", "list", "--json").stdout)
    assert [a["request_id"] for a in listed] == [first]
    assert "awaiting approval" in tf(server, "approval", "list").stdout
    refused = tf(server, "request", "approve", str(first), token=alice, check=False)
    assert refused.returncode != 0 and "separation of duties" in refused.stderr
    second = json.loads(
        tf(
            server,
            "run",
            "--target",
            "all",
            "--after",
            f"request:{first}",
            "--after-metric",
            "succeeded",
            "--json",
            "--",
            "echo",
            "chained",
        ).stdout
    )["id"]
    shown = tf(server, "request", "show", str(second)).stdout
    assert f"after: request {first} 100% succeeded" in shown and "Waiting" in shown
    assert f"request {first} approved" in tf(server, "request", "approve", str(first)).stdout
    from tests.conftest import request_done

    request_done(server, first)
    done = request_done(server, second)
    assert done["progress"]["succeeded"] == 1
    outputs = json.loads(tf(server, "request", "show", str(second), "--json").stdout)
    assert "chained" in json.dumps(outputs)

    tf(server, "group", "create", "night")
    tf(server, "group", "add", "night", str(agent.computer_id))
    out = tf(server, "group", "window", "night", "22:00-04:00", "--utc-offset", "+02:00")
    assert "22:00-04:00 (UTC+2h)" in out.stdout
    bad = tf(server, "group", "window", "night", "04:00-04:00", check=False)
    assert bad.returncode != 0 and "empty" in bad.stderr
    assert "no maintenance window" in tf(server, "group", "window", "night", "--clear").stdout

    sched = json.loads(
        tf(server, "run", "--target", "all", "--cron", "30 2 * * *", "--json", "--", "true").stdout
    )
    listed = tf(server, "schedule", "list").stdout
    assert "30 2 * * *" in listed and "active" in listed
    tf(server, "schedule", "cancel", str(sched["id"]))
    assert "canceled" in tf(server, "schedule", "show", str(sched["id"])).stdout
    bad = tf(server, "run", "--target", "all", "--cron", "every day", "--", "true", check=False)
    assert bad.returncode != 0 and "5 fields" in bad.stderr


def test_a_server_whose_port_is_taken_refuses_to_start_and_says_why(tmp_path):
    """The server binds its port before it starts anything (so peers that connect while
    it starts wait instead of being refused); a taken port is a clear error."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "taskfleet", "server", "--listen", f"127.0.0.1:{port}",
             "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr


def test_server_key_prints_the_key_agents_pin(server, start_agent):
    agent = start_agent(server, enroll_token(server))
    key = tf(server, "server", "key").stdout.strip()
    assert len(key) == 64 and key == agent.status()["server_key"]
    about = json.loads(tf(server, "server", "key", "--json").stdout)
    assert about["public_key"] == key
    refused = tf(server, "server", "key", token="tfa_not-a-token", check=False)
    assert refused.returncode != 0 and "invalid" in (refused.stdout + refused.stderr)
