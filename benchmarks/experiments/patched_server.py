"""Prototype of the server changes suggested by the benchmarks, applied by monkeypatching.

src/ is not touched: this launcher patches the running process, then runs the
normal ``taskfleet`` CLI, so the same benchmark can compare before and after:

    python benchmarks/fleet_sim.py --n 10000 \\
        --server-cmd "benchmarks/experiments/patched_server.py"

``TF_PATCH`` (comma-separated, default: all) picks the patches:

* ``fastpath``    - dispatch POST /agent/v1/exchange straight to ``api.agent.exchange`` in a
                    thin ASGI wrapper, before FastAPI's middleware stack and router
                    (server/app.py ``create_app`` / cli ``server``).
* ``notelemetry`` - ``FastAPI(telemetry={"tracing": False, "metrics": False,
                    "logs": False})``: no OpenTelemetry provider look-ups (three
                    ``os.environ`` probes) on every request.
* ``maxseq``      - ``AgentRequest.max_seq`` as ``messages[-1].seq`` (parse already
                    enforces increasing seq) instead of a generator per call.
* ``bulkinsert``  - ``service.create_request``: insert the activities with one
                    executemany and read their ids back by request_id, instead of
                    ``insert().returning(..., sort_by_parameter_order=True)``, which
                    SQLAlchemy runs on SQLite as one INSERT per row.
* ``groupcap``    - (not in the default set) the writer counts a relay exchange's jobs
                    (``ExchangeGroup``) against ``WRITE_BATCH_MAX``: once a batch holds
                    that many exchanges it takes no further group, so ten relays asking
                    at once get ten transactions (the first relay answered after its
                    own) instead of one of up to 100,000 exchanges. A group is never
                    split (one relay exchange stays one transaction).

These are experiments for measuring, not production code.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import sqlalchemy as sa

from taskfleet.protocol import exchange
from taskfleet.protocol.exchange import EXCHANGE_PATH
from taskfleet.server import app as appmod
from taskfleet.server import requests as service
from taskfleet.server.api import agent as agent_api
from taskfleet.store.schema import activities

PATCHES = set(
    filter(None, os.environ.get("TF_PATCH", "fastpath,notelemetry,maxseq,bulkinsert").split(","))
)

if "groupcap" in PATCHES:
    from taskfleet.server import exchange as exchange_mod
    from taskfleet.server import writer as writer_mod

    def _weight(job: Any) -> int:
        return len(job.jobs) if isinstance(job, exchange_mod.ExchangeGroup) else 1

    async def _loop(self: Any) -> None:
        while True:
            first = await self._queue.get()
            batch: list[Any] = []
            stopping = first is writer_mod._STOP
            weight = 0
            if not stopping:
                batch.append(first)
                weight = _weight(first)
            while weight < writer_mod.WRITE_BATCH_MAX and not self._queue.empty() and not stopping:
                job = self._queue._queue[0]  # peek: a group that does not fit waits
                if (
                    job is not writer_mod._STOP
                    and batch
                    and (weight + _weight(job) > writer_mod.WRITE_BATCH_MAX)
                ):
                    break
                self._queue.get_nowait()
                if job is writer_mod._STOP:
                    stopping = True
                else:
                    batch.append(job)
                    weight += _weight(job)
            run: list[Any] = []
            for job in batch:
                if run and type(job) is not type(run[0]):
                    await self._handlers[type(run[0])](run)
                    run = []
                run.append(job)
            if run:
                await self._handlers[type(run[0])](run)
            if stopping:
                return

    writer_mod.Writer._loop = _loop  # type: ignore[method-assign]

if "maxseq" in PATCHES:
    # parse_agent_request enforces increasing seq, so the last message has the highest.
    _field = next(
        (f for f in ("messages", "results") if f in exchange.AgentRequest.__dataclass_fields__),
        None,
    )
    if _field is None:
        print("patched server: maxseq skipped (no messages field)", file=sys.stderr)
    else:

        def _max_seq(self: Any, _f: str = _field) -> int:
            items = getattr(self, _f)
            return items[-1].seq if items else 0

        exchange.AgentRequest.max_seq = property(_max_seq)  # type: ignore[method-assign,assignment]

if "bulkinsert" in PATCHES:
    _orig_create_request = service.create_request

    class _BulkConn:
        """Turns the per-row RETURNING insert of activities into one executemany."""

        def __init__(self, conn: Any) -> None:
            self._c = conn

        def __getattr__(self, name: str) -> Any:
            return getattr(self._c, name)

        async def execute(self, stmt: Any, params: Any = None, **kw: Any) -> Any:
            if (
                isinstance(params, list)
                and params
                and getattr(stmt, "table", None) is activities
                and getattr(stmt, "_returning", None)
            ):
                await self._c.execute(activities.insert(), params)
                return await self._c.execute(
                    sa.select(activities.c.id)
                    .where(activities.c.request_id == params[0]["request_id"])
                    .order_by(activities.c.id)
                )
            if params is None:
                return await self._c.execute(stmt, **kw)
            return await self._c.execute(stmt, params, **kw)

    async def _create_request(conn: Any, *args: Any, **kw: Any) -> Any:
        return await _orig_create_request(_BulkConn(conn), *args, **kw)

    service.create_request = _create_request  # type: ignore[assignment]

_orig_create_app = appmod.create_app


def _create_app(config: Any) -> Any:
    app = _orig_create_app(config)
    if "notelemetry" in PATCHES:
        app._telemetry.update(tracing=False, metrics=False, logs=False)
    if "fastpath" not in PATCHES:
        return app
    from starlette.requests import Request

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == EXCHANGE_PATH and scope["method"] == "POST":
            response = await agent_api.exchange(app.state.rt, Request(scope, receive))
            await response(scope, receive, send)
            return
        await app(scope, receive, send)

    return asgi


appmod.create_app = _create_app  # type: ignore[assignment]

if __name__ == "__main__":
    from taskfleet.cli import root

    print(f"patched server: {sorted(PATCHES)}", file=sys.stderr, flush=True)
    root(prog_name="taskfleet")
