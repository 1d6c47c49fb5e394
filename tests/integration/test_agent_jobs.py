"""The agent runs a job operation end to end (SPEC 6; agent/jobs.py).

A real agent, in process, with its own state folder, is handed signed job
operations and terminate/cancel orders as its exchange parses them
(``parse_server_reply``); its commands are real processes and its content
comes over real HTTP from ``tests/content_server.py`` (Range, gates). What it
reports is read from its outbox, as the server would get it. Nothing is sent.
The same runs with a real agent process and a real server are in
``tests/acceptance/test_agent_jobs_process.py``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pwd
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskfleet.agent import state as st
from taskfleet.agent.job_files import Checkpoint, staging_root
from taskfleet.agent.main import Agent, AgentConfig
from taskfleet.protocol.exchange import (
    cancel_message,
    operation_message,
    parse_server_reply,
    terminate_message,
)
from taskfleet.protocol.orders import cancel_body, operation_body, terminate_body
from taskfleet.protocol.signing import Signer, Verifier, new_signing_seed
from tests.content_server import ContentStore, serve

SERVER = Signer(new_signing_seed())
COMPUTER, GENERATION = 17, 3


@pytest.fixture
def store() -> Iterator[tuple[ContentStore, str]]:
    s = ContentStore()
    srv, url = serve(s)
    yield s, url
    for sha in list(s.gates):
        s.release(sha)
    srv.shutdown()


class Harness:
    def __init__(self, agent: Agent, store: ContentStore, tmp: Path) -> None:
        self.agent = agent
        self.store = store
        self.tmp = tmp
        self.seq = 0
        self.log = tmp / "runs"  # every command appends a line: how often each ran

    # -- what the server sends ----------------------------------------------------

    def _receive(self, *messages: dict[str, Any]) -> None:
        reply = parse_server_reply({"ack": 0, "messages": list(messages)})
        self.agent.ops.receive(reply.messages, pushed=True)

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def job(self, op: int, params: dict[str, Any], policy: dict[str, Any] | None = None) -> None:
        self._receive(self.job_message(op, params, policy))

    def job_message(
        self, op: int, params: dict[str, Any], policy: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body = operation_body(
            computer=COMPUTER,
            generation=GENERATION,
            op=op,
            type="job",
            params=params,
            policy=policy or {},
            timeout=600.0,
            issued_at=time.time(),
        )
        return operation_message(self._next(), op, body, SERVER.sign(body))

    def terminate_message(self, op: int) -> dict[str, Any]:
        body = terminate_body(computer=COMPUTER, generation=GENERATION, op=op)
        return terminate_message(self._next(), op, body, SERVER.sign(body))

    def terminate(self, op: int) -> None:
        self._receive(self.terminate_message(op))

    def cancel(self, op: int) -> None:
        body = cancel_body(computer=COMPUTER, generation=GENERATION, op=op)
        self._receive(cancel_message(self._next(), op, body, SERVER.sign(body)))

    # -- what the agent reports ---------------------------------------------------

    def outbox(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.agent.state.pending(100_000, 10**9)]

    def steps(self, op: int) -> list[tuple[str, int, str, str]]:
        return [
            (m["phase"], m["item"], m["status"], m["detail"])
            for m in self.outbox()
            if m["type"] == "job-step" and m["op"] == op
        ]

    def final_steps(self, op: int) -> dict[tuple[str, int], tuple[str, str]]:
        """Each step's last report (the server keeps the last one)."""
        return {(p, i): (s, d) for p, i, s, d in self.steps(op) if s != "started"}

    def started(self, op: int, phase: str, item: int) -> bool:
        return (phase, item, "started", "") in self.steps(op)

    async def result(self, op: int, timeout: float = 30) -> dict[str, Any]:
        found = await until(
            lambda: next(
                (m for m in self.outbox() if m["type"] == "operation-result" and m["op"] == op),
                None,
            ),
            timeout,
            f"the result of operation {op}",
        )
        await asyncio.gather(*self.agent.ops.tasks)
        return dict(found)

    def runs(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    # -- what a job holds ---------------------------------------------------------

    def item(
        self,
        name: str,
        data: bytes | None = b"",
        *,
        detect: str | None = "exit 0",
        install: str = "",
        **extra: Any,
    ) -> dict[str, Any]:
        """An item whose detect and install append to the run log (install checks its
        content is in its staging folder, its cwd)."""
        content = []
        if data is not None:
            sha = self.store.add(data or name.encode() * 100)
            content = [{"sha256": sha, "size": len(data or name.encode() * 100), "name": name}]
        out: dict[str, Any] = {
            "name": name,
            "content": content,
            "install": {
                "script": (
                    f'echo "install {name} $(pwd)" >> {self.log}\n{install}\n'
                    'test "$(pwd)" = "$TASKFLEET_STAGING" || exit 90\n'
                    + (f"test -s {name} || exit 91\n" if data is not None else "")
                ),
                "timeout": 60,
            },
            **extra,
        }
        if detect is not None:
            out["detect"] = {"script": f"echo 'detect {name}' >> {self.log}; {detect}"}
        return out


def job(*items: dict[str, Any], phases: tuple[str, ...] = ("analyze", "download", "install")):
    return {"name": "May patches", "phases": list(phases), "items": list(items)}


async def until(check: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    """Poll ``check`` until it is truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _agent(tmp_path: Path, url: str, *, enrolled: bool = False, **config: Any) -> Agent:
    """An agent of computer COMPUTER; ``enrolled``: its state folder has it already."""
    agent = Agent(
        AgentConfig(server=url, state_dir=tmp_path / "agent", **{"allow_scripts": True, **config})
    )
    ident = st.Identity(url, COMPUTER, "secret", GENERATION, b"k" * 32, SERVER.public_key_hex)
    if not enrolled:
        agent.state.save_identity(ident)
    agent.ident = ident
    agent.ops.bind(ident, Verifier(SERVER.public_key_hex))
    return agent


@pytest.fixture
def h(tmp_path: Path, store: tuple[ContentStore, str]) -> Iterator[Harness]:
    agent = _agent(tmp_path, store[1])
    yield Harness(agent, store[0], tmp_path)
    agent.ops.stop()
    agent.state.close()


def gate(tmp: Path, name: str) -> tuple[str, Path]:
    """A shell command that blocks until the test creates the returned file."""
    go = tmp / f"go-{name}"
    return f"while [ ! -e {go} ]; do sleep 0.02; done;", go


def _pgid(h: Harness, op: int) -> int | None:
    """The process group of the command the job runs now (its process started)."""
    record = h.agent.state.operation(op)
    return record.pgid if record is not None else None


def _staging(h: Harness, op: int) -> Path:
    return staging_root(h.agent.config.state_dir, op)


# -- a whole run -----------------------------------------------------------------


async def test_a_three_item_job_runs_every_step_in_order_and_removes_its_staging(
    h: Harness,
) -> None:
    h.job(5, job(h.item("a"), h.item("b"), h.item("c")))
    res = await h.result(5)
    steps = h.steps(5)
    order = [(p, i) for p, i, s, _ in steps if s == "started"]
    assert order == [(p, i) for p in ("analyze", "download", "install") for i in range(3)]
    # each step: started, then its final report right after it
    for k in range(0, len(steps), 2):
        assert steps[k][2] == "started" and steps[k + 1][:2] == steps[k][:2]
        assert steps[k + 1][2] == "succeeded"
    final = h.final_steps(5)
    assert final[("analyze", 0)] == ("succeeded", "applicable")
    assert final[("download", 1)] == ("succeeded", "1 file(s), 100 bytes verified")
    assert final[("install", 2)] == ("succeeded", "exit code 0")
    assert res["status"] == "succeeded"
    assert "Stage: Install, Status: Succeeded, Result: 9 of 9 steps ran" in res["result_line"]
    assert [r.split()[:2] for r in h.runs()] == [
        ["detect", "a"],
        ["detect", "b"],
        ["detect", "c"],
        ["install", "a"],
        ["install", "b"],
        ["install", "c"],
    ]
    assert not _staging(h, 5).exists()
    record = h.agent.state.operation(5)
    assert record is not None and record.status == st.SUCCESS and record.type == "job"
    assert not record.checkpoint_path(h.agent.config.state_dir).exists()
    # every content fetch carried this computer's credentials, from the peer it talks to
    assert {r["computer"] for r in h.store.report()["requests"]} == {str(COMPUTER)}


async def test_the_local_status_follows_the_phase(h: Harness) -> None:
    cmd, go = gate(h.tmp, "install")
    h.job(6, job(h.item("a", install=cmd)))
    await until(lambda: h.started(6, "install", 0) and _pgid(h, 6))
    record = h.agent.state.operation(6)
    assert record is not None and record.status == st.INSTALLING and record.pgid
    assert record.has_checkpoint(h.agent.config.state_dir)  # steps finished before this one
    cp = Checkpoint.load(record.checkpoint_path(h.agent.config.state_dir))
    assert cp is not None and cp.done == {
        ("analyze", 0): ("succeeded", "applicable"),
        ("download", 0): ("succeeded", "1 file(s), 100 bytes verified"),
    }
    go.touch()
    assert (await h.result(6))["status"] == "succeeded"


async def test_an_item_that_is_not_applicable_is_neither_downloaded_nor_installed(
    h: Harness,
) -> None:
    h.job(7, job(h.item("a"), h.item("b", detect="exit 1"), h.item("c")))
    res = await h.result(7)
    final = h.final_steps(7)
    assert final[("analyze", 1)] == ("succeeded", "not applicable")
    assert ("download", 1) not in final and ("install", 1) not in final
    assert res["status"] == "succeeded" and "7 of 7 steps ran" in res["result_line"]
    assert not any(r.startswith("install b") for r in h.runs())


async def test_a_detect_that_fails_fails_its_step_and_the_item_does_not_go_on(h: Harness) -> None:
    h.job(8, job(h.item("a", detect="echo broken >&2; exit 7"), h.item("b")))
    res = await h.result(8)
    final = h.final_steps(8)
    assert final[("analyze", 0)] == ("failed", "exit code 7: broken; item not applicable")
    assert ("install", 0) not in final and final[("install", 1)][0] == "succeeded"
    assert res["status"] == "failed" and res["exit_code"] == 7 and "broken" in res["stderr"]


@pytest.mark.parametrize("fault", ["missing", "hash", "refused"])
async def test_a_failed_download_skips_that_items_install_and_fails_the_computer(
    h: Harness, fault: str
) -> None:
    bad = h.item("b", b"the real bytes")
    sha = bad["content"][0]["sha256"]
    if fault == "missing":
        h.store.fail(sha, 404)
    elif fault == "hash":
        h.store.corrupt(sha, b"the evil bytes")  # same size, another hash
    else:
        h.store.fail(sha, 403)
    h.job(9, job(h.item("a"), bad, h.item("c")))
    res = await h.result(9)
    final = h.final_steps(9)
    status, detail = final[("download", 1)]
    assert status == "failed" and detail.startswith("b: ")
    assert {"missing": "not found", "hash": "hash mismatch", "refused": "403"}[fault] in detail
    assert final[("install", 1)] == ("skipped", "its download failed")
    assert final[("install", 0)][0] == final[("install", 2)][0] == "succeeded"
    assert not any(r.startswith("install b") for r in h.runs())  # nothing installed
    assert (
        res["status"] == "failed"
        and "1 failed, 1 skipped (its download failed)" in (res["result_line"])
    )
    assert not _staging(h, 9).exists()


async def test_a_full_disk_fails_the_step_removes_the_staging_and_skips_the_rest(
    h: Harness,
) -> None:
    real = h.agent.ops.fetch
    calls = []

    async def fetch(*args: Any, **kw: Any) -> None:
        calls.append(args[3])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        await real(*args, **kw)

    h.agent.ops.fetch = fetch
    h.job(10, job(h.item("a"), h.item("b"), h.item("c")))
    res = await h.result(10)
    final = h.final_steps(10)
    assert final[("download", 0)][0] == "succeeded"
    assert final[("download", 1)] == ("failed", "disk full")
    assert final[("download", 2)] == ("skipped", "disk full")
    assert all(final[("install", i)] == ("skipped", "disk full") for i in range(3))
    assert res["status"] == "failed" and not _staging(h, 10).exists()
    assert not any(r.startswith("install") for r in h.runs())


# -- refused before anything runs ------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"user": "nobody-at-all"}, "user 'nobody-at-all' is not in its allowed script users"),
        ({"name_escape": "../../etc/passwd"}, "must stay inside the staging folder"),
        ({"name_escape": "/etc/passwd"}, "is an absolute path"),
    ],
)
async def test_a_job_the_agent_cannot_run_is_refused_before_anything_runs(
    h: Harness, change: dict[str, str], reason: str
) -> None:
    items = [h.item("a"), h.item("b")]
    if "user" in change:
        items[1]["install"]["user"] = change["user"]
    else:
        items[1]["content"][0]["name"] = change["name_escape"]
    h.job(11, job(*items))
    res = await h.result(11)
    assert res["status"] == "failed" and reason in res["result_line"]
    assert res["result_line"].startswith("Stage: Starting, Status: Failed, Result: Refused by")
    assert h.runs() == [] and h.steps(11) == [] and h.store.report()["requests"] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_a_command_run_as_another_user_gets_its_own_copy_of_the_staged_content(
    tmp_path: Path, store: tuple[ContentStore, str]
) -> None:
    # The state folder (and so the staging folder in it) is 0700 and root's: before the
    # copy, a command run as nobody could not even start in it.
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    agent = _agent(tmp_path, store[1], script_users=("nobody",))
    h = Harness(agent, store[0], tmp_path)
    before = set(Path(tempfile.gettempdir()).glob("taskfleet-job-*"))
    try:
        item = h.item("a", b"payload", detect=None)
        item["install"] = {
            "script": (
                f'test "$(id -u)" = {nobody.pw_uid} || exit 92\n'
                'test "$(pwd)" = "$TASKFLEET_STAGING" || exit 90\n'
                'test "$(cat a)" = payload || exit 91\n'
                'touch "$TASKFLEET_STAGING/written-by-nobody" || exit 93\n'
            ),
            "timeout": 60,
            "user": "nobody",
        }
        h.job(12, job(item, phases=("download", "install")))
        res = await h.result(12)
        assert h.final_steps(12)[("install", 0)] == ("succeeded", "exit code 0"), res
        assert res["status"] == "succeeded"
        assert stat.S_IMODE(agent.config.state_dir.stat().st_mode) == 0o700
        # the copy went with the command
        assert set(Path(tempfile.gettempdir()).glob("taskfleet-job-*")) == before
    finally:
        agent.ops.stop()
        agent.state.close()


async def test_a_job_is_refused_when_scripts_are_disabled(
    tmp_path: Path, store: tuple[ContentStore, str]
) -> None:
    agent = _agent(tmp_path, store[1], allow_scripts=False)
    h = Harness(agent, store[0], tmp_path)
    try:
        h.job(12, job(h.item("a")))
        res = await h.result(12)
        assert "scripts are disabled in its configuration" in res["result_line"]
        assert h.runs() == []
    finally:
        agent.state.close()


async def test_content_that_would_cross_a_symlink_out_of_staging_is_refused(h: Harness) -> None:
    outside = h.tmp / "outside"
    outside.mkdir()
    a = h.item("a")
    a["content"][0]["name"] = "sub/a.deb"
    b = h.item("b")
    # A symlink planted where item 1's staging folder goes (by an earlier step, or anyone).
    plant = f"mkdir -p {h.agent.config.state_dir}/jobs/13 && ln -s {outside} {{}}; exit 0"
    a["detect"]["script"] = plant.format(f"{h.agent.config.state_dir}/jobs/13/1")
    h.job(13, job(a, b))
    res = await h.result(13)
    final = h.final_steps(13)
    assert final[("download", 0)][0] == "succeeded"
    assert final[("download", 1)][0] == "failed" and "symlink" in final[("download", 1)][1]
    assert final[("install", 1)] == ("skipped", "its download failed")
    assert list(outside.iterdir()) == [] and res["status"] == "failed"
    assert outside.exists() and not _staging(h, 13).exists()  # the link went, not its target


# -- terminate -------------------------------------------------------------------


async def test_terminate_during_analyze_completes_the_phase_and_starts_no_later_one(
    h: Harness,
) -> None:
    cmd, go = gate(h.tmp, "detect")
    h.job(20, job(h.item("a", detect=f"{cmd} exit 0"), h.item("b", detect="exit 1"), h.item("c")))
    await until(lambda: h.started(20, "analyze", 0))
    h.terminate(20)
    go.touch()
    res = await h.result(20)
    final = h.final_steps(20)
    assert [final[("analyze", i)][0] for i in range(3)] == ["succeeded"] * 3
    skipped = {s for s, (status, detail) in final.items() if status == "skipped"}
    assert skipped == {("download", 0), ("download", 2), ("install", 0), ("install", 2)}
    assert {final[s][1] for s in skipped} == {"terminated"}
    assert not any(r.startswith("install") for r in h.runs())
    assert h.store.report()["requests"] == []
    assert res["status"] == "canceled"
    assert res["result_line"] == (
        "Stage: Analyze, Status: Canceled, Result: 3 of 7 steps ran, 4 skipped (terminated), "
        "Return code: none"
    )
    assert not _staging(h, 20).exists()
    record = h.agent.state.operation(20)
    assert record is not None and record.terminate_requested and record.status == st.CANCELED


async def test_terminate_during_download_finishes_that_item_and_skips_the_rest(
    h: Harness,
) -> None:
    big = b"x" * 200_000
    items = [h.item("a"), h.item("b", big), h.item("c")]
    h.store.gate(items[1]["content"][0]["sha256"], 50_000)
    h.job(21, job(*items))
    await until(lambda: h.store.report()["paused"])
    record = h.agent.state.operation(21)
    assert record is not None and record.status == st.DOWNLOADING
    h.terminate(21)
    h.store.release(items[1]["content"][0]["sha256"])
    res = await h.result(21)
    final = h.final_steps(21)
    assert final[("download", 1)][0] == "succeeded"  # the item in hand finished
    assert final[("download", 2)] == ("skipped", "terminated")
    assert all(final[("install", i)] == ("skipped", "terminated") for i in range(3))
    assert not any(r.startswith("install") for r in h.runs())
    assert res["status"] == "canceled" and "Stage: Download" in res["result_line"]
    assert not _staging(h, 21).exists()


async def test_terminate_during_install_finishes_that_item_and_skips_the_rest(
    h: Harness,
) -> None:
    cmd, go = gate(h.tmp, "install-b")
    h.job(22, job(h.item("a"), h.item("b", install=cmd), h.item("c")))
    await until(lambda: h.started(22, "install", 1))
    h.terminate(22)
    h.terminate(22)  # again: nothing more
    go.touch()
    res = await h.result(22)
    final = h.final_steps(22)
    assert final[("install", 1)] == ("succeeded", "exit code 0")
    assert final[("install", 2)] == ("skipped", "terminated")
    assert [r.split()[1] for r in h.runs() if r.startswith("install")] == ["a", "b"]
    assert res["status"] == "canceled"
    assert "8 of 9 steps ran, 1 skipped (terminated)" in res["result_line"]
    assert not _staging(h, 22).exists()
    refused = [m for m in h.outbox() if m["type"] == "refused"]
    assert refused == []  # the second terminate is not an error either
    # a terminate after the end does nothing at all
    before = h.outbox()
    h.terminate(22)
    assert h.outbox() == before


async def test_terminate_of_the_last_step_leaves_nothing_to_skip_so_it_succeeded(
    h: Harness,
) -> None:
    cmd, go = gate(h.tmp, "last")
    h.job(23, job(h.item("a", None, install=cmd), phases=("install",)))
    await until(lambda: h.started(23, "install", 0))
    h.terminate(23)
    go.touch()
    res = await h.result(23)
    assert res["status"] == "succeeded"  # SPEC 6: Succeeded if all steps ran


async def test_terminate_before_the_job_started_ends_it_at_once_every_step_skipped(
    tmp_path: Path, store: tuple[ContentStore, str]
) -> None:
    # Optional work outside the local run window is Deferred: not started.
    now = time.localtime()
    later = (now.tm_hour + 2) % 24
    agent = _agent(tmp_path, store[1], run_window=f"{later:02d}:00-{later:02d}:30")
    h = Harness(agent, store[0], tmp_path)
    try:
        h.job(24, job(h.item("a"), h.item("b")), policy={"mode": "optional"})
        await until(lambda: (o := agent.state.operation(24)) and o.status == st.DEFERRED)
        h.terminate(24)
        res = await h.result(24)
        final = h.final_steps(24)
        assert len(final) == 6 and {v for v in final.values()} == {
            ("skipped", "terminated before it started")
        }
        assert res["status"] == "canceled" and h.runs() == []
        assert "Stage: Starting, Status: Canceled, Result: 0 of 6 steps ran" in (res["result_line"])
        assert 24 not in agent.ops.timers
    finally:
        agent.ops.stop()
        agent.state.close()


async def test_a_terminate_in_the_same_reply_as_its_job_ends_it_before_it_starts(
    h: Harness,
) -> None:
    h._receive(h.job_message(25, job(h.item("a"))), h.terminate_message(25))
    res = await h.result(25)
    assert res["status"] == "canceled" and h.runs() == []


async def test_a_terminate_for_an_unknown_or_non_job_operation_is_refused(h: Harness) -> None:
    h.terminate(404)
    body = operation_body(
        computer=COMPUTER,
        generation=GENERATION,
        op=26,
        type="execute-script",
        params={"script": "true"},
        policy={},
        timeout=30.0,
        issued_at=time.time(),
    )
    h._receive(operation_message(h._next(), 26, body, SERVER.sign(body)))
    await h.result(26)
    h.terminate(26)
    forged = h.terminate_message(27)
    h.job(27, job(h.item("a")))
    h._receive({**forged, "seq": h._next(), "body": forged["body"].replace("27", "28")})
    refused = [(m["op"], m["reason"], m["text"]) for m in h.outbox() if m["type"] == "refused"]
    assert refused[0] == (404, "malformed", "a terminate for operation 404, which it does not have")
    assert refused[1] == (26, "malformed", "a terminate for operation 26, which is not a job")
    assert refused[2][1] == "bad-signature"
    assert (await h.result(27))["status"] == "succeeded"  # the forged terminate did nothing


# -- cancel ----------------------------------------------------------------------


async def test_cancel_mid_install_stops_the_command_at_once_and_skips_the_rest(
    h: Harness,
) -> None:
    cmd, _never = gate(h.tmp, "never")
    after = h.tmp / "after-the-gate"
    h.job(30, job(h.item("a"), h.item("b", install=f"{cmd} touch {after};"), h.item("c")))
    await until(lambda: h.started(30, "install", 1) and _pgid(h, 30))
    record = h.agent.state.operation(30)
    assert record is not None and record.pgid
    h.cancel(30)
    res = await h.result(30, timeout=60)
    final = h.final_steps(30)
    assert final[("install", 1)] == ("skipped", "canceled: stopped while running")
    assert final[("install", 2)] == ("skipped", "canceled")
    assert res["status"] == "canceled" and not after.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(record.pgid, 0)
    assert not _staging(h, 30).exists()


async def test_cancel_mid_download_stops_it_at_once(h: Harness) -> None:
    big = h.item("b", b"y" * 100_000)
    h.store.gate(big["content"][0]["sha256"], 10_000)
    h.job(31, job(h.item("a"), big))
    await until(lambda: h.store.report()["paused"])
    h.cancel(31)
    res = await h.result(31, timeout=60)
    final = h.final_steps(31)
    assert final[("download", 1)] == ("skipped", "canceled: stopped while downloading")
    assert final[("install", 0)] == final[("install", 1)] == ("skipped", "canceled")
    assert res["status"] == "canceled" and not _staging(h, 31).exists()


# -- resuming --------------------------------------------------------------------


async def test_a_resumed_job_reports_its_finished_steps_again_and_never_redoes_them(
    tmp_path: Path, store: tuple[ContentStore, str]
) -> None:
    """The agent stops mid-install (as at a shutdown); a new one resumes the run."""
    agent = _agent(tmp_path, store[1])
    h = Harness(agent, store[0], tmp_path)
    cmd, go = gate(tmp_path, "b")
    h.job(40, job(h.item("a"), h.item("b", install=cmd), h.item("c")))
    await until(lambda: h.started(40, "install", 1) and _pgid(h, 40))
    agent.ops.stop()  # a shutdown: the step in hand is not recorded
    await asyncio.gather(*agent.ops.tasks)
    record = agent.state.operation(40)
    assert record is not None and record.status == st.INSTALLING and not record.finished
    agent.state.acked(agent.state.last_seq)  # the server had every report so far
    agent.state.close()
    agent.agent_lock.release()

    again = _agent(tmp_path, store[1], enrolled=True)
    h2 = Harness(again, store[0], tmp_path)
    try:
        go.touch()
        again._startup()  # the scrubber continues it (pushed and Installing)
        res = await h2.result(40)
        assert res["status"] == "succeeded"
        # the finished steps are reported again (a report may come twice; the last wins)
        again_reported = {(p, i) for p, i, s, _ in h2.steps(40) if s != "started"}
        assert {("analyze", 0), ("download", 2), ("install", 0)} <= again_reported
        installs = [r.split()[1] for r in h2.runs() if r.startswith("install")]
        assert installs == ["a", "b", "b", "c"]  # b was in flight: run again; a never
        detects = [r for r in h2.runs() if r.startswith("detect")]
        assert len(detects) == 3
        requests = store[0].report()["requests"]
        assert len(requests) == 3  # no content fetched twice
    finally:
        again.ops.stop()
        again.state.close()
