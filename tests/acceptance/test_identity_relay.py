"""Identities that cannot be cloned, behind a relay (issue 15, docs/relays.md "Copies
behind a relay"): real server, relay and agent processes. Two agents started from one
copied state folder behind a relay are caught by the relay, refused, reported: the
server flags the computer and hands it no work until an administrator resets it; an
agent that fails over relay -> server -> relay is never flagged."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from typing import Any

import httpx

from tests.acceptance.test_identity_clone import _cli, _computer
from tests.conftest import Agent, Server, enroll_token, request_done, run_request, wait_until
from tests.raw_agent import enrolled
from tests.raw_relay import enrolled_relay, entry
from tests.relay_fleet import RealRelay, relay_agent, relay_token, start_real_relay

__all__ = ["start_real_relay"]  # the fixture

TIMING = ("--relay-failover-after", "1", "--relay-probe-interval", "1", "--poll-interval", "0.3")


def _refused_at_relay(relay: RealRelay) -> float:
    return relay.metric("taskfleet_relay_refused_total", 'reason="identity-conflict"')


def test_a_copied_state_folder_behind_a_relay_is_caught_and_gets_no_work_until_reset(
    start_server: Callable[..., Server],
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
) -> None:
    server = start_server("--identity-rotate", "0")
    relay = start_real_relay(server)
    a = relay_agent(start_agent, server, relay, enroll_token(server), *TIMING)
    cid = a.computer_id
    req = run_request(server, f"computer:{cid}", {"argv": ["true"]})
    assert request_done(server, req["id"])["progress"]["succeeded"] == 1

    a.proc.stop()
    copy = a.state_dir.parent / "copy"
    shutil.copytree(a.state_dir, copy)
    url = ("--relay", relay.url)
    a = start_agent(server, None, *url, *TIMING, state_dir=a.state_dir, name="a")
    b = start_agent(
        server,
        None,
        *url,
        *TIMING,
        "--tickle-bind",
        "127.0.0.2",
        state_dir=copy,
        name="b",
        tickle_port=a.tickle_port,
    )

    flagged = wait_until(lambda: _computer(server, cid)["identity_conflict"], 30, "the flag")
    assert "two agents" in flagged["reason"] and "relay" in flagged["reason"]
    for agent in (a, b):
        wait_until(lambda ag=agent: "IDENTITY CONFLICT" in ag.proc.text(), 30, "a loud log")
    out = _cli(server, "computer", "show", str(cid))
    assert "IDENTITY CONFLICT" in out.stdout, out.stderr

    # No work for either: it stays Queued while both are refused at the relay.
    refused = _refused_at_relay(relay)
    held = run_request(server, f"computer:{cid}", {"argv": ["true"]})
    wait_until(lambda: _refused_at_relay(relay) >= refused + 2, 30, "more refused exchanges")
    with server.api() as api:
        acts = api.get("/activities", params={"request_id": held["id"]}).json()
        audit = api.get("/audit", params={"object": f"computer:{cid}"}).json()
    assert [x["state"] for x in acts] == ["queued"], acts
    [conflict] = [e for e in audit if e["action"] == "computer.identity_conflict"]
    assert conflict["actor"].startswith("relay:"), conflict

    # The administrator stops the copy and resets: the agent left works behind the relay.
    b.proc.stop()
    out = _cli(server, "computer", "identity-reset", str(cid), "--yes")
    assert out.returncode == 0 and "identity reset" in out.stdout, out.stdout + out.stderr
    assert request_done(server, held["id"])["progress"]["succeeded"] == 1
    for _ in range(3):  # alone, it rotates on at the relay without being flagged
        again = run_request(server, f"computer:{cid}", {"argv": ["true"]})
        assert request_done(server, again["id"])["progress"]["succeeded"] == 1
    assert _computer(server, cid)["identity_conflict"] is None
    assert "has failed for" not in a.proc.text()  # refused: no failover


def test_an_agent_failing_over_relay_server_relay_is_never_flagged(
    start_server: Callable[..., Server],
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
) -> None:
    server = start_server("--identity-rotate", "0")
    relay = start_real_relay(server)
    a = relay_agent(start_agent, server, relay, enroll_token(server), *TIMING)
    cid = a.computer_id

    def works() -> None:
        req = run_request(server, f"computer:{cid}", {"argv": ["true"]})
        assert request_done(server, req["id"])["progress"]["succeeded"] == 1

    for _ in range(2):
        works()
    offered = relay.metric("taskfleet_relay_identity_offers_total")
    assert offered >= 1  # the relay's lineage runs
    relay.proc.stop()  # the agent fails over to the server directly
    wait_until(lambda: "has failed for" in a.proc.text(), 30, "failover")
    for _ in range(2):
        works()
    relay.start()  # back behind the relay
    wait_until(lambda: "answers again" in a.proc.text(), 30, "the return to the relay")
    for _ in range(2):
        works()
    assert relay.metric("taskfleet_relay_identity_offers_total") >= 1
    assert _computer(server, cid)["identity_conflict"] is None
    assert "IDENTITY CONFLICT" not in a.proc.text()


def test_a_relay_can_report_a_conflict_only_for_its_own_computers(server: Server) -> None:
    """A relay is semi-trusted: its report flags a computer behind it (the roster then
    says so), never one behind another relay or one talking to the server directly."""
    agents = enroll_token(server, max_uses=5)

    async def run() -> tuple[int, int, int, dict[str, Any]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            mine = await enrolled_relay(client, relay_token(server, "mine"), "mine")
            other = await enrolled_relay(client, relay_token(server, "other"), "other")
            own, _ = await mine.computer(agents, "own")
            theirs, _ = await other.computer(agents, "theirs")
            direct, _ = enrolled(server, agents, "direct")
            why = "two agents use this computer's identity (a copied state folder?): test"
            reply = await mine.exchange([entry(c, conflict=why) for c in (own, theirs, direct)])
            await mine.exchange()  # the roster, with the flag
            [row] = [r for r in mine.roster_entries if r["id"] == own]
            return own, theirs, direct, {"reply": reply, "row": row}

    own, theirs, direct, got = asyncio.run(run())
    refused = {e["id"]: e["status"] for e in got["reply"]["errors"]}
    assert refused == {theirs: 403, direct: 403}
    assert got["row"].get("flagged") is True
    flag = _computer(server, own)["identity_conflict"]
    assert flag is not None and "relay" in flag["reason"]
    for cid in (theirs, direct):
        assert _computer(server, cid)["identity_conflict"] is None
