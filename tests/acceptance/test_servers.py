"""The server processes on one database and the leader (issue 16, first slice;
server/cluster.py): registered, beating, stopped or lost; exactly one leads; on
PostgreSQL the lead moves to another process within a few beats of a kill -9."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.acceptance.test_cli import tf
from tests.conftest import BACKEND, Server, free_port, wait_until


def _status(server: Server) -> dict[str, Any]:
    with server.api() as api:
        r = api.get("/servers")
        assert r.status_code == 200, r.text
        return dict(r.json())


def _running(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in status["processes"] if p["state"] == "running"]


def test_a_server_lists_itself_running_and_leading_and_a_restart_hands_over(
    server: Server,
) -> None:
    first = _status(server)
    [me] = _running(first)
    assert me["me"] and me["leader"] and me["pid"] > 0 and me["url"] == server.url
    assert first["leader"]["id"] == me["id"]
    out = json.loads(tf(server, "server", "status", "--json").stdout)
    assert out["leader"]["id"] == me["id"]
    server.restart()  # a clean stop: marked stopped, the new process leads, one epoch on
    after = _status(server)
    [now] = _running(after)
    assert now["id"] != me["id"] and now["leader"]
    assert after["leader"]["epoch"] == first["leader"]["epoch"] + 1
    [old] = [p for p in after["processes"] if p["id"] == me["id"]]
    assert old["state"] == "stopped" and not old["leader"]


def test_only_the_super_admin_sees_the_server_processes(server: Server) -> None:
    with server.api() as api:
        r = api.post("/tokens", json={"kind": "admin", "name": "ops", "role": "admin"})
        assert r.status_code == 201, r.text
        admin = r.json()["token"]
    with server.api(admin) as api:
        r = api.get("/servers")
        assert r.status_code == 403 and "super-admin" in r.json()["error"]


@pytest.mark.skipif(BACKEND != "postgresql", reason="several servers share PostgreSQL only")
def test_two_servers_elect_one_leader_and_a_kill_9_hands_the_lead_over(
    start_server: Callable[..., Server],
) -> None:
    fast = ("--cluster-heartbeat", "0.5")
    a = start_server(*fast)
    b = start_server(*fast, port=free_port())

    def both() -> dict[str, Any] | None:
        s = _status(a)
        return s if len(_running(s)) == 2 else None

    status = wait_until(both, 20, "both processes running")
    leaders = [p for p in status["processes"] if p["leader"]]
    assert len(leaders) == 1
    leader, other = (a, b) if leaders[0]["me"] else (b, a)
    epoch = status["leader"]["epoch"]
    leader.proc.kill9()

    def handed_over() -> dict[str, Any] | None:
        s = _status(other)
        me = next(p for p in s["processes"] if p["me"])
        dead = next(p for p in s["processes"] if p["id"] == leaders[0]["id"])
        return s if me["leader"] and dead["state"] == "lost" else None

    after = wait_until(handed_over, 10, "the other process to lead")
    assert after["leader"]["epoch"] == epoch + 1
    assert len([p for p in after["processes"] if p["leader"]]) == 1
