"""Issue 9, items 2-4: what agents send can never break the exchange, for them or for others.

* Remote text with NUL or unpaired surrogates is stored, visibly, on both
  databases (PostgreSQL text cannot hold NUL): a real agent's script output,
  and every other text column an agent's words reach.
* Every number is checked against its column's range at the protocol edge
  (400), and a batch in which one exchange fails in the database still applies
  the others (real server, real HTTP, the failure injected by a trigger).
* Much queued work for an offline computer reaches it over several bounded
  replies (``more``), and argv/env are bounded like scripts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskfleet.server import exchange as writer  # REPLY_MAX_BYTES moved with the exchange
from tests.conftest import (
    BACKEND,
    Server,
    activities_of,
    enroll_token,
    request_done,
    run_request,
    wait_until,
)
from tests.inproc import inproc_server

ENROLL = "/agent/v1/enroll"
EXCHANGE = "/agent/v1/exchange"
NUL = "\u2400"  # how a NUL is stored and shown
INT64 = 2**63


def _enroll(server: Server, token: str, name: str, **extra: Any) -> httpx.Response:
    body = {"token": token, "hostname": name, "machine_id": f"machine-{name}", **extra}
    return httpx.post(server.url + ENROLL, json=body, timeout=30)


def _enrolled(server: Server, token: str, name: str) -> tuple[int, str]:
    r = _enroll(server, token, name, policy={"scripts": True})
    assert r.status_code == 201, r.text
    return int(r.json()["computer_id"]), str(r.json()["secret"])


def _exchange(
    server: Server, cid: int, secret: str, body: Any = None, *, content: bytes | None = None
) -> httpx.Response:
    if content is None:
        content = json.dumps({"ack": 0} if body is None else body).encode()
    return httpx.post(
        server.url + EXCHANGE,
        content=content,
        headers={
            "Content-Type": "application/json",
            "X-Taskfleet-Computer": str(cid),
            "Authorization": f"Bearer {secret}",
        },
        timeout=60,
    )


def _get(server: Server, path: str, **params: Any) -> Any:
    with server.api() as api:
        r = api.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def _queued(server: Server, cid: int, params: dict[str, Any] | None = None) -> int:
    with server.api() as api:
        r = api.post(
            "/requests", json={"target": f"computer:{cid}", "params": params or {"argv": ["true"]}}
        )
    assert r.status_code == 201, r.text
    (a,) = _get(server, "/activities", request_id=r.json()["id"])
    return int(a["id"])


def _delivered(server: Server, cid: int, secret: str) -> tuple[int, int]:
    """Queue one operation for the computer and take it: (activity id, server seq)."""
    aid = _queued(server, cid)
    r = _exchange(server, cid, secret, {"ack": 0})
    assert r.status_code == 200, r.text
    (msg,) = [m for m in r.json()["messages"] if m["op"] == aid]
    return aid, int(msg["seq"])


def _result(seq: int, op: int, **extra: Any) -> dict[str, Any]:
    return {
        "seq": seq,
        "type": "operation-result",
        "op": op,
        "status": "succeeded",
        "exit_code": 0,
        "stdout": "",
        "stderr": "",
        "result_line": "done",
        **extra,
    }


def _tf(server: Server, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "taskfleet", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "TASKFLEET_SERVER": server.url,
            "TASKFLEET_TOKEN": server.admin_token,
            "COLUMNS": "200",
        },
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


# -- item 2: NUL and unpaired surrogates ------------------------------------------


def test_nul_in_script_output_is_stored_visibly_and_the_activity_succeeds(server, start_agent):
    agent = start_agent(server, enroll_token(server))
    script = 'printf "before\\0after\\n"; printf "err\\0or" >&2'
    req = run_request(server, f"computer:{agent.computer_id}", {"argv": ["sh", "-c", script]})
    request_done(server, req["id"])
    (a,) = activities_of(server, req["id"])
    assert a["state"] == "succeeded", a
    assert a["exit_code"] == 0
    assert a["stdout"] == f"before{NUL}after\n"
    assert a["stderr"] == f"err{NUL}or"
    assert a["result_line"].startswith("Stage: Completed, Status: Succeeded")
    shown = _tf(server, "activity", "show", str(a["id"]))
    assert f"before{NUL}after" in shown
    assert "Succeeded" in shown
    # Not lost, not refused: the agent's result went through at once.
    assert "lost" not in a["result_line"].lower()
    assert server.metric("taskfleet_exchange_errors_total", 'reason="server"') == 0


def test_nul_and_lone_surrogates_in_every_remote_text_column_are_stored(server):
    token = enroll_token(server)
    # Enrollment: the hostname and version are labels (cleaned), the machine id
    # an identity (refused rather than altered).
    r = _enroll(server, token, "h", machine_id="m\x00x")
    assert r.status_code == 400, r.text
    assert "machine_id" in r.json()["error"]
    content = (
        b'{"token": "%s", "hostname": "web\\u0000\\udc80-1", "machine_id": "m-1",'
        b' "version": "1.0\\u0000\\ud800", "policy": {"scripts": true}}' % token.encode()
    )
    r = httpx.post(
        server.url + ENROLL,
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    cid, secret = int(r.json()["computer_id"]), str(r.json()["secret"])
    (computer,) = [c for c in _get(server, "/computers") if c["id"] == cid]
    assert computer["hostname"] == f"web{NUL}\ufffd-1"
    assert computer["agent_version"] == f"1.0{NUL}\ufffd"

    aid, seq = _delivered(server, cid, secret)
    # An operation-status reason, then a result: every text with a NUL and a lone
    # surrogate escape (which the stdlib JSON encoder of an agent can write).
    status = {
        "seq": 1,
        "type": "operation-status",
        "op": aid,
        "status": "deferred",
        "until": 1e9,
        "reason": "wait\x00ing",
    }
    result = _result(
        2,
        aid,
        stdout="out\x00put \udcff",
        stderr="\x00",
        result_line="Stage: Completed, Status: Succeeded, Result: \x00 \ud800",
    )
    body = {
        "ack": seq,
        "messages": [status, result],
        "agent": {"version": "2.0\x00\udc80", "policy": {"scripts": True}},
    }
    content = json.dumps(body).encode()  # ensure_ascii: "\u0000", "\udcff" escapes
    assert b"\\udcff" in content and b"\\u0000" in content
    r = _exchange(server, cid, secret, content=content)
    assert r.status_code == 200, r.text
    assert r.json()["ack"] == 2
    a = _get(server, f"/activities/{aid}")
    assert a["state"] == "succeeded"
    assert a["stdout"] == f"out{NUL}put \ufffd"
    assert a["stderr"] == NUL
    assert a["result_line"] == f"Stage: Completed, Status: Succeeded, Result: {NUL} \ufffd"
    assert a["history"][-1]["reason"] == a["result_line"]
    (computer,) = [c for c in _get(server, "/computers") if c["id"] == cid]
    assert computer["agent_version"] == f"2.0{NUL}\ufffd"
    assert computer["policy"] == {"scripts": True, "users": [], "types": [], "unsupported": {}}

    # A late report (the activity is final) lands in agent_report, cleaned too.
    late = _result(3, aid, status="failed", exit_code=1, stdout="late\x00")
    r = _exchange(server, cid, secret, {"ack": seq, "messages": [late]})
    assert r.status_code == 200, r.text
    a = _get(server, f"/activities/{aid}")
    assert a["state"] == "succeeded"
    assert a["agent_report"]["stdout"] == f"late{NUL}"
    # NaN is still not a number, on the slow decoding path too.
    r = _exchange(server, cid, secret, content=b'{"ack": 0, "wait": NaN, "x": "\\udc80"}')
    assert r.status_code == 400, r.text


# -- item 3 (a): every number within its column's range ----------------------------


def test_out_of_range_numbers_in_an_exchange_are_400_and_change_nothing(server):
    cid, secret = _enrolled(server, enroll_token(server), "a")
    aid, seq = _delivered(server, cid, secret)
    before = _get(server, f"/activities/{aid}")
    status = {"seq": 1, "type": "operation-status", "op": aid, "status": "working", "attempt": 1}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"ack": 2**64 - 1}, "'ack' is 18446744073709551615, the limit is 9223372036854775807"),
        ({"messages": [_result(2**64 - 1, aid)]}, "'seq' is 18446744073709551615"),
        ({"messages": [_result(INT64, aid)]}, "'seq' is 9223372036854775808"),
        ({"messages": [_result(1, INT64)]}, "'op' is 9223372036854775808"),
        ({"messages": [_result(1, aid, exit_code=2**31)]}, "'exit_code' must be"),
        ({"messages": [_result(1, aid, exit_code=-(2**31) - 1)]}, "'exit_code' must be"),
        ({"messages": [_result(1, aid, stdout_dropped=INT64)]}, "'stdout_dropped' is"),
        ({"messages": [_result(1, aid, stderr_dropped=INT64)]}, "'stderr_dropped' is"),
        ({"messages": [{**status, "attempt": 2**31}]}, "'attempt' is 2147483648"),
        ({"messages": [{**status, "attempt": INT64}]}, "'attempt' is"),
        ({"messages": [{**status, "op": INT64}]}, "'op' is"),
        ({"messages": [{**status, "reason": "r" * 2001}]}, "'reason' is 2001 characters"),
        ({"agent": {"version": "v" * 65}}, "'version' is 65 characters, the limit is 64"),
    ]
    for extra, message in cases:
        body = {"ack": seq, **extra}
        r = _exchange(server, cid, secret, body)
        assert r.status_code == 400, (extra, r.status_code, r.text)
        assert message in r.json()["error"], (extra, r.text)
    # Literals JSON has no numbers for, and numbers no double holds.
    for raw in (
        b'{"ack": 1, "wait": NaN}',
        b'{"ack": 1, "wait": Infinity}',
        b'{"ack": 1, "messages": [{"seq": 1, "type": "operation-status", "op": 1, '
        b'"status": "deferred", "until": 1e400}]}',
        json.dumps({"ack": 1, "messages": [_result(1, aid, started_at=10**400)]}).encode(),
    ):
        r = _exchange(server, cid, secret, content=raw)
        assert r.status_code == 400, (raw, r.text)
        assert "error" in r.json()
    assert _get(server, f"/activities/{aid}") == before
    # The biggest values that fit are taken; a dropped count beyond the INTEGER
    # column is stored at its top (the output's marker keeps the exact number).
    top = _result(INT64 - 1, aid, exit_code=2**31 - 1, stdout_dropped=2**40)
    r = _exchange(server, cid, secret, {"ack": seq, "messages": [top]})
    assert r.status_code == 200, r.text
    assert r.json()["ack"] == INT64 - 1
    a = _get(server, f"/activities/{aid}")
    assert (a["state"], a["exit_code"], a["stdout_dropped"]) == ("succeeded", 2**31 - 1, 2**31 - 1)


# -- item 3 (b): one failing exchange fails alone ----------------------------------


@contextlib.contextmanager
def _writes_held(server: Server) -> Iterator[None]:
    """Hold the database's write lock (SQLite) or the computers table (PostgreSQL)
    from outside the server, so exchanges pile up behind the writer's first
    transaction and are then applied together in one batch."""
    if BACKEND == "sqlite":
        conn = sqlite3.connect(server.database_url.split(":///", 1)[1], isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    import psycopg

    with psycopg.connect(server.database_url) as conn:
        conn.execute("LOCK TABLE computers IN EXCLUSIVE MODE")
        yield
        conn.rollback()


def _fail_updates_of(server: Server, cid: int) -> None:
    """A trigger: any write to this computer's row fails in the database."""
    if BACKEND == "sqlite":
        with sqlite3.connect(server.database_url.split(":///", 1)[1]) as conn:
            conn.execute(
                f"CREATE TRIGGER injected BEFORE UPDATE ON computers WHEN NEW.id = {cid} "
                "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
            )
        return
    import psycopg

    with psycopg.connect(server.database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION injected() RETURNS trigger AS "
            "$$ BEGIN RAISE EXCEPTION 'injected failure'; END $$ LANGUAGE plpgsql"
        )
        conn.execute(
            "CREATE TRIGGER injected BEFORE UPDATE ON computers FOR EACH ROW "
            f"WHEN (NEW.id = {cid}) EXECUTE FUNCTION injected()"
        )


