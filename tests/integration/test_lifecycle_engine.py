"""The full activity lifecycle over the real app, store and protocol, on a fake clock.

Scheduled, Waiting (dependencies, thresholds), Blocked (approvals, expiry,
separation of duties), rollouts in waves with the pause rule, maintenance
windows, cron schedules; and each bad input the issue lists, with the proof
that nothing changed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa

from taskfleet.domain.states import CLIENT_TRANSITIONS, State
from tests.inproc import START, Harness, eventually, inproc_server, manual_lifecycle


async def _history_is_legal(h: Harness, request_id: int) -> None:
    """Every recorded event chains and is allowed by the exact table."""
    for a in await h.ok("GET", f"/activities?request_id={request_id}&limit=100000"):
        full = await h.ok("GET", f"/activities/{a['id']}")
        prev = None
        for e in full["history"]:
            assert e["from_state"] == prev, full["history"]
            if prev is not None:
                assert State(e["to_state"]) in CLIENT_TRANSITIONS[State(prev)], e
            prev = e["to_state"]
        assert prev == full["state"]


async def test_scheduled_is_released_at_its_time_never_before(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        [a] = await h.enroll(1)
        req = await h.run("all", at=START + 3600)
        assert await h.states(req["id"]) == {a.computer_id: "scheduled"}
        assert await a.exchange() == []  # not yet
        h.clock.advance(3599.9)
        await h.tick()
        assert await a.exchange() == []  # still not: "not earlier than"
        h.clock.advance(0.1)
        await h.tick()
        # The computer is woken at the time and gets the work at its next exchange.
        assert a.computer_id in [c for c, s in h.rt.fleet.computers.items() if s.has_work]
        [op] = await a.exchange()
        assert await h.states(req["id"]) == {a.computer_id: "in_progress"}
        await a.report(op)
        assert await h.states(req["id"]) == {a.computer_id: "succeeded"}
        full = await h.ok("GET", f"/activities/{op}")
        assert [e["to_state"] for e in full["history"]] == ["scheduled", "in_progress", "succeeded"]
        assert full["delivered_at"] >= START + 3600
        await _history_is_legal(h, req["id"])


async def test_waiting_on_a_request_threshold(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        agents = await h.enroll(10)
        first = await h.run("all")
        second = await h.run(
            "all", after={"request": first["id"], "metric": "succeeded", "percent": 90}
        )
        assert set((await h.states(second["id"])).values()) == {"waiting"}
        ops = {a.computer_id: (await a.exchange())[0] for a in agents}
        # 8 of 10 succeeded: below 90%, and still reachable.
        for a in agents[:8]:
            await a.report(ops[a.computer_id])
        await h.tick()
        assert set((await h.states(second["id"])).values()) == {"waiting"}
        await agents[8].report(ops[agents[8].computer_id])  # 9 of 10 = 90%
        await eventually(lambda: _all(h, second["id"], "queued"), what="second request released")
        got = await agents[0].exchange()
        assert len(got) == 1
        detail = await h.ok("GET", f"/activities/{got[0]}")
        assert "dependency met: request" in detail["history"][1]["reason"]
        await _history_is_legal(h, second["id"])


async def _all(h: Harness, request_id: int, state: str) -> bool:
    return set((await h.states(request_id)).values()) == {state}


async def test_a_dependency_that_can_no_longer_be_met_cancels_the_waiter(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        agents = await h.enroll(4)
        first = await h.run("all")
        second = await h.run("all", after={"request": first["id"], "metric": "succeeded"})
        for a in agents[:1]:
            [op] = await a.exchange()
            await a.report(op, ok=False)  # 100% succeeded is now impossible
        await eventually(lambda: _all(h, second["id"], "canceled"), what="waiter canceled")
        a = (await h.ok("GET", f"/activities?request_id={second['id']}"))[0]
        assert "can no longer be met" in a["reason"]


async def test_waiting_on_one_activity_to_finish(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        a, b = await h.enroll(2)
        first = await h.run(f"computer:{a.computer_id}")
        [op] = await a.exchange()
        second = await h.run(f"computer:{b.computer_id}", after={"activity": op})
        assert await h.states(second["id"]) == {b.computer_id: "waiting"}
        assert await b.exchange() == []
        await a.report(op, ok=False)  # "finished" counts a failure too
        await eventually(lambda: _all(h, second["id"], "queued"), what="released")
        assert len(await b.exchange()) == 1
        assert first["id"] != second["id"]


async def test_approval_then_dependency_then_run(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        [a] = await h.enroll(1)
        requester = await h.token("admin", "alice")
        approver = await h.token("admin", "bob")
        first = await h.run("all")
        body = {
            "target": "all",
            "params": {"argv": ["true"]},
            "approval": {"separation": True, "expires_in": 3600},
            "after": {"request": first["id"]},
        }
        req = await h.ok("POST", "/requests", body, token=requester)
        assert await h.states(req["id"]) == {a.computer_id: "blocked"}
        listed = await h.ok("GET", "/approvals")
        assert [x["request_id"] for x in listed] == [req["id"]]
        assert listed[0]["separation"] is True
        # The requester may not approve their own request: clear error, nothing changed.
        r = await h.call("POST", f"/requests/{req['id']}/approve", token=requester)
        assert r.status_code == 403 and "separation of duties" in r.json()["error"]
        assert await h.states(req["id"]) == {a.computer_id: "blocked"}
        # Approved while its dependency is pending: Waiting, not Queued.
        await h.ok("POST", f"/requests/{req['id']}/approve", token=approver)
        assert await h.states(req["id"]) == {a.computer_id: "waiting"}
        assert await h.ok("GET", "/approvals") == []
        [op1] = await a.exchange()
        await a.report(op1)
        await eventually(lambda: _all(h, req["id"], "queued"), what="released after approval")
        audit = await h.ok("GET", "/audit")
        assert any(e["action"] == "request.approve" for e in audit)
        # Approving again: it is no longer Blocked.
        r = await h.call("POST", f"/requests/{req['id']}/approve", token=approver)
        assert r.status_code == 409 and "not awaiting approval" in r.json()["error"]
        await _history_is_legal(h, req["id"])


async def test_reject_and_approval_expiry(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        [a] = await h.enroll(1)
        rejected = await h.run("all", approval={})
        await h.ok("POST", f"/requests/{rejected['id']}/reject", {"reason": "not tonight"})
        acts = await h.ok("GET", f"/activities?request_id={rejected['id']}")
        assert acts[0]["state"] == "canceled" and "not tonight" in acts[0]["reason"]
        expiring = await h.run("all", approval={"expires_in": 600})
        h.clock.advance(599)
        await h.tick()
        assert await h.states(expiring["id"]) == {a.computer_id: "blocked"}
        h.clock.advance(1)
        await eventually(lambda: _all(h, expiring["id"], "canceled"), what="approval expired")
        acts = await h.ok("GET", f"/activities?request_id={expiring['id']}")
        assert "approval expired" in acts[0]["reason"]
        r = await h.call("POST", f"/requests/{expiring['id']}/approve")
        assert r.status_code == 409
        assert await a.exchange() == []
        actions = [e["action"] for e in await h.ok("GET", "/audit")]
        assert "request.reject" in actions and "request.approval-expired" in actions


async def test_rollout_waves_and_pause_and_resume(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        agents = await h.enroll(7)
        by_id = {a.computer_id: a for a in agents}
        req = await h.run(
            "all", rollout={"canary": 1, "size": 3, "success": 100, "max_failures": 20}
        )
        assert req["rollout"]["waves"] == 3
        st = await h.states(req["id"])
        ids = sorted(st)
        assert [st[i] for i in ids] == ["queued"] + ["waiting"] * 6
        # The canary succeeds: wave 1 (3 computers) is released, wave 2 still waits.
        canary = by_id[ids[0]]
        [op] = await canary.exchange()
        await canary.report(op)
        await eventually(
            lambda: _counts_are(h, req["id"], {"succeeded": 1, "queued": 3, "waiting": 3}),
            what="wave 1 released",
        )
        # Wave 1: one delivered and failed -> 1 of 2 finished failed (50% > 20%): pause.
        w1 = [by_id[i] for i in ids[1:4]]
        [op] = await w1[0].exchange()
        await w1[0].report(op, ok=False)
        await eventually(
            lambda: _counts_are(
                h, req["id"], {"succeeded": 1, "failed": 1, "blocked": 2, "waiting": 3}
            ),
            what="rollout paused",
        )
        assert (await h.ok("GET", f"/requests/{req['id']}"))["rollout"]["paused"] is True
        assert await w1[1].exchange() == []  # held work is not handed out
        # A person resumes: held work is Queued again; wave 1 can no longer reach
        # 100%, and the resume releases wave 2 too (the person decided).
        await h.ok("POST", f"/requests/{req['id']}/resume")
        await eventually(
            lambda: _counts_are(h, req["id"], {"succeeded": 1, "failed": 1, "queued": 5}),
            what="resumed",
        )
        r = await h.call("POST", f"/requests/{req['id']}/resume")
        assert r.status_code == 409 and "not paused" in r.json()["error"]
        await _history_is_legal(h, req["id"])


async def _counts_are(h: Harness, request_id: int, want: dict[str, int]) -> bool:
    return await h.counts(request_id) == want


async def test_maintenance_window_holds_work_until_it_opens(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        await h.ok("POST", "/groups", {"name": "db"})
        [a] = await h.enroll(1, group="db")
        [b] = await h.enroll(1)
        # START is 2026-09-21 22:13:20 UTC; the window is 23:00-01:00 at UTC+01:00,
        # i.e. 22:00-00:00 UTC: open now. Use a window that opens in 2 hours instead.
        await h.ok("PUT", "/groups/db/window", {"window": "01:00-03:00", "utc_offset": "+01:00"})
        req = await h.run("all")
        assert len(await b.exchange()) == 1  # not in the group: not held
        assert await a.exchange() == []
        [held] = [
            x
            for x in await h.ok("GET", f"/activities?request_id={req['id']}")
            if x["computer_id"] == a.computer_id
        ]
        detail = await h.ok("GET", f"/activities/{held['id']}")
        assert "maintenance window 01:00-03:00" in detail["held"]
        h.clock.set(_utc(0, 0) - 1)  # 00:59:59 local
        await h.tick()
        assert await a.exchange() == []
        h.clock.set(_utc(0, 0))  # 01:00 local: the window opens
        await eventually(
            lambda: _has_work(h, a.computer_id), what="computer woken when the window opens"
        )
        assert len(await a.exchange()) == 1


def _utc(hour: int, minute: int) -> float:
    """The next UTC hour:minute after START."""
    day = START - START % 86400
    t = day + hour * 3600 + minute * 60
    return t if t > START else t + 86400


async def _has_work(h: Harness, cid: int) -> bool:
    return h.rt.fleet.computers[cid].has_work


async def test_cron_schedule_creates_one_request_per_run(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        [a] = await h.enroll(1)
        body = {"cron": "0 3 * * *", "request": {"target": "all", "params": {"argv": ["true"]}}}
        sched = await h.ok("POST", "/schedules", body)
        assert sched["next_at"] == _utc(3, 0)
        h.clock.set(_utc(3, 0) - 1)
        await h.tick()
        assert (await h.ok("GET", f"/schedules/{sched['id']}"))["runs"] == 0
        h.clock.set(_utc(3, 0))
        got = await eventually(lambda: _runs(h, sched["id"], 1), what="first run created")
        first = got["last_request_id"]
        assert got["next_at"] == _utc(3, 0) + 86400
        assert (await h.ok("GET", f"/requests/{first}"))["schedule_id"] == sched["id"]
        h.clock.advance(86400)
        got = await eventually(lambda: _runs(h, sched["id"], 2), what="second run")
        assert got["last_request_id"] != first
        # Canceling the schedule stops future runs.
        await h.ok("POST", f"/schedules/{sched['id']}/cancel")
        h.clock.advance(86400 * 3)
        await h.tick()
        await h.tick()
        assert (await h.ok("GET", f"/schedules/{sched['id']}"))["runs"] == 2
        assert len(await a.exchange()) == 2


async def _runs(h: Harness, sid: int, n: int) -> dict | None:
    s = await h.ok("GET", f"/schedules/{sid}")
    return s if s["runs"] == n else None


async def _snapshot(h: Harness) -> list[object]:
    """Everything a bad request could have touched."""
    engine = h.rt.read
    async with engine.connect() as conn:
        n = [
            (await conn.execute(sa.text(f"SELECT count(*) FROM {t}"))).scalar()
            for t in ("requests", "activities", "activity_events", "schedules")
        ]
        groups = [tuple(r) for r in await conn.execute(sa.text("SELECT * FROM groups"))]
        deps = [
            tuple(r) for r in await conn.execute(sa.text("SELECT id, depends_on FROM requests"))
        ]
    return [*n, groups + deps]


async def test_bad_input_is_refused_and_changes_nothing(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        [a] = await h.enroll(1)
        await h.ok("POST", "/groups", {"name": "web"})
        plain = await h.run("all")
        needs = await h.run("all", approval={})
        w1 = await h.run("all", approval={})
        w2 = await h.run("all", approval={}, after={"request": w1["id"]})
        # A second tenant with a request and an activity of its own.
        async with h.rt.writer.engine.begin() as conn:
            tid = (
                await conn.execute(
                    sa.text(
                        "INSERT INTO tenants (name, created_at) VALUES ('other', 0) RETURNING id"
                    )
                )
            ).scalar()
            rid = (
                await conn.execute(
                    sa.text(
                        "INSERT INTO requests (tenant_id, type, params, target, created_by, "
                        "created_at, timeout, total) VALUES (:t, 'execute-script', '{}', 'all', "
                        "'token:99', 0, 60, 1) RETURNING id"
                    ),
                    {"t": tid},
                )
            ).scalar()
            aid = (
                await conn.execute(
                    sa.text(
                        "INSERT INTO activities (tenant_id, request_id, kind, type, state, "
                        "created_at, updated_at) VALUES (:t, :r, 'client', 'execute-script', "
                        "'succeeded', 0, 0) RETURNING id"
                    ),
                    {"t": tid, "r": rid},
                )
            ).scalar()
        before = await _snapshot(h)
        cases = [
            # approving one's own request where separation is required: see the approval test;
            # here: approving something that is not Blocked / needs no approval
            ("POST", f"/requests/{plain['id']}/approve", None, 409, "does not need approval"),
            # a dependency cycle: w1 would wait for w2, which waits for w1
            (
                "PUT",
                f"/requests/{w1['id']}/after",
                {"after": {"request": w2["id"]}},
                409,
                "dependency cycle",
            ),
            (
                "PUT",
                f"/requests/{w1['id']}/after",
                {"after": {"request": w1["id"]}},
                409,
                "dependency cycle",
            ),
            # a dependency on another tenant's activity or request
            ("POST", "/requests", _req(after={"activity": aid}), 404, f"no activity {aid}"),
            ("POST", "/requests", _req(after={"request": rid}), 404, f"no request {rid}"),
            (
                "PUT",
                f"/requests/{needs['id']}/after",
                {"after": {"request": rid}},
                404,
                f"no request {rid}",
            ),
            # an invalid cron expression
            ("POST", "/schedules", {"cron": "61 * * * *", "request": _req()}, 400, "invalid cron"),
            ("POST", "/schedules", {"cron": "* * * *", "request": _req()}, 400, "5 fields"),
            ("POST", "/schedules", {"cron": "0 0 30 2 *", "request": _req()}, 400, "never fires"),
            (
                "POST",
                "/schedules",
                {"cron": "0 2 * * *", "request": _req(target="grp:x")},
                400,
                "target",
            ),
            # a window that never opens (or cannot be read)
            ("PUT", "/groups/web/window", {"window": "02:00-02:00"}, 400, "empty"),
            ("PUT", "/groups/web/window", {"window": "25:00-02:00"}, 400, "HH:MM-HH:MM"),
            (
                "PUT",
                "/groups/web/window",
                {"window": "01:00-02:00", "utc_offset": "+15:00"},
                400,
                "out of range",
            ),
            # a threshold outside 0..100
            (
                "POST",
                "/requests",
                _req(after={"request": plain["id"], "percent": 101}),
                400,
                "threshold",
            ),
            (
                "POST",
                "/requests",
                _req(after={"request": plain["id"], "percent": -5}),
                400,
                "threshold",
            ),
            ("POST", "/requests", _req(rollout={"size": 1, "success": 0}), 400, "threshold"),
            (
                "POST",
                "/requests",
                _req(rollout={"size": 1, "max_failures": 120}),
                400,
                "maximum failure percent",
            ),
            # and a few neighbours
            (
                "POST",
                "/requests",
                _req(after={"request": plain["id"], "metric": "done"}),
                400,
                "metric",
            ),
            ("POST", "/requests", _req(rollout={"size": 1, "share": 10}), 400, "exactly one"),
            ("POST", "/requests", _req(rollout={"canary": 5, "size": 1}), 400, "canary"),
            ("POST", "/requests", _req(at="tomorrow"), 400, "valid number"),
            ("POST", f"/requests/{plain['id']}/resume", None, 409, "not a rollout"),
            ("POST", f"/requests/{plain['id']}/reject", None, 409, "not awaiting approval"),
            (
                "PUT",
                f"/requests/{plain['id']}/after",
                {"after": {"request": needs["id"]}},
                409,
                "only Blocked or Waiting",
            ),
        ]
        for method, path, body, status, text in cases:
            r = await h.call(method, path, body)
            assert r.status_code == status, (path, body, r.status_code, r.text)
            if text:
                assert text in r.text, (path, body, r.text)
        assert await _snapshot(h) == before
        assert await h.states(w1["id"]) == {a.computer_id: "blocked"}


def _req(**extra: object) -> dict:
    return {"target": "all", "params": {"argv": ["true"]}, **extra}


async def _statements_for_one_finish(h: Harness, agent, op: int) -> int:
    """SQL statements the lifecycle pass runs after ``op`` finishes (exchange excluded)."""
    count = 0

    def seen(*_a: object) -> None:
        nonlocal count
        count += 1

    engines = {h.rt.read.sync_engine, h.rt.writer.engine.sync_engine}
    await agent.report(op)
    for e in engines:
        sa.event.listen(e, "before_cursor_execute", seen)
    try:
        await h.tick(reap=False)
    finally:
        for e in engines:
            sa.event.remove(e, "before_cursor_execute", seen)
    return count


async def test_lifecycle_pass_costs_what_changed_not_what_waits(
    database_url: str, tmp_path: Path
) -> None:
    """A finished activity costs the same pass whether 1 or 60 requests are Scheduled or Waiting
    on other work; time passing costs nothing when no timer is due."""
    costs = []
    for pending in (1, 60):
        async with inproc_server(
            database_url.replace("taskfleet.sqlite3", f"t{pending}.sqlite3")
            if "sqlite" in database_url
            else database_url,
            tmp_path / str(pending),
            lifecycle_interval=3600,
            reaper_interval=3600,  # its statements would land in the count
        ) as h:
            # Passes run only when the test says, so each one is counted whole.
            assert h.rt.lifecycle is not None
            await manual_lifecycle(h)
            a, b = await h.enroll(2)
            unrelated = await h.run(f"computer:{b.computer_id}")
            for _ in range(pending):
                await h.run(f"computer:{b.computer_id}", at=START + 86400)
                await h.run(f"computer:{b.computer_id}", after={"request": unrelated["id"]})
            chained = await h.run(f"computer:{a.computer_id}")
            waiter = await h.run(f"computer:{a.computer_id}", after={"request": chained["id"]})
            await h.tick()
            [op] = await a.exchange()
            costs.append(await _statements_for_one_finish(h, a, op))
            assert await h.states(waiter["id"]) == {a.computer_id: "queued"}
            # Time passing with no due timer: the pass touches nothing.
            h.clock.advance(60)
            n = 0

            def seen(*_a: object) -> None:
                nonlocal n
                n += 1

            sa.event.listen(h.rt.read.sync_engine, "before_cursor_execute", seen)
            await h.tick(reap=False)
            sa.event.remove(h.rt.read.sync_engine, "before_cursor_execute", seen)
            assert n == 0
        if "postgresql" in database_url:
            break  # one database per test there; the SQLite pair makes the comparison
    if len(costs) == 2:
        assert costs[0] == costs[1], costs
    assert costs[0] <= 12, costs


async def test_a_restart_keeps_every_pending_rule(database_url: str, tmp_path: Path) -> None:
    """Timers, waiters, approvals and schedules are rebuilt from the store at start."""
    from tests.inproc import FakeClock

    clock = FakeClock()
    async with inproc_server(database_url, tmp_path, clock) as h:
        a, b = await h.enroll(2)
        first = await h.run(f"computer:{a.computer_id}")
        later = await h.run(f"computer:{b.computer_id}", at=START + 600)
        chained = await h.run(f"computer:{b.computer_id}", after={"request": first["id"]})
        expiring = await h.run(f"computer:{b.computer_id}", approval={"expires_in": 900})
        sched = await h.ok(
            "POST",
            "/schedules",
            {"cron": "*/20 * * * *", "request": {"target": "all", "params": {"argv": ["true"]}}},
        )
        [op] = await a.exchange()
    async with inproc_server(database_url, tmp_path, clock) as h2:
        h2.admin = h.admin
        b.h = h2
        a.h = h2
        await a.report(op)  # finishing the dependency after the restart releases the waiter
        await eventually(lambda: _all(h2, chained["id"], "queued"), what="waiter after restart")
        clock.advance(600)  # past the schedule's firing (START + 400) and the `at` time
        fired = await eventually(lambda: _runs(h2, sched["id"], 1), what="schedule kept")
        # Handed out: the scheduled one (due now), the released one and the cron's run.
        assert len(await b.exchange()) == 3
        for rid in (later["id"], chained["id"]):
            assert await h2.states(rid) == {b.computer_id: "in_progress"}
        run = await h2.states(fired["last_request_id"])
        assert run == {a.computer_id: "queued", b.computer_id: "in_progress"}
        clock.advance(300)
        await eventually(lambda: _all(h2, expiring["id"], "canceled"), what="expiry kept")
        assert (await h2.ok("GET", f"/schedules/{sched['id']}"))["runs"] == 1  # next: +1600


async def test_a_changed_window_wakes_at_its_new_opening(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        await h.ok("POST", "/groups", {"name": "db"})
        [a] = await h.enroll(1, group="db")
        await h.ok("PUT", "/groups/db/window", {"window": "05:00-06:00"})
        await h.run("all")
        assert await a.exchange() == []
        await h.ok("PUT", "/groups/db/window", {"window": "03:00-04:00"})
        h.clock.set(_utc(3, 0))
        await eventually(lambda: _has_work(h, a.computer_id), what="woken at the new opening")
        assert len(await a.exchange()) == 1
        audit = [e["action"] for e in await h.ok("GET", "/audit")]
        assert audit.count("group.window") == 2


async def test_expiry_covers_work_still_scheduled_waiting_or_blocked(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path) as h:
        [a] = await h.enroll(1)
        first = await h.run("all")
        reqs = [
            await h.run("all", at=START + 7200, expires_in=600),
            await h.run("all", after={"request": first["id"]}, expires_in=600),
            await h.run("all", approval={}, expires_in=600),
        ]
        h.clock.advance(599)
        await h.tick()
        assert [set((await h.states(r["id"])).values()) for r in reqs] == [
            {"scheduled"},
            {"waiting"},
            {"blocked"},
        ]
        h.clock.advance(1)
        for r in reqs:
            await eventually(lambda r=r: _all(h, r["id"], "canceled"), what="expired")
            [act] = await h.ok("GET", f"/activities?request_id={r['id']}")
            assert act["reason"] == "expired"
        assert await h.states(first["id"]) == {a.computer_id: "queued"}


async def test_a_pass_asked_for_during_another_runs_after_it(
    database_url: str, tmp_path: Path
) -> None:
    """Passes never overlap: a tick while the loop's pass is still waking computers
    returns only after that pass is done (it had popped the due timer already)."""
    async with inproc_server(database_url, tmp_path, lifecycle_interval=3600) as h:
        engine = h.rt.lifecycle
        assert engine is not None
        await engine.stop()
        [a] = await h.enroll(1)
        await h.run("all", at=START + 60)
        h.clock.advance(60)
        inside, go = asyncio.Event(), asyncio.Event()
        real_timer = engine._timer

        async def slow_timer(*args: object) -> None:
            inside.set()
            await go.wait()  # the first pass holds here, its timer already popped
            await real_timer(*args)  # type: ignore[arg-type]

        engine._timer = slow_timer  # type: ignore[method-assign]
        first = asyncio.create_task(engine.run_pass())
        await asyncio.wait_for(inside.wait(), 10)
        second = asyncio.create_task(h.tick(reap=False))
        done, _ = await asyncio.wait({second}, timeout=0.2)
        assert not done, "a second pass ran while the first was still in progress"
        go.set()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        # Once the tick returned, the computer is woken: the released work is there.
        assert h.rt.fleet.computers[a.computer_id].has_work
