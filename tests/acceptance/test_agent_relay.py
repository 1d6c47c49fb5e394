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
    agents = [relay_agent(start_agent, server, relay, token) for _ in range(2)]
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
