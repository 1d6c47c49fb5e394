"""The relay process when things go wrong, against the real server: server outages,
kill -9, lost replies, refused entries, bad input.

Outages are the real server stopped and started again; a lost reply or a refused
entry is the server's real answer dropped or amended on its way back by a test
forwarder (``HttpForwarder`` in tests/relay_proc.py).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from taskfleet.protocol.exchange import MAX_BODY_BYTES, operation_result
from taskfleet.protocol.relay import RELAY_ENROLL_PATH, RELAY_EXCHANGE_PATH
from tests.conftest import Agent, Server, _cli, enroll_token, free_port, wait_until
from tests.relay_proc import (
    HttpForwarder,
    Relay,
    done_activity,
    ended_once,
    enroll_through,
    forwarder,
    gated,
    queue_script,
    raw_exchange,
    start_relay,
    start_server_again,
    stop_server,
)

__all__ = ["forwarder", "start_relay"]  # the fixtures, used by name

QUIET = ("--poll-interval", "3600")


def _spool_results_while_the_server_is_down(
    server: Server, relay: Relay, agent: Agent, tmp_path: Path, n: int = 3
) -> list[int]:
    cid = agent.computer_id
    gate = tmp_path / "gate"
    reqs = [queue_script(server, cid, gated(gate)) for _ in range(n)]
    wait_until(lambda: len(agent.status()["records"]) == n, 30, "the agent to have the work")
    stop_server(server)
    gate.touch()
    wait_until(lambda: relay.metric("taskfleet_relay_spool_messages") == n, 30, "a full spool")
    wait_until(lambda: agent.status()["unsent_results"] == 0, 10, "the agent to hand them over")
    agent.proc.stop()  # from now on only the relay can bring them to the server
    failures = relay.metric("taskfleet_relay_upstream_failures_total", 'reason="unreachable"')
    wait_until(  # it keeps trying on its own (backoff), not only when agents speak
        lambda: (
            relay.metric("taskfleet_relay_upstream_failures_total", 'reason="unreachable"')
            > failures
        ),
        30,
        "the relay to try again",
    )
    return reqs


def test_results_spooled_during_an_outage_are_forwarded_once_when_the_server_returns(
    server: Server,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    relay = start_relay(server, *QUIET)
    agent = start_agent(relay.url, enroll_token(server))
    reqs = _spool_results_while_the_server_is_down(server, relay, agent, tmp_path)
    start_server_again(server)
    for req in reqs:
        a = wait_until(lambda req=req: ended_once(server, req), 60, "the results at the server")
        assert a["state"] == "succeeded" and a["stdout"] == f"{a['id']}\n"
    wait_until(lambda: relay.metric("taskfleet_relay_spool_messages") == 0, 10, "empty spool")
    assert relay.metric("taskfleet_relay_forwarded_total") == 3


def test_a_returning_server_wakes_its_relays_out_of_their_backoff(
    server: Server,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    """However long the outage (here: a relay whose next try is 60 s away), the status
    catches up within seconds of the server's return: the server tickles its relays
    when it starts, and a tickle ends a relay's backoff."""
    relay = start_relay(server, *QUIET, "--retry-min", "60", "--retry-max", "60")
    agent = start_agent(relay.url, enroll_token(server))
    gate = tmp_path / "gate"
    req = queue_script(server, agent.computer_id, gated(gate))
    wait_until(lambda: len(agent.status()["records"]) == 1, 30, "the agent to have the work")
    stop_server(server)
    gate.touch()
    wait_until(lambda: relay.metric("taskfleet_relay_spool_messages") == 1, 30, "the spool")
    wait_until(
        lambda: relay.metric("taskfleet_relay_upstream_failures_total", 'reason="unreachable"'),
        30,
        "the relay to find the server gone (its next try is 48-72 s away)",
    )
    agent.proc.stop()  # only the relay can bring the result home now
    start_server_again(server)
    returned = time.monotonic()
    a = wait_until(lambda: ended_once(server, req), 20, "the result within seconds")
    assert a["state"] == "succeeded"
    assert time.monotonic() - returned < 20
    assert relay.metric("taskfleet_relay_tickles_received_total", 'outcome="accepted"') >= 1


