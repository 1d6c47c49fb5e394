"""Server tasks on the real RabbitMQ when things break: a worker killed (-9) mid-task or
holding a canceled one, a broker link cut between publish and confirm, a multi-id
message redelivered after a kill, a server restarted while a canceled task holds its
slot. Separate ``taskfleet worker`` processes; the broker reached through a proxy
that can cut links."""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest

from tests.conftest import spawn_worker, wait_until
from tests.server_tasks import MARK, TYPES, finished, submit, task


def test_a_killed_worker_s_task_fails_with_heartbeat_lost_and_nothing_else(rabbit_fleet, tmp_path):
    srv, worker, _ = rabbit_fleet("--heartbeat-timeout", "3")
    victim = worker("--heartbeat-interval", "0.5")
    done_before = submit(srv, "echo", params={"msg": "fine"})["task"]["id"]
    assert finished(srv, done_before)["state"] == "succeeded"
    gate = tmp_path / "never"
    try:
        stuck = submit(srv, "gate", params={"path": str(gate)})["task"]["id"]
        wait_until(lambda: task(srv, stuck)["state"] == "in_progress", 20, "the task to run")
        victim.kill9()
        t = finished(srv, stuck, timeout=30)
        assert t["state"] == "failed"
        assert t["result_line"] == "worker heartbeat lost"
        assert task(srv, done_before)["state"] == "succeeded"
        # Work goes on with a new worker; the lost task is not rerun (its type is not
        # retry-safe).
        worker("--heartbeat-interval", "0.5")
        after = submit(srv, "echo", params={"msg": "again"})["task"]["id"]
        assert finished(srv, after)["state"] == "succeeded"
        with srv.api() as api:
            assert not any(x["retry_of"] == stuck for x in api.get("/tasks").json())
    finally:
        # The killed worker's command runs on in its own process group: let it end.
        gate.touch()


class _CutProxy:
    """A TCP proxy to RabbitMQ that can swallow one direction, then cut every link."""

    def __init__(self) -> None:
        import threading

        self.port = 0
        self.swallow: str | None = None  # "confirms" (broker->server) or "publishes"
        self.loop = asyncio.new_event_loop()
        self.links: list[asyncio.StreamWriter] = []
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await asyncio.Event().wait()

        with contextlib.suppress(RuntimeError):
            self.loop.run_until_complete(main())

    async def _client(self, creader, cwriter) -> None:
        breader, bwriter = await asyncio.open_connection("127.0.0.1", 5672)
        self.links += [cwriter, bwriter]

        async def pipe(reader, writer, direction) -> None:
            with contextlib.suppress(Exception):
                while data := await reader.read(65536):
                    if self.swallow != direction:
                        writer.write(data)
                        await writer.drain()
            writer.close()

        await asyncio.gather(
            pipe(creader, bwriter, "publishes"), pipe(breader, cwriter, "confirms")
        )

    def cut(self) -> None:
        def close_all() -> None:
            for w in self.links:
                w.transport.abort()
            self.links.clear()
            self.swallow = None

        self.loop.call_soon_threadsafe(close_all)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.parametrize("swallow", ["confirms", "publishes"])
def test_a_link_dropped_between_publish_and_confirm_loses_nothing(
    start_server, amqp_url, tmp_path, database_url, swallow
):
    proxy = _CutProxy()
    types = tmp_path / "types.toml"
    marks = tmp_path / "marks"
    types.write_text(TYPES + MARK.format(marks=marks))
    queue = amqp_url.replace("127.0.0.1:5672", f"127.0.0.1:{proxy.port}")
    srv = start_server("--task-types", str(types), "--queue", queue)
    w = spawn_worker(amqp_url, database_url, types, tmp_path / "worker.log", wait=False)
    try:
        wait_until(lambda: "consuming" in w.text(), 30, "worker")
        proxy.swallow = swallow
        ids = [submit(srv, "mark", params={"n": i})["task"]["id"] for i in range(10)]
        if swallow == "confirms":
            # The broker has the first one (the worker runs it); the server never hears
            # the confirm, so its scheduler is still waiting when the link drops.
            wait_until(lambda: marks.exists() and marks.read_text().strip(), 30, "a first run")
        else:
            wait_until(lambda: task(srv, ids[0])["dispatched_at"], 20, "a first dispatch")
        proxy.cut()
        for i in ids:
            assert finished(srv, i, timeout=60)["state"] == "succeeded"
        assert sorted(int(x) for x in marks.read_text().split()) == list(range(10))
        assert re.search(r"publishing \d+ tasks failed", srv.proc.text())
    finally:
        w.stop()
        proxy.close()


