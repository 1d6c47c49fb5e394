"""A cancel message lost on the dispatch port (issue 9): the message is a prompt and the
database the record, so the worker still learns of the cancel at its next heartbeat.
In-process server, embedded queue with its cancel dropped."""

from __future__ import annotations

from pathlib import Path

from tests.server_tasks import CALLABLES


async def test_a_lost_cancel_message_still_reaches_the_worker_at_its_heartbeat(
    database_url, tmp_path, monkeypatch
):
    """The dispatch port's message is a prompt; the database is the record: with the
    message lost, the worker learns of the cancel when it next heartbeats."""
    from taskfleet.dispatch.embedded import EmbeddedQueue
    from tests.inproc import eventually, inproc_server

    async def lost(self, task_ids):
        return None

    monkeypatch.setattr(EmbeddedQueue, "cancel", lost)
    types = tmp_path / "types.toml"
    types.write_text(CALLABLES)
    a = tmp_path / "a"
    a.mkdir()
    async with inproc_server(
        database_url, tmp_path / "server", workers=1, worker_heartbeat=0.2, task_types=types
    ) as h:
        tid = (await h.ok("POST", "/tasks", {"type": "async-wait", "params": {"dir": str(a)}}))[
            "task"
        ]["id"]
        await eventually(lambda: _exists(a / "started"), what="the coroutine to start")
        assert (await h.ok("POST", f"/tasks/{tid}/cancel", {}))["stopping"] is True

        async def stopped():
            t = await h.ok("GET", f"/tasks/{tid}")
            return t["stopped_at"] is not None and t

        t = await eventually(stopped, what="the stop, learnt at a heartbeat")
        assert (a / "ended").read_text() == "cancelled"
        assert t["state"] == "canceled" and "stopped before completion" in t["reason"]


async def _exists(path: Path) -> bool:
    return path.exists()