def test_an_exchange_failing_in_the_database_fails_alone_in_its_batch(start_server):
    # No reaper pass in between: the writer's queue holds only exchanges.
    server = start_server("--reaper-interval", "3600")
    token = enroll_token(server)
    first = _enrolled(server, token, "first")
    bad = _enrolled(server, token, "bad")
    good = [_enrolled(server, token, f"good-{i}") for i in range(12)]
    # Each good computer has one delivered operation whose result it reports.
    ops = {cid: _delivered(server, cid, secret) for cid, secret in good}
    _fail_updates_of(server, bad[0])

    def info(version: str) -> dict[str, Any]:
        return {"ack": 0, "agent": {"version": version, "policy": {"scripts": True}}}

    slow_before = server.metric("taskfleet_exchanges_total", 'path="slow"')
    with concurrent.futures.ThreadPoolExecutor(len(good) + 2) as pool:
        with _writes_held(server):
            # The writer takes this one and waits for the lock ...
            futures = [pool.submit(_exchange, server, *first, info("first"))]
            wait_until(
                lambda: server.metric("taskfleet_exchanges_total", 'path="slow"') > slow_before,
                20,
                "the first exchange to reach the writer",
            )
            # ... while these queue behind it: one batch, the bad one in the middle.
            half = len(good) // 2
            senders = (
                [(cid, secret, ops[cid]) for cid, secret in good[:half]]
                + [(*bad, None)]
                + [(cid, secret, ops[cid]) for cid, secret in good[half:]]
            )
            for cid, secret, op in senders:
                if op is None:
                    body = info("bad")
                else:
                    aid, seq = op
                    body = {**info("good"), "ack": seq, "messages": [_result(1, aid)]}
                futures.append(pool.submit(_exchange, server, cid, secret, body))
            # Every one waits in the writer's queue (not merely reached the route: an
            # exchange still on its way when the lock goes would be a batch of its own).
            wait_until(
                lambda: server.metric("taskfleet_writer_queued") >= 1 + len(good),
                20,
                "every exchange to queue at the writer",
            )
        answers = [f.result() for f in futures]

    def log() -> str:
        return server.proc.text()

    assert answers[0].status_code == 200, answers[0].text
    by_cid = {cid: r for (cid, _, _), r in zip(senders, answers[1:], strict=True)}
    refused = by_cid.pop(bad[0])
    assert refused.status_code == 500, refused.text
    assert "could not apply this exchange" in refused.json()["error"]
    for cid, r in by_cid.items():
        assert r.status_code == 200, (cid, r.text)
        assert r.json()["ack"] == 1
    # The bad one really shared a transaction with good ones, which was split.
    sizes = [int(n) for n in re.findall(r"exchange batch of (\d+) failed \(.*?splitting", log())]
    assert sizes and max(sizes) > len(good) // 2, sizes
    computers = {c["id"]: c for c in _get(server, "/computers")}
    for cid, _ in good:
        assert computers[cid]["agent_version"] == "good"
        assert _get(server, f"/activities/{ops[cid][0]}")["state"] == "succeeded"
    assert computers[bad[0]]["agent_version"] != "bad"  # nothing of it applied


