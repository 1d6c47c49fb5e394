"""A relay spoken for over raw HTTP (``protocol/relay.py``), against any server.

For tests that must say exactly what a relay sends (a replayed entry, a ``have``,
an entry for someone else's computer) and read back what the server answers.
Works on an ``httpx.AsyncClient``: the in-process server's (``tests/inproc.py``)
or one made for a real server process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx

from taskfleet.protocol.relay import (
    RELAY_ENROLL_COMPUTER_PATH,
    RELAY_ENROLL_PATH,
    RELAY_EXCHANGE_PATH,
    parse_relay_reply,
    relay_entry,
    relay_request,
)


def result_msg(seq: int, op: int, line: str = "ok") -> dict[str, Any]:
    return {
        "seq": seq,
        "type": "operation-result",
        "op": op,
        "status": "succeeded",
        "exit_code": 0,
        "stdout": "",
        "stderr": "",
        "result_line": line,
    }


async def enroll_relay(
    client: httpx.AsyncClient, token: str, name: str, **extra: Any
) -> httpx.Response:
    body = {"token": token, "name": name, "url": "http://relay.example:8471", **extra}
    return await client.post(RELAY_ENROLL_PATH, json=body)


@dataclass
class RawRelay:
    client: httpx.AsyncClient
    relay_id: int
    secret: str
    tickle_key: str
    generation: int
    roster: str = ""  # the roster version held
    roster_entries: list[dict[str, Any]] = field(default_factory=list)
    replies: list[dict[str, Any]] = field(default_factory=list)

    def headers(self, secret: str | None = None) -> dict[str, str]:
        return {
            "x-taskfleet-relay": str(self.relay_id),
            "authorization": f"Bearer {secret or self.secret}",
            "content-type": "application/json",
        }

    async def post(
        self, body: Any = None, *, content: bytes | None = None, secret: str | None = None
    ) -> httpx.Response:
        """One relay exchange, raw: ``body`` as JSON, or ``content`` as given."""
        if content is None:
            content = json.dumps(relay_request([], roster=self.roster) if body is None else body)
            content = content.encode()  # type: ignore[union-attr]
        return await self.client.post(
            RELAY_EXCHANGE_PATH, content=content, headers=self.headers(secret), timeout=60
        )

    async def exchange(
        self,
        entries: list[dict[str, Any]] | None = None,
        *,
        resync: bool = False,
        wait: float = 0.0,
        stats: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """One relay exchange that must succeed; its reply (parsed as a relay would,
        then kept as JSON). The roster it brings is kept."""
        body = relay_request(
            entries or [], roster=self.roster, resync=resync, wait=wait, stats=stats
        )
        r = await self.post(body)
        assert r.status_code == 200, r.text
        reply = r.json()
        parsed = parse_relay_reply(reply)  # the relay's own check of what it gets
        if parsed.roster is not None:
            self.roster = parsed.roster.version
            self.roster_entries = reply["roster"]["computers"]
        self.replies.append(reply)
        return dict(reply)

    async def enroll_computer(self, token: str, name: str, **extra: Any) -> httpx.Response:
        body = {
            "token": token,
            "hostname": name,
            "machine_id": f"machine-{name}",
            "policy": {"scripts": True},
            **extra,
        }
        return await self.client.post(RELAY_ENROLL_COMPUTER_PATH, json=body, headers=self.headers())

    async def computer(self, token: str, name: str) -> tuple[int, str]:
        r = await self.enroll_computer(token, name)
        assert r.status_code == 201, r.text
        return int(r.json()["computer_id"]), str(r.json()["secret"])


async def enrolled_relay(
    client: httpx.AsyncClient, token: str, name: str = "branch-7", **extra: Any
) -> RawRelay:
    r = await enroll_relay(client, token, name, **extra)
    assert r.status_code == 201, r.text
    d = r.json()
    return RawRelay(client, d["relay_id"], d["secret"], d["tickle_key"], d["generation"])


def entry(
    cid: int,
    *,
    ack: int = 0,
    have: int = 0,
    messages: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return relay_entry(cid, ack=ack, have=have, messages=messages or [], **extra)


def computer_reply(reply: dict[str, Any], cid: int) -> dict[str, Any] | None:
    return next((c for c in reply["computers"] if c["id"] == cid), None)


def ops_of(reply: dict[str, Any], cid: int) -> list[tuple[int, int]]:
    """(seq, op) of the operations sent for computer ``cid`` in a reply."""
    c = computer_reply(reply, cid)
    return [(m["seq"], m["op"]) for m in (c or {}).get("messages", []) if m["type"] == "operation"]
