"""Server tasks on the real RabbitMQ with separate `taskfleet worker` processes (SPEC 4)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys
import uuid

import pytest

from tests.conftest import REQUIRE, spawn, wait_until
from tests.integration.test_server_tasks import TYPES, finished, submit, task

AMQP = os.environ.get("TASKFLEET_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def amqp_url():
    if not _reachable():
        if REQUIRE:
            pytest.fail("RabbitMQ unavailable at 127.0.0.1:5672 (TASKFLEET_REQUIRE_SERVICES=1)")
        pytest.skip("RabbitMQ unavailable at 127.0.0.1:5672")
    name = "tf_test_" + uuid.uuid4().hex[:12]
    yield f"{AMQP}?queue={name}"

    async def drop() -> None:
        import aio_pika

        conn = await aio_pika.connect(AMQP)
        async with conn:
            channel = await conn.channel()
            await channel.queue_delete(name)

    with contextlib.suppress(Exception):
        asyncio.run(drop())


MARK = """
[types.mark]
scope = "none"
command = "sh -c 'echo {{n}} >> {marks}'"
retry_safe = false
[types.mark.params]
n = "int"
"""


@pytest.fixture
def rabbit_fleet(start_server, amqp_url, tmp_path, database_url):
    types = tmp_path / "types.toml"
    marks = tmp_path / "marks"
    types.write_text(TYPES + MARK.format(marks=marks))
    workers = []

    def start(*server_args: str):
        srv = start_server("--task-types", str(types), "--queue", amqp_url, *server_args)

        def worker(*args: str):
            proc = spawn(
                [
                    sys.executable,
                    "-m",
                    "taskfleet",
                    "worker",
                    "--queue",
                    amqp_url,
                    "--database",
                    database_url,
                    "--task-types",
                    str(types),
                    *args,
                ],
                tmp_path / f"worker-{len(workers)}.log",
            )
            workers.append(proc)
            wait_until(lambda: "consuming" in proc.text() or not proc.alive(), 30, "worker")
            assert proc.alive(), proc.text()
            return proc

        return srv, worker, marks

    yield start
    for w in workers:
        w.stop()


def test_workers_on_rabbitmq_run_tasks_and_report(rabbit_fleet):
    srv, worker, marks = rabbit_fleet()
    w = worker("--name", "w1")
    ids = [submit(srv, "mark", params={"n": i})["task"]["id"] for i in range(10)]
    for i in ids:
        t = finished(srv, i)
        assert t["state"] == "succeeded" and t["claimed_by"]
    assert sorted(int(x) for x in marks.read_text().split()) == list(range(10))
    assert f"mark[{ids[0]}] running: sh -c" in w.text()
    with srv.api() as api:
        (row,) = api.get("/workers").json()
    assert row["name"] == "w1" and "guest" not in row["queue"]


def test_two_workers_racing_claim_each_task_once(rabbit_fleet):
    srv, worker, marks = rabbit_fleet()
    worker("--concurrency", "8")
    worker("--concurrency", "8")
    ids = [submit(srv, "mark", params={"n": i})["task"]["id"] for i in range(60)]
    for i in ids:
        assert finished(srv, i)["state"] == "succeeded"
    assert sorted(int(x) for x in marks.read_text().split()) == list(range(60))
    with srv.api() as api:
        for i in ids[:10]:
            history = api.get(f"/activities/{i}").json()["history"]
            assert [h["to_state"] for h in history] == ["queued", "in_progress", "succeeded"]


def test_a_killed_worker_s_task_fails_with_heartbeat_lost_and_nothing_else(rabbit_fleet, tmp_path):
    srv, worker, _ = rabbit_fleet("--heartbeat-timeout", "3")
    victim = worker("--heartbeat-interval", "0.5")
    done_before = submit(srv, "echo", params={"msg": "fine"})["task"]["id"]
    assert finished(srv, done_before)["state"] == "succeeded"
    gate = tmp_path / "never"
    stuck = submit(srv, "gate", params={"path": str(gate)})["task"]["id"]
    wait_until(lambda: task(srv, stuck)["state"] == "in_progress", 20, "the task to run")
    victim.kill9()
    t = finished(srv, stuck, timeout=30)
    assert t["state"] == "failed"
    assert t["result_line"] == "worker heartbeat lost"
    assert task(srv, done_before)["state"] == "succeeded"
    # Work goes on with a new worker; the lost task is not rerun (its type is not retry-safe).
    worker("--heartbeat-interval", "0.5")
    after = submit(srv, "echo", params={"msg": "again"})["task"]["id"]
    assert finished(srv, after)["state"] == "succeeded"
    with srv.api() as api:
        assert not any(x["retry_of"] == stuck for x in api.get("/tasks").json())


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
    w = spawn(
        [
            sys.executable,
            "-m",
            "taskfleet",
            "worker",
            "--queue",
            amqp_url,
            "--database",
            database_url,
            "--task-types",
            str(types),
        ],
        tmp_path / "worker.log",
    )
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
