"""Bad input at the relay doors (issue 11): the relay exchange, relay enrollment and
enrollment through a relay, on the in-process server and the selected database.

A body wrong as a whole is refused whole (400, 413) with nothing applied; an entry
wrong alone is refused alone (400 in ``errors``) and the others of its exchange
are applied; a caller that is not an enrolled relay gets 401 and changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from taskfleet.protocol.relay import MAX_RELAY_BODY_BYTES, MAX_RELAY_COMPUTERS
from taskfleet.server.api import relay_exchange
from taskfleet.settings import INT64_MAX
from tests.inproc import Harness, inproc_server
from tests.raw_relay import RawRelay, enroll_relay, enrolled_relay, entry, ops_of, result_msg


async def _setup(h: Harness) -> tuple[RawRelay, int, int]:
    """A relay with one computer and one operation handed out to it (seq 1)."""
    tok = await h.ok("POST", "/tokens", {"kind": "relay", "name": "r"})
    relay = await enrolled_relay(h.client, tok["token"])
    agents = await h.ok("POST", "/tokens", {"kind": "enroll", "name": "a"})
    cid, _ = await relay.computer(agents["token"], "pc")
    await relay.exchange()
    req = await h.run(f"computer:{cid}")
    [a] = await h.ok("GET", f"/activities?request_id={req['id']}")
    assert ops_of(await relay.exchange(), cid) == [(1, a["id"])]
    return relay, cid, int(a["id"])


async def _state(h: Harness) -> Any:
    """What an administrator reads back (compared before and after bad input)."""
    return {
        "activities": await h.ok("GET", "/activities?limit=1000"),
        "computers": [
            {k: v for k, v in c.items() if k != "last_seen_at"}
            for c in await h.ok("GET", "/computers")
        ],
        "relays": [
            {k: v for k, v in r.items() if k not in ("last_seen_at", "stats")}
            for r in await h.ok("GET", "/relays")
        ],
        "audit": await h.ok("GET", "/audit?limit=1000&outcome=ok"),
    }


WHOLE = [
    (b"{", "bad relay exchange"),
    (b'{"wait": NaN}', "bad relay exchange"),
    (b'{"computers": [{"id": 1, "seen": 1e400}]}', "bad relay exchange"),
    (b"[]", "must be a JSON object"),
    (b'"x"', "must be a JSON object"),
    (b'{"roster": 5}', "'roster' must be a text"),
    (json.dumps({"roster": "v" * 65}).encode(), "'roster' must be a text"),
    (b'{"resync": "yes"}', "'resync' must be true or false"),
    (b'{"resync": 1}', "'resync' must be true or false"),
    (b'{"wait": -1}', "'wait' must be 0..300"),
    (b'{"wait": 301}', "'wait' must be 0..300"),
    (b'{"wait": "5"}', "'wait' must be a number"),
    (b'{"stats": []}', "'stats' must be an object"),
    (json.dumps({"stats": {f"k{i}": i for i in range(17)}}).encode(), "at most 16"),
    (b'{"stats": {"spool": "full"}}', "must be a number"),
    (json.dumps({"stats": {"k" * 33: 1}}).encode(), "keys must be texts"),
    (b'{"computers": {}}', "'computers' must be a list"),
    (b'{"computers": [5]}', "an entry must be an object"),
    (b'{"computers": [{"ack": 0}]}', "'id' must be an integer"),
    (b'{"computers": [{"id": 0}]}', "'id' must be an integer"),
    (json.dumps({"computers": [{"id": INT64_MAX + 1}]}).encode(), "'id' must be an integer"),
    (b'{"computers": [{"id": "1"}]}', "'id' must be an integer"),
    (b'{"computers": [{"id": 7}, {"id": 7}]}', "appears twice"),
    (
        json.dumps({"computers": [{"id": i + 1} for i in range(MAX_RELAY_COMPUTERS + 1)]}).encode(),
        f"the limit is {MAX_RELAY_COMPUTERS}",
    ),
]


@pytest.mark.parametrize("body,message", WHOLE, ids=[m for _, m in WHOLE])
async def test_a_body_wrong_as_a_whole_is_refused_whole(
    database_url: str, tmp_path: Path, body: bytes, message: str
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, cid, op = await _setup(h)
        before = await _state(h)
        r = await relay.post(content=body)
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]
        assert await _state(h) == before
        # The relay still works, and the work it had is still there for it.
        reply = await relay.exchange([entry(cid, ack=1, have=1, messages=[result_msg(1, op)])])
        assert reply["errors"] == []
        assert (await h.ok("GET", f"/activities/{op}"))["state"] == "succeeded"


ALONE = [
    ({"have": -1}, "'have' must be an integer"),
    ({"have": INT64_MAX + 1}, "'have' must be an integer"),
    ({"ack": "1"}, "'ack'"),
    ({"ack": INT64_MAX + 1}, "'ack'"),
    ({"messages": {}}, "'messages' must be a list"),
    ({"messages": [result_msg(2, 1), result_msg(1, 1)]}, "sequence numbers must increase"),
    ({"messages": [{"seq": 1, "type": "shell", "op": 1}]}, "unknown type"),
    ({"agent": {"tickle_port": 70000}}, "'tickle_port' must be 1..65535"),
    ({"agent": {"policy": {"scripts": "yes"}}}, "invalid policy"),
    ({"address": "a" * 65}, "'address' must be a text"),
    ({"address": 10}, "'address' must be a text"),
    ({"seen": "yesterday"}, "'seen' must be a number"),
]


@pytest.mark.parametrize("fields,message", ALONE, ids=[m for _, m in ALONE])
async def test_an_entry_wrong_alone_is_refused_alone(
    database_url: str, tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, cid, op = await _setup(h)
        agents = await h.ok("POST", "/tokens", {"kind": "enroll", "name": "b"})
        other, _ = await relay.computer(agents["token"], "other")
        await relay.exchange()
        req = await h.run(f"computer:{other}")
        [a] = await h.ok("GET", f"/activities?request_id={req['id']}")
        assert ops_of(await relay.exchange(), other) == [(1, a["id"])]
        before = await h.ok("GET", f"/activities/{op}")
        bad = {"id": cid, "ack": 1, "have": 1, "messages": [result_msg(1, op)], **fields}
        good = entry(other, ack=1, have=1, messages=[result_msg(1, a["id"])])
        body = {"roster": relay.roster, "computers": [bad, good]}
        r = await relay.post(body)
        assert r.status_code == 200, r.text
        reply = r.json()
        [error] = reply["errors"]
        assert error["id"] == cid and error["status"] == 400, reply
        assert message in error["error"]
        assert [c["id"] for c in reply["computers"]] == [other]
        assert await h.ok("GET", f"/activities/{op}") == before  # nothing of it applied
        assert (await h.ok("GET", f"/activities/{a['id']}"))["state"] == "succeeded"


async def test_an_ack_beyond_what_was_sent_is_ignored_and_the_results_kept(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, cid, op = await _setup(h)
        # A stale ack (an older generation, a restored database) beside a real result.
        reply = await relay.exchange([entry(cid, ack=5, have=1, messages=[result_msg(1, op)])])
        assert reply["errors"] == []
        assert [(c["id"], c["ack"]) for c in reply["computers"]] == [(cid, 1)]
        assert (await h.ok("GET", f"/activities/{op}"))["state"] == "succeeded"
        # Nothing was forgotten for it: the operation is resent above the real ack.
        reply = await relay.exchange([entry(cid, ack=0)], resync=True)
        assert ops_of(reply, cid) == [(1, op)]


async def test_callers_that_are_not_an_enrolled_relay_get_401(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, cid, op = await _setup(h)
        tok = await h.ok("POST", "/tokens", {"kind": "relay", "name": "other"})
        other = await enrolled_relay(h.client, tok["token"], "branch-8")
        before = await _state(h)
        body = json.dumps(
            {"computers": [entry(cid, ack=1, have=1, messages=[result_msg(1, op)])]}
        ).encode()
        cases = [
            {},
            {"x-taskfleet-relay": str(relay.relay_id)},
            {"x-taskfleet-relay": "abc", "authorization": f"Bearer {relay.secret}"},
            {"x-taskfleet-relay": "0", "authorization": f"Bearer {relay.secret}"},
            {"x-taskfleet-relay": str(2**70), "authorization": f"Bearer {relay.secret}"},
            {"x-taskfleet-relay": str(relay.relay_id), "authorization": "Bearer tfrs_wrong"},
            {"x-taskfleet-relay": str(relay.relay_id), "authorization": relay.secret},
            # Another relay's id with this relay's secret.
            {"x-taskfleet-relay": str(other.relay_id), "authorization": f"Bearer {relay.secret}"},
        ]
        for headers in cases:
            r = await h.client.post("/relay/v1/exchange", content=body, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            r = await h.client.post(
                "/relay/v1/enroll-computer",
                json={"token": "tfe_x", "hostname": "h", "machine_id": "m"},
                headers=headers,
            )
            assert r.status_code == 401, (headers, r.text)
        assert await _state(h) == before


async def test_oversized_relay_exchanges_are_refused_413(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, _, _ = await _setup(h)
        before = await _state(h)
        headers = {**relay.headers(), "content-length": str(MAX_RELAY_BODY_BYTES + 1)}
        r = await h.client.post("/relay/v1/exchange", content=b"{}", headers=headers)
        assert r.status_code == 413, r.text
        headers["content-length"] = "12x"
        r = await h.client.post("/relay/v1/exchange", content=b"{}", headers=headers)
        assert r.status_code == 413, r.text
        # A body without a declared size is counted as it comes (a smaller limit
        # here: the test need not send 64 MiB to prove the count).
        monkeypatch.setattr(relay_exchange, "MAX_RELAY_BODY_BYTES", 64 * 1024)

        async def chunks() -> Any:
            for _ in range(80):
                yield b" " * 1024

        r = await h.client.post("/relay/v1/exchange", content=chunks(), headers=relay.headers())
        assert r.status_code == 413, r.text
        assert await _state(h) == before
        assert (await relay.post()).status_code == 200


BAD_ENROLL = [
    ({"name": ""}, 400, "name is required"),
    ({"name": "n" * 129}, 400, "name is required"),
    ({"name": "a\x00b"}, 400, "must not contain NUL"),
    ({"url": "ftp://relay"}, 400, "url must be an http(s) URL"),
    ({"url": "http://" + "u" * 510}, 400, "url must be an http(s) URL"),
    ({"tickle_port": 0}, 400, "tickle_port must be 1..65535"),
    ({"tickle_port": 70000}, 400, "tickle_port must be 1..65535"),
    ({"version": "v" * 65}, 400, "the limit is 64"),
    ({"tickle_port": "x"}, 400, "tickle_port"),
    ({"token": "tfr_nope"}, 401, "invalid relay enrollment token"),
]


async def test_bad_relay_enrollments_are_refused_and_store_nothing(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        tok = await h.ok("POST", "/tokens", {"kind": "relay", "name": "r"})
        before = await _state(h)
        for fields, status, message in BAD_ENROLL:
            body = {"name": "branch-7", **fields}
            r = await enroll_relay(h.client, body.pop("token", tok["token"]), **body)
            assert r.status_code == status, (fields, r.text)
            assert message in r.json()["error"], (fields, r.text)
        r = await h.client.post("/relay/v1/enroll", json={"name": "no-token"})
        assert r.status_code == 400, r.text
        r = await h.client.post("/relay/v1/enroll", content=b"x" * (64 * 1024 + 1))
        assert r.status_code == 413, r.text
        assert await _state(h) == before
        relay = await enrolled_relay(h.client, tok["token"])
        # Enrollment through a relay: the agent's own checks, nothing stored on refusal.
        agents = await h.ok("POST", "/tokens", {"kind": "enroll", "name": "a"})
        before = await _state(h)
        for fields, status in (
            ({"hostname": ""}, 400),
            ({"machine_id": "m\x00"}, 400),
            ({"tickle_port": 0}, 400),
            ({"policy": {"scripts": "yes"}}, 400),
            ({"token": "tfe_nope"}, 401),
        ):
            body = {**fields}
            r = await relay.enroll_computer(body.pop("token", agents["token"]), "pc", **body)
            assert r.status_code == status, (fields, r.text)
        assert await _state(h) == before