HOLD = """
[types.hold]
scope = "none"
command = "sh -c 'while [ ! -e {gate} ]; do sleep 0.02; done; echo {{n}} >> {marks}'"
[types.hold.params]
n = "int"
"""


def test_dispatch_packs_ids_and_a_multi_id_message_redelivered_after_a_kill_runs_each_once(
    start_server, amqp_url, tmp_path, database_url
):
    """3 * SPREAD tasks dispatched together travel as SPREAD messages of 3 ids. A
    worker that may run 2 at a time takes one message (claims its 3 tasks together,
    runs 2) and has a second one prefetched but unclaimed when it is killed -9: both
    messages come back to the next worker, which drops the 3 claimed tasks (the
    reaper fails them) and runs every other task exactly once."""
    from taskfleet.dispatch.rabbitmq import SPREAD, pack

    n = 3 * SPREAD
    assert [len(b.split(b",")) for b in pack(list(range(1, n + 1)))] == [3] * SPREAD
    gate, marks = tmp_path / "gate", tmp_path / "marks"
    types = tmp_path / "types.toml"
    types.write_text(TYPES + HOLD.format(gate=gate, marks=marks))
    srv = start_server("--task-types", str(types), "--queue", amqp_url, "--heartbeat-timeout", "3")

    def worker(log: str, *args: str):
        return spawn_worker(
            amqp_url, database_url, types, tmp_path / log, "--heartbeat-interval", "0.5", *args
        )

    victim = worker("victim.log", "--concurrency", "2")
    survivor = None
    try:
        with srv.api() as api:
            r = api.post(
                "/tasks/batch",
                json={"tasks": [{"type": "hold", "params": {"n": i}} for i in range(n)]},
            )
            assert r.status_code in (200, 201), r.text
            ids = [t["id"] for t in r.json()]

            def in_progress() -> list[int]:
                return [t["id"] for t in api.get("/tasks", params={"state": "in_progress"}).json()]

            # The whole first message is claimed (3 tasks), and nothing more: the
            # worker has no room for its second, prefetched message.
            held = wait_until(lambda: len(in_progress()) == 3 and in_progress(), 20, "3 claims")
            wait_until(lambda: victim.text().count("running: sh -c") == 2, 20, "2 running")
            assert len(in_progress()) == 3 and victim.text().count(" taken by worker ") == 2
        victim.kill9()
        survivor = worker("survivor.log", "--concurrency", "64")
        gate.touch()
        for tid in ids:
            t = finished(srv, tid, timeout=60)
            if tid in held:
                assert (t["state"], t["result_line"]) == ("failed", "worker heartbeat lost")
            else:
                assert t["state"] == "succeeded", t
        # The redelivered message of claimed tasks was dropped, task by task.
        dropped = re.findall(r"task\[(\d+)\] delivery dropped \(redelivered\)", survivor.text())
        assert sorted(int(x) for x in dropped) == sorted(held)
        # Every task not claimed by the victim ran exactly once; the victim's two
        # running commands (orphaned by the kill) finish when the gate opens, so a
        # held task ran at most once, and never on the survivor.
        wait_until(lambda: len(marks.read_text().split()) >= n - 3, 20, "the marks")
        ran = sorted(int(x) for x in marks.read_text().split())
        assert len(ran) == len(set(ran))
        n_of = {tid: i for i, tid in enumerate(ids)}
        assert {n_of[t] for t in ids if t not in held} <= set(ran)
        assert f"hold[{held[0]}] taken by worker" not in survivor.text()
        with srv.api() as api:
            assert not any(x["retry_of"] in held for x in api.get("/tasks").json())
    finally:
        gate.touch()
        victim.stop()
        if survivor is not None:
            survivor.stop()


