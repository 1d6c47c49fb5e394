"""Agents behind a real relay in front of a real server: real processes, real sockets."""

from __future__ import annotations

import json
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
)
from tests.relay_fleet import RealRelay, relay_agent, start_real_relay

__all__ = ["start_real_relay"]  # the fixture


def test_a_script_runs_once_on_each_computer_behind_a_relay(
    server: Server,
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    relay = start_real_relay(server)
    token = enroll_token(server)
    # One woken by UDP (from the relay), one holding a long poll at the relay.
    agents = [relay_agent(start_agent, server, relay, token, tickle_port=p) for p in (None, 0)]
    ids = sorted(a.computer_id for a in agents)
    [row] = json.loads(tf(server, "relay", "list", "--json").stdout)
    assert row["computers"] == 2  # enrolled through the relay: behind it
    marks = tmp_path / "marks"
    marks.mkdir()
    script = f'echo run >> {marks}/$TASKFLEET_COMPUTER_ID; echo "hi from $TASKFLEET_COMPUTER_ID"'
    req = run_request(server, "all", {"script": script})
    done = request_done(server, req["id"])
    assert done["progress"]["succeeded"] == 2
    rows = activities_of(server, req["id"])
    assert [a["computer_id"] for a in rows] == ids
    for a in rows:
        assert a["stdout"] == f"hi from {a['computer_id']}\n"
        assert (marks / str(a["computer_id"])).read_text() == "run\n"
    # It all went through the relay: it answered the agents and spooled their results.
    assert relay.metric("taskfleet_relay_received_total") >= 2
    for a in agents:
        assert "exchanging with the server" not in a.proc.text()


def test_a_pinned_server_key_refuses_an_enrollment_answer_carrying_another(
    server: Server,
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    relay = start_real_relay(server)
    token = enroll_token(server)
    # The key as an administrator finds it: from an agent enrolled directly.
    key = start_agent(server, token).status()["server_key"]
    assert len(key) == 64
    pinned = relay_agent(start_agent, server, relay, token, "--server-key", key.upper())
    assert pinned.status()["server_key"] == key
    assert "matches --server-key" in pinned.proc.text()

    wrong = "ab" * 32
    refused = relay_agent(
        start_agent, server, relay, token, "--server-key", wrong, wait_enrolled=False
    )
    assert refused.proc.popen.wait(30) != 0
    text = refused.proc.text()
    assert f"carries server key {key}, not the pinned --server-key {wrong}" in text
    assert "nothing was saved" in text
    assert refused.status()["computer_id"] is None  # no identity kept

    # An enrolled agent started with another pinned key refuses to start, changes nothing.
    pinned.proc.stop()
    again = relay_agent(
        start_agent,
        server,
        relay,
        token,
        "--server-key",
        wrong,
        state_dir=pinned.state_dir,
        wait_enrolled=False,
    )
    assert again.proc.popen.wait(30) != 0
    assert f"not the server key this agent pinned at enrollment ({key})" in again.proc.text()
    assert again.status()["server_key"] == key


def test_relay_options_are_checked_before_anything_starts(
    server: Server, start_agent: Callable[..., Agent]
) -> None:
    for extra, why in [
        (("--relay", "relay.example:8471"), "is not an http(s)://HOST[:PORT] URL"),
        (("--relay", "http://r:1", "--server-key", "xyz"), "64 hex digits"),
        (("--relay", "http://r:1", "--relay-probe-interval", "0"), "must be positive"),
        (("--relay", "http://r:1", "--relay-failover-after", "-1"), "0 or more seconds"),
        (("--relay", "http://r:1", "--relay-failover-after", "nan"), "finite"),
    ]:
        agent = start_agent(server, "tok", *extra, wait_enrolled=False)
        assert agent.proc.popen.wait(30) == 2, extra
        assert why in agent.proc.text(), (extra, agent.proc.text())
