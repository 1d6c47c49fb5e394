"""What a typed activity's handler is given, and what it gives back.

Contract: an :class:`ActionEnv` is the agent's configuration for typed
activities (the system root it manages, dpkg's database, the power commands, how
long a package lock is waited for, the agent's own PID and user). An
:class:`ActionContext` is one run of one operation: ``run(argv)`` starts a tool
as argv, never through a shell, with the minimal environment of
``taskfleet.process`` plus ``env``, and returns a :class:`Ran`; it raises
:class:`ActionCanceled` when a cancel for the operation was stored before the
command starts, and a cancel while it runs stops its process group (the result
says canceled). ``deadline`` is the operation's time limit (monotonic): a
command gets at most what is left of it. A handler returns an
:class:`ActionOutcome`: ``succeeded`` or ``failed`` with the result line that
says what changed (or why not), and the last command's output for the record.
A restart's outcome carries ``awaiting`` (the boot id it started from, when it
started, until when it may take): the operation then ends only when the agent
sees the computer back (``agent/operations.py``); ``expect_restart`` records it
before the command runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskfleet.process import RunningScript, ScriptSpec
from taskfleet.settings import AGENT_PACKAGE_LOCK_TIMEOUT, AGENT_RESTART_GRACE, OUTPUT_CAP


class ActionCanceled(Exception):
    """The operation was canceled: no further command starts."""


@dataclass(frozen=True)
class ActionEnv:
    root: Path = Path("/")  # the system the agent manages (tests: a throw-away root)
    admindir: Path | None = None  # dpkg's database (default ROOT/var/lib/dpkg)
    own_pid: int = field(default_factory=os.getpid)
    own_user: str = "root"
    # The power commands, as argv; "{minutes}" and "{message}" are filled in.
    restart_command: tuple[str, ...] = ("shutdown", "-r", "+{minutes}", "{message}")
    shutdown_command: tuple[str, ...] = ("shutdown", "-h", "+{minutes}", "{message}")
    boot_id_file: Path = Path("/proc/sys/kernel/random/boot_id")
    # A restart not seen (a new boot id) this long after its delay is Failed.
    restart_grace: float = AGENT_RESTART_GRACE
    lock_timeout: float = AGENT_PACKAGE_LOCK_TIMEOUT  # seconds apt/dpkg locks are waited for
    # Extra apt-get "-o" settings (a test's local repository); each "NAME=VALUE".
    apt_options: tuple[str, ...] = ()
    tmp_dir: Path | None = None  # the agent's state folder: commands' temporary files
    inventory: bool = True  # the agent reports its inventory (--no-inventory: not)

    @property
    def dpkg_admindir(self) -> Path:
        return self.admindir or self.root / "var/lib/dpkg"

    @property
    def chrooted(self) -> bool:
        """Whether the managed system is not the one the agent runs on."""
        return self.root.resolve() != Path("/")


@dataclass(frozen=True)
class Ran:
    """A finished command."""

    argv: list[str]
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    canceled: bool = False
    error: str | None = None  # it could not start (no such program, ...)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.canceled or self.error)

    def why(self) -> str:
        """Why it failed, in a few words with the tool's last line of error output."""
        tool = Path(self.argv[0]).name
        if self.error:
            return f"{tool} could not start: {self.error}"
        if self.canceled:
            return f"{tool} was canceled"
        if self.timed_out:
            return f"{tool} ran out of time"
        last = next((ln for ln in reversed(self.stderr.strip().splitlines()) if ln.strip()), "")
        if not last:
            last = next((ln for ln in reversed(self.stdout.strip().splitlines()) if ln.strip()), "")
        return f"{tool} exited {self.exit_code}" + (f": {last.strip()[:300]}" if last else "")


@dataclass
class ActionOutcome:
    status: str  # "succeeded" | "failed"
    line: str  # what changed, or why not
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    # Set by a handler whose end comes later (a restart: when the agent is back).
    awaiting: dict[str, Any] | None = None

    @classmethod
    def failed(cls, line: str, ran: Ran | None = None) -> ActionOutcome:
        if ran is None:
            return cls("failed", line)
        return cls("failed", line, ran.stdout, ran.stderr, ran.exit_code)

    @classmethod
    def succeeded(cls, line: str, ran: Ran | None = None) -> ActionOutcome:
        if ran is None:
            return cls("succeeded", line)
        return cls("succeeded", line, ran.stdout, ran.stderr, ran.exit_code)


Starter = Callable[[ScriptSpec], Awaitable[RunningScript]]


class ActionContext:
    def __init__(
        self,
        env: ActionEnv,
        *,
        op: int,
        params: dict[str, Any],
        timeout: float,
        start: Starter,
        ended: Callable[[], None] = lambda: None,
        canceled: Callable[[], bool] = lambda: False,
        resync: Callable[[], Awaitable[None]] | None = None,
        expect_restart: Callable[[dict[str, Any] | None], None] = lambda awaiting: None,
    ) -> None:
        self.env = env
        self.op = op
        self.params = params
        self.deadline = time.monotonic() + timeout
        self._start = start
        self._ended = ended
        self._canceled = canceled
        self._resync = resync
        self._expect_restart = expect_restart

    def left(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)

    async def run(
        self, argv: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None
    ) -> Ran:
        if self._canceled():
            raise ActionCanceled
        limit = self.left() if timeout is None else min(timeout, self.left())
        try:
            spec = ScriptSpec(
                argv=argv,
                env=env or {},
                timeout=limit,
                output_cap=OUTPUT_CAP,
                tmp_dir=None if self.env.tmp_dir is None else str(self.env.tmp_dir),
            )
        except ValueError as exc:
            return Ran(argv, None, "", "", error=str(exc))
        running = await self._start(spec)
        try:
            res = await running.wait()
        finally:
            self._ended()
        return Ran(
            argv,
            res.exit_code,
            res.stdout,
            res.stderr,
            timed_out=res.timed_out,
            canceled=res.canceled,
            error=res.error,
        )

    async def resync(self) -> None:
        """Collect the whole inventory and queue it (before this operation's result)."""
        if self._resync is None:
            raise RuntimeError("inventory reporting is off on this agent")
        await self._resync()

    def expect_restart(self, awaiting: dict[str, Any] | None) -> None:
        """Record, durably and before the restart command runs, that this operation ends
        when the computer comes back (``awaiting``, as ``ActionOutcome.awaiting``): an agent
        killed from then on never runs the command again (None: forget it)."""
        self._expect_restart(awaiting)


def _supported(env: ActionEnv) -> str | None:
    return None


@dataclass(frozen=True)
class AgentAction:
    run: Callable[[ActionContext], Awaitable[ActionOutcome]]
    # Why this computer cannot run the type (a tool it lacks), or None.
    unsupported: Callable[[ActionEnv], str | None] = _supported
