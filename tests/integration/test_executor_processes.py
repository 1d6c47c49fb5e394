"""Tests for taskfleet.process: real child processes, short timeouts and graces."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pwd
import signal
import sys
import time
from pathlib import Path

import pytest

from taskfleet.process import (
    TRUNCATION_MARKER,
    ScriptResult,
    ScriptSpec,
    start_script,
)
from taskfleet.settings import OUTPUT_CAP as DEFAULT_OUTPUT_CAP

GRACE = 0.3  # short SIGTERM -> SIGKILL grace so the kill tests stay fast
DRAIN = 0.3
PY = sys.executable


async def run(spec: ScriptSpec) -> ScriptResult:
    running = await start_script(spec, kill_grace=GRACE, exit_drain=DRAIN)
    return await running.wait()


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A killed orphan may stay a zombie if PID 1 does not reap (as in some containers): dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def wait_until(condition, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def strays():
    """Pids a test deliberately leaves running; killed afterwards."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- basic runs ---------------------------------------------------------------------------


async def test_argv_success() -> None:
    running = await start_script(ScriptSpec(argv=["echo", "hello", "world"]))
    assert isinstance(running.pid, int)
    result = await running.wait()
    assert result.exit_code == 0
    assert result.signal is None
    assert result.stdout == "hello world\n"
    assert result.stderr == ""
    assert (result.stdout_dropped, result.stderr_dropped) == (0, 0)
    assert not result.timed_out and not result.canceled and result.error is None
    assert result.succeeded
    assert result.started_at <= result.ended_at
    # wait() is repeatable and cancel() after the end is a no-op
    running.cancel()
    assert await running.wait() == result


async def test_nonzero_exit() -> None:
    result = await run(ScriptSpec(argv=["sh", "-c", "exit 3"]))
    assert result.exit_code == 3
    assert result.error is None
    assert not result.succeeded


async def test_stderr_captured_separately() -> None:
    result = await run(ScriptSpec(argv=["sh", "-c", "echo out; echo err >&2"]))
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


async def test_script_with_default_sh_interpreter() -> None:
    result = await run(ScriptSpec(script='x=4\necho "value $((x * 2))"\nexit 5\n'))
    assert result.stdout == "value 8\n"
    assert result.exit_code == 5


async def test_script_with_python_interpreter() -> None:
    script = "import sys\nprint('from python', sys.argv[0].endswith('script'))\n"
    result = await run(ScriptSpec(script=script, interpreter=PY))
    assert result.stdout == "from python True\n"
    assert result.succeeded


async def test_env_is_base_plus_spec_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKFLEET_AGENT_SECRET", "must-not-leak")
    monkeypatch.setenv("PATH", os.environ.get("PATH", os.defpath))
    code = "import os, json; print(json.dumps(dict(os.environ)))"
    result = await run(ScriptSpec(argv=[PY, "-c", code], env={"FOO": "bar", "LANG": "C.UTF-8"}))
    env = __import__("json").loads(result.stdout)
    assert env["FOO"] == "bar"
    assert env["LANG"] == "C.UTF-8"
    assert env["PATH"] == os.environ["PATH"]
    assert "TASKFLEET_AGENT_SECRET" not in env
    assert set(env) <= {"PATH", "HOME", "LANG", "USER", "FOO", "LC_CTYPE"}


async def test_cwd_applied(tmp_path: Path) -> None:
    result = await run(ScriptSpec(argv=["pwd"], cwd=str(tmp_path)))
    assert result.stdout.strip() == str(tmp_path)


async def test_stdin_is_devnull() -> None:
    result = await run(ScriptSpec(argv=["cat"], timeout=5))
    assert result.succeeded and result.stdout == ""


async def test_invalid_utf8_is_replaced() -> None:
    code = "import sys; sys.stdout.buffer.write(b'ok\\xff\\xfe!')"
    result = await run(ScriptSpec(argv=[PY, "-c", code]))
    assert result.stdout == "ok\ufffd\ufffd!"


# --- time limit and cancel ----------------------------------------------------------------


async def test_timeout_kills_script_and_grandchildren() -> None:
    script = "sleep 1000 &\necho $!\nsleep 1000\n"
    t0 = time.monotonic()
    result = await run(ScriptSpec(script=script, timeout=0.5))
    elapsed = time.monotonic() - t0
    assert result.timed_out and not result.canceled
    assert result.exit_code is None
    assert result.signal == signal.SIGTERM
    assert not result.succeeded
    assert elapsed < 0.5 + GRACE + 2.0
    grandchild = int(result.stdout.split()[0])
    await wait_until(lambda: _pid_gone(grandchild), f"grandchild {grandchild} to die")


