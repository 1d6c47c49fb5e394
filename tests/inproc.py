"""An in-process server with a fake clock, and simulated agents that speak the real protocol.

For time-driven rules (schedules, approvals, windows, expiry): the test moves
the clock instead of sleeping. Everything else is real: the FastAPI app with
its lifespan, the single writer, the lifecycle engine, the real database and
the agent exchange protocol over ASGI.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from taskfleet.server.app import create_app
from taskfleet.server.runtime import Runtime, ServerConfig, reap_once

START = 1_790_000_000.0  # 2026-09-21T... UTC: a fixed, known "now"


class FakeClock:
    def __init__(self, t: float = START) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def set(self, t: float) -> None:
        self.t = t


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 15.0, what: str = "condition"
) -> Any:
    """Poll an async check with a deadline (the lifecycle loop runs concurrently)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@dataclass
class SimAgent:
    h: Harness
    computer_id: int
    secret: str
    acked: int = 0  # last server seq received
    seq: int = 0  # last message seq sent
    ops: list[int] = field(default_factory=list)

    async def exchange(self, messages: list[dict[str, Any]] | None = None) -> list[int]:
        """One exchange; returns the operation ids handed out in it."""
        r = await self.h.client.post(
            "/agent/v1/exchange",
            headers={
                "x-taskfleet-computer": str(self.computer_id),
                "authorization": f"Bearer {self.secret}",
            },
            json={"ack": self.acked, "messages": messages or []},
        )
        assert r.status_code == 200, r.text
        got = []
        for m in r.json()["messages"]:
            self.acked = max(self.acked, m["seq"])
            if m["type"] == "operation":
                got.append(m["op"])
        self.ops += got
        return got

    async def report(self, op: int, ok: bool = True) -> None:
        self.seq += 1
        t = self.h.clock()
        await self.exchange(
            [
                {
                    "seq": self.seq,
                    "type": "operation-result",
                    "op": op,
                    "status": "succeeded" if ok else "failed",
                    "exit_code": 0 if ok else 1,
                    "stdout": "",
                    "stderr": "",
                    "started_at": t,
                    "ended_at": t,
                    "result_line": "Exit code 0" if ok else "Exit code 1",
                }
            ]
        )


@dataclass
class Harness:
    client: httpx.AsyncClient
    clock: FakeClock
    rt: Runtime
    admin: str

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {token or self.admin}"}

    async def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = None, ok: int = 0
    ) -> Any:
        r = await self.client.request(
            method, "/api/v1" + path, json=body, headers=self.headers(token)
        )
        if ok:
            assert r.status_code == ok, f"{method} {path}: {r.status_code} {r.text}"
        return r

    async def ok(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        r = await self.call(method, path, body, token=token)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    async def token(self, role: str = "admin", name: str | None = None) -> str:
        out = await self.ok(
            "POST", "/tokens", {"kind": "admin", "name": name or uuid.uuid4().hex[:8], "role": role}
        )
        return str(out["token"])

    async def enroll(self, n: int, group: str | None = None) -> list[SimAgent]:
        tok = (await self.ok("POST", "/tokens", {"kind": "enroll", "name": "e", "group": group}))[
            "token"
        ]
        agents = []
        for _ in range(n):
            r = await self.client.post(
                "/agent/v1/enroll",
                json={
                    "token": tok,
                    "hostname": "sim",
                    "machine_id": uuid.uuid4().hex,
                    "policy": {"scripts": True},
                },
            )
            assert r.status_code == 201, r.text
            d = r.json()
            agents.append(SimAgent(self, d["computer_id"], d["secret"]))
        return agents

    async def run(self, target: str, **extra: Any) -> dict[str, Any]:
        body = {"target": target, "params": {"argv": ["true"]}, "timeout": 60, **extra}
        return dict(await self.ok("POST", "/requests", body))

    async def states(self, request_id: int) -> dict[int, str]:
        rows = await self.ok("GET", f"/activities?request_id={request_id}&limit=100000")
        return {a["computer_id"]: a["state"] for a in rows}

    async def counts(self, request_id: int) -> dict[str, int]:
        return dict((await self.ok("GET", f"/requests/{request_id}"))["progress"]["counts"])

    async def tick(self, *, reap: bool = True) -> None:
        """One reaper pass (unless ``reap`` is false), then one lifecycle pass, right
        now; both loops also run on their own unless the test slowed them down to
        make every step deterministic."""
        assert self.rt.lifecycle is not None
        if reap:
            await reap_once(self.rt)
        await self.rt.lifecycle.run_pass()


async def manual_lifecycle(h: Harness) -> None:
    """Stop the lifecycle engine's own loop (the leader's duty) but keep it leading, so
    its passes run only when the test calls ``tick``: a background pass or catch-up
    would otherwise land in what the test counts."""
    assert h.rt.cluster is not None and h.rt.lifecycle is not None
    task = h.rt.cluster._running.pop("lifecycle", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await h.rt.lifecycle.stop()
    h.rt.lifecycle.leading = True  # its timers and waiters are still indexed


@contextlib.asynccontextmanager
async def inproc_server(
    database_url: str, data_dir: Path, clock: FakeClock | None = None, **config: Any
) -> AsyncIterator[Harness]:
    clock = clock or FakeClock()
    defaults: dict[str, Any] = {
        "tickles": False,
        "lifecycle_interval": 0.05,
        "reaper_interval": 0.05,
        "lost_grace": 3600,
        "workers": 0,
    }
    cfg = ServerConfig(
        database_url=database_url, data_dir=data_dir, clock=clock, **{**defaults, **config}
    )
    app = create_app(cfg)
    async with app.router.lifespan_context(app):
        admin = (data_dir / "admin-token").read_text().strip()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://taskfleet") as client:
            yield Harness(client, clock, app.state.rt, admin)
