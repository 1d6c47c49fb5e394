"""Accounts typed activities end to end (issue 13): a real server and real agents; the
agent runs the real useradd, groupadd, gpasswd and usermod against a throw-away root
(``--system-root``), never this machine's own /etc. Requests through the API and the
CLI, their result lines, the computer's inventory showing the new accounts, the
refusal up front for an agent that did not enable them, bad parameters at the door."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.accounts_root import host_accounts, line_of, make_root
from tests.conftest import (
    Agent,
    Server,
    activities_of,
    enroll_token,
    post_action,
    request_done,
    wait_until,
)


@pytest.fixture(autouse=True)
def _host_accounts_untouched() -> Iterator[None]:
    before = host_accounts()
    yield
    assert host_accounts() == before, "this machine's own /etc accounts files changed"


def _done(server: Server, type_: str, target: str, params: dict[str, Any]) -> dict[str, Any]:
    r = post_action(server, type_, target, params)
    assert r.status_code == 201, r.text
    (act,) = activities_of(server, request_done(server, r.json()["id"])["id"])
    return act


def _cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TASKFLEET_SERVER": server.url, "TASKFLEET_TOKEN": server.admin_token}
    return subprocess.run(
        [sys.executable, "-m", "taskfleet", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
        check=False,
    )


def _cli_result(server: Server, *args: str) -> str:
    """The one activity's result line of a ``--wait --json`` command that succeeded."""
    out = _cli(server, *args, "--wait", "--json")
    assert out.returncode == 0, (out.stdout, out.stderr)
    (act,) = json.loads(out.stdout)["activities"]
    assert act["state"] == "succeeded", act
    return str(act["result_line"])


def test_users_and_groups_through_the_api_and_the_cli(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    root = make_root(tmp_path / "system")
    agent = start_agent(
        server,
        enroll_token(server),
        "--allow-type",
        "accounts",
        "--system-root",
        str(root),
        "--inventory-min-interval",
        "0",
        inventory=True,
    )
    target = f"computer:{agent.computer_id}"

    # Through the API.
    act = _done(server, "user-create", target, {"name": "alice", "full_name": "Alice A"})
    assert act["state"] == "succeeded", act
    assert act["result_line"] == (
        "Stage: Create user, Status: Succeeded, Result: created user alice "
        "(uid 1000, primary group alice), Return code: none"
    )
    act = _done(server, "group-create", target, {"name": "docker", "gid": 2000})
    assert "Result: created group docker (gid 2000)" in act["result_line"], act
    act = _done(server, "group-add-member", target, {"group": "docker", "user": "alice"})
    assert act["state"] == "succeeded", act
    added = "Stage: Add group member, Status: Succeeded, Result: added alice to group docker"
    assert added in act["result_line"], act
    assert line_of(root, "passwd", "alice") == "alice:x:1000:1000:Alice A:/home/alice:/bin/sh"
    assert line_of(root, "group", "docker") == "docker:x:2000:alice"

    # Through the CLI.
    line = _cli_result(
        server, "user", "create", "bob", "--groups", "sudo,docker", "--target", target
    )
    assert "Result: created user bob (uid 1001, primary group bob, groups: docker, sudo)" in line
    line = _cli_result(server, "unix-group", "create", "ops", "--target", target)
    m = re.search(r"Result: created group ops \(gid (\d+)\)", line)
    assert m, line
    gid = int(m.group(1))
    line = _cli_result(server, "unix-group", "add-member", "ops", "bob", "--target", target)
    assert "Result: added bob to group ops" in line
    line = _cli_result(server, "user", "lock", "bob", "--target", target)
    assert "Stage: Lock user, Status: Succeeded, Result: locked user bob" in line
    assert line_of(root, "group", "ops") == f"ops:x:{gid}:bob"
    assert line_of(root, "shadow", "bob").split(":")[7] == "1"

    # A failure says why, and the CLI's --wait exits 1.
    out = _cli(server, "user", "create", "alice", "--target", target, "--wait", "--json")
    assert out.returncode == 1, out.stderr
    (act,) = json.loads(out.stdout)["activities"]
    assert act["state"] == "failed"
    assert "Result: user alice already exists (uid 1000); nothing changed" in act["result_line"]

    # The computer's inventory follows (the agent reports after each operation).
    def shows_them() -> dict[str, Any] | None:
        with server.api() as api:
            inv = api.get(f"/computers/{agent.computer_id}").json()["inventory"]
        users = (inv or {}).get("users", {})
        return inv if "bob" in users and "alice" in users else None

    inv = wait_until(shows_them, 120, "the new users in the computer's inventory")
    assert inv["users"]["alice"]["uid"] == 1000 and inv["users"]["alice"]["home"] == "/home/alice"
    assert inv["groups"]["docker"] == {"gid": 2000, "members": ["alice", "bob"]}
    assert inv["groups"]["ops"]["members"] == ["bob"]


def test_refused_up_front_where_accounts_are_not_enabled_and_bad_parameters_at_the_door(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    token = enroll_token(server)
    root = make_root(tmp_path / "system")
    enabled = start_agent(server, token, "--allow-type", "user-lock", "--system-root", str(root))
    plain = start_agent(server, token, "--system-root", str(root), name="plain")
    before = (root / "etc/passwd").read_text()

    r = post_action(server, "user-create", f"computer:{plain.computer_id}", {"name": "alice"})
    assert r.status_code == 409, r.text
    assert r.json()["error"] == (
        f"1 of 1 target computers would refuse this user-create: {plain.computer_id} (plain): "
        "activity type 'user-create' is not enabled in its configuration"
    )
    both = f"computer:{enabled.computer_id},{plain.computer_id}"
    r = post_action(server, "user-lock", both, {"name": "alice"})
    assert r.status_code == 409 and f"{plain.computer_id} (plain)" in r.json()["error"], r.text
    assert f"{enabled.computer_id} (" not in r.json()["error"]
    out = _cli(server, "unix-group", "create", "ops", "--target", f"computer:{plain.computer_id}")
    assert out.returncode != 0 and "is not enabled in its configuration" in out.stderr

    for type_, params, says in [
        ("user-create", {"name": "-o"}, "name: '-o' is not a valid user name"),
        ("user-create", {"name": "a;rm -rf"}, "is not a valid user name"),
        ("user-create", {"name": "alice", "shell": "/bin/sh -c"}, "shell must be an absolute"),
        ("user-create", {"name": "alice", "password": "x"}, "unknown parameter(s): password"),
        ("user-delete", {"name": "root"}, "'root' is never changed"),
        ("group-add-member", {"group": "$(x)", "user": "alice"}, "is not a valid group name"),
    ]:
        r = post_action(server, type_, f"computer:{enabled.computer_id}", params)
        assert r.status_code == 400, (params, r.text)
        assert says in r.json()["error"], (params, r.text)
    with server.api() as api:
        assert api.get("/requests").json() == []
    assert (root / "etc/passwd").read_text() == before