async def test_timeout_kills_term_ignoring_script_and_grandchildren() -> None:
    script = 'trap "" TERM\nsleep 1000 &\necho $!\nsleep 1000\n'
    t0 = time.monotonic()
    result = await run(ScriptSpec(script=script, timeout=0.5))
    elapsed = time.monotonic() - t0
    assert result.timed_out
    assert result.signal == signal.SIGKILL
    assert elapsed < 0.5 + GRACE + 2.0
    grandchild = int(result.stdout.split()[0])
    await wait_until(lambda: _pid_gone(grandchild), f"grandchild {grandchild} to die")


async def test_timeout_with_escaped_process_holding_pipes(strays: list[int]) -> None:
    # setsid puts the sleeper outside our process group: it survives the kill and keeps
    # stdout open, yet wait() must still return.
    script = "setsid sleep 1000 &\necho $!\nsleep 1000\n"
    t0 = time.monotonic()
    result = await run(ScriptSpec(script=script, timeout=0.5))
    strays.append(int(result.stdout.split()[0]))
    assert result.timed_out
    assert time.monotonic() - t0 < 0.5 + GRACE + DRAIN + 2.0


async def test_background_process_after_normal_exit_does_not_hang(strays: list[int]) -> None:
    result = await run(ScriptSpec(script="sleep 1000 &\necho $!\nexit 0\n", timeout=30))
    strays.append(int(result.stdout.split()[0]))
    assert result.succeeded
    assert not result.timed_out


