"""Only the leader runs the leader's duties (issue 16, second slice; server/cluster.py):
the lifecycle timers, the server-task scheduler, the reaper and the tickler run in the
leading process alone; work persisted by another process is picked up by the leader; a kill -9
of the leader hands the duties over and no cron schedule fires twice."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from taskfleet.protocol.relay import RELAY_ENROLL_PATH
from taskfleet.protocol.tickle import TickleVerifier
from tests.acceptance.test_servers import _running, _status
from tests.conftest import (
    BACKEND,
    Agent,
    Server,
    activities_of,
    enroll_token,
    free_port,
    request_done,
    wait_until,
)
from tests.raw_agent import SCRIPTS_OK, enroll_raw, exchange, queued_request_for
from tests.server_tasks import TYPES, confirmed, finished, submit, task

DUTIES = ["lifecycle", "reaper", "scheduler", "tickler"]
YEARLY = "0 0 1 1 *"  # fires once in the test: its next firing is months away


def test_the_one_sqlite_or_postgresql_server_runs_every_duty(server: Server) -> None:
    assert _status(server)["duties"] == DUTIES


def _leader_and_other(a: Server, b: Server) -> tuple[Server, Server]:
    def both() -> dict[str, Any] | None:
        s = _status(a)
        leads = [p for p in s["processes"] if p["leader"] and p["state"] == "running"]
        return s if len(_running(s)) == 2 and len(leads) == 1 else None

    status = wait_until(both, 20, "both processes running, one leading")
    [lead] = [p for p in status["processes"] if p["leader"]]
    return (a, b) if lead["me"] else (b, a)


def _two(start_server: Callable[..., Server], tmp_path: Path, *extra: str) -> tuple[Server, Server]:
    """Two server processes on one database: (the leader, the other)."""
    types = tmp_path / "types.toml"
    types.write_text(TYPES)
    args = ("--cluster-heartbeat", "0.5", "--task-types", str(types), "--reaper-interval", "0.2")
    args += extra
    a = start_server(*args)
    b = start_server(*args, port=free_port())
    return _leader_and_other(a, b)


@pytest.mark.skipif(BACKEND != "postgresql", reason="several servers share PostgreSQL only")
def test_the_leader_alone_runs_the_duties_and_does_the_work_the_other_accepted(
    start_server: Callable[..., Server],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    leader, other = _two(start_server, tmp_path)
    assert _status(leader)["duties"] == DUTIES
    assert _status(other)["duties"] == []  # it answers the API, but schedules nothing

    # Submitted to the process that does not lead: the leader's catch-up dispatches it.
    task = submit(other, "echo", params={"msg": "hello"})
    assert finished(other, task["task"]["id"])["state"] == "succeeded"

    agent = start_agent(leader, enroll_token(leader))
    cid = agent.computer_id
    agent.proc.stop()  # its work stays queued
    # Created in the process that does not lead; expired by the leader's reaper, once.
    with other.api() as api:
        r = api.post(
            "/requests",
            json={"target": f"computer:{cid}", "expires_in": 0.5, "params": {"argv": ["true"]}},
        )
        assert r.status_code == 201, r.text
    req = request_done(other, r.json()["id"], timeout=20)
    (act,) = activities_of(other, req["id"])
    assert act["state"] == "canceled" and act["reason"] == "expired"
    expired = [
        line
        for line in leader.proc.lines()
        if line["msg"].endswith(f"queued activities expired: [{act['id']}]")
    ]
    assert len(expired) == 1, expired  # both processes write this log: one reaped it


@pytest.mark.skipif(BACKEND != "postgresql", reason="several servers share PostgreSQL only")
def test_a_kill_9_of_the_leader_hands_the_duties_over_and_no_schedule_fires_twice(
    start_server: Callable[..., Server],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    leader, other = _two(start_server, tmp_path)
    start_agent(leader, enroll_token(leader))  # the schedules' runs target it
    body = {"cron": YEARLY, "request": {"target": "all", "params": {"argv": ["true"]}}}
    sids = []
    with other.api() as api:
        for _ in range(8):
            r = api.post("/schedules", json=body)
            assert r.status_code == 201, r.text
            sids.append(r.json()["id"])
    # Cron is minute-grained: the test moves each schedule's next firing into the
    # coming seconds (as time passing would), one every 0.6 s; the leader's catch-up
    # reads the new times.
    now = time.time()
    with psycopg.connect(other.database_url, autocommit=True) as conn:
        for i, sid in enumerate(sids):
            at = now + 1.5 + i * 0.6
            conn.execute("UPDATE schedules SET next_at = %s WHERE id = %s", (at, sid))

    def runs() -> dict[int, int]:
        with psycopg.connect(other.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT id, runs FROM schedules WHERE id = ANY(%s)", (sids,)
            ).fetchall()
        return {int(r[0]): int(r[1]) for r in rows}

    wait_until(lambda: sum(runs().values()) >= 2, 20, "the first schedules to fire")
    leader.proc.kill9()

    def took_over() -> bool:
        s = _status(other)
        return any(p["me"] and p["leader"] for p in s["processes"]) and s["duties"] == DUTIES

    wait_until(took_over, 10, "the other process to lead and run the duties")
    done = wait_until(
        lambda: (r := runs()) and all(n >= 1 for n in r.values()) and r, 30, "every schedule"
    )
    assert set(done.values()) == {1}, done  # none fired twice
    with psycopg.connect(other.database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT schedule_id, count(*) FROM requests WHERE schedule_id = ANY(%s)"
            " GROUP BY schedule_id",
            (sids,),
        ).fetchall()
    assert {int(s): int(n) for s, n in rows} == dict.fromkeys(sids, 1)

    # The new leader dispatches what is submitted to it, as the old one did.
    again = submit(other, "echo", params={"msg": "again"})
    assert finished(other, again["task"]["id"])["state"] == "succeeded"


@pytest.mark.skipif(BACKEND != "postgresql", reason="several servers share PostgreSQL only")
def test_a_task_running_in_a_dead_leaders_embedded_worker_fails_within_seconds(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """The embedded worker dies with its server process: the new leader fails the task
    it ran once that process is gone (SERVER_GONE_AFTER_BEATS beats), not after the
    workers' heartbeat timeout (5 hours)."""
    leader, other = _two(start_server, tmp_path)
    gate = tmp_path / "gate"
    try:
        tid = submit(other, "gate", params={"path": str(gate)})["task"]["id"]
        running = wait_until(
            lambda: (t := task(other, tid))["state"] == "in_progress" and t, 20, "the task to run"
        )
        assert running["claimed_by"].startswith("embedded-")  # the leader's own worker
        leader.proc.kill9()
        # 6 beats of 0.5 s after the last one, then the next reaper pass (0.2 s).
        done = finished(other, tid, timeout=20)
        assert done["state"] == "failed" and done["result_line"] == "worker heartbeat lost"
        # Logged after the commit the API already shows: polled, not read at once.
        wait_until(
            lambda: any(
                "its server process ended" in line["msg"] or "(worker embedded-" in line["msg"]
                for line in other.proc.lines()
            ),
            10,
            "the new leader to log why the task failed",
        )
    finally:
        gate.touch()  # the command outlives the killed process (its own session): end it


