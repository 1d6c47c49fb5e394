"""``taskfleet relay assign`` moves the agents too (issue 11): two real relays in front of
the real server, real agents (one behind relay A, one talking to the server directly),
the CLI as typed. Default poll interval (30 min): the agents learn of it through the
wake-ups the assignment causes, not by polling."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests.acceptance.test_cli import tf
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


def _relays(server: Server) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in json.loads(tf(server, "relay", "list", "--json").stdout)}


def _runs_once_through(server: Server, relay: RealRelay, ids: list[int], text: str) -> None:
    """A script on group ``moved`` runs once on each computer, its results through ``relay``."""
    received = relay.metric("taskfleet_relay_received_total")
    req = run_request(server, "group:moved", {"script": f"echo {text} $TASKFLEET_COMPUTER_ID"})
    done = request_done(server, req["id"], timeout=60)
    assert done["progress"]["succeeded"] == len(ids)
    rows = activities_of(server, req["id"])
    assert sorted(a["computer_id"] for a in rows) == ids
    for a in rows:
        assert a["stdout"] == f"{text} {a['computer_id']}\n"
        with server.api() as api:
            history = api.get(f"/activities/{a['id']}").json()["history"]
        assert [h["cause"] for h in history].count("agent-report") == 1, history
    # Both results were spooled by the relay (then forwarded by it).
    assert relay.metric("taskfleet_relay_received_total") >= received + len(ids)


def test_relay_assign_moves_the_agents_behind_the_new_relay_and_they_stay(
    server: Server,
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
) -> None:
    a, b = start_real_relay(server), start_real_relay(server)
    token = enroll_token(server)
    behind_a = relay_agent(start_agent, server, a, token)  # failover after 1 s
    direct = start_agent(server, token)  # no --relay at all
    agents = [behind_a, direct]
    ids = sorted(x.computer_id for x in agents)
    tf(server, "group", "create", "moved")
    for cid in ids:
        tf(server, "group", "add", "moved", str(cid))
    relays = _relays(server)
    assert (relays["relay-1"]["computers"], relays["relay-2"]["computers"]) == (1, 0)
    a_received = a.metric("taskfleet_relay_received_total")

    out = tf(server, "relay", "assign", str(relays["relay-2"]["id"]), "--group", "moved")
    assert "2 computers of group moved assigned" in out.stdout
    moved = f"the server assigned this computer to relay {b.url}: exchanging through it"
    for x in agents:
        wait_until(lambda x=x: moved in x.proc.text(), 60, "the agent to move to relay B")
    assert behind_a.proc.text().count(moved) == 1  # logged once
    assert f"no longer {a.url}" in behind_a.proc.text()
    # The server hears both through B now, and wakes them through it.
    wait_until(lambda: _relays(server)["relay-2"]["computers_via_relay"] == 2, 30, "both through B")
    assert _relays(server)["relay-1"]["computers"] == 0
    wait_until(lambda: a.metric("taskfleet_relay_computers") == 0, 30, "A's roster to shrink")

    _runs_once_through(server, b, ids, "moved")
    assert a.metric("taskfleet_relay_received_total") == a_received  # nothing went to A

    # Restarted (with --relay A as before, and without --relay): they stay with B.
    for x in agents:
        x.proc.stop()
    again = [
        relay_agent(start_agent, server, a, token, state_dir=behind_a.state_dir),
        start_agent(server, None, state_dir=direct.state_dir),
    ]
    assert f"relay {b.url}: exchanging through it, not --relay {a.url}" in again[0].proc.text()
    for x in again:
        assert f"through relay {b.url}" in x.proc.text()
    _runs_once_through(server, b, ids, "again")
    assert a.metric("taskfleet_relay_received_total") == a_received
    for x in again:
        assert FAILED_OVER not in x.proc.text()
        assert x.proc.text().count("the server assigned this computer") == 1  # the start only


def test_an_agent_moved_off_its_relay_follows_at_once_not_after_its_failover_time(
    server: Server,
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
) -> None:
    """The old relay answers a computer that left its roster 410, and the agent asks the
    server at once (whose reply names the new relay) instead of retrying the old relay
    for its failover time (here an hour)."""
    a, b = start_real_relay(server), start_real_relay(server)
    agent = relay_agent(
        start_agent,
        server,
        a,
        enroll_token(server),
        "--relay-failover-after",
        "3600",
        "--relay-probe-interval",
        "3600",
    )
    tf(server, "group", "create", "moved")
    tf(server, "group", "add", "moved", str(agent.computer_id))
    tf(server, "relay", "assign", str(_relays(server)["relay-2"]["id"]), "--group", "moved")
    moved = f"the server assigned this computer to relay {b.url}: exchanging through it"
    wait_until(lambda: moved in agent.proc.text(), 30, "the agent to move to relay B")
    assert f"relay {a.url} no longer serves this computer" in agent.proc.text()
    assert a.metric("taskfleet_relay_refused_total", 'reason="moved"') >= 1
    _runs_once_through(server, b, [agent.computer_id], "moved")
