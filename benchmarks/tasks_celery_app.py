"""Celery side of benchmarks/bench_tasks.py: the app and its no-op task.

Configured from the environment (set by bench_tasks.py for the worker processes
and for its own producer):

* ``BENCH_CELERY_MODE``: ``safe`` (durable queue, persistent messages, publisher
  confirms, acks late, prefetch 1) or ``fast`` (transient queue and messages,
  acks early, prefetch 64, no confirms).
* ``BENCH_CELERY_QUEUE``: the queue name (unique per run; bench_tasks.py deletes it).
* ``BENCH_CELERY_OUT``: directory where each worker process appends one line per
  task: ``submitted started finished`` (time.time() seconds).
No result backend: results are ignored (the task's timings go to the file).
"""

from __future__ import annotations

import os
import time

from celery import Celery
from kombu import Queue

MODE = os.environ.get("BENCH_CELERY_MODE", "safe")
QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "celbench")
OUT = os.environ.get("BENCH_CELERY_OUT", "/tmp")
BROKER = os.environ.get("BENCH_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//")

app = Celery("tasks_celery_app", broker=BROKER)
_common = {
    "task_ignore_result": True,
    "result_backend": None,
    "task_default_queue": QUEUE,
    "worker_enable_remote_control": False,  # no pidbox queue left behind
    "worker_send_task_events": False,
    "broker_connection_retry_on_startup": True,
    "worker_hijack_root_logger": False,
}
if MODE == "safe":
    app.conf.update(
        _common,
        task_queues=[Queue(QUEUE, routing_key=QUEUE, durable=True)],
        task_default_delivery_mode="persistent",
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"confirm_publish": True},
    )
elif MODE == "fast":
    app.conf.update(
        _common,
        task_queues=[Queue(QUEUE, routing_key=QUEUE, durable=False)],
        task_default_delivery_mode="transient",
        task_acks_late=False,
        worker_prefetch_multiplier=64,
    )
else:  # pragma: no cover
    raise ValueError(f"BENCH_CELERY_MODE must be safe or fast, not {MODE!r}")

_out = None


@app.task(name="bench.noop", ignore_result=True)
def noop(submitted: float) -> None:
    global _out
    started = time.time()
    if _out is None:
        _out = open(os.path.join(OUT, f"celery-{os.getpid()}.txt"), "a", buffering=1)  # noqa: SIM115
    _out.write(f"{submitted!r} {started!r} {time.time()!r}\n")