async def test_cancel_mid_run(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    script = f"sleep 1000 &\necho $!\ntouch {marker}\nsleep 1000\n"
    running = await start_script(ScriptSpec(script=script, timeout=60), kill_grace=GRACE)
    await wait_until(marker.exists, "script to start")
    running.cancel()
    running.cancel()  # idempotent
    result = await running.wait()
    assert result.canceled and not result.timed_out
    assert result.signal == signal.SIGTERM
    assert not result.succeeded
    grandchild = int(result.stdout.split()[0])
    await wait_until(lambda: _pid_gone(grandchild), f"grandchild {grandchild} to die")


async def test_cancelled_waiter_does_not_abandon_child(tmp_path: Path) -> None:
    running = await start_script(ScriptSpec(argv=["sleep", "1000"]), kill_grace=GRACE)
    waiter = asyncio.ensure_future(running.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert running.pid is not None and not _pid_gone(running.pid)
    running.cancel()
    assert (await running.wait()).canceled


# --- output cap ---------------------------------------------------------------------------


async def test_output_far_beyond_cap_is_truncated_exactly() -> None:
    out_n, err_n, cap = 6_000_000, 3_000_000, 1000
    code = (
        "import sys\n"
        f"sys.stdout.buffer.write(b'a' * {out_n})\n"
        f"sys.stderr.buffer.write(b'b' * {err_n})\n"
    )
    result = await run(ScriptSpec(argv=[PY, "-c", code], output_cap=cap, timeout=20))
    assert result.succeeded
    assert result.stdout_dropped == out_n - cap
    assert result.stderr_dropped == err_n - cap
    assert result.stdout == "a" * cap + TRUNCATION_MARKER.format(dropped=out_n - cap)
    assert result.stderr == "b" * cap + TRUNCATION_MARKER.format(dropped=err_n - cap)


async def test_output_at_cap_is_not_marked() -> None:
    result = await run(ScriptSpec(argv=["printf", "12345"], output_cap=5))
    assert result.stdout == "12345"
    assert result.stdout_dropped == 0


async def test_default_cap() -> None:
    n = DEFAULT_OUTPUT_CAP + 10
    result = await run(ScriptSpec(argv=[PY, "-c", f"print('x' * {n - 1})"]))
    assert result.stdout_dropped == 10
    assert result.stdout.startswith("x" * DEFAULT_OUTPUT_CAP + "\n[taskfleet")


async def test_cap_zero() -> None:
    result = await run(ScriptSpec(argv=["sh", "-c", "printf abc; printf de >&2"], output_cap=0))
    assert result.stdout == TRUNCATION_MARKER.format(dropped=3)
    assert result.stderr == TRUNCATION_MARKER.format(dropped=2)
    assert (result.stdout_dropped, result.stderr_dropped) == (3, 2)
    quiet = await run(ScriptSpec(argv=["true"], output_cap=0))
    assert quiet.stdout == "" and quiet.stdout_dropped == 0


# --- failures to start --------------------------------------------------------------------


def _assert_start_error(result: ScriptResult, *fragments: str) -> None:
    assert result.error is not None
    for fragment in fragments:
        assert fragment in result.error
    assert result.exit_code is None and result.signal is None
    assert not result.succeeded and not result.timed_out and not result.canceled


async def test_missing_executable() -> None:
    running = await start_script(ScriptSpec(argv=["/nonexistent/taskfleet-no-such-binary"]))
    assert running.pid is None
    _assert_start_error(await running.wait(), "not found", "taskfleet-no-such-binary")
    result = await run(ScriptSpec(argv=["taskfleet-no-such-command-on-path"]))
    _assert_start_error(result, "not found")


async def test_missing_interpreter() -> None:
    result = await run(ScriptSpec(script="echo hi", interpreter="/nonexistent/sh"))
    _assert_start_error(result, "/nonexistent/sh")


async def test_bad_cwd(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    _assert_start_error(await run(ScriptSpec(argv=["true"], cwd=missing)), missing)
    a_file = tmp_path / "file"
    a_file.write_text("")
    _assert_start_error(await run(ScriptSpec(argv=["true"], cwd=str(a_file))), str(a_file))


async def test_unknown_user() -> None:
    result = await run(ScriptSpec(argv=["true"], user="taskfleet-no-such-user"))
    _assert_start_error(result, "unknown user", "taskfleet-no-such-user")


async def test_not_executable(tmp_path: Path) -> None:
    path = tmp_path / "plain.sh"
    path.write_text("#!/bin/sh\necho hi\n")
    path.chmod(0o644)
    _assert_start_error(await run(ScriptSpec(argv=[str(path)])), "cannot execute", str(path))


async def test_unusable_tmp_dir(tmp_path: Path) -> None:
    result = await run(ScriptSpec(script="echo hi", tmp_dir=str(tmp_path / "missing")))
    _assert_start_error(result, "script file")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_runs_as_other_user_with_its_groups(tmp_path: Path) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    result = await run(ScriptSpec(script='id -u; id -g; id -G; echo "$HOME $USER"', user="nobody"))
    assert result.succeeded, result
    uid, gid, groups, home_user = result.stdout.splitlines()
    assert (int(uid), int(gid)) == (nobody.pw_uid, nobody.pw_gid)
    assert "0" not in groups.split()  # root's groups are not inherited
    assert home_user == f"{nobody.pw_dir} nobody"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_a_script_of_another_user_runs_though_the_tmp_dir_is_private(tmp_path: Path) -> None:
    # The agent's tmp_dir is its 0700 state folder: that user cannot enter it.
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    private = tmp_path / "state"
    private.mkdir(mode=0o700)
    result = await run(ScriptSpec(script="id -un", user="nobody", tmp_dir=str(private)))
    assert result.succeeded, result
    assert result.stdout == "nobody\n"
    assert list(private.iterdir()) == []  # nothing left behind, nothing put there


# --- script file --------------------------------------------------------------------------


async def test_script_file_private_and_removed(tmp_path: Path) -> None:
    script = 'echo "$0"\nstat -c %a "$0" "$(dirname "$0")"\n'
    result = await run(ScriptSpec(script=script, tmp_dir=str(tmp_path)))
    assert result.succeeded, result
    path, file_mode, dir_mode = result.stdout.split()
    assert Path(path).parent.parent == tmp_path
    assert (file_mode, dir_mode) == ("700", "700")
    assert not Path(path).exists()
    assert list(tmp_path.iterdir()) == []


async def test_script_file_removed_after_timeout(tmp_path: Path) -> None:
    result = await run(ScriptSpec(script="sleep 1000", tmp_dir=str(tmp_path), timeout=0.2))
    assert result.timed_out
    assert list(tmp_path.iterdir()) == []


# --- spec validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"argv": ["true"], "script": "true"},
        {"argv": []},
        {"argv": ("true",)},
        {"argv": ["true", 1]},
        {"argv": [""]},
        {"argv": ["echo", "a\0b"]},
        {"script": "true", "interpreter": ""},
        {"argv": ["true"], "timeout": 0},
        {"argv": ["true"], "timeout": -1},
        {"argv": ["true"], "timeout": math.nan},
        {"argv": ["true"], "timeout": math.inf},
        {"argv": ["true"], "output_cap": -1},
        {"argv": ["true"], "output_cap": 1.5},
        {"argv": ["true"], "env": {"A=B": "x"}},
        {"argv": ["true"], "env": {"A": 1}},
        {"argv": ["true"], "cwd": ""},
    ],
)
def test_invalid_spec_raises(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="ScriptSpec"):
        ScriptSpec(**kwargs)  # type: ignore[arg-type]
