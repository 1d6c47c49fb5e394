"""The relay process when things go wrong: server outages, kill -9, lost replies, bad input.

The server is the TEMPORARY double of its relay endpoints (tests/fake_relay_server.py)
until the server side of relays is merged.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskfleet.protocol.exchange import MAX_BODY_BYTES, operation_result
from tests.conftest import Agent, _cli, free_port, wait_until
from tests.fake_relay_server import ENROLL_TOKEN, FakeComputer, FakeRelayServer
from tests.relay_proc import Relay, raw_exchange, start_relay

__all__ = ["start_relay"]  # the fixture, used by name

QUIET = ("--poll-interval", "3600")


@pytest.fixture
def fake() -> Iterator[FakeRelayServer]:
    server = FakeRelayServer()
    server.start()
    yield server
    server.stop()


def _gated(gate: Path) -> list[str]:
    """A script that ends once the test creates ``gate``."""
    return [
        "sh",
        "-c",
        f'while [ ! -e "{gate}" ]; do sleep 0.05; done; echo "$TASKFLEET_OPERATION_ID"',
    ]


def _results(fake: FakeRelayServer, cid: int) -> list[dict[str, Any]]:
    return [m for m in fake.results(cid) if m["type"] == "operation-result"]


def _offered_once(fake: FakeRelayServer, cid: int) -> bool:
    seqs = [s for c, s in fake.offered if c == cid]
    return sorted(seqs) == sorted(set(seqs))


def _spool_results_while_the_server_is_down(
    fake: FakeRelayServer, relay: Relay, agent: Agent, tmp_path: Path, n: int = 3
) -> tuple[int, list[int]]:
    cid = agent.computer_id
    gate = tmp_path / "gate"
    ops = [fake.queue_script(cid, _gated(gate)) for _ in range(n)]
    fake.tickle_relay()
    wait_until(lambda: len(agent.status()["records"]) == n, 30, "the agent to have the work")
    fake.stop()
    gate.touch()
    wait_until(lambda: relay.metric("taskfleet_relay_spool_messages") == n, 30, "a full spool")
    wait_until(lambda: agent.status()["unsent_results"] == 0, 10, "the agent to hand them over")
    assert _results(fake, cid) == []
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
    return cid, ops


def test_results_spooled_during_an_outage_are_forwarded_once_when_the_server_returns(
    fake: FakeRelayServer,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    relay = start_relay(fake.url, *QUIET)
    agent = start_agent(relay.url, ENROLL_TOKEN)
    cid, ops = _spool_results_while_the_server_is_down(fake, relay, agent, tmp_path)
    assert relay.metric("taskfleet_relay_upstream_failures_total", 'reason="unreachable"') >= 1
    fake.start()
    wait_until(lambda: len(_results(fake, cid)) == 3, 60, "the results at the server")
    assert sorted(m["op"] for m in _results(fake, cid)) == ops
    assert _offered_once(fake, cid), fake.offered
    wait_until(lambda: relay.metric("taskfleet_relay_spool_messages") == 0, 10, "empty spool")
    assert relay.metric("taskfleet_relay_forwarded_total") == 3


def test_kill_9_of_the_relay_with_a_full_spool_loses_nothing(
    fake: FakeRelayServer,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    relay = start_relay(fake.url, *QUIET)
    agent = start_agent(relay.url, ENROLL_TOKEN)
    cid, ops = _spool_results_while_the_server_is_down(fake, relay, agent, tmp_path)
    relay.proc.kill9()
    fake.start()
    relay.restart()  # same state folder: no new enrollment
    wait_until(lambda: len(_results(fake, cid)) == 3, 60, "the results at the server")
    assert sorted(m["op"] for m in _results(fake, cid)) == ops
    assert _offered_once(fake, cid), fake.offered
    assert fake.relay_enrollments == 1
    assert fake.requests[-1].get("resync")  # the first exchange after the restart


def test_a_lost_reply_is_followed_by_a_resync_and_the_work_still_arrives_once(
    fake: FakeRelayServer,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    relay = start_relay(fake.url, *QUIET)
    agent = start_agent(relay.url, ENROLL_TOKEN)
    cid = agent.computer_id
    fake.tickle_relay()
    wait_until(lambda: fake.requests and not fake.requests[-1].get("resync"), 10, "settled")
    op = fake.queue_script(cid, ["echo", "once"])
    fake.lose_replies = 1  # the server hands the operation out; the answer is lost
    fake.tickle_relay()
    wait_until(lambda: _results(fake, cid), 30, "the result")
    assert [m["op"] for m in _results(fake, cid)] == [op]
    assert [r["op"] for r in agent.status()["records"]] == [op]
    resyncs = [r for r in fake.requests if r.get("resync")]
    assert len(resyncs) >= 2  # the start, and after the lost reply
    assert relay.metric("taskfleet_relay_upstream_failures_total", 'reason="connection-closed"')


def _known(relay: Relay, c: FakeComputer) -> None:
    def served() -> bool:
        return raw_exchange(relay, c.id, c.secret).status_code == 200

    wait_until(served, 20, "the relay to know the computer")


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
    fake: FakeRelayServer, start_relay: Callable[..., Relay]
) -> None:
    relay = start_relay(fake.url, *QUIET)
    c = fake.add_computer()
    _known(relay, c)
    for what, body in BAD_BODIES:
        r = raw_exchange(relay, c.id, c.secret, content=body)
        assert r.status_code == 400, (what, r.text)
        assert "bad exchange" in r.json()["error"], what
    big = b'{"ack":0,"x":"' + b"a" * MAX_BODY_BYTES + b'"}'
    assert raw_exchange(relay, c.id, c.secret, content=big).status_code == 413
    assert relay.metric("taskfleet_relay_received_total") == 0
    assert relay.metric("taskfleet_relay_spool_messages") == 0
    # Nothing of them was kept: the first good message is seq 1, and the server gets it once.
    r = raw_exchange(relay, c.id, c.secret, {"ack": 0, "messages": [_result(1)]})
    assert r.status_code == 200 and r.json()["ack"] == 1
    wait_until(lambda: fake.seqs(c.id) == [1], 20, "the good message at the server")
    assert relay.metric("taskfleet_relay_received_total") == 1


def test_agent_requests_without_credentials_are_refused(
    fake: FakeRelayServer, start_relay: Callable[..., Relay]
) -> None:
    relay = start_relay(fake.url, *QUIET)
    url = relay.url + "/agent/v1/exchange"
    assert httpx.post(url, json={"ack": 0}).status_code == 401
    headers = {"X-Taskfleet-Computer": "99999999999999999999", "Authorization": "Bearer x"}
    assert httpx.post(url, json={"ack": 0}, headers=headers).status_code == 401
    assert httpx.get(url).status_code == 405
    assert httpx.get(relay.url + "/nowhere").status_code == 404


def test_enrollment_through_the_relay_passes_the_servers_answer_on(
    fake: FakeRelayServer, start_relay: Callable[..., Relay]
) -> None:
    relay = start_relay(fake.url, *QUIET)
    body = {"token": "tfe_wrong", "hostname": "h", "machine_id": "m", "policy": {}}
    r = httpx.post(relay.url + "/agent/v1/enroll", json=body)
    assert r.status_code == 401 and "enrollment token" in r.json()["error"]
    fake.stop()
    r = httpx.post(relay.url + "/agent/v1/enroll", json={**body, "token": ENROLL_TOKEN})
    assert r.status_code == 503 and "cannot reach its server" in r.json()["error"]
    assert fake.computers == {}


def test_an_entry_the_server_refuses_is_dropped_from_the_spool_and_logged(
    fake: FakeRelayServer, start_relay: Callable[..., Relay]
) -> None:
    relay = start_relay(fake.url, *QUIET)
    c = fake.add_computer()
    _known(relay, c)
    fake.entry_status[c.id] = 403
    r = raw_exchange(relay, c.id, c.secret, {"ack": 0, "messages": [_result(1), _result(2)]})
    assert r.status_code == 200
    wait_until(lambda: relay.metric("taskfleet_relay_dropped_total") == 2, 20, "the drop")
    assert relay.metric("taskfleet_relay_spool_messages") == 0
    assert f"server refused computer {c.id}'s entry (403" in relay.proc.text()
    assert fake.seqs(c.id) == []


def test_an_entry_the_server_cannot_apply_now_is_kept_and_sent_again(
    fake: FakeRelayServer, start_relay: Callable[..., Relay]
) -> None:
    relay = start_relay(fake.url, *QUIET)
    c = fake.add_computer()
    _known(relay, c)
    fake.entry_status[c.id] = 500
    raw_exchange(relay, c.id, c.secret, {"ack": 0, "messages": [_result(1)]})
    wait_until(lambda: f"could not apply computer {c.id}" in relay.proc.text(), 20, "a 500")
    assert relay.metric("taskfleet_relay_spool_messages") == 1
    del fake.entry_status[c.id]
    wait_until(lambda: fake.seqs(c.id) == [1], 20, "the message at the server")


def test_a_relay_whose_enrollment_is_refused_stops_with_the_servers_reason(
    fake: FakeRelayServer, tmp_path: Path
) -> None:
    out = subprocess.run(
        _cli(
            "relay",
            "--server",
            fake.url,
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
