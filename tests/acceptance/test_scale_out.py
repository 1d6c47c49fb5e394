"""Several server processes on one PostgreSQL database serve any computer's exchange
(issue 16; docs/scale-out.md): sequence numbers are allocated in the database
(server/outbox.py, server/exchange.py), a computer enrolled through one process is
loaded by another on its first exchange (server/fleet_load.py), and work created on
one process wakes an agent long-polling another (server/hints.py), also after the
hints listener's session was killed. The agent is mostly the raw one
(tests/raw_agent.py), pointing each exchange at one server or the other; a real
``taskfleet agent`` talks to one, then (restarted) to the other. Dashboard sessions
and the limits on failed credentials are the database's: a session opened on one
process is valid on the other until logged out or revoked on either, and failures
seen by both count towards one limit."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from taskfleet.settings import DASHBOARD_LOGIN_LIMIT, HINTS_APPLICATION
from tests.conftest import (
    BACKEND,
    Agent,
    Server,
    activities_of,
    enroll_token,
    free_port,
    request_done,
    run_request,
    wait_until,
)
from tests.raw_agent import activity, enrolled, exchange, queued_request_for, result_msg
from tests.relay_proc import Relay, start_relay

__all__ = ["start_relay"]  # the fixture, used by name

pytestmark = pytest.mark.skipif(
    BACKEND != "postgresql", reason="several servers share PostgreSQL only"
)


def _two(start_server: Callable[..., Server]) -> tuple[Server, Server]:
    return start_server(), start_server(port=free_port())


def _enroll_token(server: Server) -> str:
    with server.api() as api:
        r = api.post("/tokens", json={"kind": "enroll", "name": "e"})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


class Inbox:
    """What the raw agent was sent, by seq: a resend must be the very same text."""

    def __init__(self) -> None:
        self.by_seq: dict[int, str] = {}

    def take(self, r: httpx.Response) -> list[dict[str, Any]]:
        assert r.status_code == 200, r.text
        out = r.json()["messages"]
        for m in out:
            text = repr(sorted(m.items()))
            assert self.by_seq.setdefault(m["seq"], text) == text, f"seq {m['seq']} reused"
        return list(out)

    @property
    def top(self) -> int:
        return max(self.by_seq, default=0)


def _ops(messages: list[dict[str, Any]], kind: str) -> list[int]:
    return [m["op"] for m in messages if m["type"] == kind]


def _causes(server: Server, op: int) -> list[str]:
    return [h["cause"] for h in activity(server, op)["history"]]


def test_exchanges_alternating_between_two_servers_keep_one_line_of_sequence_numbers(
    start_server: Callable[..., Server],
) -> None:
    a, b = _two(start_server)
    cid, secret = enrolled(a, _enroll_token(a), "pc-1")  # B has never heard of it
    inbox = Inbox()

    _, op1 = queued_request_for(a, cid)
    got = inbox.take(exchange(b, cid, secret, {"ack": 0}))  # B loads it on the miss
    assert _ops(got, "operation") == [op1] and got[0]["seq"] == 1

    _, op2 = queued_request_for(b, cid)
    # A's memory has sent nothing to this computer: the counters come from the database.
    got = inbox.take(exchange(a, cid, secret, {"ack": 1}))
    assert _ops(got, "operation") == [op2] and got[0]["seq"] == 2

    with b.api() as api:  # B's memory says 1 message was sent; the outbox holds 2
        r = api.post(f"/activities/{op1}/cancel")
        assert r.status_code == 200, r.text

    # The result of op2 on A; the cancel (seq 3) comes with the reply.
    got = inbox.take(exchange(a, cid, secret, {"ack": 2, "messages": [result_msg(1, op2)]}))
    assert [m["seq"] for m in got] == [3] and _ops(got, "cancel") == [op1]

    # B has not seen agent message 1 applied: it is not applied twice.
    late = result_msg(2, op1, "stopped")
    r = exchange(b, cid, secret, {"ack": 3, "messages": [result_msg(1, op2), late]})
    assert r.status_code == 200, r.text
    assert r.json()["ack"] == 2
    inbox.take(r)

    assert sorted(inbox.by_seq) == [1, 2, 3]  # strictly increasing, no gap, no duplicate
    assert _causes(a, op2).count("agent-report") == 1
    assert activity(a, op2)["state"] == "succeeded"
    assert activity(b, op1)["state"] == "canceled"
    # Nothing left to send on either side: both go by the same counters.
    for s in (a, b):
        r = exchange(s, cid, secret, {"ack": 3})
        assert r.status_code == 200 and r.json()["messages"] == []


def test_a_computer_enrolled_on_one_server_is_refused_by_another_once_removed(
    start_server: Callable[..., Server],
) -> None:
    a, b = _two(start_server)
    cid, secret = enrolled(a, _enroll_token(a), "pc-1")
    assert exchange(b, cid, secret).status_code == 200
    assert exchange(b, cid, "tfc_wrong").status_code == 401
    with a.api() as api:
        assert api.delete(f"/computers/{cid}").status_code == 200
    wait_until(lambda: exchange(b, cid, secret).status_code == 401, 10, "B refuses it")
    # Enrolled again through B: A takes the new secret, refuses the old one.
    cid2, secret2 = enrolled(b, _enroll_token(a), "pc-1")
    assert cid2 == cid
    assert exchange(a, cid, secret2).status_code == 200
    assert exchange(a, cid, secret).status_code == 401


def _long_poll(
    server: Server, cid: int, secret: str, box: dict[str, Any], ack: int
) -> threading.Thread:
    def run() -> None:
        # As an agent does: a long poll answered with nothing is followed by another.
        for _ in range(5):
            r = exchange(server, cid, secret, {"ack": ack, "wait": 25})
            if r.status_code != 200 or r.json()["messages"]:
                break
        box["response"] = r
        box["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _held(server: Server, n: int = 1) -> None:
    wait_until(lambda: server.metric("taskfleet_long_polls") >= n, 10, "the long poll held")


def _woken_by_work_on(
    a: Server,
    b: Server,
    cid: int,
    secret: str,
    before: Callable[[], None] = lambda: None,
    ack: int = 0,
) -> None:
    box: dict[str, Any] = {}
    t = _long_poll(b, cid, secret, box, ack)
    _held(b)
    before()
    _, op = queued_request_for(a, cid)
    created = time.monotonic()
    t.join(30)
    assert "response" in box
    assert _ops(box["response"].json()["messages"], "operation") == [op]
    assert box["at"] - created < 3.0  # the hint, not the end of the 25 s poll


def test_work_created_on_one_server_wakes_an_agent_long_polling_another(
    start_server: Callable[..., Server],
) -> None:
    a, b = _two(start_server)
    cid, secret = enrolled(a, _enroll_token(a), "pc-1")
    assert exchange(b, cid, secret).json()["messages"] == []  # B looked once: nothing
    _woken_by_work_on(a, b, cid, secret)


def _listener_pid(database_url: str, server: Server) -> int | None:
    with psycopg.connect(database_url.replace("+asyncpg", ""), autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (f"{HINTS_APPLICATION} {server.proc.popen.pid}",),
        ).fetchone()
    return None if row is None else int(row[0])


def test_a_killed_hints_listener_reconnects_and_work_still_wakes_the_agent(
    start_server: Callable[..., Server], database_url: str
) -> None:
    a, b = _two(start_server)
    cid, secret = enrolled(a, _enroll_token(a), "pc-1")
    assert exchange(b, cid, secret).json()["messages"] == []
    first = wait_until(lambda: _listener_pid(database_url, b), 10, "B's listener")

    def kill() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            assert conn.execute("SELECT pg_terminate_backend(%s)", (first,)).fetchone() == (True,)

    # The work is created right after the kill: heard by the new session, or found by
    # the catch-up that ends every long poll after a reconnect.
    _woken_by_work_on(a, b, cid, secret, before=kill)
    again = wait_until(
        lambda: (p := _listener_pid(database_url, b)) not in (None, first) and p, 15, "reconnect"
    )
    assert again != first
    assert exchange(b, cid, secret, {"ack": 1}).status_code == 200
    _woken_by_work_on(a, b, cid, secret, ack=1)  # and the new session hears hints


def test_a_real_agent_runs_work_created_on_either_server_whichever_it_talks_to(
    start_server: Callable[..., Server],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    a, b = _two(start_server)
    state = tmp_path / "agent-state"
    agent = start_agent(a, enroll_token(a), state_dir=state)
    target = f"computer:{agent.computer_id}"

    def runs_once(server: Server, line: str) -> None:
        start = time.monotonic()
        req = run_request(server, target, {"script": f"echo {line}"})
        request_done(server, req["id"])
        # Woken by the other process's hint (its long poll, its tickle), not a poll.
        assert time.monotonic() - start < 10
        [act] = activities_of(server, req["id"])
        assert act["state"] == "succeeded" and line in act["stdout"], act
        assert _causes(server, act["id"]).count("agent-report") == 1

    runs_once(b, "made-on-b")  # the agent talks to A
    agent.proc.stop()
    start_agent(b, state_dir=state)  # the same computer, now talking to B
    runs_once(a, "made-on-a")


def test_an_agent_behind_a_relay_of_one_server_runs_work_created_on_the_other(
    start_server: Callable[..., Server],
    start_agent: Callable[..., Agent],
    start_relay: Callable[..., Relay],
) -> None:
    a, b = _two(start_server)
    relay = start_relay(a, via=b.url)  # its token made on A; it enrolls and exchanges on B
    agent = start_agent(relay.url, enroll_token(a))  # enrolled through it: on B
    start = time.monotonic()
    req = run_request(a, f"computer:{agent.computer_id}", {"script": "echo via-b"})
    request_done(a, req["id"])
    assert time.monotonic() - start < 10  # B heard A's hint and woke its relay
    [act] = activities_of(a, req["id"])
    assert act["state"] == "succeeded" and "via-b" in act["stdout"], act
    assert _causes(a, act["id"]).count("agent-report") == 1


# -- dashboard sessions and failure limits, shared by the processes -----------------------


def _login(server: Server, token: str) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        form = client.get("/ui/login")
        m = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert form.status_code == 200 and m
        return client.post("/ui/login", data={"csrf": m.group(1), "token": token})


def _session_of(r: httpx.Response) -> str:
    assert r.status_code == 303, r.text
    return str(r.cookies["tf_session"])


def _ui(server: Server, sid: str) -> httpx.Client:
    client = httpx.Client(base_url=server.url, timeout=30)
    client.cookies.set("tf_session", sid, path="/ui")
    return client


def _logged_in(server: Server, sid: str) -> bool:
    with _ui(server, sid) as client:
        r = client.get("/ui/fleet")
    assert r.status_code in (200, 303), r.text
    return r.status_code == 200


def _session_rows(database_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url.replace("+asyncpg", ""), autocommit=True) as conn:
        return conn.execute("SELECT * FROM dashboard_sessions").fetchall()


def test_a_dashboard_session_opened_on_one_server_is_valid_on_the_other_until_logged_out(
    start_server: Callable[..., Server], database_url: str
) -> None:
    a, b = _two(start_server)
    sid = _session_of(_login(a, a.admin_token))
    assert _logged_in(b, sid) and _logged_in(a, sid)
    # The database holds the session id's hash, never the id (the cookie's secret).
    rows = _session_rows(database_url)
    assert len(rows) == 1
    assert hashlib.sha256(sid.encode()).hexdigest() in rows[0]
    assert not any(sid in str(v) for v in rows[0])

    with _ui(b, sid) as client:
        m = re.search(r'name="csrf" value="([^"]+)"', client.get("/ui/fleet").text)
        assert m
        assert client.post("/ui/logout", data={"csrf": m.group(1)}).status_code == 303
    assert not _logged_in(a, sid) and not _logged_in(b, sid)
    assert _session_rows(database_url) == []


def test_a_revoked_tokens_session_ends_on_both_servers(
    start_server: Callable[..., Server], database_url: str
) -> None:
    a, b = _two(start_server)
    with a.api() as api:
        r = api.post("/tokens", json={"kind": "admin", "name": "ui", "role": "viewer"})
        assert r.status_code == 201, r.text
        made = r.json()
    sid = _session_of(_login(a, made["token"]))
    assert _logged_in(b, sid) and _logged_in(a, sid)
    with b.api() as api:
        assert api.delete(f"/tokens/{made['id']}").status_code in (200, 204)
    assert not _logged_in(a, sid) and not _logged_in(b, sid)
    assert _session_rows(database_url) == []  # closed, not only refused


def test_failed_credentials_on_both_servers_count_towards_one_limit(
    start_server: Callable[..., Server],
) -> None:
    limit = 4
    a = start_server("--auth-failure-limit", str(limit))
    b = start_server("--auth-failure-limit", str(limit), port=free_port())
    wrong = a.admin_token[:-4] + ("aaaa" if not a.admin_token.endswith("aaaa") else "bbbb")

    # Bearer tokens: half the limit on each server, then both refuse, the right one too.
    for s in (a, b):
        for _ in range(limit // 2):
            with s.api(wrong) as api:
                assert api.get("/computers").status_code == 401
    for s in (a, b):
        refused = s.metric("taskfleet_auth_refused_total", 'kind="token"')
        with s.api() as api:
            r = api.get("/computers")
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) > 0
        assert s.metric("taskfleet_auth_refused_total", 'kind="token"') == refused + 1
    assert sum(s.metric("taskfleet_auth_failures_total", 'kind="token"') for s in (a, b)) == limit

    # Dashboard logins: their own limit, also counted once for both.
    for s in (a, b):
        for _ in range(DASHBOARD_LOGIN_LIMIT // 2):
            assert _login(s, wrong).status_code == 401
    for s in (a, b):
        r = _login(s, a.admin_token)
        assert r.status_code == 429 and "too many failed logins" in r.text
        assert "tf_session" not in r.cookies