def test_kill_9_of_the_relay_with_a_full_spool_loses_nothing(
    server: Server,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    relay = start_relay(server, *QUIET)
    agent = start_agent(relay.url, enroll_token(server))
    reqs = _spool_results_while_the_server_is_down(server, relay, agent, tmp_path)
    relay.proc.kill9()
    start_server_again(server)
    relay.restart()  # same state folder: no new enrollment
    for req in reqs:
        a = wait_until(lambda req=req: ended_once(server, req), 60, "the results at the server")
        assert a["state"] == "succeeded"
    assert relay.shown()["generation"] == 1  # enrolled once


def test_work_cached_but_not_yet_tickled_when_the_relay_dies_is_tickled_at_its_restart(
    start_server: Callable[..., Server],
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    # One tickle per computer per ten minutes: the second piece of work waits at the
    # relay for the agent's poll (half an hour) unless the restarted relay wakes it.
    server = start_server("--tickle-min-interval", "600")
    relay = start_relay(server, "--poll-interval", "1")
    agent = start_agent(relay.url, enroll_token(server))
    first = queue_script(server, agent.computer_id, ["true"])
    wait_until(lambda: done_activity(server, first), 30, "the first result")
    second = queue_script(server, agent.computer_id, ["echo", "second"])
    wait_until(lambda: relay.metric("taskfleet_relay_cached_messages") == 1, 30, "work cached")
    assert done_activity(server, second) is None
    relay.proc.kill9()
    relay.restart()
    a = wait_until(lambda: done_activity(server, second), 30, "the cached work to run")
    assert a["state"] == "succeeded" and a["stdout"] == "second\n"


def _op_at(relay: Relay, cid: int, secret: str) -> tuple[int, int]:
    """The operation the server sent ``cid`` through the relay: (seq, op)."""

    def arrived() -> tuple[int, int] | None:
        r = raw_exchange(relay, cid, secret)
        assert r.status_code == 200, r.text
        ops = [(m["seq"], m["op"]) for m in r.json()["messages"] if m["type"] == "operation"]
        return ops[0] if ops else None

    found: tuple[int, int] = wait_until(arrived, 30, "the operation at the relay")
    return found


def test_a_lost_reply_is_followed_by_a_resync_and_the_work_still_arrives_once(
    server: Server,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
    forwarder: Callable[[Server], HttpForwarder],
) -> None:
    fwd = forwarder(server)
    relay = start_relay(server, *QUIET, via=fwd.url)
    agent = start_agent(relay.url, enroll_token(server))
    cid = agent.computer_id
    wait_until(lambda: relay.metric("taskfleet_relay_agent_exchanges_total"), 10, "settled")
    # The answer that carries the operation is lost (the server applied it all the same).
    fwd.amend(RELAY_EXCHANGE_PATH, lambda body: None if b'"operation"' in body else body)
    before = len(fwd.requests)
    req = queue_script(server, cid, ["echo", "once"])  # the server tickles the relay
    a = wait_until(lambda: ended_once(server, req), 30, "the result")
    assert a["stdout"] == "once\n"
    assert [r["op"] for r in agent.status()["records"]] == [a["id"]]
    assert not fwd.amends  # the answer was lost
    after = [json.loads(b) for p, b in fwd.requests[before + 1 :] if p == RELAY_EXCHANGE_PATH]
    assert after and after[0].get("resync") is True  # asked again, with resync
    failures = relay.metric(
        "taskfleet_relay_upstream_failures_total", 'reason="connection-closed"'
    ) + relay.metric("taskfleet_relay_upstream_failures_total", 'reason="unreachable"')
    assert failures >= 1


def _result(seq: int, op: int = 7) -> dict[str, Any]:
    return {**operation_result(op, "succeeded", "ok", exit_code=0), "seq": seq}


BAD_BODIES: list[tuple[str, Any]] = [
    ("malformed JSON", b'{"ack": 0, "messages": ['),
    ("not an object", b"[]"),
    ("a negative ack", b'{"ack": -1}'),
    ("an ack beyond 64 bits", b'{"ack": 9223372036854775808}'),
    ("a non-finite number", b'{"ack": 0, "wait": NaN}'),
    ("a long poll too long", json.dumps({"ack": 0, "wait": 100000}).encode()),
    ("an unknown message", json.dumps({"ack": 0, "messages": [{"seq": 1, "type": "x"}]}).encode()),
    (
        "decreasing sequence numbers",
        json.dumps({"ack": 0, "messages": [_result(2), _result(1)]}).encode(),
    ),
    (
        "one good and one bad message",
        json.dumps(
            {"ack": 0, "messages": [_result(1), {**_result(2), "exit_code": 2**40}]}
        ).encode(),
    ),
]


def test_bad_agent_bodies_are_refused_with_400_and_nothing_is_spooled(
    server: Server, start_relay: Callable[..., Relay]
) -> None:
    relay = start_relay(server, *QUIET)
    c = enroll_through(relay, enroll_token(server), "raw")
    cid, secret = int(c["computer_id"]), str(c["secret"])
    req = queue_script(server, cid, ["true"])
    seq, op = _op_at(relay, cid, secret)
    for what, body in BAD_BODIES:
        r = raw_exchange(relay, cid, secret, content=body)
        assert r.status_code == 400, (what, r.text)
        assert "bad exchange" in r.json()["error"], what
    big = b'{"ack":0,"x":"' + b"a" * MAX_BODY_BYTES + b'"}'
    assert raw_exchange(relay, cid, secret, content=big).status_code == 413
    assert relay.metric("taskfleet_relay_received_total") == 0
    assert relay.metric("taskfleet_relay_spool_messages") == 0
    # Nothing of them was kept: the first good message is seq 1, and the server takes it.
    r = raw_exchange(relay, cid, secret, {"ack": seq, "messages": [_result(1, op)]})
    assert r.status_code == 200 and r.json()["ack"] == 1
    a = wait_until(lambda: ended_once(server, req), 20, "the good message at the server")
    assert a["state"] == "succeeded" and a["result_line"] == "ok"
    assert relay.metric("taskfleet_relay_received_total") == 1


def test_agent_requests_without_credentials_are_refused(
    server: Server, start_relay: Callable[..., Relay]
) -> None:
    relay = start_relay(server, *QUIET)
    url = relay.url + "/agent/v1/exchange"
    assert httpx.post(url, json={"ack": 0}).status_code == 401
    headers = {"X-Taskfleet-Computer": "99999999999999999999", "Authorization": "Bearer x"}
    assert httpx.post(url, json={"ack": 0}, headers=headers).status_code == 401
    assert httpx.get(url).status_code == 405
    assert httpx.get(relay.url + "/nowhere").status_code == 404


def test_enrollment_through_the_relay_passes_the_servers_answer_on(
    server: Server, start_relay: Callable[..., Relay]
) -> None:
    relay = start_relay(server, *QUIET)
    body = {"token": "tfe_wrong", "hostname": "h", "machine_id": "m", "policy": {}}
    r = httpx.post(relay.url + "/agent/v1/enroll", json=body)
    assert r.status_code == 401 and "enrollment token" in r.json()["error"]
    token = enroll_token(server)
    stop_server(server)
    r = httpx.post(relay.url + "/agent/v1/enroll", json={**body, "token": token})
    assert r.status_code == 503 and "cannot reach its server" in r.json()["error"]
    start_server_again(server)
    with server.api() as api:
        assert api.get("/computers").json() == []


def _refuse_entry(cid: int, status: int) -> Callable[[bytes], bytes | None]:
    """The server's answer, with ``cid``'s part replaced by a refusal."""

    def change(raw: bytes) -> bytes:
        reply = json.loads(raw)
        reply["computers"] = [c for c in reply["computers"] if c["id"] != cid]
        reply["errors"].append({"id": cid, "status": status, "error": "refused by the test"})
        return json.dumps(reply).encode()

    return change


def test_an_entry_for_a_computer_moved_to_another_relay_is_refused_and_dropped(
    server: Server,
    start_relay: Callable[..., Relay],
    forwarder: Callable[[Server], HttpForwarder],
) -> None:
    fwd = forwarder(server)
    relay = start_relay(server, *QUIET, via=fwd.url)
    c = enroll_through(relay, enroll_token(server), "moved")
    cid, secret = int(c["computer_id"]), str(c["secret"])
    assert raw_exchange(relay, cid, secret).status_code == 200
    fwd.pause()  # the relay cannot reach the server: what agents bring stays spooled
    r = raw_exchange(relay, cid, secret, {"ack": 0, "messages": [_result(1), _result(2)]})
    assert r.status_code == 200
    wait_until(lambda: relay.metric("taskfleet_relay_spool_messages") == 2, 10, "spooled")
    # Meanwhile the computer is put behind another relay.
    with server.api() as api:
        other = api.post("/tokens", json={"kind": "relay", "name": "other"}).json()["token"]
        assert api.post("/groups", json={"name": "moved"}).status_code == 201
        api.post("/groups/moved/members", json={"computer_ids": [cid]}).raise_for_status()
        enrolled = httpx.post(server.url + RELAY_ENROLL_PATH, json={"token": other, "name": "o"})
        r = api.post(f"/relays/{enrolled.json()['relay_id']}/assign", json={"group": "moved"})
        assert r.status_code == 200, r.text
    fwd.start()
    wait_until(lambda: relay.metric("taskfleet_relay_dropped_total") == 2, 30, "the drop")
    assert relay.metric("taskfleet_relay_spool_messages") == 0
    assert f"server refused computer {cid}'s entry (403" in relay.proc.text()
    assert f"relay {relay.relay_id} sent an entry for computer {cid}" in server.proc.text()


def test_an_entry_the_server_cannot_apply_now_is_kept_and_sent_again(
    server: Server,
    start_relay: Callable[..., Relay],
    forwarder: Callable[[Server], HttpForwarder],
) -> None:
    fwd = forwarder(server)
    relay = start_relay(server, *QUIET, via=fwd.url)
    c = enroll_through(relay, enroll_token(server), "retry")
    cid, secret = int(c["computer_id"]), str(c["secret"])
    req = queue_script(server, cid, ["true"])
    seq, op = _op_at(relay, cid, secret)
    for _ in range(3):  # the server's part for it says 500 ("retry later"), three times
        fwd.amend(RELAY_EXCHANGE_PATH, _refuse_entry(cid, 500))
    raw_exchange(relay, cid, secret, {"ack": seq, "messages": [_result(1, op)]})
    wait_until(lambda: f"could not apply computer {cid}" in relay.proc.text(), 20, "a 500")
    assert relay.metric("taskfleet_relay_spool_messages") == 1  # kept
    a = wait_until(lambda: ended_once(server, req), 30, "the result at the server")
    assert a["state"] == "succeeded"
    wait_until(lambda: relay.metric("taskfleet_relay_spool_messages") == 0, 20, "acked at last")
    assert relay.metric("taskfleet_relay_dropped_total") == 0


def test_a_relay_whose_enrollment_is_refused_stops_with_the_servers_reason(
    server: Server, tmp_path: Path
) -> None:
    out = subprocess.run(
        _cli(
            "relay",
            "--server",
            server.url,
            "--enroll-token",
            "tfr_wrong",
            "--state-dir",
            str(tmp_path / "relay"),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--tickle-port",
            "0",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "relay enrollment refused: invalid relay enrollment token" in out.stderr
    assert "Traceback" not in out.stderr and "tfr_wrong" not in out.stderr
