"""The server names a computer's relay in its direct replies (issue 11, ``relay assign``),
over the real app, store and protocol: on the fast path and the slow one, from the
relay's advertised URL, after a server restart, not for a relay without a URL, not
once the relay is revoked, and never for a computer behind no relay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskfleet.protocol.exchange import parse_server_reply
from tests.inproc import Harness, SimAgent, inproc_server
from tests.raw_relay import enrolled_relay

A_URL = "http://relay.example:8471"  # what tests/raw_relay.py advertises
B_URL = "https://relay-b.example:8471/tf"


async def _relay(h: Harness, name: str, **extra: Any) -> tuple[int, int]:
    """A relay enrolled with ``extra``; its id and its token's id."""
    tok = await h.ok("POST", "/tokens", {"kind": "relay", "name": name})
    relay = await enrolled_relay(h.client, tok["token"], name, **extra)
    return relay.relay_id, int(tok["id"])


async def _direct(h: Harness, agent: SimAgent) -> dict[str, Any]:
    """One direct exchange; the reply as sent (checked by the agent's parser too)."""
    r = await h.client.post(
        "/agent/v1/exchange",
        headers={
            "x-taskfleet-computer": str(agent.computer_id),
            "authorization": f"Bearer {agent.secret}",
        },
        json={"ack": agent.acked, "messages": []},
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert parse_server_reply(body).relay == body.get("relay")
    agent.acked = max([agent.acked, *(m["seq"] for m in body["messages"])])
    return body


async def test_a_direct_reply_names_the_relay_the_computer_is_assigned_to(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        a, _ = await _relay(h, "a")
        b, b_token = await _relay(h, "b", url=B_URL)
        c, _ = await _relay(h, "c", url="")  # advertises nothing
        await h.ok("POST", "/groups", {"name": "web"})
        [agent] = await h.enroll(1, group="web")
        assert "relay" not in await _direct(h, agent)  # behind no relay

        await h.ok("POST", f"/relays/{a}/assign", {"group": "web"})
        quiet = await _direct(h, agent)
        assert quiet["relay"] == A_URL and quiet["messages"] == []  # the fast path
        await h.run(f"computer:{agent.computer_id}")
        work = await _direct(h, agent)
        assert work["relay"] == A_URL and len(work["messages"]) == 1  # the slow path

        await h.ok("POST", f"/relays/{c}/assign", {"group": "web"})
        assert "relay" not in await _direct(h, agent)  # nothing to move to
        await h.ok("POST", f"/relays/{b}/assign", {"group": "web"})
        assert (await _direct(h, agent))["relay"] == B_URL
    async with inproc_server(database_url, tmp_path) as h:
        assert (await _direct(h, agent))["relay"] == B_URL  # loaded from the database
        await h.ok("DELETE", f"/tokens/{b_token}")  # B is revoked: it would refuse the agent
        assert "relay" not in await _direct(h, agent)
