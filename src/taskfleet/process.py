"""Run one child process under a time limit: the agent's scripts and the worker's commands.

Neither the agent nor the worker owns this module; both import it (the agent for
"execute-script" operations, the worker for command handlers of server task types).

Contract:
- The child gets its own session and process group, stdin from /dev/null, a minimal base
  environment (PATH, HOME, LANG, USER) plus ``ScriptSpec.env``, and optionally another user.
- The time limit (and ``RunningScript.cancel``) ends the whole process group: SIGTERM, then
  SIGKILL after ``KILL_GRACE`` seconds. ``wait()`` then returns promptly even if stray
  processes outside the group still hold the output pipes.
- stdout and stderr are read concurrently and never block the child; at most ``output_cap``
  bytes per stream are kept, the rest is counted and marked with ``TRUNCATION_MARKER``.
- Problems of the child (missing executable, bad cwd, unknown user, permissions) never
  raise: they give a ``ScriptResult`` with ``error`` set. Invalid specs raise ``ValueError``.
- When the main process exits on its own, processes it left in the background are not killed;
  output is collected for at most ``EXIT_DRAIN`` more seconds, then reading stops.

Stdlib only (and the constants in ``taskfleet.settings``): the agent must stay lean.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from taskfleet.settings import EXIT_DRAIN, KILL_GRACE, OUTPUT_CAP, SCRIPT_TIMEOUT

__all__ = [
    "TRUNCATION_MARKER",
    "RunningScript",
    "ScriptResult",
    "ScriptSpec",
    "cap_text",
    "start_script",
]

TRUNCATION_MARKER = "\n[taskfleet: output truncated, {dropped} bytes dropped]\n"

_BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "USER")
_GROUP_POLL = 0.02  # seconds between checks whether the process group is gone


@dataclass(frozen=True)
class ScriptSpec:
    argv: list[str] | None = None
    script: str | None = None
    interpreter: str = "/bin/sh"
    env: dict[str, str] | None = None
    cwd: str | None = None
    timeout: float = SCRIPT_TIMEOUT
    output_cap: int = OUTPUT_CAP
    user: str | None = None
    tmp_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.argv is None) == (self.script is None):
            raise ValueError("ScriptSpec needs exactly one of argv or script")
        self._check_command()
        self._check_env()
        for name in ("cwd", "user", "tmp_dir"):
            value = getattr(self, name)
            if value is not None:
                _check_str(name, value)
                if not value:
                    raise ValueError(f"ScriptSpec.{name} must not be empty")
        self._check_limits()

    def _check_command(self) -> None:
        if self.argv is not None:
            if not isinstance(self.argv, list) or not self.argv:
                raise ValueError("ScriptSpec.argv must be a non-empty list of str")
            for arg in self.argv:
                _check_str("argv item", arg)
            if not self.argv[0]:
                raise ValueError("ScriptSpec.argv[0] must not be empty")
        if self.script is not None:
            _check_str("script", self.script)
            _check_str("interpreter", self.interpreter)
            if not self.interpreter:
                raise ValueError("ScriptSpec.interpreter must not be empty")

    def _check_env(self) -> None:
        if self.env is not None:
            if not isinstance(self.env, dict):
                raise ValueError("ScriptSpec.env must be a dict of str to str")
            for key, value in self.env.items():
                _check_str("env name", key)
                _check_str("env value", value)
                if not key or "=" in key:
                    raise ValueError(f"ScriptSpec.env name {key!r} is empty or contains '='")

    def _check_limits(self) -> None:
        if (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, int | float)
            or not math.isfinite(self.timeout)
            or self.timeout <= 0
        ):
            raise ValueError(
                f"ScriptSpec.timeout must be a finite number > 0, got {self.timeout!r}"
            )
        if (
            isinstance(self.output_cap, bool)
            or not isinstance(self.output_cap, int)
            or self.output_cap < 0
        ):
            raise ValueError(f"ScriptSpec.output_cap must be an int >= 0, got {self.output_cap!r}")


def _check_str(what: str, value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"ScriptSpec {what} must be str, got {type(value).__name__}")
    # exec and the environment block cannot carry NUL; catch it here rather than at spawn.
    if "\0" in value:
        raise ValueError(f"ScriptSpec {what} must not contain NUL characters")


@dataclass(frozen=True)
class ScriptResult:
    exit_code: int | None
    signal: int | None
    timed_out: bool
    canceled: bool
    stdout: str
    stderr: str
    stdout_dropped: int
    stderr_dropped: int
    started_at: float
    ended_at: float
    error: str | None

    @property
    def succeeded(self) -> bool:
        return (
            self.exit_code == 0 and not self.timed_out and not self.canceled and self.error is None
        )


class _CappedBuffer:
    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._data = bytearray()
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        room = self._cap - len(self._data)
        if room > 0:
            self._data += chunk[:room]
        self.dropped += max(0, len(chunk) - max(room, 0))

    def text(self) -> str:
        text = self._data.decode("utf-8", errors="replace")
        if self.dropped:
            text += TRUNCATION_MARKER.format(dropped=self.dropped)
        return text


def cap_text(text: str, cap: int) -> str:
    """``text`` cut to ``cap`` UTF-8 bytes, marked with ``TRUNCATION_MARKER`` like a stream."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= cap:
        return text
    kept = data[:cap].decode("utf-8", errors="ignore")  # never split a character
    return kept + TRUNCATION_MARKER.format(dropped=len(data) - len(kept.encode("utf-8")))


