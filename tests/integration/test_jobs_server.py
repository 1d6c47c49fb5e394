"""The server side of jobs (issue 12, SPEC 6) over the real app, store and protocol, on a
fake clock: create (and every refusal), job steps recorded from exchanges (direct and
through a relay), terminate in each situation, the termination deadline, reads and
tenant isolation. The agent is a raw one (``tests/job_agent.py``): it says exactly
what a job runner says, and checks every terminate order's signature.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from taskfleet.protocol.jobs import job_step
from taskfleet.store.schema import (
    activities,
    api_tokens,
    audit_log,
    content,
    job_steps,
    jobs,
    outbox,
    requests,
    tenants,
)
from tests.inproc import START, Harness, inproc_server
from tests.job_agent import JobAgent, items, sha
from tests.raw_relay import enrolled_relay, entry

DATA = [b"first package bytes", b"second package"]
HASHES = [sha(d) for d in DATA]


async def _content(h: Harness, tenant_id: int = 1, data: list[bytes] = DATA) -> None:
    """Content rows as the content API would leave them (that API is built elsewhere)."""

    async def fn(conn: Any) -> None:
        await conn.execute(
            content.insert(),
            [
                {
                    "tenant_id": tenant_id,
                    "sha256": sha(d),
                    "size": len(d),
                    "name": f"file-{k}.bin",
                    "created_by": "test",
                    "created_at": h.clock(),
                }
                for k, d in enumerate(data)
            ],
        )

    await h.rt.writer.run(fn)


async def _agents(h: Harness, n: int, **extra: Any) -> list[JobAgent]:
    tok = (await h.ok("POST", "/tokens", {"kind": "enroll", "name": "e"}))["token"]
    return [await JobAgent.enroll(h.client, tok, f"pc-{i}", **extra) for i in range(n)]


def _job(target: str, **extra: Any) -> dict[str, Any]:
    return {"name": "May patches", "target": target, "items": items(HASHES), **extra}


async def _create(h: Harness, agents: list[JobAgent], **extra: Any) -> dict[str, Any]:
    target = "computer:" + ",".join(str(a.computer_id) for a in agents)
    return dict(await h.ok("POST", "/jobs", _job(target, **extra)))


async def _count(h: Harness, table: Any, *where: Any) -> int:
    async with h.rt.read.connect() as conn:
        q = sa.select(sa.func.count()).select_from(table).where(*where)
        return int((await conn.execute(q)).scalar_one())


async def _audit(h: Harness, action: str) -> list[dict[str, Any]]:
    rows = await h.ok("GET", "/audit?limit=1000")
    return [r for r in rows if r["action"] == action]


# -- create --------------------------------------------------------------------------


async def test_create_fills_content_stores_the_job_and_hands_out_a_signed_job(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        await _content(h)
        [a, b] = await _agents(h, 2)
        job = await _create(h, [a, b])
        assert job["state"] == "pending" and job["total"] == 2 and job["terminate"] is None
        assert job["phases"] == ["analyze", "download", "install"]
        # size and name were left out: filled from the content rows, stored complete.
        assert job["items"][0]["content"] == [
            {"sha256": HASHES[0], "size": len(DATA[0]), "name": "file-0.bin"},
            {"sha256": HASHES[1], "size": len(DATA[1]), "name": "file-1.bin"},
        ]
        req = await h.ok("GET", f"/requests/{job['id']}")
        assert req["type"] == "job" and req["params"]["name"] == "May patches"
        assert req["timeout"] == 600  # the longest step's time limit
        assert await _count(h, jobs, jobs.c.request_id == job["id"]) == 1
        [op] = await a.ops()
        assert op["type"] == "operation"
        signed = json.loads(op["body"])
        assert signed["type"] == "job" and signed["params"] == req["params"]
        assert (await h.ok("GET", f"/jobs/{job['id']}"))["state"] == "running"
        [created] = await _audit(h, "job.create")
        assert created["detail"]["id"] == job["id"] and created["detail"]["name"] == "May patches"
        listed = await h.ok("GET", "/jobs")
        assert [(j["id"], j["state"], j["counts"]) for j in listed] == [
            (job["id"], "running", {"queued": 1, "in_progress": 1})
        ]


def _no_detect() -> dict[str, Any]:
    bad = items(HASHES)
    del bad[1]["detect"]
    return bad


REFUSALS: list[tuple[str, Callable[[list[int]], dict[str, Any]], int, str]] = [
    (
        "unknown content hash",
        lambda c: _job(f"computer:{c[0]}", items=items([HASHES[0], "ab" * 32])),
        400,
        "ab" * 32,
    ),
    (
        "a content reference that is not a hash",
        lambda c: _job(
            f"computer:{c[0]}",
            items=[{**items([])[0], "content": [{"sha256": ["not", "text"], "size": 1}]}],
        ),
        400,
        "sha256 must be 64 lowercase hex digits",
    ),
    (
        "content size differs",
        lambda c: _job(
            f"computer:{c[0]}",
            items=[{**items([])[0], "content": [{"sha256": HASHES[0], "size": 3}]}],
        ),
        400,
        f"content {HASHES[0]} has size {len(DATA[0])}",
    ),
    (
        "item without detect while analyzing",
        lambda c: _job(f"computer:{c[0]}", items=_no_detect()),
        400,
        "item 1 (pkg-1): the analyze phase needs a detect command",
    ),
    (
        "a content name that leaves the staging folder",
        lambda c: _job(
            f"computer:{c[0]}",
            items=[{**items([])[0], "content": [{"sha256": HASHES[0], "name": "../x"}]}],
        ),
        400,
        "must stay inside the staging folder",
    ),
    (
        "phases out of order",
        lambda c: _job(f"computer:{c[0]}", phases=["install", "analyze"]),
        400,
        "phases must be in order",
    ),
    (
        "timeout shorter than a step",
        lambda c: _job(f"computer:{c[0]}", timeout=60),
        400,
        "shorter than the job's longest step (600s)",
    ),
    (
        "a user the computers do not allow",
        lambda c: _job(
            f"computer:{c[0]},{c[1]}",
            items=[{**items(HASHES)[0], "install": {"argv": ["true"], "user": "mallory"}}],
        ),
        409,
        "2 of 2 target computers would refuse this job",
    ),
    (
        "scripts disabled on one computer",
        lambda c: _job(f"computer:{c[0]},{c[2]}"),
        409,
        "scripts are disabled",
    ),
]


@pytest.mark.parametrize(("case", "body", "status", "says"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_create_refusals_change_nothing(
    database_url: str,
    tmp_path: Path,
    case: str,
    body: Callable[[list[int]], dict[str, Any]],
    status: int,
    says: str,
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        await _content(h)
        agents = await _agents(h, 2)
        [locked] = await _agents(h, 1, policy={"scripts": False})
        ids = [a.computer_id for a in agents] + [locked.computer_id]
        r = await h.call("POST", "/jobs", body(ids))
        assert r.status_code == status, r.text
        assert says in r.json()["error"], r.json()
        if status == 409:  # a policy refusal names the computers
            assert f"{ids[-1] if 'disabled' in says else ids[0]} (pc-" in r.json()["error"]
        for table in (requests, jobs, activities):
            assert await _count(h, table) == 0


async def test_content_of_another_tenant_is_not_found_and_jobs_stay_in_their_tenant(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:

        async def other(conn: Any) -> int:
            new = tenants.insert().values(name="other", created_at=h.clock())
            tid = (await conn.execute(new.returning(tenants.c.id))).scalar_one()
            await conn.execute(
                api_tokens.insert().values(
                    tenant_id=tid,
                    name="theirs",
                    kind="admin",
                    role="admin",
                    token_hash=hashlib.sha256(b"tfa_theirs").hexdigest(),
                    created_at=h.clock(),
                    revoked=False,
                )
            )
            return int(tid)

        tid = await h.rt.writer.run(other)
        await _content(h, tenant_id=tid)  # their content, not ours
        [a] = await _agents(h, 1)
        r = await h.call("POST", "/jobs", _job(f"computer:{a.computer_id}"))
        assert r.status_code == 400 and HASHES[0] in r.json()["error"], r.text
        await _content(h)
        job = await _create(h, [a])
        for method, path in (
            ("GET", f"/jobs/{job['id']}"),
            ("POST", f"/jobs/{job['id']}/terminate"),
        ):
            r = await h.call(method, path, token="tfa_theirs")
            assert r.status_code == 404 and "no job" in r.json()["error"], r.text
        assert await h.ok("GET", "/jobs", token="tfa_theirs") == []
        assert (await h.ok("GET", f"/jobs/{job['id']}"))["state"] == "pending"


# -- job steps -----------------------------------------------------------------------


async def _steps(h: Harness, op: int) -> dict[tuple[str, int], str]:
    async with h.rt.read.connect() as conn:
        rows = await conn.execute(
            sa.select(job_steps.c.phase, job_steps.c.item, job_steps.c.status).where(
                job_steps.c.activity_id == op
            )
        )
        return {(r.phase, r.item): r.status for r in rows}


async def _deadline(h: Harness, op: int) -> float | None:
    async with h.rt.read.connect() as conn:
        q = sa.select(activities.c.deadline_at).where(activities.c.id == op)
        return (await conn.execute(q)).scalar_one()  # type: ignore[no-any-return]


async def test_steps_are_recorded_last_report_wins_and_move_the_lost_deadline(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path, lost_grace=60) as h:
        await _content(h)
        [a, b] = await _agents(h, 2)
        job = await _create(h, [a, b])
        [op] = await a.ops()
        [other_op] = await b.ops()
        op_id = op["op"]
        assert await _deadline(h, op_id) == START + 600 + 60
        h.clock.advance(500)
        await a.steps(op_id, ("analyze", 0, "started"), ("analyze", 0, "succeeded"))
        assert await _steps(h, op_id) == {("analyze", 0): "succeeded"}
        assert await _deadline(h, op_id) == START + 500 + 600 + 60  # moved: it is alive
        # A resend of an applied message (same seq) changes nothing.
        resent = {**job_step(op_id, "analyze", 0, "failed", "resent", 1.0), "seq": a.seq}
        await a.exchange([resent])
        assert await _steps(h, op_id) == {("analyze", 0): "succeeded"}
        # A new report of the same step (a resumed job) is the step's status now.
        await a.steps(op_id, ("analyze", 0, "skipped"))
        assert await _steps(h, op_id) == {("analyze", 0): "skipped"}
        # A step for another computer's operation, or for no job: ignored, the rest applied.
        script = await h.run(f"computer:{a.computer_id}")
        [script_op] = await a.ops()
        assert script_op["op"] != op_id and script["type"] == "execute-script"
        before = a.seq
        await a.steps(other_op["op"], ("analyze", 1, "succeeded"))  # b's operation, reported by a
        await a.steps(script_op["op"], ("analyze", 0, "succeeded"))
        await a.steps(op_id, ("analyze", 1, "started"))
        assert a.seq == before + 3  # every exchange was answered (200)
        assert await _steps(h, other_op["op"]) == {}
        assert await _steps(h, script_op["op"]) == {}
        assert await _steps(h, op_id) == {("analyze", 0): "skipped", ("analyze", 1): "started"}
        # What show says per computer: the current step and every step as reported.
        shown = await h.ok("GET", f"/jobs/{job['id']}")
        mine = next(c for c in shown["computers"] if c["computer_id"] == a.computer_id)
        assert mine["state"] == "in_progress" and mine["phase"] == "analyze"
        assert mine["step"]["item"] == 1 and mine["step"]["status"] == "started"
        assert [(s["phase"], s["item"], s["status"], s["item_name"]) for s in mine["steps"]] == [
            ("analyze", 0, "skipped", "pkg-0"),
            ("analyze", 1, "started", "pkg-1"),
        ]
        # The end of the job on a computer is its operation-result.
        await a.exchange([a.result(op_id, "succeeded")])
        shown = await h.ok("GET", f"/jobs/{job['id']}")
        assert {c["computer_id"]: c["state"] for c in shown["computers"]} == {
            a.computer_id: "succeeded",
            b.computer_id: "in_progress",
        }


async def test_steps_through_a_relay_are_recorded_like_direct_ones(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        await _content(h)
        relay_token = (await h.ok("POST", "/tokens", {"kind": "relay", "name": "r"}))["token"]
        relay = await enrolled_relay(h.client, relay_token)
        tok = (await h.ok("POST", "/tokens", {"kind": "enroll", "name": "e"}))["token"]
        cid, _ = await relay.computer(tok, "behind-1")
        job = await h.ok("POST", "/jobs", _job(f"computer:{cid}"))
        reply = await relay.exchange([entry(cid)])
        [msg] = [m for c in reply["computers"] if c["id"] == cid for m in c["messages"]]
        op = msg["op"]
        steps = [
            {**job_step(op, "analyze", 0, "succeeded", "applicable", 5.0), "seq": 1},
            {**job_step(op, "download", 0, "failed", "hash mismatch", 6.0), "seq": 2},
        ]
        await relay.exchange([entry(cid, ack=msg["seq"], have=msg["seq"], messages=steps)])
        assert await _steps(h, op) == {("analyze", 0): "succeeded", ("download", 0): "failed"}
        # The relay replays the entry (its reply was lost): nothing changes.
        await relay.exchange([entry(cid, ack=msg["seq"], have=msg["seq"], messages=steps)])
        shown = await h.ok("GET", f"/jobs/{job['id']}")
        [c] = shown["computers"]
        assert [(s["phase"], s["status"], s["detail"], s["at"]) for s in c["steps"]] == [
            ("analyze", "succeeded", "applicable", 5.0),
            ("download", "failed", "hash mismatch", 6.0),
        ]


# -- terminate -----------------------------------------------------------------------


async def _outbox_terminates(h: Harness) -> int:
    async with h.rt.read.connect() as conn:
        rows = (await conn.execute(sa.select(outbox.c.message))).scalars().all()
    return sum('"type":"terminate"' in m for m in rows)


async def _terminate(h: Harness, job_id: int, ok: int = 200, **body: Any) -> dict[str, Any]:
    r = await h.call("POST", f"/jobs/{job_id}/terminate", {"reason": "window over", **body})
    assert r.status_code == ok, r.text
    return dict(r.json())


async def case_not_delivered(h: Harness) -> None:
    [a, b] = await _agents(h, 2)
    job = await _create(h, [a, b])
    out = await _terminate(h, job["id"])
    assert out["state"] == "terminated" and out["waiting_for"] == []
    assert len(out["terminate_call"]["canceled"]) == 2 and out["terminate_call"]["ordered"] == []
    for c in out["computers"]:
        assert c["state"] == "canceled"
        assert c["reason"] == (
            "job terminated before this computer started (by token:1: window over)"
        )
    t = out["terminate"]
    assert (t["by"], t["at"], t["reason"], t["terminated_at"]) == (
        "token:1",
        START,
        "window over",
        START,
    )
    assert await a.ops() == [] and await _outbox_terminates(h) == 0


async def case_in_progress(h: Harness) -> None:
    [a, b] = await _agents(h, 2)
    job = await _create(h, [a, b])
    [op] = await a.ops()  # a started; b never exchanged
    await a.steps(op["op"], ("analyze", 0, "succeeded"), ("analyze", 1, "started"))
    h.clock.advance(10)
    out = await _terminate(h, job["id"])
    assert out["state"] == "terminating"
    assert out["terminate_call"]["ordered"] == [op["op"]]
    assert [c["computer_id"] for c in out["waiting_for"]] == [a.computer_id]
    states = {c["computer_id"]: c["state"] for c in out["computers"]}
    assert states == {a.computer_id: "in_progress", b.computer_id: "canceled"}
    await a.exchange()
    [order] = a.terminates()  # signed by the server, for this computer and operation
    assert order["op"] == op["op"]
    # The agent finishes Analyze, skips the rest and ends Canceled (SPEC 6).
    await a.steps(
        op["op"],
        ("analyze", 1, "succeeded"),
        ("download", 0, "skipped"),
        ("install", 0, "skipped"),
    )
    h.clock.advance(5)
    await a.exchange([a.result(op["op"], "canceled")])
    out = await h.ok("GET", f"/jobs/{job['id']}")
    assert out["state"] == "terminated" and out["waiting_for"] == []
    assert out["terminate"]["terminated_at"] == START + 15  # derived before the reaper runs
    await h.tick()
    async with h.rt.read.connect() as conn:
        stored = (await conn.execute(sa.select(jobs.c.terminated_at))).scalar_one()
    assert stored == START + 15
    mine = next(c for c in out["computers"] if c["computer_id"] == a.computer_id)
    assert {(s["phase"], s["item"]): s["status"] for s in mine["steps"]} == {
        ("analyze", 0): "succeeded",
        ("analyze", 1): "succeeded",
        ("download", 0): "skipped",
        ("install", 0): "skipped",
    }
    assert mine["state"] == "canceled"


async def case_already_terminating(h: Harness) -> None:
    [a] = await _agents(h, 1)
    job = await _create(h, [a])
    await a.ops()
    first = await _terminate(h, job["id"])
    h.clock.advance(30)
    again = await _terminate(h, job["id"], reason="again")
    assert again["terminate_call"] == {
        "already_terminating": True,
        "canceled": [],
        "ordered": [],
    }
    assert again["state"] == first["state"] == "terminating"
    assert again["terminate"] == first["terminate"]  # who, when and why stay the first's
    assert await _outbox_terminates(h) == 1
    await a.exchange()
    assert len(a.terminates()) == 1
    entries = await _audit(h, "job.terminate")
    assert len(entries) == 2
    assert "already terminating since" in entries[0]["detail"]["already"]
    assert "already" not in entries[1]["detail"]


async def case_finished(h: Harness) -> None:
    [a] = await _agents(h, 1)
    job = await _create(h, [a])
    [op] = await a.ops()
    await a.exchange([a.result(op["op"], "succeeded")])
    r = await h.call("POST", f"/jobs/{job['id']}/terminate", {"reason": "late"})
    assert r.status_code == 409, r.text
    assert r.json()["error"] == (
        f"job {job['id']} has finished (Succeeded): there is nothing to terminate"
    )
    assert (await h.ok("GET", f"/jobs/{job['id']}"))["terminate"] is None
    assert await _audit(h, "job.terminate") == []


async def case_scheduled(h: Harness) -> None:
    [a] = await _agents(h, 1)
    job = await _create(h, [a], at=START + 3600)
    assert {c["state"] for c in job["computers"]} == {"scheduled"}
    out = await _terminate(h, job["id"])
    assert out["state"] == "terminated" and out["computers"][0]["state"] == "canceled"
    h.clock.advance(7200)
    await h.tick()
    assert await a.ops() == []  # its time came: it never starts


async def case_recurring_schedule(h: Harness) -> None:
    [a] = await _agents(h, 1)
    body = {
        "cron": "0 3 * * *",
        "request": {
            "type": "job",
            "target": f"computer:{a.computer_id}",
            "params": {"name": "nightly", "items": items(HASHES)},
        },
    }
    sched = await h.ok("POST", "/schedules", body)
    # Stored complete: each run names the same bytes.
    assert sched["template"]["params"]["items"][0]["content"][0]["size"] == len(DATA[0])
    h.clock.set(sched["next_at"])
    await h.tick()
    [run] = await h.ok("GET", "/jobs")
    assert run["name"] == "nightly" and run["schedule_id"] == sched["id"]
    [op] = await a.ops()
    out = await _terminate(h, run["id"])
    assert out["state"] == "terminating"
    after = await h.ok("GET", f"/schedules/{sched['id']}")
    assert after["canceled_at"] == h.clock() and after["next_at"] is None
    [entry_] = await _audit(h, "schedule.cancel")
    assert entry_["detail"] == {"id": sched["id"], "reason": f"job {run['id']} terminated"}
    h.clock.advance(86400 * 2)
    await h.tick()
    assert len(await h.ok("GET", "/jobs")) == 1  # no later run started
    assert [o["op"] for o in await a.ops()] == []
    shown = await h.ok("GET", f"/jobs/{run['id']}")
    assert [c["activity_id"] for c in shown["computers"]] == [op["op"]]


async def case_deadline_unreachable(h: Harness) -> None:
    [a, b] = await _agents(h, 2)
    job = await _create(h, [a, b])
    [op_a] = await a.ops()
    [op_b] = await b.ops()
    out = await _terminate(h, job["id"], wait=10_000)
    assert out["terminate"]["deadline"] == START + 10_000
    await a.exchange([a.result(op_a["op"], "canceled")])  # a answers; b is offline
    # Past b's own lost-deadline (600 + grace): still waited for, not "lost".
    h.clock.advance(5000)
    await h.tick()
    out = await h.ok("GET", f"/jobs/{job['id']}")
    assert out["state"] == "terminating"
    assert [c["computer_id"] for c in out["waiting_for"]] == [b.computer_id]
    h.clock.advance(5000)  # the deadline
    await h.tick()
    out = await h.ok("GET", f"/jobs/{job['id']}")
    assert out["state"] == "terminated" and out["waiting_for"] == []
    assert out["terminate"]["terminated_at"] == START + 10_000
    late = next(c for c in out["computers"] if c["computer_id"] == b.computer_id)
    assert late["state"] == "canceled" and late["reason"] == "unreachable at termination"
    # b comes back: it still gets the order, and its late report is recorded, not applied.
    await b.exchange()
    assert [t["op"] for t in b.terminates()] == [op_b["op"]]
    await b.exchange([b.result(op_b["op"], "canceled")])
    full = await h.ok("GET", f"/activities/{op_b['op']}")
    assert full["state"] == "canceled" and full["agent_report"]["status"] == "canceled"


TERMINATE_CASES: dict[str, Callable[[Harness], Awaitable[None]]] = {
    "not delivered": case_not_delivered,
    "in progress": case_in_progress,
    "already terminating": case_already_terminating,
    "finished": case_finished,
    "scheduled job (--at)": case_scheduled,
    "recurring job's schedule": case_recurring_schedule,
    "deadline: unreachable": case_deadline_unreachable,
}


@pytest.mark.parametrize("case", list(TERMINATE_CASES))
async def test_terminate(database_url: str, tmp_path: Path, case: str) -> None:
    # The reaper and lifecycle loops are slowed down: each test's tick() is the only pass.
    async with inproc_server(
        database_url, tmp_path, reaper_interval=3600, lifecycle_interval=3600
    ) as h:
        await _content(h)
        await TERMINATE_CASES[case](h)


async def test_terminate_bad_input(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        await _content(h)
        [a] = await _agents(h, 1)
        job = await _create(h, [a])
        script = await h.run(f"computer:{a.computer_id}")
        for path, body, status, says in (
            (f"/jobs/{job['id']}/terminate", {"wait": -1}, 400, "wait"),
            (f"/jobs/{job['id']}/terminate", {"reason": "x" * 2001}, 400, "reason"),
            ("/jobs/999999/terminate", {}, 404, "no job 999999"),
            (f"/jobs/{script['id']}/terminate", {}, 404, f"no job {script['id']}"),
        ):
            r = await h.call("POST", path, body)
            assert r.status_code == status and says in r.json()["error"], (path, r.text)
        assert (await h.ok("GET", f"/jobs/{job['id']}"))["terminate"] is None
        assert await _count(h, audit_log, audit_log.c.action == "job.terminate") == 0


async def test_jobs_take_part_in_approvals_rollouts_and_expiry(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(
        database_url, tmp_path, reaper_interval=3600, lifecycle_interval=3600
    ) as h:
        await _content(h)
        [a, b] = await _agents(h, 2)
        job = await _create(
            h, [a, b], approval={"separation": False}, rollout={"canary": 1, "size": 1}
        )
        assert {c["state"] for c in job["computers"]} == {"blocked"} and job["state"] == "pending"
        await h.ok("POST", f"/requests/{job['id']}/approve")
        shown = await h.ok("GET", f"/jobs/{job['id']}")
        states = sorted(c["state"] for c in shown["computers"])
        assert states == ["queued", "waiting"]
        first = next(x for x in (a, b) if any(
            c["computer_id"] == x.computer_id and c["state"] == "queued"
            for c in shown["computers"]
        ))  # fmt: skip
        second = b if first is a else a
        [op] = await first.ops()
        await first.exchange([first.result(op["op"], "succeeded")])
        await h.tick()
        [op2] = await second.ops()  # the next wave started once the canary succeeded
        await second.exchange([second.result(op2["op"], "succeeded")])
        assert (await h.ok("GET", f"/jobs/{job['id']}"))["state"] == "succeeded"

        late = await _create(h, [a], expires_in=100)
        h.clock.advance(101)
        await h.tick()
        shown = await h.ok("GET", f"/jobs/{late['id']}")
        assert shown["state"] == "canceled" and shown["computers"][0]["reason"] == "expired"
        assert await a.ops() == []
