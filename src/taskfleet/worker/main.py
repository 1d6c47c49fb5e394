"""``taskfleet worker``: a worker process on RabbitMQ with direct database access."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

from taskfleet.dispatch import open_queue
from taskfleet.store import db
from taskfleet.task_type_file import load_task_types
from taskfleet.worker.builtin import BUILTINS
from taskfleet.worker.runner import Worker


def run_worker(
    *,
    queue: str,
    database: str,
    task_types: Path | None,
    concurrency: int,
    heartbeat_interval: float,
    name: str | None,
) -> None:
    if not queue.startswith(("amqp://", "amqps://")):
        raise ValueError(f"--queue must be amqp://..., not {queue!r}")
    specs = load_task_types(task_types, builtins=BUILTINS)
    asyncio.run(_main(queue, database, specs, concurrency, heartbeat_interval, name))


async def _main(
    queue_url: str,
    database: str,
    specs: Any,
    concurrency: int,
    heartbeat_interval: float,
    name: str | None,
) -> None:
    # No ping per checkout: a worker retries storing a result until the database
    # answers, and the ping would cost a round trip per transaction.
    engine = db.create_engine(database, writer=True, pre_ping=False)

    async def run_tx(fn: Any) -> Any:
        async with engine.begin() as conn:
            return await fn(conn)

    async def run_sync(fn: Any) -> Any:
        async with engine.begin() as conn:
            return await conn.run_sync(fn)

    queue = open_queue(queue_url)
    await queue.connect()
    worker = Worker(
        queue=queue,
        types=specs,
        run_tx=run_tx,
        run_sync=run_sync,
        pg=not db.is_sqlite(database),
        concurrency=concurrency,
        heartbeat_interval=heartbeat_interval,
        context={"run_tx": run_tx},
        name=name,
    )
    main = asyncio.create_task(worker.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.wait(
        {main, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
    )
    main.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await main
    await queue.close()
    await engine.dispose()
