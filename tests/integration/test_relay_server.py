"""The server side of relays over the real app, store and protocol (issue 11).

A raw relay (``tests/raw_relay.py``) enrolls, enrolls computers through itself and
makes relay exchanges for them against the in-process server (``tests/inproc.py``)
on the selected database: work reaches computers behind it and their results
come back, nothing is recorded or sent twice, one bad entry fails alone, the
roster comes when stale, ``have`` and ``resync`` are honoured, a computer may
fail over to the server and back, and wake-ups go to the relay, not past it.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from taskfleet.protocol.tickle import TickleVerifier, derive_relay_tickle_key, derive_tickle_key
from taskfleet.server import metrics
from taskfleet.store.schema import activity_events, api_tokens, computers, tenants
from tests.inproc import Harness, SimAgent, eventually, inproc_server
from tests.raw_relay import (
    RawRelay,
    computer_reply,
    enroll_relay,
    enrolled_relay,
    entry,
    ops_of,
    result_msg,
)


async def _relay_token(h: Harness, name: str = "branch") -> dict[str, Any]:
    return dict(await h.ok("POST", "/tokens", {"kind": "relay", "name": name}))


async def _enroll_token(h: Harness) -> str:
    return str((await h.ok("POST", "/tokens", {"kind": "enroll", "name": "agents"}))["token"])


async def _relay_with(h: Harness, n: int, name: str = "branch-7") -> tuple[RawRelay, list[int]]:
    relay = await enrolled_relay(h.client, (await _relay_token(h))["token"], name)
    token = await _enroll_token(h)
    cids = [(await relay.computer(token, f"{name}-pc{i}"))[0] for i in range(n)]
    return relay, cids


async def _op_for(h: Harness, cid: int) -> int:
    req = await h.run(f"computer:{cid}")
    [a] = await h.ok("GET", f"/activities?request_id={req['id']}")
    return int(a["id"])


async def _history(h: Harness, activity_id: int) -> list[str]:
    return [e["to_state"] for e in (await h.ok("GET", f"/activities/{activity_id}"))["history"]]


async def test_a_relay_enrolls_once_and_again_with_a_new_secret(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        tok = await _relay_token(h)
        assert tok["token"].startswith("tfr_") and tok["kind"] == "relay"
        # Neither kind of enrollment token opens the other door.
        agent_token = await _enroll_token(h)
        r = await enroll_relay(h.client, agent_token, "branch-7")
        assert r.status_code == 401, r.text
        r = await h.client.post(
            "/agent/v1/enroll",
            json={"token": tok["token"], "hostname": "x", "machine_id": "m-x"},
        )
        assert r.status_code == 401, r.text

        r = await enroll_relay(h.client, tok["token"], "branch-7", tickle_port=50123)
        assert r.status_code == 201, r.text
        first = r.json()
        rid = first["relay_id"]
        assert first["secret"].startswith("tfrs_") and first["generation"] == 1
        assert first["tickle_key"] == derive_relay_tickle_key(h.rt.tickle_master, rid, 1).hex()
        assert first["tickle_key"] != derive_tickle_key(h.rt.tickle_master, rid, 1).hex()
        assert first["server_public_key"] == h.rt.signer.public_key_hex
        assert first["relay_settings"]["poll_interval"] == 60
        relay = RawRelay(h.client, rid, first["secret"], first["tickle_key"], 1)
        await relay.exchange()

        again = (await enroll_relay(h.client, tok["token"], "branch-7")).json()
        assert again["relay_id"] == rid and again["generation"] == 2 and again["reenrolled"]
        assert (await relay.post()).status_code == 401  # the old secret is gone
        relay.secret = again["secret"]
        await relay.exchange()
        [row] = await h.ok("GET", "/relays")
        assert row["name"] == "branch-7" and row["generation"] == 2
        assert "secret_hash" not in row and row["url"] == "http://relay.example:8471"
        actions = [a["action"] for a in await h.ok("GET", "/audit")]
        assert {"relay.enroll", "relay.reenroll"} <= set(actions)


async def test_a_computer_enrolled_through_a_relay_is_behind_it(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, [cid] = await _relay_with(h, 1)
        reply = await relay.exchange()
        assert reply["roster"]["version"] == relay.roster
        [r] = relay.roster_entries
        cs = h.rt.fleet.get(cid)
        assert cs is not None and cs.relay is h.rt.fleet.relays[relay.relay_id]
        assert r["id"] == cid and r["generation"] == 1
        assert r["secret_hash"] == cs.secret_hash.hex()
        assert r["tickle_key"] == derive_tickle_key(h.rt.tickle_master, cid, 1).hex()
        # The secret the agent got checks against the hash the relay got.
        token = await _enroll_token(h)
        other, secret = await relay.computer(token, "second")
        second = (await relay.exchange())["roster"]
        [s] = [c for c in second["computers"] if c["id"] == other]
        assert s["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
        shown = await h.ok("GET", f"/relays/{relay.relay_id}")
        assert shown["computers"] == 2 and [m["id"] for m in shown["members"]] == [cid, other]
        async with h.rt.read.connect() as conn:
            rows = (await conn.execute(sa.select(computers.c.relay_id))).scalars().all()
        assert set(rows) == {relay.relay_id}


async def test_a_token_of_another_tenant_is_refused_at_enroll_computer(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, _ = await _relay_with(h, 0)
        now = h.clock()

        async def other_tenant_token(conn: Any) -> None:
            tid = (
                await conn.execute(
                    tenants.insert().values(name="other", created_at=now).returning(tenants.c.id)
                )
            ).scalar_one()
            await conn.execute(
                api_tokens.insert().values(
                    tenant_id=tid,
                    name="theirs",
                    kind="enroll",
                    token_hash=hashlib.sha256(b"tfe_theirs").hexdigest(),
                    created_at=now,
                    uses_left=5,
                    revoked=False,
                )
            )

        await h.rt.writer.run(other_tenant_token)
        before = await h.ok("GET", "/audit")
        r = await relay.enroll_computer("tfe_theirs", "intruder")
        assert r.status_code == 403, r.text
        assert "another tenant" in r.json()["error"]
        async with h.rt.read.connect() as conn:
            assert (
                await conn.execute(sa.select(sa.func.count()).select_from(computers))
            ).scalar() == 0
            uses = (
                await conn.execute(
                    sa.select(api_tokens.c.uses_left).where(api_tokens.c.name == "theirs")
                )
            ).scalar()
        assert uses == 5 and await h.ok("GET", "/audit") == before
        assert h.rt.fleet.computers == {}


async def test_work_goes_out_through_the_relay_and_results_finish_it(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, [cid, idle] = await _relay_with(h, 2)
        await relay.exchange()  # roster, and the first look at every computer
        op = await _op_for(h, cid)
        reply = await relay.exchange()  # nothing to say: the server adds what it holds
        assert ops_of(reply, cid) == [(1, op)] and computer_reply(reply, idle) is None
        assert reply["roster"] is None and reply["errors"] == []
        assert await _history(h, op) == ["queued", "in_progress"]

        reply = await relay.exchange([entry(cid, ack=1, have=1, messages=[result_msg(1, op)])])
        assert computer_reply(reply, cid) == {"id": cid, "ack": 1, "messages": []}
        assert await _history(h, op) == ["queued", "in_progress", "succeeded"]
        assert (await h.ok("GET", f"/activities/{op}"))["result_line"] == "ok"

        # Replayed (a lost reply, a relay restart): nothing is recorded twice.
        for _ in range(2):
            reply = await relay.exchange(
                [entry(cid, ack=1, have=1, messages=[result_msg(1, op, "again")])]
            )
            assert computer_reply(reply, cid) == {"id": cid, "ack": 1, "messages": []}
        assert await _history(h, op) == ["queued", "in_progress", "succeeded"]
        assert (await h.ok("GET", f"/activities/{op}"))["result_line"] == "ok"
        async with h.rt.read.connect() as conn:
            events = (
                await conn.execute(
                    sa.select(sa.func.count()).where(activity_events.c.activity_id == op)
                )
            ).scalar()
        assert events == 3


async def test_an_entry_for_another_relays_computer_is_refused_alone(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, [mine] = await _relay_with(h, 1, "branch-7")
        other, [theirs] = await _relay_with(h, 1, "branch-8")
        direct = (await h.enroll(1))[0].computer_id
        for r in (relay, other):
            await r.exchange()
        op_mine, op_theirs = await _op_for(h, mine), await _op_for(h, theirs)
        assert ops_of(await relay.exchange(), mine) == [(1, op_mine)]
        assert ops_of(await other.exchange(), theirs) == [(1, op_theirs)]
        before = metrics.RELAY_REFUSED_ENTRIES.labels("403")._value.get()
        reply = await relay.exchange(
            [
                entry(mine, ack=1, have=1, messages=[result_msg(1, op_mine)]),
                entry(theirs, ack=1, have=1, messages=[result_msg(1, op_theirs, "forged")]),
                entry(direct, ack=0),
                entry(987654, ack=0),
            ]
        )
        refused = {e["id"]: e["status"] for e in reply["errors"]}
        assert refused == {theirs: 403, direct: 403, 987654: 403}
        assert computer_reply(reply, mine) == {"id": mine, "ack": 1, "messages": []}
        assert await _history(h, op_mine) == ["queued", "in_progress", "succeeded"]
        assert await _history(h, op_theirs) == ["queued", "in_progress"]  # untouched
        assert metrics.RELAY_REFUSED_ENTRIES.labels("403")._value.get() == before + 3
        # One bad entry (a result for an operation that is not its computer's) fails
        # alone too, as 400; the others of the same exchange are applied.
        op2 = await _op_for(h, mine)
        assert ops_of(await relay.exchange(), mine) == [(2, op2)]
        reply = await relay.exchange(
            [entry(mine, ack=2, have=2, messages=[result_msg(2, op_theirs)])]
        )
        assert reply["errors"][0]["id"] == mine and reply["errors"][0]["status"] == 400
        assert "does not belong to this computer" in reply["errors"][0]["error"]
        assert await _history(h, op2) == ["queued", "in_progress"]
        assert await _history(h, op_theirs) == ["queued", "in_progress"]


async def test_a_revoked_relay_token_revokes_its_relay(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        tok = await _relay_token(h)
        relay = await enrolled_relay(h.client, tok["token"])
        await relay.exchange()
        await h.ok("DELETE", f"/tokens/{tok['id']}")
        r = await relay.post()
        assert r.status_code == 401, r.text
        r = await relay.enroll_computer(await _enroll_token(h), "late")
        assert r.status_code == 401, r.text
        assert (await enroll_relay(h.client, tok["token"], "branch-7")).status_code == 401
        [row] = await h.ok("GET", "/relays")
        assert row["revoked_at"] is not None
        # A new token brings it back, with a new secret.
        back = await enrolled_relay(h.client, (await _relay_token(h, "new"))["token"])
        assert back.relay_id == relay.relay_id and back.generation == 2
        await back.exchange()


async def test_the_roster_comes_when_stale_and_only_then(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, [a] = await _relay_with(h, 1)
        first = await relay.exchange()
        assert [c["id"] for c in first["roster"]["computers"]] == [a]
        assert (await relay.exchange())["roster"] is None
        assert (await relay.exchange())["roster"] is None
        # A new computer, a re-enrollment, a removal, an assignment: each changes it.
        token = await _enroll_token(h)
        b, _ = await relay.computer(token, "b")
        roster = (await relay.exchange())["roster"]
        assert [c["id"] for c in roster["computers"]] == [a, b]
        assert (await relay.exchange())["roster"] is None
        await relay.computer(token, "b")  # the same machine again: a new generation
        roster = (await relay.exchange())["roster"]
        assert [c["generation"] for c in roster["computers"]] == [1, 2]
        await h.ok("DELETE", f"/computers/{a}")
        assert [c["id"] for c in (await relay.exchange())["roster"]["computers"]] == [b]
        await h.ok("POST", "/groups", {"name": "web"})
        [direct] = await h.enroll(1, group="web")
        await h.ok("POST", f"/relays/{relay.relay_id}/assign", {"group": "web"})
        roster = (await relay.exchange())["roster"]
        assert [c["id"] for c in roster["computers"]] == [b, direct.computer_id]
        assert (await relay.exchange())["roster"] is None


async def test_have_is_honoured_and_resync_resends(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, [cid] = await _relay_with(h, 1)
        await relay.exchange()
        op = await _op_for(h, cid)
        assert ops_of(await relay.exchange(), cid) == [(1, op)]
        # The relay holds it (have=1); the agent has not acked it: not sent again.
        reply = await relay.exchange([entry(cid, ack=0, have=1)])
        assert computer_reply(reply, cid) == {"id": cid, "ack": 0, "messages": []}
        reply = await relay.exchange()  # nor to a relay with nothing to say
        assert computer_reply(reply, cid) is None
        # The relay lost its cache (a restart): everything above the agent's ack again.
        reply = await relay.exchange([entry(cid, ack=0, have=0)], resync=True)
        assert ops_of(reply, cid) == [(1, op)]
        # A lost reply: resync without an entry resends it too.
        reply = await relay.exchange(resync=True)
        assert ops_of(reply, cid) == [(1, op)]
        # Acked by the agent: gone for good, even on resync.
        await relay.exchange([entry(cid, ack=1, have=1)])
        assert computer_reply(await relay.exchange(resync=True), cid) is None
        assert await _history(h, op) == ["queued", "in_progress"]


async def test_failover_to_the_server_and_back_loses_nothing_and_doubles_nothing(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, [cid] = await _relay_with(h, 1)
        token = await _enroll_token(h)
        # The agent's own secret, for its direct exchanges (the relay re-enrolls it).
        cid2, secret = await relay.computer(token, "branch-7-pc0")
        assert cid2 == cid
        agent = SimAgent(h, cid, secret)
        await relay.exchange()
        op1 = await _op_for(h, cid)
        assert ops_of(await relay.exchange(), cid) == [(1, op1)]
        # The relay went away before the agent got it: the agent asks the server.
        assert await agent.exchange() == [op1]  # resent, the same message
        assert await _history(h, op1) == ["queued", "in_progress"]
        await agent.report(op1)  # direct: result seq 1, ack 1
        assert await _history(h, op1) == ["queued", "in_progress", "succeeded"]
        op2 = await _op_for(h, cid)
        assert await agent.exchange() == [op2]  # seq 2, directly
        # The relay comes back and forwards what it had spooled before: the same
        # result (seq 1) with the agent's older ack. Nothing is recorded twice;
        # op2 goes to the relay (the agent has not acked it yet) but not op1.
        reply = await relay.exchange(
            [entry(cid, ack=0, have=1, messages=[result_msg(1, op1, "via relay")])]
        )
        assert ops_of(reply, cid) == [(2, op2)]
        assert computer_reply(reply, cid)["ack"] == 1  # type: ignore[index]
        assert (await h.ok("GET", f"/activities/{op1}"))["result_line"] == "Exit code 0"
        assert await _history(h, op1) == ["queued", "in_progress", "succeeded"]
        # The agent reports op2 through the relay now; acked end to end.
        reply = await relay.exchange([entry(cid, ack=2, have=2, messages=[result_msg(2, op2)])])
        assert computer_reply(reply, cid) == {"id": cid, "ack": 2, "messages": []}
        assert await _history(h, op2) == ["queued", "in_progress", "succeeded"]
        assert h.rt.fleet.get(cid).out_acked == 2  # type: ignore[union-attr]
        # And directly again: nothing is sent twice.
        agent.acked, agent.seq = 2, 2
        assert await agent.exchange() == []


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def _datagram(sock: socket.socket, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 100), timeout)


def _nothing(sock: socket.socket) -> bool:
    try:
        sock.recv(100)
    except BlockingIOError:
        return True
    return False


async def test_the_relay_is_tickled_not_the_computer_behind_it(
    database_url: str, tmp_path: Path
) -> None:
    relay_sock, agent_sock = _udp(), _udp()
    try:
        async with inproc_server(
            database_url, tmp_path, tickles=True, tickle_min_interval=0.0
        ) as h:
            tok = (await _relay_token(h))["token"]
            relay = await enrolled_relay(h.client, tok, tickle_port=relay_sock.getsockname()[1])
            cid, secret = await relay.computer(await _enroll_token(h), "pc")
            # The relay forwards the agent's info: where it is, its tickle port.
            agent_port = agent_sock.getsockname()[1]
            info = {"tickle_port": agent_port, "version": "t", "policy": {"scripts": True}}
            await relay.exchange([entry(cid, agent=info, address="127.0.0.1")])
            sent = metrics.TICKLES._value.get()

            op = await _op_for(h, cid)
            data = await _datagram(relay_sock)
            verifier = TickleVerifier(bytes.fromhex(relay.tickle_key), relay.relay_id)
            assert verifier.verify(data, time.time()).computer_id == relay.relay_id
            assert ops_of(await relay.exchange(), cid) == [(1, op)]
            assert metrics.TICKLES._value.get() == sent and _nothing(agent_sock)

            # The agent failed over: its last exchange was direct, so it is tickled itself.
            agent = SimAgent(h, cid, secret)
            assert await agent.exchange() == [op]
            op2 = await _op_for(h, cid)
            data = await _datagram(agent_sock)
            key = derive_tickle_key(h.rt.tickle_master, cid, 1)
            assert TickleVerifier(key, cid).verify(data, time.time()).computer_id == cid
            assert _nothing(relay_sock)
            assert await agent.exchange() == [op2]
    finally:
        relay_sock.close()
        agent_sock.close()


async def test_after_a_server_restart_the_relay_keeps_its_roster_and_gets_resends(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, [cid] = await _relay_with(h, 1)
        await relay.exchange()
        op = await _op_for(h, cid)
        assert ops_of(await relay.exchange(), cid) == [(1, op)]
        held = (relay.relay_id, relay.secret, relay.tickle_key, relay.roster)
    async with inproc_server(database_url, tmp_path) as h:
        relay = RawRelay(h.client, held[0], held[1], held[2], 1, roster=held[3])
        reply = await relay.exchange()
        # The same roster (its version is a digest, not a counter), and the server
        # forgot what the relay holds: everything above the agent's ack again.
        assert reply["roster"] is None
        assert ops_of(reply, cid) == [(1, op)]
        assert await _history(h, op) == ["queued", "in_progress"]
        assert computer_reply(await relay.exchange(), cid) is None


async def test_a_long_poll_is_answered_when_work_comes(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, [cid] = await _relay_with(h, 1)
        await relay.exchange()
        before = metrics.FAST_RELAY_EXCHANGES._value.get()
        quiet = await relay.exchange(wait=0.05)  # nothing comes: answered at the timeout
        assert quiet["computers"] == [] and quiet["roster"] is None
        assert metrics.FAST_RELAY_EXCHANGES._value.get() == before + 1
        held = asyncio.create_task(relay.exchange(wait=30))
        rs = h.rt.fleet.relays[relay.relay_id]

        async def waiting() -> bool:
            return rs.waiter is not None

        await eventually(waiting, what="the long poll to be held")
        assert not held.done()
        op = await _op_for(h, cid)
        reply = await asyncio.wait_for(held, 10)
        assert ops_of(reply, cid) == [(1, op)]


async def test_a_cancel_reaches_the_relay_without_an_entry(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        relay, [cid] = await _relay_with(h, 1)
        await relay.exchange()
        op = await _op_for(h, cid)
        assert ops_of(await relay.exchange(), cid) == [(1, op)]
        await h.ok("POST", f"/activities/{op}/cancel", {"reason": "changed my mind"})
        # The relay says nothing about the computer; the server adds the cancel.
        reply = await relay.exchange()
        [message] = computer_reply(reply, cid)["messages"]  # type: ignore[index]
        assert message["type"] == "cancel" and message["seq"] == 2 and message["op"] == op
        assert computer_reply(await relay.exchange(), cid) is None  # not sent twice


async def test_a_full_reply_says_more_and_the_rest_comes_next(
    database_url: str, tmp_path: Path, monkeypatch: Any
) -> None:
    from taskfleet.server import relays

    # A reply budget of one byte: each relay reply takes exactly one message.
    monkeypatch.setattr(relays, "RELAY_REPLY_MAX_BYTES", 1)
    async with inproc_server(database_url, tmp_path) as h:
        relay, cids = await _relay_with(h, 3)
        await relay.exchange()
        req = await h.run("all")
        got: list[int] = []
        mores = []
        for _ in range(3):
            reply = await relay.exchange()
            got += [op for cid in cids for _, op in ops_of(reply, cid)]
            mores.append(reply["more"])
            assert len(got) == len(set(got))
        assert mores == [True, True, False] and len(got) == 3
        assert set((await h.states(req["id"])).values()) == {"in_progress"}
        assert (await relay.exchange())["computers"] == []
