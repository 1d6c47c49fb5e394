"""Running task handlers for real: commands as child processes (time limits, signals,
output caps, process groups) and callables in threads or on the loop (time limits,
cancellation, stop requests). The declarations they run are in unit/test_task_types.py."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import pytest

from taskfleet.domain.task_types import TaskTypeSpec
from taskfleet.process import TRUNCATION_MARKER
from taskfleet.worker.handlers import HandlerResult, StopRequest, run_handler

ME = __name__  # callables below are referenced as "MODULE:NAME"
PY = shlex.quote(sys.executable).replace("{", "{{").replace("}", "}}")
GRACE = 0.2


# --- callables referenced as f"{ME}:NAME" -----------------------------


def sync_echo(params, context):
    return {"return_code": 0, "output": f"{context['task_id']}:{params['n'] * 2}"}


async def async_echo(params, context):
    await asyncio.sleep(0)
    return f"async {params['word']}"


def returns_code(params, context):
    return 3


def returns_none(params, context):
    return None


def returns_bad(params, context):
    return [1, 2]


def raises(params, context):
    raise RuntimeError("disk on fire")


async def async_raises(params, context):
    raise KeyError("missing")


def calls_exit(params, context):
    sys.exit(4)


def returns_coroutine(params, context):
    return async_echo({"word": "via sync"}, context)


def big_output(params, context):
    return "x" * 5000


state: dict[str, object] = {}


async def async_forever(params, context):
    state["started"] = True
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        state["cancelled"] = True
        raise


async def async_stubborn(params, context):
    release: asyncio.Event = state["release"]  # type: ignore[assignment]
    while not release.is_set():
        try:
            await release.wait()
        except asyncio.CancelledError:
            state["ignored"] = True


def sync_blocking(params, context):
    gate: threading.Event = state["gate"]  # type: ignore[assignment]
    gate.wait(30)
    state["thread_done"] = True
    return 0


@pytest.fixture(autouse=True)
def _clean_state():
    state.clear()
    yield
    gate = state.get("gate")
    if isinstance(gate, threading.Event):
        gate.set()  # never leave a handler thread blocked


# --- helpers -----------------------------------------------------------------------------


def spec(**kw) -> TaskTypeSpec:
    base = {"name": "t", "scope": "none", "handler": f"{ME}:returns_none", "kind": "callable"}
    base.update(kw)
    return TaskTypeSpec(**base)


def command(template: str, **kw) -> TaskTypeSpec:
    return spec(handler=template, kind="command", **kw)


CTX = {"task_id": "42", "type": "t", "tenant": None, "group": None}


# --- running commands --------------------------------------------------------------------


async def test_command_success_records_argv_and_output():
    t = command(
        f"{PY} -c 'import json, sys, os; print(json.dumps(sys.argv[1:])); "
        'print(os.environ["TASKFLEET_TASK_ID"], file=sys.stderr)\' {msg} --id={task_id}',
        params={"msg": "str"},
    )
    hostile = "a b; rm -rf /"
    result = await run_handler(t, {"msg": hostile}, CTX, kill_grace=GRACE)
    assert isinstance(result, HandlerResult)
    assert result.ok is True
    assert result.return_code == 0
    assert result.error is None
    assert result.timed_out is False
    assert result.argv is not None and result.argv[-2:] == [hostile, "--id=42"]
    lines = result.output.splitlines()
    assert json.loads(lines[0]) == [hostile, "--id=42"]
    assert lines[1] == "42"
    assert shlex.split(result.command_line) == result.argv
    assert result.started_at <= result.ended_at


async def test_command_nonzero_exit_fails_with_its_code_and_output():
    t = command("sh -c 'echo out; echo err >&2; exit 3'")
    result = await run_handler(t, {}, CTX, kill_grace=GRACE)
    assert result.ok is False
    assert result.return_code == 3
    assert result.output == "out\nerr\n"
    assert result.error == "exited with code 3"
    assert result.argv == ["sh", "-c", "echo out; echo err >&2; exit 3"]


async def test_command_killed_by_a_signal_says_so():
    result = await run_handler(command("sh -c 'kill -9 $$'"), {}, CTX, kill_grace=GRACE)
    assert (result.ok, result.return_code, result.timed_out) == (False, None, False)
    assert result.error == "killed by signal SIGKILL"


async def test_command_that_cannot_start():
    t = command("/nonexistent/taskfleet-tool --x")
    result = await run_handler(t, {}, CTX, kill_grace=GRACE)
    assert result.ok is False
    assert result.return_code is None
    assert "executable not found" in result.error
    assert result.argv == ["/nonexistent/taskfleet-tool", "--x"]


async def test_command_over_its_time_limit_is_killed(tmp_path):
    pidfile = tmp_path / "pid"
    t = command(
        "sh -c 'echo $$ > \"$1\"; echo begun; exec sleep 30' sh {pidfile}",
        params={"pidfile": "str"},
        time_limit=0.5,
    )
    began = time.monotonic()
    result = await run_handler(t, {"pidfile": str(pidfile)}, CTX, kill_grace=GRACE)
    assert time.monotonic() - began < 5
    assert result.ok is False
    assert result.timed_out is True
    assert result.return_code is None
    assert "time limit of 0.5 s exceeded" in result.error
    assert result.output == "begun\n"
    assert _pid_gone(int(pidfile.read_text()))


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # An orphan may stay a zombie where PID 1 does not reap: dead all the same.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def test_command_output_is_capped():
    t = command(f"{PY} -c 'print(\"y\" * 1000)'")
    result = await run_handler(t, {}, CTX, output_cap=100, kill_grace=GRACE)
    assert result.ok is True
    assert result.output.startswith("y" * 100 + TRUNCATION_MARKER.format(dropped=901))


async def test_command_with_unrenderable_template_fails_without_running():
    t = command("echo {tenant}", scope="tenant")
    result = await run_handler(t, {}, CTX, kill_grace=GRACE)
    assert result.ok is False
    assert result.argv is None
    assert "{tenant} has no value" in result.error


async def test_cancelling_run_handler_kills_the_command():
    t = command("sleep 30", time_limit=60)
    task = asyncio.create_task(run_handler(t, {}, CTX, kill_grace=GRACE))
    await asyncio.sleep(0.2)
    began = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - began < 3


# --- running callables -------------------------------------------------------------------


async def test_sync_callable_runs_in_a_thread_and_returns_a_dict():
    t = spec(handler=f"{ME}:sync_echo", params={"n": "int"})
    result = await run_handler(t, {"n": 21}, CTX)
    assert result == HandlerResult(
        ok=True,
        return_code=0,
        output="42:42",
        error=None,
        timed_out=False,
        argv=None,
        started_at=result.started_at,
        ended_at=result.ended_at,
    )


async def test_async_callable_output():
    result = await run_handler(spec(handler=f"{ME}:async_echo"), {"word": "hi"}, CTX)
    assert (result.ok, result.return_code, result.output) == (True, 0, "async hi")


@pytest.mark.parametrize(
    ("fn", "ok", "code", "output", "error"),
    [
        ("returns_none", True, 0, "", None),
        ("returns_code", False, 3, "", "handler returned code 3"),
        ("returns_coroutine", True, 0, "async via sync", None),
        ("returns_bad", False, None, "", "handler returned an unsupported list"),
    ],
)
async def test_callable_return_values(fn, ok, code, output, error):
    result = await run_handler(spec(handler=f"{ME}:{fn}"), {}, CTX)
    assert (result.ok, result.return_code, result.output) == (ok, code, output)
    assert (result.error or "").startswith(error or "")
    assert (result.error is None) == (error is None)


@pytest.mark.parametrize(
    ("fn", "error"),
    [
        ("raises", "RuntimeError: disk on fire"),
        ("async_raises", "KeyError: 'missing'"),
        ("calls_exit", "SystemExit: 4"),
    ],
)
async def test_callable_raising_fails_with_traceback(fn, error):
    result = await run_handler(spec(handler=f"{ME}:{fn}"), {}, CTX)
    assert result.ok is False
    assert result.return_code is None
    assert result.error == error
    assert result.output.startswith("Traceback")
    assert fn in result.output


async def test_callable_traceback_output_is_capped():
    result = await run_handler(spec(handler=f"{ME}:big_output"), {}, CTX, output_cap=10)
    assert result.output == "x" * 10 + TRUNCATION_MARKER.format(dropped=4990)


async def test_unresolvable_callable_fails_cleanly():
    result = await run_handler(spec(handler=f"{ME}:missing_fn"), {}, CTX)
    assert result.ok is False
    assert "has no attribute 'missing_fn'" in result.error


async def test_async_callable_over_its_time_limit_is_cancelled():
    t = spec(handler=f"{ME}:async_forever", time_limit=0.2)
    result = await run_handler(t, {}, CTX, kill_grace=GRACE)
    assert result.ok is False
    assert result.timed_out is True
    assert result.error == "time limit of 0.2 s exceeded; handler cancelled"
    assert state == {"started": True, "cancelled": True}


async def test_async_callable_ignoring_cancellation_is_abandoned():
    release = asyncio.Event()
    state["release"] = release
    t = spec(handler=f"{ME}:async_stubborn", time_limit=0.1)
    result = await run_handler(t, {}, CTX, kill_grace=0.1)
    assert result.timed_out is True
    assert "ignored cancellation" in result.error
    assert state["ignored"] is True
    release.set()
    await asyncio.sleep(0)


async def test_sync_callable_over_its_time_limit_reports_timeout_while_thread_runs():
    gate = threading.Event()
    state["gate"] = gate
    t = spec(handler=f"{ME}:sync_blocking", time_limit=0.2)
    result = await run_handler(t, {}, CTX, kill_grace=GRACE)
    assert result.ok is False
    assert result.timed_out is True
    assert "thread cannot be killed" in result.error
    assert "thread_done" not in state
    gate.set()  # the thread finishes on its own; its late result is dropped quietly
    for _ in range(200):
        if "thread_done" in state:
            break
        await asyncio.sleep(0.01)
    assert state["thread_done"] is True


async def test_cancelling_run_handler_cancels_an_async_callable():
    t = spec(handler=f"{ME}:async_forever", time_limit=60)
    task = asyncio.create_task(run_handler(t, {}, CTX, kill_grace=GRACE))
    while "started" not in state:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state["cancelled"] is True


# --- stopping a canceled task (issue 9) ----------------------------------------------------


async def test_a_stop_request_kills_the_command_s_whole_process_group(tmp_path):
    pids = tmp_path / "pids"
    t = command(
        "sh -c 'sleep 30 & echo $! > {path}; echo $$ >> {path}; wait'",
        params={"path": "str"},
        time_limit=60,
    )
    stop = StopRequest()
    task = asyncio.create_task(
        run_handler(t, {"path": str(pids)}, CTX, kill_grace=GRACE, stop=stop)
    )
    while len(pids.read_text().split() if pids.exists() else []) < 2:
        await asyncio.sleep(0.01)
    child, leader = (int(p) for p in pids.read_text().split())
    stop.set()
    result = await asyncio.wait_for(task, 5)
    assert result.stopped is True and result.ok is False
    assert result.error == "stopped by cancel; process group killed"
    for pid in (child, leader):  # the background child too: the group is gone
        assert not _running(pid), pid


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for an init that never reaps)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_stop_request_cancels_an_async_callable():
    t = spec(handler=f"{ME}:async_forever", time_limit=60)
    stop = StopRequest()
    task = asyncio.create_task(run_handler(t, {}, CTX, kill_grace=GRACE, stop=stop))
    while "started" not in state:
        await asyncio.sleep(0.01)
    stop.set()
    result = await asyncio.wait_for(task, 5)
    assert state["cancelled"] is True
    assert result.stopped is True and result.error == "stopped by cancel; handler cancelled"


async def test_an_async_callable_ignoring_the_stop_is_waited_for_not_abandoned():
    release = asyncio.Event()
    state["release"] = release
    t = spec(handler=f"{ME}:async_stubborn", time_limit=60)
    stop = StopRequest()
    task = asyncio.create_task(run_handler(t, {}, CTX, kill_grace=0.05, stop=stop))
    await asyncio.sleep(0)
    stop.set()
    while "ignored" not in state:
        await asyncio.sleep(0.01)
    done, _ = await asyncio.wait({task}, timeout=0.3)  # well past the kill grace
    assert not done  # still running: the worker must keep its slot
    release.set()
    result = await asyncio.wait_for(task, 5)
    assert result.stopped is False
    assert result.error.startswith("cancel requested; the handler ignored it")


async def test_a_thread_cannot_be_stopped_says_so_and_is_waited_for_past_its_time_limit():
    gate = threading.Event()
    state["gate"] = gate
    held: list[str] = []
    t = spec(handler=f"{ME}:sync_blocking", time_limit=0.2)
    stop = StopRequest(on_held=held.append)
    task = asyncio.create_task(run_handler(t, {}, CTX, kill_grace=GRACE, stop=stop))
    while not any(th.name == "taskfleet-handler" for th in threading.enumerate()):
        await asyncio.sleep(0.01)
    stop.set()
    while not held:
        await asyncio.sleep(0.01)
    assert held == ["handler cannot be interrupted, slot held until it returns"]
    done, _ = await asyncio.wait({task}, timeout=0.5)  # past the 0.2 s time limit
    assert not done  # the thread runs on: run_handler returns only when it does
    gate.set()
    result = await asyncio.wait_for(task, 5)
    assert state["thread_done"] is True
    assert result.stopped is False and result.ok is True and result.return_code == 0
    assert "could not be interrupted and returned on its own" in result.error
