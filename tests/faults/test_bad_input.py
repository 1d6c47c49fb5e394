"""Bad input on every door of a real server: a clear error, and nothing changes.

Each test sends something wrong (a bad token, a malformed exchange, a forged
tickle, an impossible request) and checks both halves of the contract: the
answer names the problem, and the state read back afterwards (requests,
activities and their history, computers, groups, tags, audit log) is exactly
what it was before. Agents are simulated with raw HTTP where the test needs
to say things a real agent never would.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import struct
import time
from typing import Any

import httpx
import pytest

from tests.conftest import Agent, Server, enroll_token, request_done, wait_until
from tests.raw_agent import (
    MIB,
    activity,
    admin_token,
    computer_ids,
    enroll_raw,
    enrolled,
    error_of,
    exchange,
    get,
    queued_request_for,
    result_msg,
    snapshot,
)

# -- 1. admin API authentication and roles -------------------------------------


def test_admin_api_without_or_with_a_wrong_token_is_401_and_changes_nothing(server):
    enroll_only = enroll_token(server)
    before = snapshot(server)
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer tfa_not-a-real-token"},
        {"Authorization": f"Basic {server.admin_token}"},
        {"Authorization": "Bearer"},
        {"Authorization": server.admin_token},  # no scheme
        {"Authorization": f"Bearer {enroll_only}"},  # an enrollment token is no API token
    ]
    for headers in bad_headers:
        with httpx.Client(base_url=server.url + "/api/v1", headers=headers, timeout=30) as api:
            r = api.post("/groups", json={"name": "web"})
            assert r.status_code == 401, (headers, r.text)
            assert "token" in error_of(r)
            r = api.post("/tokens", json={"kind": "admin", "name": "x", "role": "admin"})
            assert r.status_code == 401, (headers, r.text)
            assert api.get("/requests").status_code == 401
    with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as api:
        assert "missing bearer token" in error_of(api.get("/whoami"))
    assert snapshot(server) == before


def test_revoked_token_is_refused_401(server):
    tok = admin_token(server, "operator")
    with server.api(tok["token"]) as api:
        assert api.get("/whoami").json()["role"] == "operator"
    with server.api() as api:
        assert api.delete(f"/tokens/{tok['id']}").status_code == 204
        r = api.delete("/tokens/99999")
        assert r.status_code == 404
        assert "no token 99999" in error_of(r)
    before = snapshot(server)
    with server.api(tok["token"]) as api:
        r = api.get("/whoami")
        assert r.status_code == 401
        assert error_of(r) == "invalid, expired or revoked token"
        assert api.post("/groups", json={"name": "web"}).status_code == 401
    assert snapshot(server) == before


def test_expired_token_is_refused_401_once_its_time_is_up(server):
    tok = admin_token(server, "viewer", expires_in=2.0)
    with server.api(tok["token"]) as api:
        assert api.get("/whoami").status_code == 200  # it worked until it expired

        def refused() -> httpx.Response | None:
            r = api.get("/whoami")
            return r if r.status_code == 401 else None

        r = wait_until(refused, 10, "the token to expire")
    assert error_of(r) == "invalid, expired or revoked token"


def test_viewer_cannot_create_a_request_and_is_told_the_role_it_needs(server):
    cid, _ = enrolled(server, enroll_token(server), "a")
    viewer = admin_token(server, "viewer")["token"]
    before = snapshot(server)
    with server.api(viewer) as api:
        r = api.post("/requests", json={"target": f"computer:{cid}", "params": {"argv": ["true"]}})
        assert r.status_code == 403, r.text
        assert error_of(r) == "this needs the operator role; the token has viewer"
        r = api.post("/groups", json={"name": "web"})
        assert r.status_code == 403
        assert api.get("/requests").json() == []  # but it may read
    assert snapshot(server) == before


def test_operator_cannot_create_a_token_but_can_create_a_request(server):
    cid, _ = enrolled(server, enroll_token(server), "a")
    operator = admin_token(server, "operator")["token"]
    before = snapshot(server)
    with server.api(operator) as api:
        for kind, role in (("admin", "admin"), ("admin", "viewer"), ("enroll", None)):
            r = api.post("/tokens", json={"kind": kind, "name": "sneaky", "role": role})
            assert r.status_code == 403, r.text
            assert error_of(r) == "this needs the admin role; the token has operator"
        assert api.get("/audit").status_code == 403
    assert snapshot(server) == before
    with server.api(operator) as api:
        r = api.post("/requests", json={"target": f"computer:{cid}", "params": {"argv": ["true"]}})
        assert r.status_code == 201, r.text
        assert r.json()["created_by"].startswith("token:")
    assert len(get(server, "/requests")) == 1


def test_invalid_token_creation_is_refused_400_and_creates_no_token(server):
    before = snapshot(server)
    cases = [
        ({"kind": "root", "name": "x"}, 400, "kind must be admin, enroll or relay"),
        ({"kind": "relay", "name": "x", "role": "admin"}, 400, "enrollment tokens have no role"),
        ({"kind": "relay", "name": "x", "max_uses": 3}, 400, "max_uses"),
        ({"kind": "relay", "name": "x", "group": "web"}, 400, "group is for agent"),
        ({"kind": "admin", "name": "x", "role": "god"}, 400, "role must be one of"),
        ({"kind": "admin", "name": "x"}, 400, "role must be one of"),
        ({"kind": "enroll", "name": "x", "role": "admin"}, 400, "enrollment tokens have no role"),
        ({"kind": "admin", "name": "", "role": "viewer"}, 400, "name must be 1..128"),
        ({"kind": "admin", "name": "x", "role": "viewer", "expires_in": 0}, 400, "expires_in"),
        ({"kind": "admin", "name": "x", "role": "viewer", "expires_in": -5}, 400, "expires_in"),
        ({"kind": "enroll", "name": "x", "max_uses": 0}, 400, "max_uses"),
        ({"kind": "admin", "name": "x", "role": "viewer", "max_uses": 3}, 400, "max_uses"),
        ({"kind": "enroll", "name": "x", "group": "nope"}, 404, "unknown group 'nope'"),
    ]
    with server.api() as api:
        for body, status, message in cases:
            r = api.post("/tokens", json=body)
            assert r.status_code == status, (body, r.text)
            assert message in error_of(r), (body, r.text)
    assert snapshot(server) == before


# -- 2. enrollment -------------------------------------------------------------


def test_enrollment_with_a_wrong_admin_or_revoked_token_is_401_and_enrolls_nothing(server):
    revoked = enroll_token(server)
    with server.api() as api:
        rid = next(t["id"] for t in api.get("/tokens").json() if t["kind"] == "enroll")
        assert api.delete(f"/tokens/{rid}").status_code == 204
    before = snapshot(server)
    for token in ("tfe_wrong", "", server.admin_token, revoked):
        r = enroll_raw(server, token, "intruder")
        assert r.status_code == 401, (token, r.text)
        assert error_of(r) == "invalid enrollment token"
    assert snapshot(server) == before
    assert computer_ids(server) == []


def test_used_up_enrollment_token_refuses_a_second_machine(server):
    token = enroll_token(server, max_uses=1)
    first, _ = enrolled(server, token, "first")
    before = snapshot(server)
    r = enroll_raw(server, token, "second")
    assert r.status_code == 401, r.text
    assert error_of(r) == "enrollment token used up"
    assert computer_ids(server) == [first]
    assert snapshot(server) == before


def test_expired_enrollment_token_is_401_and_enrolls_nothing(server):
    token = enroll_token(server, expires_in=0.3)
    (row,) = get(server, "/tokens")[1:]
    assert row["kind"] == "enroll" and row["expires_at"]
    # The server's clock is this machine's clock: wait until it is past the expiry.
    wait_until(lambda: time.time() > row["expires_at"] + 0.05, 5, "the expiry time")
    before = snapshot(server)
    r = enroll_raw(server, token, "late")
    assert r.status_code == 401, r.text
    assert error_of(r) == "enrollment token expired"
    assert snapshot(server) == before
    assert computer_ids(server) == []


def test_enrollment_without_hostname_or_machine_id_is_400_and_uses_up_nothing(server):
    token = enroll_token(server, max_uses=1)
    before = snapshot(server)
    for extra in ({"hostname": ""}, {"machine_id": ""}, {"hostname": "h" * 256}):
        r = enroll_raw(server, token, "box", **extra)
        assert r.status_code == 400, (extra, r.text)
        assert "hostname (1..255) and machine_id (1..128) are required" in error_of(r)
    assert snapshot(server) == before  # uses_left is still 1 ...
    enrolled(server, token, "box")  # ... so the one allowed enrollment still works


def test_enrollment_with_an_out_of_range_tickle_port_is_400_and_enrolls_nothing(server):
    token = enroll_token(server)
    for port in (-1, 0, 65536, 70000):
        r = enroll_raw(server, token, f"port{port}", tickle_port=port)
        assert r.status_code == 400, (port, r.status_code, r.text)
        assert "tickle_port" in error_of(r)
    assert computer_ids(server) == []


# -- 3. the exchange endpoint ----------------------------------------------------


@pytest.fixture
def delivered(server):
    """Computer A (raw) holding one delivered, in-progress operation."""
    token = enroll_token(server)
    cid, secret = enrolled(server, token, "a")
    _, aid = queued_request_for(server, cid)
    r = exchange(server, cid, secret, {"ack": 0})
    assert r.status_code == 200, r.text
    (msg,) = r.json()["messages"]
    assert msg["op"] == aid and msg["type"] == "operation"
    assert activity(server, aid)["state"] == "in_progress"
    return server, token, cid, secret, aid, int(msg["seq"])


def test_exchange_without_valid_credentials_is_401_and_changes_nothing(delivered):
    server, token, cid, secret, aid, seq = delivered
    _, other_secret = enrolled(server, token, "b")
    body = {"ack": seq, "messages": [result_msg(1, aid)]}
    before = snapshot(server)
    refused = server.metric("taskfleet_exchange_errors_total", 'reason="auth"')
    cases: list[tuple[Any, Any, str]] = [
        (None, None, "missing or malformed X-Taskfleet-Computer header"),
        (None, secret, "missing or malformed X-Taskfleet-Computer header"),
        ("abc", secret, "missing or malformed X-Taskfleet-Computer header"),
        (cid, None, "unknown computer or wrong secret"),
        (cid, "tfc_wrong", "unknown computer or wrong secret"),
        (cid, other_secret, "unknown computer or wrong secret"),
        (99999, secret, "unknown computer or wrong secret"),
    ]
    for c, s, message in cases:
        r = exchange(server, c, s, body)
        assert r.status_code == 401, (c, s, r.text)
        assert error_of(r) == message
    assert server.metric("taskfleet_exchange_errors_total", 'reason="auth"') == refused + len(cases)
    assert activity(server, aid)["state"] == "in_progress"
    assert snapshot(server) == before


def test_malformed_or_invalid_exchange_is_400_and_applies_nothing(delivered):
    server, _, cid, secret, aid, seq = delivered
    good = result_msg(1, aid)
    valid = json.dumps({"ack": seq, "messages": [good]}).encode()
    before = activity(server, aid)
    snap = snapshot(server)
    cases: list[tuple[bytes, str]] = [
        (b"this is not json", "bad exchange:"),
        (b"", "bad exchange:"),
        (valid[: len(valid) // 2], "bad exchange:"),  # a truncated body
        (json.dumps([{"ack": seq, "messages": [good]}]).encode(), "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (json.dumps({"messages": [good]}).encode(), "'ack' must be an integer >= 0"),
        (json.dumps({"ack": str(seq), "messages": [good]}).encode(), "'ack' must be an integer"),
        (json.dumps({"ack": -1, "messages": [good]}).encode(), "'ack' must be an integer >= 0"),
        (json.dumps({"ack": True, "messages": [good]}).encode(), "'ack' must be an integer"),
        (json.dumps({"ack": seq, "messages": good}).encode(), "'messages' must be a list"),
        (json.dumps({"ack": seq, "messages": [good, 7]}).encode(), "message 1 must be an object"),
        (
            json.dumps({"ack": seq, "messages": [{**good, "seq": "1"}]}).encode(),
            "message 0: 'seq' must be an integer >= 1",
        ),
        (
            json.dumps({"ack": seq, "messages": [{**good, "op": None}]}).encode(),
            "message 0: 'op' must be an integer >= 1",
        ),
        (
            json.dumps({"ack": seq, "messages": [{**good, "exit_code": "0"}]}).encode(),
            "'exit_code' must be an integer or null",
        ),
        (
            json.dumps({"ack": seq, "messages": [{**good, "stdout": 5}]}).encode(),
            "'stdout' must be a string",
        ),
        (
            json.dumps({"ack": seq, "messages": [{**good, "status": "done"}]}).encode(),
            "'status' must be one of",
        ),
        (
            json.dumps({"ack": seq, "messages": [{**good, "started_at": "now"}]}).encode(),
            "'started_at' must be a number",
        ),
        (
            json.dumps({"ack": seq, "messages": [{**good, "result_line": "r" * 2001}]}).encode(),
            "'result_line' is 2001 characters, the limit is 2000",
        ),
        (
            json.dumps({"ack": seq, "messages": [{**good, "type": "operation-reslt"}]}).encode(),
            "message 0: unknown type 'operation-reslt'",
        ),
        (
            json.dumps({"ack": seq, "messages": [{**good, "type": "operation"}]}).encode(),
            "message 0: unknown type 'operation'",
        ),
        (
            json.dumps({"ack": seq, "messages": [good, good]}).encode(),
            "message 1: sequence numbers must increase",
        ),
        (
            json.dumps({"ack": seq, "messages": [good], "agent": "v1"}).encode(),
            "'agent' must be an object",
        ),
        (
            json.dumps({"ack": seq, "messages": [good], "agent": {"tickle_port": 0}}).encode(),
            "'tickle_port' must be 1..65535",
        ),
        (
            json.dumps({"ack": seq, "messages": [good], "wait": 301}).encode(),
            "'wait' must be 0..300 seconds",
        ),
        (
            json.dumps({"ack": seq + 5, "messages": [good]}).encode(),
            f"ack {seq + 5} is beyond the last message sent ({seq})",
        ),
        (
            json.dumps(
                {"ack": seq, "messages": [result_msg(i, aid) for i in range(1, 502)]}
            ).encode(),
            "501 messages, the limit is 500",
        ),
    ]
    for content, message in cases:
        r = exchange(server, cid, secret, content=content)
        assert r.status_code == 400, (content[:80], r.status_code, r.text)
        assert message in error_of(r), (content[:80], r.text)
        assert activity(server, aid) == before, content[:80]
    assert snapshot(server) == snap
    # The same result, well formed, is accepted: the refusals were about the form alone.
    r = exchange(server, cid, secret, content=valid)
    assert r.status_code == 200, r.text
    assert r.json()["ack"] == 1
    assert activity(server, aid)["state"] == "succeeded"


def test_oversized_exchange_body_is_413_and_applies_nothing(delivered):
    server, _, cid, secret, aid, seq = delivered
    valid = json.dumps({"ack": seq, "messages": [result_msg(1, aid)]}).encode()
    padded = valid + b" " * (4 * MIB)  # still valid JSON, only too big
    before = activity(server, aid)
    r = exchange(server, cid, secret, content=padded)
    assert r.status_code == 413, r.text
    assert error_of(r) == f"exchange body over {4 * MIB} bytes"

    def chunks():  # no Content-Length: the server must count as it reads
        yield valid
        for _ in range(5):
            yield b" " * MIB

    r = exchange(server, cid, secret, content=chunks())
    assert r.status_code == 413, r.text
    assert activity(server, aid) == before
    assert server.metric("taskfleet_exchange_errors_total", 'reason="too-large"') == 2
    r = exchange(server, cid, secret, content=valid)
    assert r.status_code == 200, r.text
    assert activity(server, aid)["state"] == "succeeded"


def test_result_for_another_computers_operation_is_400_and_changes_nothing(server):
    token = enroll_token(server)
    a, a_secret = enrolled(server, token, "a")
    b, b_secret = enrolled(server, token, "b")
    _, op = queued_request_for(server, a)
    r = exchange(server, a, a_secret, {"ack": 0})
    assert r.status_code == 200, r.text
    (msg,) = r.json()["messages"]
    assert msg["op"] == op
    seq = msg["seq"]
    before = activity(server, op)
    assert before["state"] == "in_progress"
    snap = snapshot(server)

    r = exchange(server, b, b_secret, {"ack": 0, "messages": [result_msg(1, op, "forged")]})
    assert r.status_code == 400, r.text
    assert error_of(r) == f"bad exchange: operation {op} does not belong to this computer"
    assert activity(server, op) == before
    assert snapshot(server) == snap
    # B is not broken by it: its next ordinary exchange is fine and carries nothing.
    r = exchange(server, b, b_secret, {"ack": 0})
    assert r.status_code == 200 and r.json()["messages"] == []

    # A's own result is recorded exactly once, even when it is sent twice.
    mine = {"ack": seq, "messages": [result_msg(1, op, "done by a")]}
    for _ in range(2):
        r = exchange(server, a, a_secret, mine)
        assert r.status_code == 200, r.text
        assert r.json()["ack"] == 1
    got = activity(server, op)
    assert got["state"] == "succeeded"
    assert got["result_line"] == "done by a"
    assert got["agent_report"] is None
    assert [(h["from_state"], h["to_state"], h["cause"]) for h in got["history"]] == [
        (None, "queued", "created"),
        ("queued", "in_progress", "delivered"),
        ("in_progress", "succeeded", "agent-report"),
    ]
    assert got["history"][-1]["actor"] == f"computer:{a}"


def test_result_for_an_operation_never_delivered_is_400_and_consumes_no_sequence(server):
    token = enroll_token(server)
    cid, secret = enrolled(server, token, "a")
    _, op = queued_request_for(server, cid)
    before = activity(server, op)
    r = exchange(server, cid, secret, {"ack": 0, "messages": [result_msg(1, op)]})
    assert r.status_code == 400, r.text
    assert error_of(r) == f"bad exchange: operation {op} was never delivered (state Queued)"
    assert activity(server, op) == before
    # Refused whole: the operation is still handed out, and seq 1 is still unused.
    r = exchange(server, cid, secret, {"ack": 0})
    (msg,) = r.json()["messages"]
    assert msg["op"] == op
    r = exchange(server, cid, secret, {"ack": msg["seq"], "messages": [result_msg(1, op)]})
    assert r.status_code == 200 and r.json()["ack"] == 1
    assert activity(server, op)["state"] == "succeeded"


def test_lost_response_resends_the_same_operation_and_delivers_it_once(server):
    cid, secret = enrolled(server, enroll_token(server), "a")
    _, op = queued_request_for(server, cid)
    first = exchange(server, cid, secret, {"ack": 0})
    again = exchange(server, cid, secret, {"ack": 0})  # as if the first answer was lost
    assert first.status_code == again.status_code == 200
    (m1,) = first.json()["messages"]
    (m2,) = again.json()["messages"]
    assert (m1["seq"], m1["op"], m1["type"]) == (1, op, "operation")
    assert m2 == m1  # the very same message: same seq, same op, same signed body
    history = activity(server, op)["history"]
    assert [h["cause"] for h in history] == ["created", "delivered"]
    # Once acknowledged it is not sent again.
    r = exchange(server, cid, secret, {"ack": 1})
    assert r.status_code == 200 and r.json()["messages"] == []
    assert [h["cause"] for h in activity(server, op)["history"]] == ["created", "delivered"]


# -- 4. tickles ----------------------------------------------------------------


def _identity(agent: Agent) -> tuple[int, bytes]:
    db = sqlite3.connect(agent.state_dir / "state.db")
    try:
        (raw,) = db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
    finally:
        db.close()
    ident = json.loads(raw)
    return int(ident["computer_id"]), bytes.fromhex(ident["tickle_key"])


def _exchanges(server: Server) -> float:
    return server.metric("taskfleet_exchanges_total", 'path="fast"') + server.metric(
        "taskfleet_exchanges_total", 'path="slow"'
    )


def _drop_lines(agent: Agent, reason: str) -> int:
    return agent.proc.text().count(f"tickle dropped ({reason}) from 127.0.0.1")


def _send_until_dropped(agent: Agent, reason: str, datagram: Any) -> None:
    """Send (again and again: the agent logs at most one drop a second) until it logs the drop."""
    seen = _drop_lines(agent, reason)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:

        def logged() -> bool:
            data = datagram() if callable(datagram) else datagram
            sock.sendto(data, ("127.0.0.1", agent.tickle_port))
            return _drop_lines(agent, reason) > seen

        wait_until(logged, 5, f"the agent to log a {reason} drop")


def _ready(server: Server) -> float:
    # The agent's start-up exchange has been answered; it stays idle after that.
    return wait_until(
        lambda: server.metric("taskfleet_exchanges_total", 'path="fast"'), 10, "first exchange"
    )


def test_forged_wrong_key_misaddressed_and_stale_tickles_are_dropped_with_their_reason(
    server, start_agent
):
    from taskfleet.protocol.tickle import encode_tickle

    agent = start_agent(server, enroll_token(server))
    cid, key = _identity(agent)
    _ready(server)
    exchanges = _exchanges(server)

    def forged_mac() -> bytes:
        header = struct.pack(">2sBQQ12s", b"TF", 1, cid, int(time.time() * 1000), os.urandom(12))
        return header + os.urandom(16)

    _send_until_dropped(agent, "malformed", lambda: os.urandom(47))
    _send_until_dropped(agent, "malformed", b"TF\x01short")
    _send_until_dropped(agent, "bad-mac", forged_mac)
    _send_until_dropped(agent, "bad-mac", lambda: encode_tickle(os.urandom(32), cid, time.time()))
    _send_until_dropped(agent, "wrong-computer", lambda: encode_tickle(key, cid + 1, time.time()))
    _send_until_dropped(agent, "stale", lambda: encode_tickle(key, cid, time.time() - 3600))
    _send_until_dropped(agent, "stale", lambda: encode_tickle(key, cid, time.time() + 3600))
    # Not one of them woke the agent.
    assert _exchanges(server) == exchanges
    assert agent.proc.alive()


def test_valid_tickle_makes_the_agent_exchange_and_its_replay_is_dropped(server, start_agent):
    from taskfleet.protocol.tickle import encode_tickle

    agent = start_agent(server, enroll_token(server))
    cid, key = _identity(agent)
    fast = _ready(server)
    tickle = encode_tickle(key, cid, time.time())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(tickle, ("127.0.0.1", agent.tickle_port))
    wait_until(
        lambda: server.metric("taskfleet_exchanges_total", 'path="fast"') > fast,
        10,
        "the tickled agent to exchange",
    )
    after = _exchanges(server)
    _send_until_dropped(agent, "replayed", tickle)
    assert _exchanges(server) == after


# -- 5. requests -------------------------------------------------------------------


def test_request_with_a_bad_target_params_timeout_or_type_is_refused_and_creates_nothing(
    server,
):
    cid, _ = enrolled(server, enroll_token(server), "a")
    with server.api() as api:
        assert api.post("/groups", json={"name": "web"}).status_code == 201
        assert api.post("/groups/web/members", json={"computer_ids": [cid]}).status_code == 200
        assert api.post("/groups", json={"name": "empty"}).status_code == 201
        r = api.put(f"/computers/{cid}/tags", json={"key": "role", "value": "db"})
        assert r.status_code == 200
    ok = {"argv": ["true"]}
    me = f"computer:{cid}"
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"target": "group:nope", "params": ok}, 404, "unknown group 'nope'"),
        ({"target": "tag:role=nope", "params": ok}, 404, "no computer has tag role=nope"),
        ({"target": "tag:nokey=db", "params": ok}, 404, "no computer has tag nokey=db"),
        ({"target": "group:empty", "params": ok}, 400, "group 'empty' is empty"),
        ({"target": "", "params": ok}, 400, "invalid target ''"),
        ({"target": "nope", "params": ok}, 400, "invalid target 'nope'"),
        ({"target": "group:", "params": ok}, 400, "invalid target 'group:'"),
        ({"target": "tag:role", "params": ok}, 400, "invalid tag target 'tag:role'"),
        ({"target": "computer:abc", "params": ok}, 400, "invalid computer id list 'abc'"),
        ({"target": "computer:0", "params": ok}, 400, "invalid computer id list '0'"),
        ({"target": f"{me},{cid}", "params": ok}, 400, "positive, no repeats"),
        ({"target": "computer:99999", "params": ok}, 404, "unknown computer(s): 99999"),
        ({"target": f"{me},99999", "params": ok}, 404, "unknown computer(s): 99999"),
        ({"target": "planet:earth", "params": ok}, 400, "invalid target kind 'planet'"),
        (
            {"target": me, "params": {"argv": ["true"], "script": "true"}},
            400,
            "give exactly one of argv (a command) or script (a script text)",
        ),
        ({"target": me, "params": {}}, 400, "give exactly one of argv"),
        (
            {"target": me, "params": {"argv": ["true"], "shell": "bash"}},
            400,
            "unknown script parameter(s): shell",
        ),
        ({"target": me, "params": {"argv": []}}, 400, "argv must be a non-empty list"),
        ({"target": me, "params": {"argv": "true"}}, 400, "argv must be a non-empty list"),
        ({"target": me, "params": {"script": "  "}}, 400, "script must be a non-empty text"),
        ({"target": me, "params": {**ok, "env": {"A": 1}}}, 400, "env must map variable"),
        ({"target": me, "params": {**ok, "cwd": ""}}, 400, "cwd must be a non-empty string"),
        (
            {"target": me, "params": {**ok, "output_cap": MIB + 1}},
            400,
            f"output_cap must be 0..{MIB} bytes",
        ),
        ({"target": me, "params": {**ok, "output_cap": -1}}, 400, "output_cap must be"),
        ({"target": me, "params": ok, "timeout": 0}, 400, "timeout must be a number of seconds"),
        ({"target": me, "params": ok, "timeout": -5}, 400, "timeout must be a number of seconds"),
        ({"target": me, "params": ok, "timeout": 7 * 86400 + 1}, 400, "timeout must be"),
        (
            {"target": me, "params": ok, "type": "reboot"},
            400,
            "unknown activity type 'reboot' (known: execute-script, job, user-create",
        ),
        (
            {"target": me, "params": {**ok, "user": "someone-else"}},
            409,
            "user 'someone-else' is not in its allowed script users",
        ),
    ]
    before = snapshot(server)
    with server.api() as api:
        for body, status, message in cases:
            r = api.post("/requests", json=body)
            assert r.status_code == status, (body, r.text)
            assert message in error_of(r), (body, r.text)
            assert api.get("/requests").json() == [], body
    assert snapshot(server) == before
    assert get(server, "/activities") == []
    # The same target and parameters, done right, work: the setup was not the problem.
    with server.api() as api:
        assert api.post("/requests", json={"target": "group:web", "params": ok}).status_code == 201


# -- 6. groups and tags --------------------------------------------------------------


def test_duplicate_or_invalid_group_is_refused_and_groups_unchanged(server):
    with server.api() as api:
        assert api.post("/groups", json={"name": "web"}).status_code == 201
    before = snapshot(server)
    with server.api() as api:
        r = api.post("/groups", json={"name": "web"})
        assert r.status_code == 409
        assert error_of(r) == "group 'web' already exists"
        for name in ("", "bad name", "-dash", "a/b", "x" * 65, "web!"):
            r = api.post("/groups", json={"name": name})
            assert r.status_code == 400, (name, r.text)
            assert f"invalid group name {name!r}" in error_of(r)
        r = api.delete("/groups/nope")
        assert r.status_code == 404
        assert error_of(r) == "unknown group 'nope'"
    assert snapshot(server) == before
    assert get(server, "/groups") == [{"name": "web", "size": 0}]


def test_adding_an_unknown_computer_to_a_group_is_404_and_membership_unchanged(server):
    token = enroll_token(server)
    a, _ = enrolled(server, token, "a")
    b, _ = enrolled(server, token, "b")
    with server.api() as api:
        assert api.post("/groups", json={"name": "web"}).status_code == 201
        assert api.post("/groups/web/members", json={"computer_ids": [a]}).status_code == 200
    before = snapshot(server)
    with server.api() as api:
        for ids in ([99999], [b, 99999], [99999, b, 88888]):
            r = api.post("/groups/web/members", json={"computer_ids": ids})
            assert r.status_code == 404, (ids, r.text)
            assert "unknown computer(s): " in error_of(r) and "99999" in error_of(r)
        r = api.post("/groups/web/members/remove", json={"computer_ids": [a, 99999]})
        assert r.status_code == 404
        r = api.post("/groups/nope/members", json={"computer_ids": [b]})
        assert r.status_code == 404
        assert error_of(r) == "unknown group 'nope'"
        r = api.post("/groups/web/members", json={"computer_ids": []})
        assert r.status_code == 400
        assert error_of(r) == "no computer ids given"
    assert snapshot(server) == before
    assert {c["id"]: c["groups"] for c in get(server, "/computers")} == {a: ["web"], b: []}


def test_adding_the_same_computer_twice_in_one_call_is_not_a_server_error(server):
    a, _ = enrolled(server, enroll_token(server), "a")
    with server.api() as api:
        assert api.post("/groups", json={"name": "web"}).status_code == 201
    before = snapshot(server)
    with server.api() as api:
        r = api.post("/groups/web/members", json={"computer_ids": [a, a]})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:  # refused like "computer:1,1" is: clear error, nothing changed
        assert error_of(r)
        assert snapshot(server) == before
    else:  # or taken as meaning "a": a member exactly once
        assert get(server, "/groups") == [{"name": "web", "size": 1}]


def test_removing_a_tag_that_does_not_exist_is_404_and_tags_unchanged(server):
    cid, _ = enrolled(server, enroll_token(server), "a")
    with server.api() as api:
        r = api.put(f"/computers/{cid}/tags", json={"key": "env", "value": "prod"})
        assert r.status_code == 200
    before = snapshot(server)
    with server.api() as api:
        r = api.delete(f"/computers/{cid}/tags/role")
        assert r.status_code == 404
        assert error_of(r) == f"computer {cid} has no tag 'role'"
        r = api.delete("/computers/99999/tags/env")
        assert r.status_code == 404
        assert error_of(r) == "unknown computer(s): 99999"
        r = api.put("/computers/99999/tags", json={"key": "env", "value": "prod"})
        assert r.status_code == 404
        r = api.put(f"/computers/{cid}/tags", json={"key": "bad key", "value": "x"})
        assert r.status_code == 400
        assert error_of(r) == "invalid tag key 'bad key'"
        r = api.put(f"/computers/{cid}/tags", json={"key": "env", "value": "v" * 257})
        assert r.status_code == 400
        assert error_of(r) == "tag value is longer than 256 characters"
    assert snapshot(server) == before
    assert get(server, f"/computers/{cid}")["tags"] == {"env": "prod"}


# -- 7. cancel -----------------------------------------------------------------------


def test_cancel_of_an_unknown_activity_or_request_is_404(server):
    before = snapshot(server)
    with server.api() as api:
        r = api.post("/activities/99999/cancel", json={})
        assert r.status_code == 404
        assert error_of(r) == "no activity 99999"
        r = api.post("/requests/99999/cancel", json={})
        assert r.status_code == 404
        assert error_of(r) == "no request 99999"
    assert snapshot(server) == before


def test_cancel_of_a_canceled_activity_is_409_and_history_unchanged(server):
    cid, _ = enrolled(server, enroll_token(server), "a")
    req, aid = queued_request_for(server, cid)
    with server.api() as api:
        r = api.post(f"/activities/{aid}/cancel", json={"reason": "first"})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "canceled"
    before = snapshot(server)
    one = activity(server, aid)
    with server.api() as api:
        r = api.post(f"/activities/{aid}/cancel", json={"reason": "second"})
        assert r.status_code == 409, r.text
        assert "illegal transition" in error_of(r)
        assert "Canceled -> Canceled" in error_of(r)
        # Canceling the whole request again finds nothing open: a no-op, not a second event.
        r = api.post(f"/requests/{req}/cancel", json={"reason": "third"})
        assert r.status_code == 200, r.text
        assert r.json()["canceled"] == []
    got = activity(server, aid)
    assert got == one
    assert [h["reason"] for h in got["history"]][-1] == "first"
    assert request_done(server, req)["progress"]["counts"] == {"canceled": 1}
    after = snapshot(server)
    # The request-level cancel is audited (as canceling 0); nothing else changed.
    assert after["audit"][1:] == before["audit"]
    assert after["audit"][0]["action"] == "request.cancel"
    assert after["audit"][0]["detail"]["canceled"] == 0
    assert {k: v for k, v in after.items() if k != "audit"} == {
        k: v for k, v in before.items() if k != "audit"
    }
