"""Remote text cannot drive the administrator's terminal, and `run --wait` rides out a restart.

Script output, result lines, hostnames and reasons come from computers; every
CLI command that prints them (tables and plain lines) must print no escape
sequence and no control character, while ``--json`` stays exact JSON. The CLI
runs as a real subprocess against a real server; the agent is simulated over
HTTP so that it can report exactly the bytes a hostile script would print.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import httpx

from tests.conftest import Server, enroll_token, wait_until

EVIL = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x1b[0m\x9b1;1H\x07\x08\r"
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def cli(server: Server, *args: str) -> list[str]:
    return [sys.executable, "-m", "taskfleet", *args]


def env(server: Server) -> dict[str, str]:
    return {
        **os.environ,
        "TASKFLEET_SERVER": server.url,
        "TASKFLEET_TOKEN": server.admin_token,
        "COLUMNS": "200",
    }


def tf(server: Server, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        cli(server, *args), capture_output=True, text=True, timeout=120, env=env(server)
    )
    assert out.returncode == code, out.stdout + out.stderr
    return out


def assert_clean(out: subprocess.CompletedProcess[str], *expected: str) -> None:
    text = out.stdout + out.stderr
    bad = CONTROL.findall(text)
    assert not bad, f"{out.args[3:]} printed control characters {bad!r}:\n{text!r}"
    for e in expected:
        assert e in text, (e, text)


def exchange(server: Server, cid: int, secret: str, body: dict[str, Any]) -> httpx.Response:
    r = httpx.post(
        server.url + "/agent/v1/exchange",
        json=body,
        headers={"X-Taskfleet-Computer": str(cid), "Authorization": f"Bearer {secret}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r


def test_no_cli_command_prints_escape_sequences_from_remote_text(server):
    body = {
        "token": enroll_token(server),
        "hostname": f"web{EVIL}1",
        "machine_id": "m-evil",
        "policy": {"scripts": True, "users": ["deploy"]},
    }
    r = httpx.post(server.url + "/agent/v1/enroll", json=body, timeout=30)
    assert r.status_code == 201, r.text
    cid, secret = r.json()["computer_id"], r.json()["secret"]

    # `run --wait` waits while the "agent" takes the work and reports hostile output.
    waiting = subprocess.Popen(
        cli(server, "run", "--target", f"computer:{cid}", "--wait", "--", "true"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(server),
    )
    try:

        def delivered() -> list[dict[str, Any]]:
            return exchange(server, cid, secret, {"ack": 0}).json()["messages"]

        (op,) = wait_until(delivered, 30, "the operation to be handed out")
        result = {
            "seq": 1,
            "type": "operation-result",
            "op": op["op"],
            "status": "succeeded",
            "exit_code": 0,
            "stdout": f"out{EVIL}put\nline two{EVIL}\n",
            "stderr": f"err{EVIL}\n",
            "result_line": f"Result{EVIL}",
        }
        exchange(server, cid, secret, {"ack": op["seq"], "messages": [result]})
        stdout, stderr = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
        waiting.wait()
    assert waiting.returncode == 0, stdout + stderr
    ran = subprocess.CompletedProcess(waiting.args, 0, stdout, stderr)
    assert_clean(ran, "output", "red")  # the text stays, its escape sequences go

    # A reason set by a person, shown back: cleaned as well.
    req = json.loads(tf(server, "run", "--target", f"computer:{cid}", "--json", "--", "x").stdout)
    (queued,) = json.loads(tf(server, "activity", "list", "--state", "queued", "--json").stdout)
    tf(server, "activity", "cancel", str(queued["id"]), "--reason", f"stop{EVIL}now")

    activity = str(op["op"])
    for args, expected in (
        (("request", "show", str(req["id"] - 1)), "output"),
        (("request", "show", str(req["id"])), "web"),
        (("request", "list"), f"computer:{cid}"),
        (("activity", "show", activity), "line two"),
        (("activity", "show", str(queued["id"])), "stop"),
        (("activity", "list"), "Result"),
        (("computer", "list"), "web"),
        (("computer", "show", str(cid)), "web"),
    ):
        assert_clean(tf(server, *args), expected)
    # An error that quotes the hostname (the computer refuses this user).
    refused = tf(server, "run", "--target", f"computer:{cid}", "--user", "root", "--", "x", code=2)
    assert_clean(refused, "would refuse")

    # --json stays exact: the escape sequences are there, JSON-escaped.
    shown = tf(server, "activity", "show", activity, "--json")
    assert "\x1b" not in shown.stdout and "\\u001b" in shown.stdout
    assert json.loads(shown.stdout)["stdout"] == result["stdout"]


def test_run_wait_keeps_waiting_through_a_server_restart(server, start_agent, tmp_path):
    cid = start_agent(server, enroll_token(server)).computer_id
    go = tmp_path / "go"
    script = f'while [ ! -e "{go}" ]; do sleep 0.05; done; echo finished-after-restart'
    waiting = subprocess.Popen(
        cli(server, "run", "--target", f"computer:{cid}", "--wait", "--", "sh", "-c", script),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(server),
    )
    try:

        def running() -> bool:
            with server.api() as api:
                rows = api.get("/activities", params={"computer_id": cid}).json()
            return bool(rows) and rows[0]["state"] == "in_progress"

        wait_until(running, 30, "the script to run")
        server.restart()  # the CLI's polls fail while the server is down
        assert waiting.poll() is None, waiting.communicate()
        go.touch()
        stdout, stderr = waiting.communicate(timeout=120)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, stdout + stderr
    assert "retrying for up to 120s" in stderr and "is back; still waiting" in stderr, stderr
    assert "finished-after-restart" in stdout and "Succeeded" in stdout, stdout
