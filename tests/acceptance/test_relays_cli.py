"""Relays as an administrator sees them: a real server process, a raw relay over real
HTTP, and ``taskfleet token create --relay``, ``relay list | show | assign`` as typed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from tests.acceptance.test_cli import tf
from tests.conftest import Server, enroll_token
from tests.raw_agent import enrolled
from tests.raw_relay import enrolled_relay, entry


def _relay_side(server: Server, relay_token: str, agent_token: str) -> tuple[int, int]:
    """A relay enrolls, enrolls a computer through itself and reports its stats."""

    async def run() -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            relay = await enrolled_relay(client, relay_token, "branch-7")
            cid, _ = await relay.computer(agent_token, "behind")
            await relay.exchange(
                [entry(cid, address="10.0.0.5")], stats={"spool": 3, "cached": 2, "lag": 1.5}
            )
            return relay.relay_id, cid

    return asyncio.run(run())


def _exchange_status(server: Server, relay_id: int, secret: str) -> int:
    headers = {"x-taskfleet-relay": str(relay_id), "authorization": f"Bearer {secret}"}
    r = httpx.post(server.url + "/relay/v1/exchange", json={}, headers=headers, timeout=30)
    return r.status_code


def test_relay_tokens_list_show_and_assign_from_the_cli(server: Server) -> None:
    made: dict[str, Any] = json.loads(
        tf(server, "token", "create", "--relay", "--name", "branch-7", "--json").stdout
    )
    assert made["token"].startswith("tfr_") and made["kind"] == "relay"
    out = tf(server, "token", "create", "--relay", "--enroll", "--name", "x", check=False)
    assert out.returncode == 2 and "give one of" in out.stderr
    agents = enroll_token(server)
    relay_id, behind = _relay_side(server, made["token"], agents)

    [row] = json.loads(tf(server, "relay", "list", "--json").stdout)
    assert row["id"] == relay_id and row["name"] == "branch-7" and row["computers"] == 1
    assert row["stats"]["spool"] == 3 and row["computers_via_relay"] == 1
    table = tf(server, "relay", "list").stdout
    assert "branch-7" in table and "1.5" in table
    shown = tf(server, "relay", "show", str(relay_id)).stdout
    assert "behind" in shown and "stats: cached" in shown

    direct, _ = enrolled(server, agents, "direct")
    tf(server, "group", "create", "web")
    tf(server, "group", "add", "web", str(direct))
    out = tf(server, "relay", "assign", str(relay_id), "--group", "web").stdout
    assert f"relay {relay_id}: 1 computers of group web assigned" in out
    shown_json = json.loads(tf(server, "relay", "show", str(relay_id), "--json").stdout)
    assert [m["id"] for m in shown_json["members"]] == [behind, direct]
    with server.api() as api:
        audit = api.get("/audit").json()
    assert any(a["action"] == "relay.assign" and a["detail"]["group"] == "web" for a in audit)
    out = tf(server, "relay", "show", "999", check=False)
    assert out.returncode == 2 and "no relay 999" in out.stderr
    out = tf(server, "relay", "assign", str(relay_id), "--group", "nope", check=False)
    assert out.returncode == 2 and "unknown group 'nope'" in out.stderr


def test_revoking_a_relay_token_refuses_its_relay(server: Server) -> None:
    made = json.loads(
        tf(server, "token", "create", "--relay", "--name", "branch-9", "--json").stdout
    )

    async def enroll() -> tuple[int, str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            relay = await enrolled_relay(client, made["token"], "branch-9")
            return relay.relay_id, relay.secret

    relay_id, secret = asyncio.run(enroll())
    assert _exchange_status(server, relay_id, secret) == 200
    tf(server, "token", "revoke", str(made["id"]))
    assert _exchange_status(server, relay_id, secret) == 401
    [row] = json.loads(tf(server, "relay", "list", "--json").stdout)
    assert row["revoked_at"] is not None
    # Still refused after a restart (the revocation is stored, not only in memory).
    server.restart()
    assert _exchange_status(server, relay_id, secret) == 401
