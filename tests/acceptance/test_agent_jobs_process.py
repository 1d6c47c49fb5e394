"""Jobs on a real agent process, with a real server (SPEC 5, 6; agent/jobs.py).

Real processes over real sockets: a ``taskfleet server``, ``taskfleet agent``
processes and ``tests/job_proxy.py`` between them. The server on this branch
does not create job requests yet (that is the server-jobs work), so the proxy
turns the operation of an ordinary request into a job operation signed with the
server's own key (read from its database) for the same operation id, and a
second request's operation into a signed terminate: the agent, its exchange,
its checkpoint and its crash recovery are the real ones, and the job's end
lands on the server as the carrier activity's result. The proxy also serves the
content and records the ``job-step`` reports the agent sends.

The kill -9 tests block a download at a byte offset (the proxy holds the answer)
or an install command on a file the test creates, kill the agent, start it on
the same state folder, and count what ran from files the commands append to.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from taskfleet.store.db import create_engine
from taskfleet.store.schema import server_secrets
from tests.conftest import (
    Agent,
    Proc,
    Server,
    activities_of,
    enroll_token,
    free_port,
    request_done,
    run_request,
    spawn,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
PROXY = ROOT / "tests" / "job_proxy.py"


def _signing_seed(server: Server) -> str:
    async def read() -> str:
        engine = create_engine(server.database_url)
        try:
            async with engine.connect() as conn:
                value = (
                    await conn.execute(
                        sa.select(server_secrets.c.value).where(
                            server_secrets.c.name == "signing_seed"
                        )
                    )
                ).scalar_one()
        finally:
            await engine.dispose()
        return bytes(value).hex()

    return asyncio.run(read())


@dataclass
class Proxy:
    url: str
    proc: Proc

    def _post(self, path: str, **kw: Any) -> Any:
        r = httpx.post(f"{self.url}{path}", timeout=10, **kw)
        assert r.status_code == 200, r.text
        return r.json()

    def arm(self, computer: int, action: str, **kw: Any) -> None:
        self._post("/_job", json={"computer": computer, "action": action, **kw})

    def add(self, data: bytes) -> str:
        return str(self._post("/_content", content=data)["sha256"])

    def gate(self, sha: str, after: int) -> None:
        self._post("/_gate", json={"sha256": sha, "after": after})

    def release(self, sha: str) -> None:
        self._post("/_release", json={"sha256": sha})

    def report(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/_job", timeout=10).json())

    def steps(self, computer: int, op: int) -> list[tuple[str, int, str, str]]:
        return [
            (m["phase"], m["item"], m["status"], m["detail"])
            for m in self.report()["messages"].get(str(computer), [])
            if m["type"] == "job-step" and m["op"] == op
        ]

    def final(self, computer: int, op: int) -> dict[tuple[str, int], tuple[str, str]]:
        return {(p, i): (s, d) for p, i, s, d in self.steps(computer, op) if s != "started"}


@pytest.fixture
def proxy(server: Server, tmp_path: Path) -> Iterator[Proxy]:
    port = free_port()
    proc = spawn(
        [
            sys.executable,
            str(PROXY),
            *("--listen", str(port), "--upstream", server.url),
            *("--seed", _signing_seed(server)),
        ],
        tmp_path / "proxy.log",
        env={"PYTHONPATH": str(ROOT)},
    )
    p = Proxy(f"http://127.0.0.1:{port}", proc)

    def up() -> bool:
        if not proc.alive():
            raise AssertionError(f"proxy exited:\n{proc.text()[-3000:]}")
        try:
            return httpx.get(f"{p.url}/_job", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 30, "the job proxy")
    yield p
    for sha in p.report()["content"]["paused"]:
        p.release(sha)
    proc.stop()


class Fleet:
    """One real agent behind the proxy, and the jobs the test gives it."""

    def __init__(self, server: Server, proxy: Proxy, start: Callable[..., Agent], tmp: Path):
        self.server, self.proxy, self.start, self.tmp = server, proxy, start, tmp
        self.agent = start(proxy.url, enroll_token(server))
        self.cid = self.agent.computer_id
        self.log = tmp / "runs"

    def item(self, name: str, size: int = 1000, *, install: str = "") -> dict[str, Any]:
        sha = self.proxy.add(name.encode() * (size // len(name)))
        return {
            "name": name,
            "detect": {"script": f"echo 'detect {name}' >> {self.log}"},
            "content": [{"sha256": sha, "size": size // len(name) * len(name), "name": name}],
            "install": {
                "script": f"echo 'install {name}' >> {self.log}\n{install}\ntest -s {name}",
                "timeout": 120,
            },
        }

    def job(self, *items: dict[str, Any], phases: tuple[str, ...] | None = None) -> tuple[int, int]:
        """(request id, operation id) of a job run on the agent."""
        params: dict[str, Any] = {"name": "May patches", "items": list(items)}
        if phases is not None:
            params["phases"] = list(phases)
        self.proxy.arm(self.cid, "job", params=params)
        req = run_request(self.server, f"computer:{self.cid}", {"script": "exit 99"}, 300)
        (a,) = activities_of(self.server, req["id"])
        return req["id"], a["id"]

    def terminate(self, op: int) -> None:
        """A signed terminate for ``op``, carried by another request's message."""
        before = self._terminates()
        self.proxy.arm(self.cid, "terminate", op=op)
        run_request(self.server, f"computer:{self.cid}", {"script": "true"}, 300)
        wait_until(lambda: self._terminates() > before, 30, "the terminate to be delivered")

    def _terminates(self) -> int:
        return sum(1 for d in self.proxy.report()["done"] if d["action"] == "terminate")

    def result(self, op: int) -> dict[str, Any] | None:
        """The operation-result the agent sent for ``op`` (as the proxy saw it)."""
        sent = self.proxy.report()["messages"].get(str(self.cid), [])
        return next((m for m in sent if m["type"] == "operation-result" and m["op"] == op), None)

    def started(self, op: int, phase: str, item: int) -> bool:
        return (phase, item, "started", "") in self.proxy.steps(self.cid, op)

    def runs(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def activity(self, request_id: int) -> dict[str, Any]:
        request_done(self.server, request_id, 60)
        (a,) = activities_of(self.server, request_id)
        return a

    def restart(self) -> Agent:
        self.agent.proc.kill9()
        self.agent = self.start(
            self.proxy.url, None, state_dir=self.agent.state_dir, tickle_port=self.agent.tickle_port
        )
        return self.agent

    def staging(self, op: int) -> Path:
        return self.agent.state_dir / "jobs" / str(op)


@pytest.fixture
def fleet(server: Server, proxy: Proxy, start_agent: Callable[..., Agent], tmp_path: Path) -> Fleet:
    return Fleet(server, proxy, start_agent, tmp_path)


def _gate(tmp: Path, name: str) -> tuple[str, Path]:
    go = tmp / f"go-{name}"
    return f"while [ ! -e {go} ]; do sleep 0.02; done", go


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` runs (a zombie nobody reaps does not)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[2] == str(pgid) and fields[0] not in "ZX":
            return True
    return False


def _record(agent: Agent, op: int) -> dict[str, Any] | None:
    return next((r for r in agent.status()["records"] if r["op"] == op), None)


def test_a_three_item_job_runs_on_a_real_agent_and_its_end_reaches_the_server(
    fleet: Fleet,
) -> None:
    req, op = fleet.job(fleet.item("a"), fleet.item("b"), fleet.item("c"))
    a = fleet.activity(req)
    assert a["state"] == "succeeded"
    assert a["result_line"].startswith("Stage: Install, Status: Succeeded, Result: 9 of 9 steps")
    steps = fleet.proxy.steps(fleet.cid, op)
    started = [(p, i) for p, i, s, _ in steps if s == "started"]
    assert started == [(p, i) for p in ("analyze", "download", "install") for i in range(3)]
    assert set(fleet.proxy.final(fleet.cid, op).values()) >= {("succeeded", "exit code 0")}
    assert [r.split()[0] for r in fleet.runs()] == ["detect"] * 3 + ["install"] * 3
    assert not fleet.staging(op).exists()
    content = fleet.proxy.report()["content"]["requests"]
    assert len(content) == 3 and {r["computer"] for r in content} == {str(fleet.cid)}


def test_terminate_during_install_on_a_real_agent_finishes_the_item_and_cancels(
    fleet: Fleet,
) -> None:
    cmd, go = _gate(fleet.tmp, "b")
    req, op = fleet.job(fleet.item("a"), fleet.item("b", install=cmd), fleet.item("c"))
    wait_until(lambda: fleet.started(op, "install", 1), 30, "install b to start")
    fleet.terminate(op)
    record = wait_until(
        lambda: (r := _record(fleet.agent, op)) and r["terminate_requested"] and r,
        30,
        "the terminate stored",
    )
    assert record["status"] == 3  # Installing: the item in hand goes on
    fleet.terminate(op)  # twice: nothing more
    go.touch()
    a = fleet.activity(req)
    assert a["state"] == "canceled"
    assert (
        "Stage: Install, Status: Canceled, Result: 8 of 9 steps ran, 1 skipped (terminated)"
        in (a["result_line"])
    )
    final = fleet.proxy.final(fleet.cid, op)
    assert final[("install", 1)] == ("succeeded", "exit code 0")
    assert final[("install", 2)] == ("skipped", "terminated")
    assert [r for r in fleet.runs() if r.startswith("install")] == ["install a", "install b"]
    assert not fleet.staging(op).exists()
    refused = [
        m for m in fleet.proxy.report()["messages"][str(fleet.cid)] if m["type"] == "refused"
    ]
    assert refused == []


def test_cancel_through_the_server_stops_a_job_mid_install(fleet: Fleet, tmp_path: Path) -> None:
    cmd, _never = _gate(tmp_path, "never")
    after = tmp_path / "after"
    req, op = fleet.job(fleet.item("a", install=f"{cmd}; touch {after}"), fleet.item("b"))
    wait_until(lambda: fleet.started(op, "install", 0), 30, "install a to start")
    pgid = wait_until(lambda: (r := _record(fleet.agent, op)) and r.get("pgid"), 30, "its pgid")
    with fleet.server.api() as api:
        r = api.post(f"/requests/{req}/cancel", json={})
        assert r.status_code in (200, 202), r.text
    a = fleet.activity(req)
    assert a["state"] == "canceled"
    res = wait_until(lambda: fleet.result(op), 30, "the agent's result")
    assert res["status"] == "canceled" and not after.exists()
    final = fleet.proxy.final(fleet.cid, op)
    assert final[("install", 0)] == ("skipped", "canceled: stopped while running")
    assert final[("install", 1)] == ("skipped", "canceled")
    assert not _group_alive(int(pgid))
    assert not fleet.staging(op).exists()


def test_kill9_mid_download_with_a_checkpoint_resumes_from_the_part_file(fleet: Fleet) -> None:
    items = [fleet.item("a"), fleet.item("big", 300_000), fleet.item("c")]
    sha = items[1]["content"][0]["sha256"]
    fleet.proxy.gate(sha, 100_000)
    req, op = fleet.job(*items)
    wait_until(lambda: fleet.proxy.report()["content"]["paused"], 30, "the download to be held")
    record = wait_until(lambda: _record(fleet.agent, op), 30, "the record")
    assert record["status"] == 2  # Downloading, with a checkpoint (Analyze, item a done)
    part = fleet.staging(op) / "1" / "big.part"
    wait_until(lambda: part.exists() and part.stat().st_size == 100_000, 30, "the part file")
    fleet.agent.proc.kill9()
    fleet.proxy.release(sha)
    again = fleet.restart()
    a = fleet.activity(req)
    assert a["state"] == "succeeded", a["result_line"]
    assert "continues (attempt 2): continue: it has a resume checkpoint" in again.proc.text()
    fetched = [(r["sha256"], r["start"]) for r in fleet.proxy.report()["content"]["requests"]]
    assert fetched.count((sha, 0)) == 1 and (sha, 100_000) in fetched  # resumed from .part
    assert len(fetched) == 4  # a, big, big again from 100000, c: a is not fetched again
    assert [r.split()[0] for r in fleet.runs()] == ["detect"] * 3 + ["install"] * 3
    assert not fleet.staging(op).exists()


def test_kill9_mid_download_without_a_checkpoint_is_scrubbed(fleet: Fleet) -> None:
    items = [fleet.item("big", 300_000), fleet.item("c")]
    sha = items[0]["content"][0]["sha256"]
    fleet.proxy.gate(sha, 100_000)
    req, op = fleet.job(*items, phases=("download", "install"))
    wait_until(lambda: fleet.proxy.report()["content"]["paused"], 30, "the download to be held")
    wait_until(lambda: fleet.staging(op).exists(), 30, "the staging folder")
    fleet.agent.proc.kill9()
    fleet.proxy.release(sha)
    again = fleet.restart()
    a = fleet.activity(req)
    assert a["state"] == "failed"
    assert "Scrubbed: local status was Downloading (2)" in a["result_line"]
    assert "scrub: pushed and Downloading" in a["result_line"]
    final = fleet.proxy.final(fleet.cid, op)
    assert final[("download", 0)] == ("failed", "scrubbed: the agent stopped during this step")
    assert {final[s] for s in final if s != ("download", 0)} == {("skipped", "scrubbed")}
    assert not fleet.staging(op).exists() and fleet.runs() == []
    assert f"operation {op} scrubbed: old status Downloading" in again.proc.text()


def test_kill9_mid_install_continues_without_redoing_finished_steps(fleet: Fleet) -> None:
    cmd, go = _gate(fleet.tmp, "b")
    req, op = fleet.job(fleet.item("a"), fleet.item("b", install=cmd), fleet.item("c"))
    wait_until(lambda: fleet.started(op, "install", 1), 30, "install b to start")
    record = wait_until(
        lambda: (r := _record(fleet.agent, op)) and r.get("pgid") and r, 30, "its process"
    )
    assert record["status"] == 3 and record["pushed"] == 1
    fleet.agent.proc.kill9()
    assert _group_alive(record["pgid"])  # the install command outlived its agent...
    again = fleet.restart()  # ...until the scrubber killed it, before the step runs again
    wait_until(lambda: fleet.runs().count("install b") == 2, 30, "install b to run again")
    wait_until(lambda: not _group_alive(record["pgid"]), 10, "the leftover to be killed")
    go.touch()
    a = fleet.activity(req)
    assert a["state"] == "succeeded", a["result_line"]
    assert "continues (attempt 2): continue: it has a resume checkpoint" in again.proc.text()
    assert f"operation {op}: killed process group {record['pgid']}" in again.proc.text()
    runs = fleet.runs()
    assert runs.count("detect a") == runs.count("detect b") == runs.count("detect c") == 1
    assert [r for r in runs if r.startswith("install")] == [
        "install a",
        "install b",
        "install b",
        "install c",
    ]
    assert len(fleet.proxy.report()["content"]["requests"]) == 3  # nothing fetched twice
    final = fleet.proxy.final(fleet.cid, op)
    assert all(status == "succeeded" for status, _ in final.values()) and len(final) == 9
    assert not fleet.staging(op).exists()