# -- item 4: bounded replies ---------------------------------------------------------


def test_ten_megabyte_scripts_for_an_offline_computer_all_reach_it(server, start_agent, tmp_path):
    token = enroll_token(server)
    agent = start_agent(server, token, name="offline")
    cid = agent.computer_id
    agent.proc.stop()  # offline from here on
    go = tmp_path / "go"
    # 1 Mi characters of "é" (the documented limit): ~7 MiB per signed operation,
    # ~70 MiB for ten, beyond the agent's 64 MiB reply cap if sent at once. Each
    # script waits for the go file, so no result (and no exchange it would
    # cause) can pull the rest: only the replies' "more" can.
    head = f"while [ ! -e {go} ]; do sleep 0.05; done; echo ran\n#"
    script = head + "é" * (1024 * 1024 - len(head))
    assert len(script) == 1024 * 1024
    ids = []
    for _ in range(10):
        body = {"target": f"computer:{cid}", "params": {"script": script}, "timeout": 120}
        r = httpx.post(
            server.url + "/api/v1/requests",
            content=json.dumps(body, ensure_ascii=False).encode(),
            headers={
                "Authorization": f"Bearer {server.admin_token}",
                "Content-Type": "application/json",
            },
            timeout=120,
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    again = start_agent(server, state_dir=tmp_path / "offline", name="offline-again")

    def all_delivered() -> bool:
        return all(activities_of(server, rid)[0]["state"] == "in_progress" for rid in ids)

    wait_until(all_delivered, 120, "all ten operations to reach the agent")
    assert server.metric("taskfleet_activities_delivered_total") == 10
    go.touch()
    for rid in ids:
        done = request_done(server, rid, timeout=120)
        assert done["progress"]["succeeded"] == 1, done
    for rid in ids:
        (a,) = activities_of(server, rid)
        assert (a["state"], a["stdout"]) == ("succeeded", "ran\n")
    assert "response too large" not in again.proc.text()


def test_argv_env_and_names_beyond_their_limits_are_refused_at_creation(server):
    cid, _ = _enrolled(server, enroll_token(server), "a")
    cases = [
        ({"argv": ["echo", "a" * (1024 * 1024)]}, "argv is 1048580 characters, the limit is"),
        ({"argv": ["true"], "env": {"A": "b" * (256 * 1024)}}, "env is 262145 characters"),
        ({"script": "true", "interpreter": "/" * 4097}, "interpreter is 4097 characters"),
        ({"argv": ["true"], "cwd": "/" * 4097}, "cwd is 4097 characters"),
        ({"argv": ["true"], "user": "u" * 4097}, "user is 4097 characters"),
    ]
    with server.api() as api:
        for params, message in cases:
            r = api.post("/requests", json={"target": f"computer:{cid}", "params": params})
            assert r.status_code == 400, (str(params)[:80], r.text)
            assert message in r.json()["error"], r.text
        assert api.get("/requests").json() == []
        # At the limits they are taken.
        ok = {"argv": ["echo", "a" * (1024 * 1024 - 4)], "env": {"A": "b" * (256 * 1024 - 1)}}
        r = api.post("/requests", json={"target": f"computer:{cid}", "params": ok})
        assert r.status_code == 201, r.text


async def test_replies_are_bounded_by_bytes_resent_identically_and_the_rest_stays_queued(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small budget: two of these operations (~1.4 KB each) fit in one reply.
    monkeypatch.setattr(writer, "REPLY_MAX_BYTES", 3000)
    async with inproc_server(database_url, tmp_path) as h:
        (sim,) = await h.enroll(1)
        ids = []
        for i in range(5):
            req = await h.run(
                f"computer:{sim.computer_id}", params={"argv": ["echo", f"{i}" * 1000]}
            )
            ids.append(req["id"])
        big = await h.run(f"computer:{sim.computer_id}", params={"argv": ["echo", "b" * 5000]})

        async def exchange(ack: int) -> tuple[httpx.Response, list[dict[str, Any]]]:
            r = await h.client.post(
                EXCHANGE,
                headers={
                    "x-taskfleet-computer": str(sim.computer_id),
                    "authorization": f"Bearer {sim.secret}",
                },
                json={"ack": ack},
            )
            assert r.status_code == 200, r.text
            return r, r.json()["messages"]

        async def states() -> list[str]:
            return [(await h.states(rid))[sim.computer_id] for rid in [*ids, big["id"]]]

        r, first = await exchange(0)
        assert [m["seq"] for m in first] == [1, 2]
        assert r.json()["more"] is True
        assert len(r.content) < 3000 + 200  # the messages within budget, plus the envelope
        assert await states() == ["in_progress"] * 2 + ["queued"] * 4  # not handed out yet
        # The reply was lost: the same two again, byte for byte, and nothing more.
        r2, again = await exchange(0)
        assert r2.json()["more"] is True
        raw = r.content.split(b'"messages":[', 1)[1].split(b'],"server_time"', 1)[0]
        raw2 = r2.content.split(b'"messages":[', 1)[1].split(b'],"server_time"', 1)[0]
        assert raw2 == raw and again == first
        assert await states() == ["in_progress"] * 2 + ["queued"] * 4
        r, nxt = await exchange(2)
        assert [m["seq"] for m in nxt] == [3, 4] and r.json()["more"] is True
        r, nxt = await exchange(4)
        # The fifth fits; the big one (over the budget by itself) waits for a reply
        # of its own, and then goes alone.
        assert [m["seq"] for m in nxt] == [5] and r.json()["more"] is True
        r, nxt = await exchange(5)
        (big_activity,) = await h.ok("GET", f"/activities?request_id={big['id']}")
        assert [(m["seq"], m["op"]) for m in nxt] == [(6, big_activity["id"])]
        assert len(nxt[0]["body"]) > 5000
        assert "more" not in r.json()
        assert await states() == ["in_progress"] * 6
        r, nxt = await exchange(6)
        assert nxt == [] and "more" not in r.json()


def test_an_id_header_out_of_64_bits_or_not_ascii_digits_is_a_401_on_every_agent_route(server):
    """X-Taskfleet-Computer and X-Taskfleet-Relay name ids 1..2**63-1 in ASCII digits:
    anything else is refused as unknown, never looked up (a bigint out of range made
    PostgreSQL's driver raise: a 500, found by the schemathesis run)."""
    token = enroll_token(server)
    cid, secret = _enrolled(server, token, "real")
    body = {"ack": 0, "messages": []}
    for raw in (str(INT64), str(2**70), "0", "-1", "+1", "1_0", "\u00b2", "1e3", "0x1", ""):
        for header, path, auth in (
            ("x-taskfleet-computer", "/agent/v1/exchange", secret),
            ("x-taskfleet-relay", "/relay/v1/exchange", "tfrs_x"),
        ):
            r = httpx.post(
                server.url + path,
                json=body if "agent" in path else {"computers": []},
                headers={header: raw.encode("latin-1"), "authorization": f"Bearer {auth}"},
                timeout=30,
            )
            assert r.status_code == 401, (header, raw, r.status_code, r.text)
        r = httpx.get(
            f"{server.url}/agent/v1/content/{'0' * 64}",
            headers={"x-taskfleet-computer": raw.encode("latin-1"), "authorization": "Bearer x"},
            timeout=30,
        )
        assert r.status_code == 401, (raw, r.text)
    assert _exchange(server, cid, secret, body).status_code == 200  # the real one still works