class _Protocol(asyncio.SubprocessProtocol):
    # A bare protocol rather than asyncio.subprocess.Process: it never pauses reading (so the
    # child never blocks on a full pipe) and never buffers more than the cap.
    def __init__(self, loop: asyncio.AbstractEventLoop, cap: int) -> None:
        self.streams = {1: _CappedBuffer(cap), 2: _CappedBuffer(cap)}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        self._open = {1, 2}

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        buf = self.streams.get(fd)
        if buf is not None and isinstance(data, bytes):
            buf.feed(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open.discard(fd)
        if not self._open and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


class RunningScript:
    """A started script. ``wait()`` may be called any number of times."""

    def __init__(
        self,
        result: asyncio.Future[ScriptResult],
        pid: int | None,
        cancel: asyncio.Future[None] | None = None,
    ) -> None:
        self._result = result  # the supervising task: also keeps it referenced
        self._pid = pid
        self._cancel = cancel if cancel is not None else asyncio.get_running_loop().create_future()

    @property
    def pid(self) -> int | None:
        return self._pid

    async def wait(self) -> ScriptResult:
        # Shielded: a caller giving up on waiting must not abandon the child unsupervised.
        return await asyncio.shield(self._result)

    def cancel(self) -> None:
        """Kill the whole process group (SIGTERM, then SIGKILL); no-op once finished."""
        if not self._result.done() and not self._cancel.done():
            self._cancel.set_result(None)


async def start_script(
    spec: ScriptSpec, *, kill_grace: float = KILL_GRACE, exit_drain: float = EXIT_DRAIN
) -> RunningScript:
    """Start ``spec``; returns once the child is running (or failed to start)."""
    loop = asyncio.get_running_loop()
    started_at = time.time()
    script_dir: str | None = None

    def failed(message: str) -> RunningScript:
        if script_dir is not None:
            shutil.rmtree(script_dir, ignore_errors=True)
        fut: asyncio.Future[ScriptResult] = loop.create_future()
        fut.set_result(_error_result(message, started_at))
        return RunningScript(fut, None)

    account: pwd.struct_passwd | None = None
    if spec.user is not None:
        try:
            account = pwd.getpwnam(spec.user)
        except KeyError:
            return failed(f"unknown user {spec.user!r}")

    env = _base_env(account)
    if spec.env:
        env.update(spec.env)

    if spec.argv is not None:
        argv = list(spec.argv)
    else:
        assert spec.script is not None
        try:
            script_dir, path = _write_script(spec.script, spec.tmp_dir, account)
        except OSError as exc:
            where = spec.tmp_dir or tempfile.gettempdir()
            return failed(f"cannot write script file in {where!r}: {exc.strerror or exc}")
        argv = [spec.interpreter, path]

    identity: dict[str, Any] = {}
    if account is not None and account.pw_uid != os.geteuid():
        # subprocess' user= alone only switches the uid: the child would keep the agent's
        # (often root's) gid and supplementary groups, so set those explicitly too.
        identity = {
            "user": account.pw_uid,
            "group": account.pw_gid,
            "extra_groups": os.getgrouplist(account.pw_name, account.pw_gid),
        }

    proto = _Protocol(loop, spec.output_cap)
    try:
        transport, _ = await loop.subprocess_exec(
            lambda: proto,
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=spec.cwd,
            start_new_session=True,
            **identity,
        )
    except OSError as exc:
        return failed(_spawn_error(exc, argv[0], spec))
    except (ValueError, subprocess.SubprocessError) as exc:
        return failed(f"cannot start process: {exc}")

    pid = transport.get_pid()
    cancel: asyncio.Future[None] = loop.create_future()
    supervisor = _Supervisor(
        transport, proto, pid, spec, cancel, started_at, kill_grace, exit_drain
    )
    return RunningScript(loop.create_task(supervisor.run(script_dir)), pid, cancel)


class _Supervisor:
    def __init__(
        self,
        transport: asyncio.SubprocessTransport,
        proto: _Protocol,
        pid: int,
        spec: ScriptSpec,
        cancel: asyncio.Future[None],
        started_at: float,
        kill_grace: float,
        exit_drain: float,
    ) -> None:
        self.transport = transport
        self.proto = proto
        self.pgid = pid  # start_new_session makes the child its own group leader
        self.spec = spec
        self.cancel = cancel
        self.started_at = started_at
        self.kill_grace = kill_grace
        self.exit_drain = exit_drain

    async def run(self, script_dir: str | None) -> ScriptResult:
        timed_out = canceled = False
        error: str | None = None
        try:
            await asyncio.wait(
                [self.proto.exited, self.cancel],
                timeout=self.spec.timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not self.proto.exited.done():
                canceled = self.cancel.done()
                timed_out = not canceled
                if not await self._end_group():
                    error = "process did not exit after SIGKILL"
            # Stray processes may hold the pipes open indefinitely; the main process is
            # what we report on, so read what comes soon and then stop.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.proto.pipes_closed), self.exit_drain)
        except asyncio.CancelledError:
            # The agent is shutting down: no time for a grace period.
            _killpg(self.pgid, signal.SIGKILL)
            raise
        finally:
            self.transport.close()
            if script_dir is not None:
                shutil.rmtree(script_dir, ignore_errors=True)

        returncode = self.transport.get_returncode()
        out, err = self.proto.streams[1], self.proto.streams[2]
        return ScriptResult(
            exit_code=returncode if returncode is not None and returncode >= 0 else None,
            signal=-returncode if returncode is not None and returncode < 0 else None,
            timed_out=timed_out,
            canceled=canceled,
            stdout=out.text(),
            stderr=err.text(),
            stdout_dropped=out.dropped,
            stderr_dropped=err.dropped,
            started_at=self.started_at,
            ended_at=time.time(),
            error=error,
        )

    async def _end_group(self) -> bool:
        """SIGTERM the group, SIGKILL what is left after the grace; True once the leader exited."""
        loop = asyncio.get_running_loop()
        _killpg(self.pgid, signal.SIGTERM)
        deadline = loop.time() + self.kill_grace
        # Poll the group (not just the leader): a TERM-ignoring grandchild must still get KILL.
        while _group_exists(self.pgid) and loop.time() < deadline:
            await asyncio.sleep(_GROUP_POLL)
        if _group_exists(self.pgid):
            _killpg(self.pgid, signal.SIGKILL)
        try:
            # Bounded: a process stuck in uninterruptible sleep must not hang wait() forever.
            await asyncio.wait_for(asyncio.shield(self.proto.exited), max(self.kill_grace, 1.0))
        except TimeoutError:
            return False
        return True


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_exists(pgid: int) -> bool:
    # Unreaped zombies count as members, so this can stay True until the grace ends.
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _base_env(account: pwd.struct_passwd | None) -> dict[str, str]:
    env = {key: os.environ[key] for key in _BASE_ENV_KEYS if key in os.environ}
    env.setdefault("PATH", os.defpath)
    if account is not None:
        # The agent's own HOME/USER would point another user's script at the agent's files.
        env["HOME"] = account.pw_dir
        env["USER"] = account.pw_name
    return env


def _write_script(
    text: str, tmp_dir: str | None, account: pwd.struct_passwd | None
) -> tuple[str, str]:
    """Write ``text`` into a fresh private directory; returns (directory, file path).

    A script run as another user goes in the system's temporary folder, not ``tmp_dir``:
    the agent's ``tmp_dir`` is its 0700 state folder, which that user cannot enter."""
    other_user = account is not None and account.pw_uid != os.geteuid()
    directory = tempfile.mkdtemp(prefix="taskfleet-script-", dir=None if other_user else tmp_dir)
    try:
        path = os.path.join(directory, "script")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o700)  # umask must not widen or narrow it
            fh.write(text.encode("utf-8"))
        if account is not None and other_user:
            # The interpreter runs as that user and must be able to read the file.
            os.chown(directory, account.pw_uid, account.pw_gid)
            os.chown(path, account.pw_uid, account.pw_gid)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory, path


def _spawn_error(exc: OSError, executable: str, spec: ScriptSpec) -> str:
    reason = exc.strerror or str(exc)
    # subprocess reports which step failed through exc.filename: the cwd, the executable,
    # or None for the identity switch.
    if spec.cwd is not None and exc.filename == spec.cwd:
        return f"cannot use working directory {spec.cwd!r}: {reason}"
    if exc.filename is None and spec.user is not None:
        return f"cannot start process as user {spec.user!r}: {reason}"
    if isinstance(exc, FileNotFoundError):
        return f"executable not found: {executable!r}"
    return f"cannot execute {executable!r}: {reason}"


def _error_result(message: str, started_at: float) -> ScriptResult:
    return ScriptResult(
        exit_code=None,
        signal=None,
        timed_out=False,
        canceled=False,
        stdout="",
        stderr="",
        stdout_dropped=0,
        stderr_dropped=0,
        started_at=started_at,
        ended_at=time.time(),
        error=message,
    )
