"""A real ``taskfleet relay`` between real agents and the real server (issue 11).

Work is queued with real requests; results are read through the API; what only a
test does (a forged tickle) is sent with the protocol's helpers (tests/relay_proc.py).
"""

from __future__ import annotations

import stat
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from taskfleet.protocol.relay import RELAY_ENROLL_COMPUTER_PATH
from tests.conftest import Agent, Server, enroll_token, wait_until
from tests.relay_proc import (
    HttpForwarder,
    Relay,
    agent_state,
    behind,
    done_activity,
    enroll_through,
    forwarder,
    queue_script,
    raw_exchange,
    start_relay,
)

__all__ = ["forwarder", "start_relay"]  # the fixtures, used by name

QUIET = ("--poll-interval", "3600")  # only tickles and agents make this relay exchange


def _upstream(relay: Relay) -> float:
    return relay.metric("taskfleet_relay_upstream_exchanges_total")


def test_work_cached_at_the_relay_reaches_the_agent_and_its_result_the_server(
    server: Server,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    relay = start_relay(server, *QUIET)
    agent = start_agent(relay.url, enroll_token(server))  # enrolls through the relay
    cid = agent.computer_id
    assert behind(server, relay) == [cid]
    # The server tickles the relay; it fetches at once, caches, tickles the agent.
    req = queue_script(server, cid, ["echo", "through the relay"])
    a = wait_until(lambda: done_activity(server, req), 30, "the result at the server")
    assert a["state"] == "succeeded"
    assert a["stdout"] == "through the relay\n"
    assert relay.metric("taskfleet_relay_tickles_received_total", 'outcome="accepted"') >= 1
    assert relay.metric("taskfleet_relay_tickles_sent_total") >= 1
    # The server acked it: the relay's spool is empty, the agent's outbox too.
    wait_until(lambda: relay.metric("taskfleet_relay_spool_messages") == 0, 10, "empty spool")
    wait_until(lambda: agent.status()["unsent_results"] == 0, 10, "the agent's outbox empty")


def test_a_tickle_makes_the_relay_exchange_at_once(
    server: Server, start_relay: Callable[..., Relay]
) -> None:
    relay = start_relay(server, *QUIET)
    wait_until(lambda: _upstream(relay), 10, "the relay's first exchange")
    before = _upstream(relay)
    relay.tickle()  # as the server sends it, with the relay's key
    wait_until(lambda: _upstream(relay) > before, 10, "an exchange after the tickle")
    assert relay.metric("taskfleet_relay_tickles_received_total", 'outcome="accepted"') == 1


def test_a_forged_tickle_is_dropped(server: Server, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(server, *QUIET)
    wait_until(lambda: _upstream(relay), 10, "the relay's first exchange")
    before = _upstream(relay)
    relay.tickle(b"\x01" * 32)  # not the relay's key
    wait_until(
        lambda: relay.metric("taskfleet_relay_tickles_received_total", 'outcome="bad-mac"'),
        10,
        "the forged tickle counted",
    )
    assert _upstream(relay) == before


def test_the_relay_tickles_its_agent_when_work_arrives(
    server: Server,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    relay = start_relay(server, *QUIET)
    agent = start_agent(relay.url, enroll_token(server))
    cid = agent.computer_id
    wait_until(  # the agent's first exchange after it was ready
        lambda: relay.metric("taskfleet_relay_agent_exchanges_total") >= 1,
        10,
        "the agent's first exchange",
    )
    req = queue_script(server, cid, ["true"])
    # The agent polls every 30 minutes (the server's settings): only a tickle brings it.
    wait_until(lambda: done_activity(server, req), 30, "the result")
    assert relay.metric("taskfleet_relay_tickles_sent_total") >= 1


def test_an_agent_long_polls_the_relay_without_udp(
    server: Server,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    relay = start_relay(server, *QUIET)
    agent = start_agent(relay.url, enroll_token(server), tickle_port=0)
    cid = agent.computer_id
    req = queue_script(server, cid, ["echo", "held"])
    a = wait_until(lambda: done_activity(server, req), 30, "the result")
    assert a["stdout"] == "held\n"
    assert relay.metric("taskfleet_relay_tickles_sent_total") == 0


def test_an_agent_the_relay_does_not_know_is_served_after_the_roster_refresh(
    start_server: Callable[..., Server],
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    # A server whose tickles are lost (none sent): ``relay assign`` tickles the relay so
    # it fetches its roster at once; lost, the relay's roster is stale, as here.
    server = start_server("--no-tickles", "--lost-grace", "2", "--reaper-interval", "0.2")
    relay = start_relay(server, *QUIET)
    wait_until(lambda: _upstream(relay), 10, "the relay's first exchange")
    # Enrolled behind the relay through a second relay... no: directly, then assigned
    # to it by its group; this relay hears of it only from a roster.
    token = enroll_token(server)
    late = start_relay(server, *QUIET)
    enrolled = enroll_through(late, token, "late")
    cid = int(enrolled["computer_id"])
    with server.api() as api:
        assert api.post("/groups", json={"name": "late"}).status_code == 201
        assert api.post("/groups/late/members", json={"computer_ids": [cid]}).status_code in (
            200,
            201,
        )
        r = api.post(f"/relays/{relay.relay_id}/assign", json={"group": "late"})
        assert r.status_code == 200, r.text
    late.proc.stop()
    folder = agent_state(tmp_path / "late", relay.url, enrolled, enrolled["secret"])
    exchanges = _upstream(relay)
    agent = start_agent(relay.url, state_dir=folder)
    wait_until(lambda: "does not know this computer yet" in agent.proc.text(), 20, "a 503")
    # Nothing else makes this relay exchange (no tickle, an hour's poll): the 503 did.
    wait_until(
        lambda: relay.metric("taskfleet_relay_agent_exchanges_total"), 20, "the agent served"
    )
    assert _upstream(relay) > exchanges
    req = queue_script(server, cid, ["echo", "known now"])
    relay.tickle()  # as the server would
    a = wait_until(lambda: done_activity(server, req), 30, "the result")
    assert a["stdout"] == "known now\n"
    assert relay.metric("taskfleet_relay_refused_total", 'reason="unknown"') >= 1


def test_a_wrong_agent_secret_is_refused_with_401(
    server: Server,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    relay = start_relay(server, *QUIET)
    enrolled = enroll_through(relay, enroll_token(server), "liar")
    folder = agent_state(tmp_path / "liar", relay.url, enrolled, "tfc_wrong")
    agent = start_agent(relay.url, state_dir=folder)
    wait_until(lambda: "refused this computer's credentials" in agent.proc.text(), 30, "a 401")
    assert relay.metric("taskfleet_relay_refused_total", 'reason="auth"') >= 1
    assert relay.metric("taskfleet_relay_agent_exchanges_total") == 0
    assert "tfc_wrong" not in relay.proc.text() and enrolled["secret"] not in relay.proc.text()


def test_a_revoked_relay_answers_its_agents_503(
    server: Server,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    relay = start_relay(server, *QUIET)
    enrolled = enroll_through(relay, enroll_token(server), "pc")
    cid, secret = int(enrolled["computer_id"]), str(enrolled["secret"])
    assert raw_exchange(relay, cid, secret).status_code == 200
    assert httpx.get(relay.url + "/healthz").status_code == 200
    with server.api() as api:
        assert api.delete(f"/tokens/{relay.token['id']}").status_code in (200, 204)
    relay.tickle()  # its next exchange (the server no longer tickles a revoked relay)
    wait_until(lambda: "refused this relay" in relay.proc.text(), 20, "the relay to see the 401")
    r = raw_exchange(relay, cid, secret)
    assert r.status_code == 503 and "revoked" in r.json()["error"]
    assert httpx.get(relay.url + "/healthz").status_code == 503
    # It stays refused across a restart (it must not take messages it cannot forward).
    relay.restart()
    r = raw_exchange(relay, cid, secret)
    assert r.status_code == 503


def test_the_state_folder_is_private(server: Server, start_relay: Callable[..., Relay]) -> None:
    relay = start_relay(server, *QUIET)
    assert stat.S_IMODE(relay.state_dir.stat().st_mode) == 0o700
    for f in relay.state_dir.iterdir():  # the spool's files, and the content cache folder
        assert stat.S_IMODE(f.stat().st_mode) == (0o700 if f.is_dir() else 0o600), f
    assert (relay.state_dir / "content").is_dir()
    secret = relay.identity()["secret"]
    assert secret.startswith("tfrs_") and secret not in relay.proc.text()
    assert relay.token["token"] not in relay.proc.text()


def test_a_relay_without_udp_long_polls_the_server_and_still_gets_work_at_once(
    server: Server,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
) -> None:
    relay = start_relay(server, *QUIET, "--tickle-port", "0")
    assert relay.shown()["tickle_port"] is None  # the server cannot wake it
    agent = start_agent(relay.url, enroll_token(server))
    cid = agent.computer_id
    wait_until(lambda: _upstream(relay) >= 2, 20, "the relay's exchanges")
    req = queue_script(server, cid, ["echo", "pushed"])  # no tickle: the held poll answers
    a = wait_until(lambda: done_activity(server, req), 30, "the result")
    assert a["stdout"] == "pushed\n"
    assert relay.metric("taskfleet_relay_tickles_received_total", 'outcome="accepted"') == 0
    assert _upstream(relay) < 50  # held polls, not a busy loop


def test_agents_enrolling_through_a_relay_at_the_same_time_all_enroll(
    server: Server, start_relay: Callable[..., Relay]
) -> None:
    """The relay forwards enrollments over one connection to the server; agents that
    enroll at the same moment (a fleet installed at once) must not trip over each
    other (it answered 500 and 503 to all but one)."""
    from concurrent.futures import ThreadPoolExecutor

    relay = start_relay(server, *QUIET)
    token = enroll_token(server)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: enroll_through(relay, token, f"c{i}"), range(8)))
    assert len({a["computer_id"] for a in answers}) == 8
    wait_until(lambda: len(behind(server, relay)) == 8, 20, "all eight behind the relay")


def test_agents_enrolling_together_are_forwarded_side_by_side(
    server: Server,
    start_relay: Callable[..., Relay],
    forwarder: Callable[[Server], HttpForwarder],
) -> None:
    """Enrollments through a relay go to the server side by side, not one at a time
    behind one connection (the job benchmark: 100 agents per relay queued there until
    they timed out and enrolled again). The forwarder holds the server's answers until
    eight are waiting at once (with one connection: never more than one)."""
    from concurrent.futures import ThreadPoolExecutor

    fwd = forwarder(server)
    relay = start_relay(server, *QUIET, via=fwd.url)
    token = enroll_token(server)
    gate = fwd.slow[RELAY_ENROLL_COMPUTER_PATH] = threading.Event()
    with ThreadPoolExecutor(8) as pool:
        answers = pool.map(lambda i: enroll_through(relay, token, f"c{i}"), range(8))
        wait_until(
            lambda: fwd.in_flight.get(RELAY_ENROLL_COMPUTER_PATH, 0) == 8,
            30,
            "eight enrollments at the server at once",
        )
        gate.set()
        assert len({a["computer_id"] for a in answers}) == 8
