"""Blocked and Waiting server tasks: approvals (separation, expiry, reject) and dependencies,
with the embedded workers really running them, on a fake clock."""

from __future__ import annotations

from pathlib import Path

from tests.inproc import Harness, eventually, inproc_server


async def _state(h: Harness, tid: int) -> str:
    return str((await h.ok("GET", f"/tasks/{tid}"))["state"])


async def _is(h: Harness, tid: int, state: str) -> bool:
    return await _state(h, tid) == state


async def test_task_approval_and_dependency(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path, workers=2) as h:
        alice = await h.token("admin", "alice")
        first = (
            await h.ok("POST", "/tasks", {"type": "noop", "approval": {"separation": True}}, alice)
        )["task"]
        assert first["state"] == "blocked"
        second = (
            await h.ok(
                "POST",
                "/tasks",
                {"type": "noop", "after": {"task": first["id"], "metric": "succeeded"}},
            )
        )["task"]
        assert second["state"] == "waiting"
        listed = await h.ok("GET", "/approvals")
        assert [x.get("task_id") for x in listed] == [first["id"]]
        r = await h.call("POST", f"/tasks/{first['id']}/approve", token=alice)
        assert r.status_code == 403 and "separation of duties" in r.text
        assert await _state(h, first["id"]) == "blocked"
        await h.ok("POST", f"/tasks/{first['id']}/approve")
        await eventually(lambda: _is(h, first["id"], "succeeded"), what="approved task ran")
        await eventually(lambda: _is(h, second["id"], "succeeded"), what="waiting task ran")
        hist = (await h.ok("GET", f"/activities/{second['id']}"))["history"]
        assert [e["to_state"] for e in hist] == ["waiting", "queued", "in_progress", "succeeded"]
        r = await h.call("POST", f"/tasks/{first['id']}/approve")
        assert r.status_code == 409 and "not Blocked" in r.text


async def test_task_reject_expiry_and_doomed_dependency(database_url: str, tmp_path: Path) -> None:
    async with inproc_server(database_url, tmp_path, workers=2) as h:
        a = (await h.ok("POST", "/tasks", {"type": "noop", "approval": {}}))["task"]
        waiter = (
            await h.ok(
                "POST",
                "/tasks",
                {"type": "noop", "after": {"task": a["id"], "metric": "succeeded"}},
            )
        )["task"]
        await h.ok("POST", f"/tasks/{a['id']}/reject", {"reason": "no"})
        assert await _state(h, a["id"]) == "canceled"
        await eventually(lambda: _is(h, waiter["id"], "canceled"), what="doomed waiter canceled")
        # A dependency that can never be met is refused: nothing created.
        before = len(await h.ok("GET", "/tasks?limit=1000"))
        r = await h.call(
            "POST", "/tasks", {"type": "noop", "after": {"task": a["id"], "metric": "succeeded"}}
        )
        assert r.status_code == 409 and "can never be met" in r.text
        r = await h.call("POST", "/tasks", {"type": "noop", "after": {"task": 99999}})
        assert r.status_code == 404
        r = await h.call("POST", "/tasks", {"type": "noop", "approval": {"expires_in": -1}})
        assert r.status_code == 400
        r = await h.call("POST", "/tasks/batch", {"tasks": [{"type": "noop", "approval": {}}]})
        assert r.status_code == 400
        assert len(await h.ok("GET", "/tasks?limit=1000")) == before
        expiring = (await h.ok("POST", "/tasks", {"type": "noop", "approval": {"expires_in": 60}}))[
            "task"
        ]
        h.clock.advance(61)
        await eventually(lambda: _is(h, expiring["id"], "canceled"), what="approval expired")
        detail = await h.ok("GET", f"/activities/{expiring['id']}")
        assert detail["reason"] == "approval expired"


async def test_a_duplicate_of_a_blocked_or_waiting_task_is_not_queued_again(
    database_url: str, tmp_path: Path
) -> None:
    """SPEC 4.2: "still waiting to be dispatched" covers tasks held for an approval
    or for another task; a submission that waits for a task is not its duplicate."""
    async with inproc_server(database_url, tmp_path, workers=2) as h:
        blocked = (await h.ok("POST", "/tasks", {"type": "noop", "approval": {}}))["task"]
        r = await h.call("POST", "/tasks", {"type": "noop"}, ok=200)
        assert r.json()["duplicate_of"] == blocked["id"]
        after = {"type": "purge-history", "after": {"task": blocked["id"]}}
        waiting = await h.ok("POST", "/tasks", after)
        assert waiting["duplicate_of"] is None and waiting["task"]["state"] == "waiting"
        # The same waiting work again, plain or held, names the waiting task.
        again = await h.call("POST", "/tasks", after, ok=200)
        assert again.json()["duplicate_of"] == waiting["task"]["id"]
        plain = await h.call("POST", "/tasks", {"type": "purge-history"}, ok=200)
        assert plain.json()["duplicate_of"] == waiting["task"]["id"]
        batch = await h.ok(
            "POST", "/tasks/batch", {"tasks": [{"type": "noop"}, {"type": "purge-history"}]}
        )
        assert [b["duplicate_of"] for b in batch] == [blocked["id"], waiting["task"]["id"]]
        # "noop after the blocked noop" waits for it: not a duplicate of it.
        chained = await h.ok("POST", "/tasks", {"type": "noop", "after": {"task": blocked["id"]}})
        assert chained["duplicate_of"] is None
        assert len(await h.ok("GET", "/tasks?limit=1000")) == 3


async def test_a_negative_retention_is_refused_at_submission(
    database_url: str, tmp_path: Path
) -> None:
    async with inproc_server(database_url, tmp_path, workers=1) as h:
        for params in ({"older_than_days": -1}, {"older_than_days": 2**63}):
            r = await h.call("POST", "/tasks", {"type": "purge-history", "params": params})
            assert r.status_code == 400 and "older_than_days" in r.json()["error"], r.text
        bad = {"type": "purge-history", "params": {"older_than_days": -1}}
        r = await h.call("POST", "/tasks/batch", {"tasks": [{"type": "noop"}, bad]})
        assert r.status_code == 400 and "task 1" in r.json()["error"]
        assert await h.ok("GET", "/tasks") == []
