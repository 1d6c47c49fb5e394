"""Relays end to end (issue 11): the real server, a real ``taskfleet relay`` and real
``taskfleet agent`` processes pointed at the relay (``--server RELAY_URL``: the agent
speaks the same protocol to it), work as real requests, everything read back
through the API and the CLI as typed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

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
from tests.relay_proc import (
    Relay,
    ended_once,
    gated,
    history,
    queue_script,
    start_relay,
    start_server_again,
    stop_server,
)

__all__ = ["start_relay"]  # the fixture, used by name


def _three_behind(
    server: Server, start_relay: Callable[..., Relay], start_agent: Callable[..., Agent], *args: str
) -> tuple[Relay, list[Agent]]:
    relay = start_relay(server, *args)
    token = enroll_token(server)
    agents = [start_agent(relay.url, token, name=f"branch-pc{i}") for i in range(3)]
    return relay, agents


def _relay_row(server: Server, relay: Relay) -> dict:
    [row] = [r for r in json.loads(tf(server, "relay", "list", "--json").stdout)]
    assert row["id"] == relay.relay_id
    return dict(row)


def test_a_script_runs_once_on_each_of_three_computers_behind_a_relay(
    server: Server, start_relay: Callable[..., Relay], start_agent: Callable[..., Agent]
) -> None:
    relay, agents = _three_behind(server, start_relay, start_agent, "--poll-interval", "1")
    cids = sorted(a.computer_id for a in agents)
    req = run_request(server, "all", {"argv": ["sh", "-c", 'echo "hi from $(hostname)"; echo x']})
    request_done(server, req["id"])
    rows = activities_of(server, req["id"])
    assert [a["computer_id"] for a in rows] == cids
    for a in rows:
        assert a["state"] == "succeeded" and a["stdout"].endswith("x\n")
        assert history(server, a["id"]) == [
            (None, "queued", "created"),
            ("queued", "in_progress", "delivered"),
            ("in_progress", "succeeded", "agent-report"),
        ]
    for agent in agents:  # each ran it once
        assert [r["op"] for r in agent.status()["records"]] == [
            a["id"] for a in rows if a["computer_id"] == agent.computer_id
        ]
    # The administrator's view: the computers behind it and what the relay reports.
    shown = tf(server, "relay", "show", str(relay.relay_id)).stdout
    for i in range(3):
        assert f"branch-pc{i}" in shown
    for stat in ("spool", "cached", "lag", "computers"):
        assert f"stats: {stat}" in shown, shown

    def reported_idle() -> dict | None:
        row = _relay_row(server, relay)
        s = row["stats"]
        done = s.get("spool") == 0 and s.get("cached") == 0 and s.get("lag") == 0
        return row if done and s.get("computers") == 3 else None

    row = wait_until(reported_idle, 20, "the relay to report an empty spool and cache")
    assert row["computers"] == 3 and row["computers_via_relay"] == 3
    table = tf(server, "relay", "list").stdout
    assert relay.state_dir.name in table


def test_a_server_outage_loses_and_doubles_nothing_and_status_catches_up(
    server: Server,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    relay, agents = _three_behind(server, start_relay, start_agent, "--poll-interval", "3600")
    gate = tmp_path / "gate"
    reqs = {a.computer_id: queue_script(server, a.computer_id, gated(gate)) for a in agents}
    for a in agents:
        wait_until(lambda a=a: len(a.status()["records"]) == 1, 30, "the work at the agent")
    stop_server(server)
    gate.touch()  # the agents keep working while the server is away
    wait_until(lambda: relay.metric("taskfleet_relay_spool_messages") == 3, 30, "a full spool")
    for a in agents:
        wait_until(lambda a=a: a.status()["unsent_results"] == 0, 10, "results at the relay")
    # While the server is down, more work is queued nowhere; the relay keeps retrying.
    failures = relay.metric("taskfleet_relay_upstream_failures_total", 'reason="unreachable"')
    wait_until(
        lambda: (
            relay.metric("taskfleet_relay_upstream_failures_total", 'reason="unreachable"')
            > failures
        ),
        30,
        "the relay to retry",
    )
    start_server_again(server)
    back = time.monotonic()
    for cid, req in reqs.items():
        a = wait_until(lambda req=req: ended_once(server, req), 30, "the result recorded")
        assert a["state"] == "succeeded" and a["computer_id"] == cid
        assert a["stdout"] == f"{a['id']}\n"
    assert time.monotonic() - back < 20  # caught up within seconds (the relay's backoff)
    wait_until(lambda: relay.metric("taskfleet_relay_spool_messages") == 0, 10, "empty spool")
    assert relay.metric("taskfleet_relay_forwarded_total") == 3
    # Nothing twice: each agent message was recorded once (one end per activity above),
    # and the next work still flows.
    req = run_request(server, "all", {"argv": ["true"]})
    assert all(
        a["state"] == "succeeded"
        for a in activities_of(server, request_done(server, req["id"])["id"])
    )


def test_kill_9_of_the_relay_under_load_records_every_result_exactly_once(
    server: Server, start_relay: Callable[..., Relay], start_agent: Callable[..., Agent]
) -> None:
    relay, agents = _three_behind(server, start_relay, start_agent, "--poll-interval", "2")
    reqs = [run_request(server, "all", {"argv": ["echo", str(i)]})["id"] for i in range(8)]
    kills = 0
    # kill -9 whenever results are flowing: some land between the server applying an
    # exchange and the relay committing its answer, some in the spool, some in flight.
    for _ in range(3):
        seen = len([a for r in reqs for a in activities_of(server, r) if a["state"] == "succeeded"])
        wait_until(
            lambda seen=seen: (
                len(
                    [a for r in reqs for a in activities_of(server, r) if a["state"] == "succeeded"]
                )
                > seen
                or all(request_done_now(server, r) for r in reqs)
            ),
            60,
            "results flowing",
        )
        relay.proc.kill9()
        kills += 1
        relay.restart()
    for r in reqs:
        request_done(server, r, timeout=90)
        rows = activities_of(server, r)
        assert len(rows) == 3
        for a in rows:
            assert a["state"] == "succeeded", (a, history(server, a["id"]))
            ends = [h for h in history(server, a["id"]) if h[1] in ("succeeded", "failed")]
            assert len(ends) == 1, history(server, a["id"])
    for agent in agents:  # each operation ran once on its computer
        ops = [rec["op"] for rec in agent.status()["records"]]
        assert len(ops) == len(set(ops)) == len(reqs)
    assert kills == 3 and relay.shown()["generation"] == 1


def request_done_now(server: Server, request_id: int) -> bool:
    with server.api() as api:
        return bool(api.get(f"/requests/{request_id}").json()["progress"]["done"])


def test_a_relay_whose_token_is_revoked_is_refused_and_answers_its_agents_503(
    server: Server, start_relay: Callable[..., Relay], start_agent: Callable[..., Agent]
) -> None:
    relay, agents = _three_behind(server, start_relay, start_agent, "--poll-interval", "3600")
    wait_until(lambda: relay.metric("taskfleet_relay_agent_exchanges_total") >= 3, 20, "agents")
    tf(server, "token", "revoke", str(relay.token["id"]))
    [row] = json.loads(tf(server, "relay", "list", "--json").stdout)
    assert row["revoked_at"] is not None
    # The server tickles the relay one last time: it exchanges, is refused (401) at once.
    wait_until(lambda: "refused this relay" in relay.proc.text(), 10, "the relay refused")
    # Work for a computer behind it is tickled to the computer directly now; its agent
    # asks the relay and is answered 503 (its failover to the server is the agent's).
    queue_script(server, agents[0].computer_id, ["true"])
    wait_until(
        lambda: relay.metric("taskfleet_relay_refused_total", 'reason="unavailable"') >= 1,
        30,
        "an agent answered 503",
    )
    assert relay.metric("taskfleet_relay_upstream_failures_total", 'reason="revoked"') >= 1


def test_an_agent_of_another_tenant_cannot_enroll_through_a_relay(
    server: Server, start_relay: Callable[..., Relay], start_agent: Callable[..., Agent]
) -> None:
    relay = start_relay(server)  # the default tenant's relay
    out = json.loads(tf(server, "tenant", "create", "other", "--json").stdout)
    other = out["token"]
    foreign = json.loads(
        tf(server, "token", "create", "--name", "e", "--enroll", "--json", token=other).stdout
    )["token"]
    agent = start_agent(relay.url, foreign, name="intruder", wait_enrolled=False)
    wait_until(lambda: not agent.proc.alive(), 30, "the agent to give up")
    assert "enrollment refused" in agent.proc.text()
    assert "another tenant than this relay" in agent.proc.text()
    # Neither tenant has it: the relay's nor the token's.
    assert json.loads(tf(server, "computer", "list", "--json").stdout) == []
    assert json.loads(tf(server, "computer", "list", "--json", token=other).stdout) == []
    # The same token enrolls directly with the server, in its own tenant.
    start_agent(server, foreign, name="direct")
    [c] = json.loads(tf(server, "computer", "list", "--json", token=other).stdout)
    assert c["hostname"] == "direct"


def test_an_agent_back_on_a_new_tickle_port_is_woken_there_after_the_relay_restarts(
    server: Server, start_relay: Callable[..., Relay], start_agent: Callable[..., Agent]
) -> None:
    """The relay tickles an agent at the port the agent last told it, kept across the
    relay's restart (the agent tells it only when it starts). Agents poll every 30
    minutes here: only a tickle at the right port brings the work within the test."""
    relay = start_relay(server)
    agent = start_agent(relay.url, enroll_token(server))
    cid = agent.computer_id
    request_done(server, run_request(server, f"computer:{cid}", {"argv": ["true"]})["id"])
    agent.proc.stop()
    again = start_agent(relay.url, state_dir=agent.state_dir, name="again")  # a new port
    assert again.tickle_port != agent.tickle_port
    # The server has the new port (the relay passed the agent's news on) ...
    wait_until(
        lambda: _computer(server, cid)["tickle_port"] == again.tickle_port, 30, "the new port"
    )
    relay.restart()  # ... and the relay, which forgot what the agent told it, too
    req = run_request(server, f"computer:{cid}", {"argv": ["true"]})
    assert request_done(server, req["id"], timeout=30)["progress"]["succeeded"] == 1


def _computer(server: Server, cid: int) -> dict:
    with server.api() as api:
        return dict(api.get(f"/computers/{cid}").json())
