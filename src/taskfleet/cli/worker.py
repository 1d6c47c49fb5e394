"""``taskfleet worker``: run a worker that takes server tasks from RabbitMQ.

Contract: parses and checks the options, then hands over to ``worker.main``
(imported only when the command runs).
"""

from __future__ import annotations

from pathlib import Path

import click

from taskfleet.cli.options import FINITE_FLOAT
from taskfleet.cli.output import fail
from taskfleet.settings import WORKER_CONCURRENCY, WORKER_HEARTBEAT_INTERVAL


@click.command()
@click.option(
    "--queue",
    envvar="TASKFLEET_QUEUE",
    required=True,
    help="amqp://USER:PASS@HOST/VHOST [env: TASKFLEET_QUEUE].",
)
@click.option(
    "--database",
    envvar="TASKFLEET_DATABASE",
    required=True,
    help="The server's database (postgresql://...) [env: TASKFLEET_DATABASE].",
)
@click.option(
    "--task-types",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="The same TOML file the server uses.",
)
@click.option(
    "--concurrency", type=click.IntRange(1, 256), default=WORKER_CONCURRENCY, show_default=True
)
@click.option(
    "--heartbeat-interval", type=FINITE_FLOAT, default=WORKER_HEARTBEAT_INTERVAL, show_default=True
)
@click.option("--name", default=None, help="Name in logs and `taskfleet task workers`.")
@click.option(
    "--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True
)
def worker(
    queue: str,
    database: str,
    task_types: Path | None,
    concurrency: int,
    heartbeat_interval: float,
    name: str | None,
    log_format: str,
) -> None:
    """Run a worker: take server tasks from RabbitMQ, run them, heartbeat."""
    from taskfleet import logs
    from taskfleet.worker.main import run_worker

    logs.setup(log_format)
    if heartbeat_interval <= 0:
        fail("--heartbeat-interval must be positive")
    try:
        run_worker(
            queue=queue,
            database=database,
            task_types=task_types,
            concurrency=concurrency,
            heartbeat_interval=heartbeat_interval,
            name=name,
        )
    except ValueError as exc:
        fail(str(exc))
