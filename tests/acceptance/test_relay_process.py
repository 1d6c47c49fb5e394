"""A real ``taskfleet relay`` between real agents and the server (issue 11).

The server here is the TEMPORARY double of its relay endpoints
(tests/fake_relay_server.py) until the server side of relays is merged.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Agent, wait_until
from tests.fake_relay_server import ENROLL_TOKEN, FakeRelayServer
from tests.relay_proc import Relay, agent_state, raw_exchange, start_relay

__all__ = ["start_relay"]  # the fixture, used by name

QUIET = ("--poll-interval", "3600")  # only tickles and agents make this relay exchange


@pytest.fixture
def fake() -> Iterator[FakeRelayServer]:
    server = FakeRelayServer()
    server.start()
    yield server
    server.stop()


def _result_of(fake: FakeRelayServer, cid: int, op: int) -> dict[str, Any] | None:
    return next(
        (m for m in fake.results(cid) if m["type"] == "operation-result" and m["op"] == op),
        None,
    )


def test_work_cached_at_the_relay_reaches_the_agent_and_its_result_the_server(
    fake: FakeRelayServer,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    relay = start_relay(fake.url, *QUIET)
    agent = start_agent(relay.url, ENROLL_TOKEN)  # enrolls through the relay
    cid = agent.computer_id
    assert fake.computers[cid].relay_id == fake.relay_id
    op = fake.queue_script(cid, ["echo", "through the relay"])
    fake.tickle_relay()  # the relay fetches at once, caches, tickles the agent
    result = wait_until(lambda: _result_of(fake, cid, op), 30, "the result at the server")
    assert result["status"] == "succeeded"
    assert result["stdout"] == "through the relay\n"
    assert relay.metric("taskfleet_relay_tickles_received_total", 'outcome="accepted"') >= 1
    assert relay.metric("taskfleet_relay_tickles_sent_total") >= 1
    # The server acked it: the relay's spool is empty, the agent's outbox too.
    wait_until(lambda: relay.metric("taskfleet_relay_spool_messages") == 0, 10, "empty spool")
    assert agent.status()["unsent_results"] == 0
    assert fake.seqs(cid) == sorted(set(fake.seqs(cid)))


def test_a_tickle_from_the_server_makes_the_relay_exchange_at_once(
    fake: FakeRelayServer, start_relay: Callable[..., Relay]
) -> None:
    start_relay(fake.url, *QUIET)
    wait_until(lambda: fake.requests, 10, "the relay's first exchange")
    before = len(fake.requests)
    fake.tickle_relay()
    wait_until(lambda: len(fake.requests) > before, 10, "an exchange after the tickle")


def test_a_forged_tickle_is_dropped(
    fake: FakeRelayServer, start_relay: Callable[..., Relay]
) -> None:
    relay = start_relay(fake.url, *QUIET)
    wait_until(lambda: fake.requests, 10, "the relay's first exchange")
    fake.relay_key = b"\x01" * 32  # not the relay's key
    fake.tickle_relay()
    wait_until(
        lambda: relay.metric("taskfleet_relay_tickles_received_total", 'outcome="bad-mac"'),
        10,
        "the forged tickle counted",
    )


def test_the_relay_tickles_its_agent_when_work_arrives(
    fake: FakeRelayServer,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    relay = start_relay(fake.url, *QUIET)
    agent = start_agent(relay.url, ENROLL_TOKEN)
    cid = agent.computer_id
    wait_until(lambda: "agent ready" in agent.proc.text(), 10, "agent ready")
    exchanges = relay.metric("taskfleet_relay_agent_exchanges_total")
    wait_until(  # the agent's first exchange after it was ready
        lambda: relay.metric("taskfleet_relay_agent_exchanges_total") >= max(exchanges, 1),
        10,
        "the agent's first exchange",
    )
    op = fake.queue_script(cid, ["true"])
    fake.tickle_relay()
    # The agent polls every 30 minutes (the server's settings): only a tickle brings it.
    wait_until(lambda: _result_of(fake, cid, op), 30, "the result")
    assert relay.metric("taskfleet_relay_tickles_sent_total") >= 1


def test_an_agent_long_polls_the_relay_without_udp(
    fake: FakeRelayServer,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    relay = start_relay(fake.url, *QUIET)
    agent = start_agent(relay.url, ENROLL_TOKEN, tickle_port=0)
    cid = agent.computer_id
    op = fake.queue_script(cid, ["echo", "held"])
    fake.tickle_relay()
    result = wait_until(lambda: _result_of(fake, cid, op), 30, "the result")
    assert result["stdout"] == "held\n"
    assert relay.metric("taskfleet_relay_tickles_sent_total") == 0


def test_an_agent_the_relay_does_not_know_is_served_after_the_roster_refresh(
    fake: FakeRelayServer,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    relay = start_relay(fake.url, *QUIET)
    wait_until(lambda: fake.requests, 10, "the relay's first exchange")
    c = fake.add_computer()  # enrolled behind the relay; the relay has not heard yet
    folder = agent_state(tmp_path / "late", relay, c, fake.signer.public_key_hex, c.secret)
    agent = start_agent(relay.url, state_dir=folder)
    wait_until(lambda: "does not know this computer yet" in agent.proc.text(), 20, "a 503")
    # Nothing else makes this relay exchange (no tickle, an hour's poll): the 503 did.
    wait_until(
        lambda: relay.metric("taskfleet_relay_agent_exchanges_total"), 20, "the agent served"
    )
    assert any(r.get("roster") == "" for r in fake.requests[1:])  # asked for the whole roster
    op = fake.queue_script(c.id, ["echo", "known now"])
    fake.tickle_relay()
    result = wait_until(lambda: _result_of(fake, c.id, op), 30, "the result")
    assert result["stdout"] == "known now\n"
    assert relay.metric("taskfleet_relay_refused_total", 'reason="unknown"') >= 1


def test_a_wrong_agent_secret_is_refused_with_401(
    fake: FakeRelayServer,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    relay = start_relay(fake.url, *QUIET)
    c = fake.add_computer()
    folder = agent_state(tmp_path / "liar", relay, c, fake.signer.public_key_hex, "tfc_wrong")
    agent = start_agent(relay.url, state_dir=folder)
    wait_until(lambda: "refused this computer's credentials" in agent.proc.text(), 30, "a 401")
    assert relay.metric("taskfleet_relay_refused_total", 'reason="auth"') >= 1
    assert relay.metric("taskfleet_relay_agent_exchanges_total") == 0
    assert "tfc_wrong" not in relay.proc.text() and c.secret not in relay.proc.text()


def test_a_revoked_relay_answers_its_agents_503(
    fake: FakeRelayServer,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    relay = start_relay(fake.url, *QUIET)
    agent = start_agent(relay.url, ENROLL_TOKEN)
    cid = agent.computer_id
    assert httpx.get(relay.url + "/healthz").status_code == 200
    fake.revoked = True
    fake.tickle_relay()
    wait_until(lambda: "refused this relay" in relay.proc.text(), 20, "the relay to see the 401")
    r = raw_exchange(relay, cid, fake.computers[cid].secret)
    assert r.status_code == 503 and "revoked" in r.json()["error"]
    assert httpx.get(relay.url + "/healthz").status_code == 503
    # It stays refused across a restart (it must not take messages it cannot forward).
    relay.restart()
    r = raw_exchange(relay, cid, fake.computers[cid].secret)
    assert r.status_code == 503


def test_the_state_folder_is_private(
    fake: FakeRelayServer, start_relay: Callable[..., Relay]
) -> None:
    relay = start_relay(fake.url, *QUIET)
    assert stat.S_IMODE(relay.state_dir.stat().st_mode) == 0o700
    for f in relay.state_dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert fake.relay_secret is not None and fake.relay_secret not in relay.proc.text()


def test_a_relay_without_udp_long_polls_the_server_and_still_gets_work_at_once(
    fake: FakeRelayServer,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    relay = start_relay(fake.url, *QUIET, "--tickle-port", "0")
    agent = start_agent(relay.url, ENROLL_TOKEN)
    cid = agent.computer_id
    wait_until(lambda: fake.long_polls, 20, "a long poll held at the server")
    op = fake.queue_script(cid, ["echo", "pushed"])  # no tickle: the held poll answers
    result = wait_until(lambda: _result_of(fake, cid, op), 30, "the result")
    assert result["stdout"] == "pushed\n"
    assert relay.metric("taskfleet_relay_tickles_received_total", 'outcome="accepted"') == 0
    assert len(fake.requests) < 50  # held polls, not a busy loop
