"""Agents behind a relay through outages: kill -9 of the relay, the server down while the
relay spools, both in turn. Real server, real ``taskfleet relay``, real agents, real
sockets; short failover and probe times (1 s) so the switches happen within the test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Agent,
    Server,
    activities_of,
    enroll_token,
    request_done,
    run_request,
    wait_until,
)
from tests.relay_fleet import RealRelay, relay_agent, start_real_relay

__all__ = ["start_real_relay"]  # the fixture

FAILED_OVER = "exchanging with the server"
RETURNED = "answers again"


def _slow_script(marks: Path, name: str) -> dict[str, Any]:
    """Marks its start, waits (so an outage can begin meanwhile), marks its end."""
    return {
        "script": f"echo start >> {marks}/{name}; sleep 2; echo done >> {marks}/{name}; echo {name}"
    }


def _recorded_once(server: Server, request_id: int, stdout: str) -> None:
    done = request_done(server, request_id, timeout=60)
    assert done["progress"]["succeeded"] == 1
    (a,) = activities_of(server, request_id)
    assert a["stdout"] == stdout
    with server.api() as api:
        history = api.get(f"/activities/{a['id']}").json()["history"]
    reports = [h for h in history if h["cause"] == "agent-report"]
    assert len(reports) == 1, history


def _marks(folder: Path, name: str) -> str:
    return (folder / name).read_text()


def test_relay_killed_with_a_result_in_flight_agent_fails_over_then_returns(
    server: Server,
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    relay = start_real_relay(server)
    agent = relay_agent(start_agent, server, relay, enroll_token(server), "--poll-interval", "1")
    target = f"computer:{agent.computer_id}"
    marks = tmp_path / "marks"
    marks.mkdir()

    first = run_request(server, target, _slow_script(marks, "one"))
    wait_until(lambda: (marks / "one").exists(), 30, "the script to start")
    relay.kill9()  # its result is produced while the relay is gone
    _recorded_once(server, first["id"], "one\n")
    assert _marks(marks, "one") == "start\ndone\n"
    assert agent.proc.text().count(FAILED_OVER) == 1  # logged once

    # Later work reaches it directly (the server wakes it directly: its last exchange was).
    second = run_request(server, target, {"script": "echo two"})
    _recorded_once(server, second["id"], "two\n")

    # The relay is back: the agent's probe answers, and it is behind its relay again.
    relay.start()
    wait_until(lambda: RETURNED in agent.proc.text(), 30, "the agent to return to its relay")
    third = run_request(server, target, {"script": "echo three"})
    _recorded_once(server, third["id"], "three\n")
    assert relay.metric("taskfleet_relay_received_total") >= 1  # its result came this way
    assert agent.proc.text().count(FAILED_OVER) == 1
    # The relay's next exchange tells the agent the server has it all: nothing kept.
    wait_until(lambda: agent.status()["unsent_results"] == 0, 30, "the agent to prune")


def test_server_down_while_the_relay_spools_results_are_recorded_once_when_it_returns(
    server: Server,
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    relay = start_real_relay(server)
    # Polls often: a result the server has not acknowledged is asked after at that pace.
    agent = relay_agent(start_agent, server, relay, enroll_token(server), "--poll-interval", "1")
    marks = tmp_path / "marks"
    marks.mkdir()
    req = run_request(server, f"computer:{agent.computer_id}", _slow_script(marks, "one"))
    wait_until(lambda: (marks / "one").exists(), 30, "the script to start")
    server.proc.stop()
    wait_until(lambda: relay.metric("taskfleet_relay_spool_messages") >= 1, 30, "the spool")
    # The relay holds it, the agent keeps its own copy until the server has it.
    assert agent.status()["unsent_results"] >= 1
    server.restart()
    _recorded_once(server, req["id"], "one\n")
    wait_until(lambda: agent.status()["unsent_results"] == 0, 30, "the agent to prune")
    assert _marks(marks, "one") == "start\ndone\n"
    assert FAILED_OVER not in agent.proc.text()  # the relay answered all along


def test_a_result_held_by_a_dead_relay_and_sent_directly_is_recorded_once(
    server: Server,
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    """The relay spooled the result (the server was down) and died; the agent sends its
    own copy directly; the relay comes back and forwards its copy too: one record."""
    relay = start_real_relay(server)
    agent = relay_agent(
        start_agent,
        server,
        relay,
        enroll_token(server),
        "--poll-interval",
        "1",
        "--relay-probe-interval",
        "600",  # stays direct once failed over, whatever the relay does
    )
    marks = tmp_path / "marks"
    marks.mkdir()
    req = run_request(server, f"computer:{agent.computer_id}", _slow_script(marks, "one"))
    wait_until(lambda: (marks / "one").exists(), 30, "the script to start")
    server.proc.stop()
    wait_until(lambda: relay.metric("taskfleet_relay_spool_messages") >= 1, 30, "the spool")
    relay.kill9()
    wait_until(lambda: FAILED_OVER in agent.proc.text(), 30, "the agent to fail over")
    server.restart()
    _recorded_once(server, req["id"], "one\n")
    wait_until(lambda: agent.status()["unsent_results"] == 0, 30, "the agent to prune")
    relay.start()  # with the copy in its spool: it forwards it, the server drops it
    # Forwarded, acknowledged by the server (which had it already), dropped from the spool.
    wait_until(lambda: relay.metric("taskfleet_relay_forwarded_total") >= 1, 30, "a forward")
    assert relay.metric("taskfleet_relay_spool_messages") == 0
    _recorded_once(server, req["id"], "one\n")
    assert _marks(marks, "one") == "start\ndone\n"


@pytest.mark.serial  # timing-sensitive: one at a time (scripts/test)
def test_an_idle_agent_back_behind_its_relay_gets_new_work_through_it_at_once(
    server: Server,
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
) -> None:
    """Nothing happened while it was direct, so only its probe tells the relay (and so the
    server) that it is back; else the server would wake it directly, the agent would ask
    its relay, and the relay would learn of the work only at its next poll (60 s)."""
    relay = start_real_relay(server)
    agent = relay_agent(start_agent, server, relay, enroll_token(server), "--poll-interval", "1")
    relay.kill9()
    # Setup, not what is measured: an exchange in flight may take up to the agent's HTTP
    # timeout (EXCHANGE_HTTP_TIMEOUT, 30 s) before it counts as a relay failure.
    wait_until(lambda: FAILED_OVER in agent.proc.text(), 45, "the agent to fail over")
    relay.start()
    wait_until(lambda: RETURNED in agent.proc.text(), 30, "the agent to return to its relay")
    req = run_request(server, f"computer:{agent.computer_id}", {"script": "echo back"})
    done = request_done(server, req["id"], timeout=15)  # far below the relay's poll
    assert done["progress"]["succeeded"] == 1
    assert relay.metric("taskfleet_relay_received_total") >= 1


def test_a_revoked_relay_s_agents_fail_over_and_their_work_goes_on_directly(
    server: Server,
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
) -> None:
    """Issue 11: "a relay token revoked while the relay runs (it stops being served, its
    computers fail over)". The relay is refused by the server, answers its agents 503,
    and they take their work from the server directly, each result recorded once."""
    relay = start_real_relay(server)
    agent = relay_agent(start_agent, server, relay, enroll_token(server), "--poll-interval", "1")
    target = f"computer:{agent.computer_id}"
    before = run_request(server, target, {"script": "echo before"})
    _recorded_once(server, before["id"], "before\n")
    assert FAILED_OVER not in agent.proc.text()

    with server.api() as api:
        (token,) = [t for t in api.get("/tokens").json() if t["kind"] == "relay"]
        assert api.delete(f"/tokens/{token['id']}").status_code == 204
    wait_until(lambda: "refused this relay" in relay.proc.text(), 20, "the relay refused")

    after = run_request(server, target, {"script": "echo after"})
    _recorded_once(server, after["id"], "after\n")
    assert agent.proc.text().count(FAILED_OVER) == 1  # it left the relay, once
    assert relay.metric("taskfleet_relay_refused_total", 'reason="unavailable"') >= 1
    # Still refused: the agent stays with the server (no return to a revoked relay).
    assert RETURNED not in agent.proc.text()
