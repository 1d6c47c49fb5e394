"""Signal Process, Restart and Shutdown through the real server and agent processes
(issue 13). Only processes the test started are ever signalled, and the power commands
are always a test script (no real shutdown(8) runs): it logs its arguments and, for a
restart, writes a new boot id to the file the agent reads (``--boot-id-file``); the test
then stops the agent and starts it again on the same state folder, as a real restart
would.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import (
    Agent,
    Server,
    activities_of,
    enroll_token,
    post_action,
    request_done,
    wait_until,
)

POWER_SCRIPT = """#!{python}
import json, sys, time
from pathlib import Path
with open({calls!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
message = sys.argv[2] if len(sys.argv) > 2 else ""
if message == "fail":
    sys.stderr.write("the power command refused\\n")
    sys.exit(3)
if {new_boot}:
    Path({boot!r}).write_text("boot-after-" + str(len(Path({calls!r}).read_text().split())))
if message == "slow":  # the computer goes down while the command still runs
    release = Path({calls!r} + ".release")
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
print("power command ran")
"""


class Power:
    """A test power command and the boot id file it changes."""

    def __init__(self, folder: Path, *, new_boot: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.calls = folder / "calls"
        self.boot = folder / "boot_id"
        self.boot.write_text("boot-before\n")
        self.script = folder / "power.py"
        self.script.write_text(
            POWER_SCRIPT.format(
                python=sys.executable, calls=str(self.calls), boot=str(self.boot), new_boot=new_boot
            )
        )
        self.script.chmod(0o755)

    def args(self, *, grace: float | None = None) -> list[str]:
        command = f"{self.script} {{minutes}} {{message}}"
        out = ["--allow-type", "system", "--boot-id-file", str(self.boot)]
        out += ["--restart-command", command, "--shutdown-command", command]
        return out + ([] if grace is None else ["--restart-grace", str(grace)])

    def ran(self) -> list[list[str]]:
        if not self.calls.exists():
            return []
        return [json.loads(line) for line in self.calls.read_text().splitlines()]


def _activity(server: Server, request_id: int) -> dict[str, Any]:
    (act,) = activities_of(server, request_id)
    with server.api() as api:
        return dict(api.get(f"/activities/{act['id']}").json())


def _waiting_for_the_computer(server: Server, request_id: int) -> dict[str, Any]:
    """The activity once the server has the agent's "restart initiated" status."""

    def told() -> dict[str, Any] | None:
        act = _activity(server, request_id)
        return act if act["agent_status"] == "working" else None

    act = wait_until(told, 30, "the agent's restart initiated status")
    assert act["state"] == "in_progress", act
    assert "restart initiated, waiting for the computer to come back" in act["reason"], act
    return act


def _again(start_agent: Callable[..., Agent], server: Server, first: Agent, *extra: str) -> Agent:
    """The same agent (state folder) started again, as after a restart."""
    return start_agent(server, None, *extra, state_dir=first.state_dir, name=f"again-{id(extra)}")


# -- signal-process ------------------------------------------------------------------


def test_signal_a_process_by_pid_and_every_one_by_exact_name(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = start_agent(server, enroll_token(server), "--allow-type", "signal-process")
    target = f"computer:{agent.computer_id}"
    one = subprocess.Popen(["sleep", "300"], start_new_session=True)
    # A unique exact name (comm holds 15 characters): a copy of sleep no one else runs.
    name = f"tfsig{secrets.token_hex(5)}"
    exe = tmp_path / name
    shutil.copy("/bin/sleep", exe)
    named = [subprocess.Popen([str(exe), "300"], start_new_session=True) for _ in range(2)]
    try:
        r = post_action(server, "signal-process", target, {"pid": one.pid, "signal": "TERM"})
        assert r.status_code == 201, r.text
        (act,) = activities_of(server, request_done(server, r.json()["id"])["id"])
        assert act["state"] == "succeeded", act["result_line"]
        assert f"sent TERM to process {one.pid} (sleep)" in act["result_line"], act
        assert one.wait(10) == -signal.SIGTERM

        r = post_action(server, "signal-process", target, {"process": name, "signal": "KILL"})
        assert r.status_code == 201, r.text
        (act,) = activities_of(server, request_done(server, r.json()["id"])["id"])
        assert act["state"] == "succeeded", act["result_line"]
        pids = ", ".join(str(p.pid) for p in sorted(named, key=lambda p: p.pid))
        assert f"sent KILL to 2 processes named {name} (pids {pids})" in act["result_line"], act
        assert [p.wait(10) for p in named] == [-signal.SIGKILL] * 2

        # Nothing left of that name (the two are reaped): Failed, saying so.
        r = post_action(server, "signal-process", target, {"process": name})
        (act,) = activities_of(server, request_done(server, r.json()["id"])["id"])
        assert act["state"] == "failed" and f"no process named {name}" in act["result_line"]
    finally:
        for p in (one, *named):
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_pid_1_is_refused_at_the_door_and_the_agent_refuses_itself(
    server: Server, start_agent: Callable[..., Agent]
) -> None:
    agent = start_agent(server, enroll_token(server), "--allow-type", "system")
    target = f"computer:{agent.computer_id}"
    r = post_action(server, "signal-process", target, {"pid": 1, "signal": "KILL"})
    assert r.status_code == 400 and "pid must be an integer in [2" in r.json()["error"], r.text

    own = agent.proc.popen.pid  # the agent process itself (python -m taskfleet agent)
    r = post_action(server, "signal-process", target, {"pid": own, "signal": "KILL"})
    assert r.status_code == 201, r.text
    (act,) = activities_of(server, request_done(server, r.json()["id"])["id"])
    assert act["state"] == "failed", act["result_line"]
    assert f"process {own} (" in act["result_line"], act
    assert "is the agent itself: it is never signalled" in act["result_line"], act
    assert agent.proc.alive()

    r = post_action(server, "signal-process", target, {"pid": 4194304})
    (act,) = activities_of(server, request_done(server, r.json()["id"])["id"])
    assert act["state"] == "failed" and "no process 4194304" in act["result_line"], act
    assert agent.proc.alive()


# -- restart -------------------------------------------------------------------------


def test_a_restart_is_succeeded_only_once_the_agent_is_back_on_a_new_boot(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    power = Power(tmp_path / "power")
    agent = start_agent(server, enroll_token(server), *power.args())
    r = post_action(
        server,
        "restart",
        f"computer:{agent.computer_id}",
        {"delay": 0, "message": "back soon"},
        timeout=600,
    )
    assert r.status_code == 201, r.text
    request_id = r.json()["id"]
    _waiting_for_the_computer(server, request_id)
    assert power.ran() == [["0", "back soon"]]
    # The computer "goes down": the agent dies without a word (kill -9), as at power-off.
    agent.proc.kill9()
    assert _activity(server, request_id)["state"] == "in_progress"
    back = _again(start_agent, server, agent, *power.args())
    req = request_done(server, request_id)
    (act,) = activities_of(server, req["id"])
    assert act["state"] == "succeeded", act["result_line"]
    assert "Restart" in act["result_line"], act
    assert "restarted: the computer came back at " in act["result_line"], act
    assert "power command ran" in act["stdout"], act
    # Never run again: not by the scrubber at start, not as a pending operation.
    assert power.ran() == [["0", "back soon"]]
    assert back.proc.alive()


def test_an_agent_killed_while_the_restart_command_runs_never_runs_it_again(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    power = Power(tmp_path / "power")
    agent = start_agent(server, enroll_token(server), *power.args())
    r = post_action(
        server, "restart", f"computer:{agent.computer_id}", {"message": "slow"}, timeout=600
    )
    assert r.status_code == 201, r.text
    wait_until(lambda: power.ran() and power.boot.read_text() != "boot-before\n", 30, "command")
    agent.proc.kill9()  # down before the command returned (or the agent said anything)
    try:
        _again(start_agent, server, agent, *power.args())
        (act,) = activities_of(server, request_done(server, r.json()["id"])["id"])
    finally:
        Path(f"{power.calls}.release").touch()
    assert act["state"] == "succeeded", act["result_line"]
    assert "restarted: the computer came back at " in act["result_line"]
    assert power.ran() == [["1", "slow"]]


def test_a_restart_that_comes_back_on_the_same_boot_fails_after_the_grace(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    power = Power(tmp_path / "power", new_boot=False)
    grace = 6.0
    agent = start_agent(server, enroll_token(server), *power.args(grace=grace))
    r = post_action(server, "restart", f"computer:{agent.computer_id}", {"delay": 0}, timeout=600)
    assert r.status_code == 201, r.text
    request_id = r.json()["id"]
    _waiting_for_the_computer(server, request_id)
    agent.proc.kill9()  # only the agent restarted: the boot id is the same
    back = _again(start_agent, server, agent, *power.args(grace=grace))
    req = request_done(server, request_id, timeout=60)
    (act,) = activities_of(server, req["id"])
    assert act["state"] == "failed", act["result_line"]
    assert "the computer did not restart within 6 s of the restart command" in act["result_line"]
    # Not at the agent's start: once the delay (0) and the grace had passed since the command.
    assert act["agent_ended_at"] - act["agent_started_at"] >= grace, act
    assert power.ran() == [["0"]]  # never run again
    assert back.proc.alive()


def test_a_failing_power_command_fails_the_activity_and_is_not_awaited(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    power = Power(tmp_path / "power")
    agent = start_agent(server, enroll_token(server), *power.args())
    target = f"computer:{agent.computer_id}"
    for kind in ("restart", "shutdown"):
        r = post_action(server, kind, target, {"delay": 60, "message": "fail"}, timeout=600)
        (act,) = activities_of(server, request_done(server, r.json()["id"])["id"])
        assert act["state"] == "failed", act["result_line"]
        assert (
            f"the {kind} command failed: power.py exited 3: the power command refused"
            in (act["result_line"])
        ), act
    assert power.boot.read_text() == "boot-before\n"


# -- shutdown ------------------------------------------------------------------------


def test_shutdown_is_succeeded_once_initiated(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    power = Power(tmp_path / "power", new_boot=False)
    agent = start_agent(server, enroll_token(server), *power.args())
    r = post_action(server, "shutdown", f"computer:{agent.computer_id}", {"delay": 90})
    assert r.status_code == 201, r.text
    (act,) = activities_of(server, request_done(server, r.json()["id"])["id"])
    assert act["state"] == "succeeded", act["result_line"]
    assert "shutdown initiated (in 2 min)" in act["result_line"], act
    assert power.ran() == [["2"]]  # rounded up to whole minutes; no message, no word


# -- the command line ----------------------------------------------------------------


def test_taskfleet_restart_waits_until_the_computer_is_back(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    power = Power(tmp_path / "power")
    agent = start_agent(server, enroll_token(server), *power.args())
    env = {**os.environ, "TASKFLEET_SERVER": server.url, "TASKFLEET_TOKEN": server.admin_token}
    env["COLUMNS"] = "200"
    target = f"computer:{agent.computer_id}"
    argv = [sys.executable, "-m", "taskfleet", "restart", "--target", target]
    cli = subprocess.Popen(
        [*argv, "--delay", "0", "--wait", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:

        def created() -> int | None:
            with server.api() as api:
                reqs = [q for q in api.get("/requests").json() if q["type"] == "restart"]
            return int(reqs[0]["id"]) if reqs else None

        request_id = wait_until(created, 30, "the CLI's restart request")
        _waiting_for_the_computer(server, request_id)
        with server.api() as api:  # the CLI's default time limit: the delay plus an hour
            assert api.get(f"/requests/{request_id}").json()["timeout"] == 3600
        assert cli.poll() is None  # still waiting: not done before the computer is back
        agent.proc.stop()  # a clean stop this time (systemd stops the agent at reboot)
        _again(start_agent, server, agent, *power.args())
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)
    assert cli.returncode == 0, out + err
    assert "restarted: the computer came back at " in out, out
    assert power.ran() == [["0"]]
