"""An agent's policy is checked as a schema, and an administrator can remove a computer.

A malformed policy (``"users": 5``) used to be stored and turn every later
``user`` request into a 500; a string (``"users": "root"``) matched substrings.
Now enrollment and the agent's info exchange refuse it (400, nothing stored),
and user names are compared exactly. ``DELETE /api/v1/computers/{id}`` (and
``taskfleet computer remove``) cancels the computer's open work, makes its
exchanges 401 at once, keeps its history readable and takes it out of lists
and targets. Real server process, agents simulated over HTTP.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import threading
from typing import Any

import httpx
import sqlalchemy as sa

from tests.conftest import BACKEND, Server, enroll_token, wait_until

ENROLL = "/agent/v1/enroll"
EXCHANGE = "/agent/v1/exchange"
ME = getpass.getuser()
OK_POLICY = {"scripts": True, "users": [ME, "root"], "types": ["execute-script"]}


def enroll(server: Server, token: str, name: str, policy: Any = None) -> httpx.Response:
    body = {
        "token": token,
        "hostname": name,
        "machine_id": f"machine-{name}",
        "policy": OK_POLICY if policy is None else policy,
    }
    return httpx.post(server.url + ENROLL, json=body, timeout=30)


def enrolled(server: Server, token: str, name: str) -> tuple[int, str]:
    r = enroll(server, token, name)
    assert r.status_code == 201, r.text
    return int(r.json()["computer_id"]), str(r.json()["secret"])


def exchange(server: Server, cid: int, secret: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        server.url + EXCHANGE,
        json=body,
        headers={"X-Taskfleet-Computer": str(cid), "Authorization": f"Bearer {secret}"},
        timeout=60,
    )


def api(server: Server, method: str, path: str, token: str | None = None, **kw: Any):
    with server.api(token) as c:
        return c.request(method, path, **kw)


def get(server: Server, path: str, **params: Any) -> Any:
    r = api(server, "GET", path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def request(server: Server, target: str, **params: Any) -> httpx.Response:
    return api(
        server,
        "POST",
        "/requests",
        json={"target": target, "params": {"argv": ["true"], **params}},
    )


def admin_token(server: Server, role: str) -> str:
    r = api(server, "POST", "/tokens", json={"kind": "admin", "name": role, "role": role})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def set_policy_in_database(server: Server, cid: int, policy_json: str) -> None:
    """What a server before the schema check may have stored."""
    url = server.database_url
    if BACKEND == "postgresql":
        url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE computers SET policy = :p WHERE id = :id"),
                {"p": policy_json, "id": cid},
            )
    finally:
        engine.dispose()


# -- the agent's policy -------------------------------------------------------------


BAD_POLICIES = [
    {"scripts": True, "users": 5},
    {"scripts": True, "users": "root"},
    {"scripts": True, "users": [5]},
    {"scripts": True, "users": [""]},
    {"scripts": True, "users": ["ro ot"]},
    {"scripts": "yes"},
    {"scripts": True, "types": "execute-script"},
    {"scripts": True, "admin": True},
]


def test_enrollment_with_a_malformed_policy_is_400_and_stores_nothing(server):
    token = enroll_token(server, max_uses=1)
    tokens_before = get(server, "/tokens")
    for policy in BAD_POLICIES:
        r = enroll(server, token, "box", policy)
        assert r.status_code == 400, (policy, r.text)
        assert r.json()["error"].startswith("invalid policy: "), r.text
    assert get(server, "/computers") == []
    assert get(server, "/tokens") == tokens_before  # no use of the one allowed enrollment
    cid, _ = enrolled(server, token, "box")
    (c,) = get(server, "/computers")
    assert c["id"] == cid and c["policy"] == {
        "scripts": True,
        "users": sorted({ME, "root"}),
        "types": ["execute-script"],
        "unsupported": {},
    }


def test_an_info_exchange_with_a_malformed_policy_is_400_and_changes_nothing(server):
    cid, secret = enrolled(server, enroll_token(server), "box")
    before = get(server, f"/computers/{cid}")
    for policy in BAD_POLICIES:
        agent = {"tickle_port": 4000, "version": "9", "policy": policy}
        r = exchange(server, cid, secret, {"ack": 0, "agent": agent})
        assert r.status_code == 400, (policy, r.text)
        assert "invalid policy" in r.json()["error"]
    after = get(server, f"/computers/{cid}")
    assert {k: after[k] for k in ("policy", "tickle_port", "agent_version")} == {
        k: before[k] for k in ("policy", "tickle_port", "agent_version")
    }
    good = {"tickle_port": 4000, "version": "9", "policy": {"scripts": True, "users": ["deploy"]}}
    assert exchange(server, cid, secret, {"ack": 0, "agent": good}).status_code == 200
    assert get(server, f"/computers/{cid}")["policy"]["users"] == ["deploy"]


def test_script_users_are_compared_exactly_even_in_a_policy_stored_before_the_check(server):
    cid, _ = enrolled(server, enroll_token(server), "box")
    r = request(server, f"computer:{cid}", user="oo")  # a substring of "root"
    assert r.status_code == 409, r.text
    assert "user 'oo' is not in its allowed script users" in r.json()["error"]
    assert request(server, f"computer:{cid}", user="root").status_code == 201

    # Policies a server without the check stored: a clear refusal, never a 500.
    requests_before = get(server, "/requests")
    for stored in ('{"scripts": true, "users": "root"}', '{"scripts": true, "users": 5}'):
        set_policy_in_database(server, cid, stored)
        for user in ("oo", "root"):
            r = request(server, f"computer:{cid}", user=user)
            assert r.status_code == 409, (stored, user, r.text)
            assert f"user {user!r} is not in its allowed script users" in r.json()["error"]
    assert get(server, "/requests") == requests_before  # refused: nothing created
    # ... and that computer can still be removed.
    r = api(server, "DELETE", f"/computers/{cid}")
    assert r.status_code == 200, r.text
    assert len(r.json()["canceled"]) == 1  # the "root" request of before


# -- removal ---------------------------------------------------------------------------


def result(seq: int, op: int) -> dict[str, Any]:
    return {
        "seq": seq,
        "type": "operation-result",
        "op": op,
        "status": "succeeded",
        "exit_code": 0,
        "stdout": "ok\n",
        "stderr": "",
        "result_line": "done",
    }


def test_removing_a_computer_cancels_its_work_keeps_its_history_and_locks_it_out(server):
    token = enroll_token(server)
    a, secret = enrolled(server, token, "a")
    b, _ = enrolled(server, token, "b")
    assert api(server, "POST", "/groups", json={"name": "web"}).status_code == 201
    r = api(server, "POST", "/groups/web/members", json={"computer_ids": [a, b]})
    assert r.status_code == 200, r.text
    r = api(server, "PUT", f"/computers/{a}/tags", json={"key": "role", "value": "db"})
    assert r.status_code == 200, r.text
    # History: one finished, one In Progress, one Queued.
    assert request(server, f"computer:{a}").status_code == 201
    (m1,) = exchange(server, a, secret, {"ack": 0}).json()["messages"]
    assert exchange(server, a, secret, {"ack": 1, "messages": [result(1, m1["op"])]}).is_success
    assert request(server, f"computer:{a}").status_code == 201
    (m2,) = exchange(server, a, secret, {"ack": 1}).json()["messages"]
    assert request(server, f"computer:{a}").status_code == 201
    (queued,) = get(server, "/activities", computer_id=a, state="queued")
    done, running = m1["op"], m2["op"]
    assert get(server, f"/activities/{running}")["state"] == "in_progress"

    for role in ("viewer", "operator"):  # SPEC 7: removal is the admin's
        r = api(server, "DELETE", f"/computers/{a}", token=admin_token(server, role))
        assert r.status_code == 403, r.text
    assert [c["id"] for c in get(server, "/computers")] == [a, b]

    r = api(server, "DELETE", f"/computers/{a}")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == a and out["hostname"] == "a" and out["removed_at"]
    assert sorted(out["canceled"]) == sorted([running, queued["id"]])

    for aid in (running, queued["id"]):
        act = get(server, f"/activities/{aid}")
        assert act["state"] == "canceled"
        assert act["reason"] == f"computer {a} (a) was removed from the fleet"
        last = act["history"][-1]
        assert (last["to_state"], last["cause"], last["actor"]) == ("canceled", "admin", "token:1")
    history = get(server, f"/activities/{done}")
    assert history["state"] == "succeeded" and history["stdout"] == "ok\n"
    assert history["hostname"] == "a"
    assert len(get(server, "/activities", computer_id=a)) == 3
    shown = get(server, f"/computers/{a}")
    assert shown["removed_at"] == out["removed_at"] and len(shown["activities"]) == 3

    # Out of lists and targets, locked out of exchanges.
    assert [c["id"] for c in get(server, "/computers")] == [b]
    r = exchange(server, a, secret, {"ack": 2})
    assert r.status_code == 401, r.text
    r = request(server, "all")
    assert r.status_code == 201 and r.json()["total"] == 1
    assert [x["computer_id"] for x in get(server, "/activities", request_id=r.json()["id"])] == [b]
    r = request(server, "group:web")
    assert r.status_code == 201 and r.json()["total"] == 1
    r = request(server, f"computer:{a}")
    assert r.status_code == 404 and r.json()["error"] == f"removed computer(s): {a}"
    assert request(server, "tag:role=db").status_code == 404
    for method, path, body in (
        ("PUT", f"/computers/{a}/tags", {"key": "k", "value": "v"}),
        ("POST", "/groups/web/members", {"computer_ids": [a]}),
    ):
        r = api(server, method, path, json=body)
        assert r.status_code == 404, r.text
    r = api(server, "DELETE", f"/computers/{a}")
    assert r.status_code == 409 and "already removed" in r.json()["error"]
    assert api(server, "DELETE", "/computers/99999").status_code == 404
    (entry,) = [e for e in get(server, "/audit") if e["action"] == "computer.remove"]
    assert entry["detail"] == {"computer_id": a, "hostname": "a", "canceled": 2}

    # A restart does not bring it back ...
    server.restart()
    assert exchange(server, a, secret, {"ack": 2}).status_code == 401
    assert [c["id"] for c in get(server, "/computers")] == [b]
    # ... enrolling the machine again does, under its old id.
    r = enroll(server, token, "a")
    assert r.status_code == 201 and r.json()["computer_id"] == a and r.json()["reenrolled"]
    assert [c["id"] for c in get(server, "/computers")] == [a, b]
    assert get(server, f"/computers/{a}")["removed_at"] is None


def test_a_long_poll_held_by_a_removed_computer_ends_with_401(server):
    cid, secret = enrolled(server, enroll_token(server), "idle")
    assert exchange(server, cid, secret, {"ack": 0}).status_code == 200
    answers: list[httpx.Response] = []
    poll = threading.Thread(
        target=lambda: answers.append(exchange(server, cid, secret, {"ack": 0, "wait": 50}))
    )
    poll.start()
    # The long poll is held once the server counts the exchange and has not answered.
    wait_until(lambda: server.metric("taskfleet_exchanges_total", 'path="fast"') >= 1, 10)
    assert api(server, "DELETE", f"/computers/{cid}").status_code == 200
    poll.join(20)
    assert not poll.is_alive(), "the long poll was not released"
    (r,) = answers
    assert r.status_code == 401, r.text


# -- the CLI ------------------------------------------------------------------------------


def tf(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TASKFLEET_SERVER": server.url, "TASKFLEET_TOKEN": server.admin_token}
    return subprocess.run(
        [sys.executable, "-m", "taskfleet", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_cli_computer_remove_asks_for_yes_then_removes(server):
    token = enroll_token(server)
    a, _ = enrolled(server, token, "a")
    b, _ = enrolled(server, token, "b")
    assert request(server, f"computer:{a}").status_code == 201
    out = tf(server, "computer", "remove", str(a))
    assert out.returncode == 2
    assert f"this removes computer {a}; add --yes" in out.stderr
    assert [c["id"] for c in get(server, "/computers")] == [a, b]
    out = tf(server, "computer", "remove", str(a), "--yes")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"computer {a} (a) removed; 1 open activities canceled"
    listed = tf(server, "computer", "list")
    assert listed.returncode == 0 and " a " not in listed.stdout and " b " in listed.stdout
    out = tf(server, "computer", "remove", str(a), "--yes")
    assert out.returncode == 2 and "already removed" in out.stderr
    # The archive: removed computers are listed apart, their records kept.
    archived = tf(server, "computer", "list", "--removed")
    assert archived.returncode == 0 and "removed computers" in archived.stdout
    assert " a " in archived.stdout and " b " not in archived.stdout
    assert [c["id"] for c in get(server, "/computers", removed="true")] == [a]
    assert get(server, "/computers", removed="true")[0]["removed_at"] is not None