def test_a_held_canceled_task_of_a_worker_killed_9_is_freed_by_the_reaper(
    start_server, amqp_url, tmp_path, database_url
):
    """A threaded handler cannot be stopped, so its canceled task holds its slot; when
    its worker dies (kill -9) the heartbeat is lost and the reaper frees the slot: the
    next task of the concurrency-1 type then runs, on another worker."""
    from tests.server_tasks import CALLABLES, confirmed

    types = tmp_path / "types.toml"
    types.write_text(CALLABLES)
    srv = start_server("--task-types", str(types), "--queue", amqp_url, "--heartbeat-timeout", "3")

    def worker(log: str):
        return spawn_worker(
            amqp_url, database_url, types, tmp_path / log, "--heartbeat-interval", "0.5"
        )

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    victim = worker("victim.log")
    survivor = None
    try:
        first = submit(srv, "sync-wait", params={"dir": str(a)})["task"]["id"]
        wait_until(lambda: (a / "started").exists(), 20, "the thread to start")
        second = submit(srv, "sync-wait", params={"dir": str(b)})["task"]["id"]
        with srv.api() as api:
            assert api.post(f"/tasks/{first}/cancel", json={}).json()["state"] == "canceled"
        wait_until(
            lambda: "cannot be interrupted" in task(srv, first)["reason"], 20, "the held note"
        )
        victim.kill9()
        survivor = worker("survivor.log")
        t1 = confirmed(srv, first)
        assert t1["state"] == "canceled" and not t1["stopping"]
        assert t1["reason"] == (
            "canceled; worker heartbeat lost before it confirmed the stop: slot freed"
        )
        wait_until(lambda: (b / "started").exists(), 30, "the next task to start")
        t2 = task(srv, second)
        assert t2["delivered_at"] >= t1["stopped_at"] and t2["claimed_by"] != t1["claimed_by"]
        assert "worker heartbeat lost" in [h["reason"] for h in _history(srv, first)][-1]
    finally:
        (a / "gate").touch()
        (b / "gate").touch()
        victim.stop()
        if survivor is not None:
            survivor.stop()


def _history(srv, tid):
    with srv.api() as api:
        return api.get(f"/activities/{tid}").json()["history"]


def test_a_held_canceled_task_still_holds_its_slot_after_a_server_restart(
    start_server, amqp_url, tmp_path, database_url
):
    """The hold is in the database: a restarted server counts the canceled task (its
    remote worker's thread still runs) as running until the worker reports it ended."""
    from tests.server_tasks import CALLABLES, confirmed

    types = tmp_path / "types.toml"
    types.write_text(CALLABLES)
    srv = start_server("--task-types", str(types), "--queue", amqp_url)
    w = spawn_worker(amqp_url, database_url, types, tmp_path / "worker.log", wait=False)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    try:
        wait_until(lambda: "consuming" in w.text() or not w.alive(), 30, "worker")
        first = submit(srv, "sync-wait", params={"dir": str(a)})["task"]["id"]
        wait_until(lambda: (a / "started").exists(), 20, "the thread to start")
        second = submit(srv, "sync-wait", params={"dir": str(b)})["task"]["id"]
        with srv.api() as api:
            assert api.post(f"/tasks/{first}/cancel", json={}).json()["stopping"] is True
        wait_until(
            lambda: "cannot be interrupted" in task(srv, first)["reason"], 20, "the held note"
        )
        srv.proc.kill9()
        srv.restart()
        assert srv.proc.text().count("scheduler ready") == 2  # started, then restarted
        assert re.search(r"scheduler ready: 1 pending, 1 running", srv.proc.text())
        t2 = task(srv, second)
        assert t2["state"] == "queued" and "limit" in t2["waiting_for"], t2
        (a / "gate").touch()  # the thread returns; the worker's report frees the slot
        t1 = confirmed(srv, first)
        assert t1["state"] == "canceled" and "finished on its own" in t1["reason"]
        wait_until(lambda: (b / "started").exists(), 30, "the next task to start")
        assert task(srv, second)["delivered_at"] >= t1["stopped_at"]
    finally:
        (a / "gate").touch()
        (b / "gate").touch()
        w.stop()
