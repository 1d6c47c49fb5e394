"""An agent's ``refused`` messages are recorded by the server and change nothing else.

A raw agent (tests/raw_agent.py) against a real server says what a real agent
says when a relay tampered with its messages: the server records each refusal
once (audit entry by ``computer:ID``, metric, log line), answers 200 even when
the refused message named another computer's operation (that is the point),
and no activity moves. A refusal that is itself malformed is refused whole (400).
"""

from __future__ import annotations

from typing import Any

from taskfleet.protocol.exchange import refused_message
from tests.conftest import enroll_token, wait_until
from tests.raw_agent import (
    activity,
    enrolled,
    error_of,
    exchange,
    get,
    queued_request_for,
    snapshot,
)


def _refused(seq: int, server_seq: int, op: int | None, reason: str, text: str) -> dict[str, Any]:
    return {**refused_message(server_seq, op, reason, text), "seq": seq}


def _refusal_entries(server: Any) -> list[dict[str, Any]]:
    return [e for e in get(server, "/audit", limit=1000) if e["action"] == "agent.refused"]


def test_a_refusal_is_recorded_once_and_no_activity_moves(server):
    token = enroll_token(server)
    a, secret_a = enrolled(server, token, "a")
    b, _ = enrolled(server, token, "b")
    _, op_a = queued_request_for(server, a)
    _, op_b = queued_request_for(server, b)
    (msg,) = exchange(server, a, secret_a, {"ack": 0}).json()["messages"]
    assert msg["op"] == op_a
    before = (activity(server, op_a), activity(server, op_b))
    counted = server.metric("taskfleet_agent_refusals_total", 'reason="wrong-computer"')
    body = {
        "ack": msg["seq"],
        "messages": [
            _refused(1, msg["seq"], op_a, "bad-signature", "the operation's signature ..."),
            _refused(2, 9, op_b, "wrong-computer", f"the operation is for computer {b}"),
            _refused(3, 10, None, "malformed", "unknown message type 'reboot'"),
        ],
    }
    r = exchange(server, a, secret_a, body)
    assert r.status_code == 200, r.text
    assert r.json()["ack"] == 3
    again = exchange(server, a, secret_a, body)  # as if the answer was lost: a resend
    assert again.status_code == 200 and again.json()["ack"] == 3
    assert (activity(server, op_a), activity(server, op_b)) == before  # In Progress, Queued
    entries = _refusal_entries(server)
    assert [
        (e["actor"], e["detail"]["server_seq"], e["detail"]["op"], e["detail"]["reason"])
        for e in reversed(entries)
    ] == [
        (f"computer:{a}", msg["seq"], op_a, "bad-signature"),
        (f"computer:{a}", 9, op_b, "wrong-computer"),
        (f"computer:{a}", 10, None, "malformed"),
    ]
    assert entries[1]["detail"]["text"] == f"the operation is for computer {b}"
    assert entries[1]["detail"]["computer"] == a
    assert server.metric("taskfleet_agent_refusals_total", 'reason="wrong-computer"') == counted + 1
    log = wait_until(
        lambda: [
            line
            for line in server.proc.lines()
            if f"computer {a} refused server message 9" in line.get("msg", "")
        ],
        10,
        "the refusal's log line",
    )
    assert log[0]["level"] == "warning" and "wrong-computer" in log[0]["msg"]
    assert secret_a not in server.proc.text()


def test_a_malformed_refusal_is_refused_whole_and_changes_nothing(server):
    a, secret_a = enrolled(server, enroll_token(server), "a")
    before = snapshot(server)
    for bad, error in [
        ({"reason": "bored"}, "'reason'"),
        ({"server_seq": 0}, "'server_seq'"),
        ({"text": "x" * 2001}, "limit"),
    ]:
        message = {**_refused(1, 1, None, "malformed", "x"), **bad}
        r = exchange(server, a, secret_a, {"ack": 0, "messages": [message]})
        assert r.status_code == 400, r.text
        assert error in error_of(r)
    assert snapshot(server) == before