@pytest.mark.skipif(BACKEND != "postgresql", reason="several servers share PostgreSQL only")
def test_a_cancel_through_the_other_process_stops_the_task_in_the_leaders_worker(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """With the embedded queue the task runs in the leader's worker; the cancel reached
    the other process, whose hint tells the leader's worker at once. (Its heartbeat,
    which also reads cancels from the database, is set to 10 minutes here: only the
    hint can stop the task within the test's time.)"""
    leader, other = _two(start_server, tmp_path, "--worker-heartbeat", "600")
    gate = tmp_path / "gate"
    try:
        tid = submit(other, "gate", params={"path": str(gate)})["task"]["id"]
        wait_until(lambda: task(other, tid)["state"] == "in_progress", 20, "the task to run")
        with other.api() as api:
            r = api.post(f"/tasks/{tid}/cancel", json={})
            assert r.status_code == 200, r.text
        stopped = confirmed(other, tid, timeout=20)
        assert stopped["state"] == "canceled"
        assert any(
            line["msg"] == f"task[{tid}] cancel received: stopping its handler"
            for line in leader.proc.lines()
        )
    finally:
        gate.touch()


@pytest.mark.skipif(BACKEND != "postgresql", reason="several servers share PostgreSQL only")
def test_tasks_submitted_through_the_other_process_are_dispatched_on_its_hint(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """The process that does not lead tells the leader of the tasks it took: the leader
    catches up at once. (Its own periodic catch-up is set to 10 minutes here: only the
    hint can start them within the test's time.)"""
    _leader, other = _two(start_server, tmp_path, "--leader-catch-up", "600")
    ids = [submit(other, "echo", params={"msg": f"m{i}"})["task"]["id"] for i in range(3)]
    for tid in ids:
        assert finished(other, tid, timeout=20)["state"] == "succeeded"


class _Udp:
    """A UDP port standing in for an agent's or a relay's tickle listener."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])

    def tickle(self, key: str, target_id: int, timeout: float = 10) -> None:
        """Wait for a tickle for ``target_id`` that its key verifies."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(200)
        verifier = TickleVerifier(bytes.fromhex(key), target_id)
        assert verifier.verify(data, time.time()).computer_id == target_id

    def close(self) -> None:
        self.sock.close()


def _token(server: Server, kind: str) -> dict[str, Any]:
    with server.api() as api:
        r = api.post("/tokens", json={"kind": kind, "name": f"t-{kind}"})
        assert r.status_code == 201, r.text
        return dict(r.json())


def _sent(server: Server, relay: bool = False) -> float:
    name = "taskfleet_relay_tickles_sent_total" if relay else "taskfleet_tickles_sent_total"
    return server.metric(name)


@pytest.mark.skipif(BACKEND != "postgresql", reason="several servers share PostgreSQL only")
def test_only_the_leader_tickles_wherever_the_work_or_the_agent_is_and_its_successor_takes_over(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """The tickler is a leader's duty: a computer enrolled through the other process and
    talking only to it is tickled by the leader, at the tickle port its last info
    exchange there gave (the ``reach`` hint); a relay revoked through the other process
    is tickled by the leader (the ``tickle`` hint); after a kill -9 of the leader the
    other process tickles."""
    leader, other = _two(start_server, tmp_path)
    first, second, relay_port = _Udp(), _Udp(), _Udp()
    try:
        r = enroll_raw(other, _token(other, "enroll")["token"], "pc-t", tickle_port=first.port)
        assert r.status_code == 201, r.text
        cid, secret, key = r.json()["computer_id"], r.json()["secret"], r.json()["tickle_key"]
        assert exchange(other, cid, secret).status_code == 200  # no long poll: wait 0

        queued_request_for(other, cid)  # made, and the agent served, where the leader is not
        first.tickle(key, cid)
        assert _sent(leader) >= 1 and _sent(other) == 0

        # Its agent now listens elsewhere (an info exchange, on the other process only).
        agent = {"tickle_port": second.port, "version": "t", "policy": SCRIPTS_OK}
        info = {"ack": 0, "agent": agent}
        assert exchange(other, cid, secret, info).status_code == 200
        queued_request_for(other, cid)
        second.tickle(key, cid)
        assert _sent(other) == 0

        # A relay revoked through the other process is told at once: by the leader.
        token = _token(other, "relay")
        body = {"token": token["token"], "name": "r1", "url": "http://r1.example:8471"}
        rr = httpx.post(
            other.url + RELAY_ENROLL_PATH, json={**body, "tickle_port": relay_port.port}
        )
        assert rr.status_code == 201, rr.text
        with other.api() as api:
            assert api.delete(f"/tokens/{token['id']}").status_code == 204
        relay_port.tickle(rr.json()["tickle_key"], rr.json()["relay_id"])
        assert _sent(leader, relay=True) >= 1 and _sent(other, relay=True) == 0
        assert other.metric("taskfleet_tickles_forwarded_total") >= 1

        leader.proc.kill9()
        wait_until(lambda: "tickler" in _status(other)["duties"], 15, "the other process to lead")
        queued_request_for(other, cid)
        second.tickle(key, cid)
        assert _sent(other) >= 1
    finally:
        for u in (first, second, relay_port):
            u.close()
