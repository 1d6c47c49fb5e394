"""System activities on the agent: Resynchronize, Restart, Shutdown, Signal Process.

Contract (``domain/actions/system.py`` for the parameters):
* ``resync``: the whole inventory is collected and queued before the result, so the
  server has it when it sees the activity Succeeded; unsupported where the agent's
  inventory reporting is off (``--no-inventory``).
* ``restart`` / ``shutdown``: run the agent's power command (``ActionEnv``'s
  ``restart_command`` / ``shutdown_command``, argv, no shell) with ``{minutes}`` (the
  delay rounded up to whole minutes: ``+0`` is "now" for shutdown(8)) and
  ``{message}`` filled in (a word that is only ``{message}`` is dropped when there is
  no message). A shutdown is Succeeded "shutdown initiated" when its command exits 0.
  A restart reads the boot id first and records, before its command runs, that the
  operation waits for the computer to come back (``ActionContext.expect_restart``);
  on exit 0 its outcome carries ``awaiting`` and ``agent/operations.py`` ends it when
  the agent sees another boot id (Succeeded) or none by the restart's delay plus
  ``restart_grace`` (Failed). A command that fails ends the activity Failed with why.
  Unsupported where the command's program is not found (or, for a restart, the boot
  id cannot be read).
* ``signal-process``: by ``pid`` or exact name (``/proc/PID/stat``'s name, as
  ``/proc/PID/comm``: every live match is signalled), through a pidfd (a reused PID
  is never signalled in its stead) or ``os.kill``. Never signalled: PID 1, a kernel
  thread, the agent itself, a process in the agent's process group, an ancestor of
  the agent (:func:`protected`). A PID that is not a live process, or a name that
  matches none, is Failed ("no process 12345", "no process named x"); a name whose
  matches are all protected is Failed naming them; otherwise the line names the PIDs
  signalled and those left alone.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskfleet.agent.actions.context import ActionContext, ActionEnv, ActionOutcome, AgentAction
from taskfleet.domain.actions.system import RESTART, RESYNC, SHUTDOWN, SIGNAL_PROCESS

PROC = Path("/proc")
PF_KTHREAD = 0x00200000  # /proc/PID/stat flags: a kernel thread (include/linux/sched.h)
KTHREADD = 2  # the kernel threads' parent


async def resync(ctx: ActionContext) -> ActionOutcome:
    await ctx.resync()
    return ActionOutcome.succeeded("the whole inventory was collected and sent")


def _resync_unsupported(env: ActionEnv) -> str | None:
    return None if env.inventory else "inventory reporting is off in its configuration"


# -- restart and shutdown ----------------------------------------------------------


def minutes_of(delay: float) -> int:
    """A delay in seconds as shutdown(8)'s whole minutes, rounded up (0: now)."""
    return math.ceil(delay / 60)


_PLACEHOLDER = re.compile(r"\{(minutes|message)\}")


def power_argv(template: tuple[str, ...], minutes: int, message: str | None) -> list[str]:
    """The power command's argv: ``{minutes}`` and ``{message}`` filled in, in one pass
    (a message holding ``{minutes}`` stays as typed); a word that is only ``{message}``
    is dropped when there is no message."""
    values = {"minutes": str(minutes), "message": message or ""}
    return [
        _PLACEHOLDER.sub(lambda m: values[m.group(1)], word)
        for word in template
        if not (word == "{message}" and not message)
    ]


def read_boot_id(path: Path) -> str:
    """The boot id (``OSError``/``ValueError`` if it cannot be read)."""
    value = path.read_text(errors="replace").strip()
    if not value or len(value) > 200:
        raise ValueError(f"{path} holds no boot id")
    return value


def _when(minutes: int) -> str:
    return "now" if minutes == 0 else f"in {minutes} min"


async def restart(ctx: ActionContext) -> ActionOutcome:
    minutes = minutes_of(ctx.params["delay"])
    argv = power_argv(ctx.env.restart_command, minutes, ctx.params["message"])
    try:
        boot_id = read_boot_id(ctx.env.boot_id_file)
    except (OSError, ValueError) as exc:
        return ActionOutcome.failed(f"cannot read the boot id, nothing was run: {exc}")
    since = time.time()
    awaiting = {
        "boot_id": boot_id,
        "since": since,
        "until": since + minutes * 60 + ctx.env.restart_grace,
        "minutes": minutes,
    }
    ctx.expect_restart(awaiting)  # durable before the command: never run twice
    ran = await ctx.run(argv)
    if not ran.ok:
        return ActionOutcome.failed(f"the restart command failed: {ran.why()}", ran)
    outcome = ActionOutcome.succeeded(f"restart initiated ({_when(minutes)})", ran)
    outcome.awaiting = awaiting
    return outcome


async def shutdown(ctx: ActionContext) -> ActionOutcome:
    minutes = minutes_of(ctx.params["delay"])
    argv = power_argv(ctx.env.shutdown_command, minutes, ctx.params["message"])
    ran = await ctx.run(argv)
    if not ran.ok:
        return ActionOutcome.failed(f"the shutdown command failed: {ran.why()}", ran)
    return ActionOutcome.succeeded(f"shutdown initiated ({_when(minutes)})", ran)


def _command_missing(command: tuple[str, ...]) -> str | None:
    if shutil.which(command[0]) is None:
        return f"its power command {command[0]!r} is not found"
    return None


def _restart_unsupported(env: ActionEnv) -> str | None:
    try:
        read_boot_id(env.boot_id_file)
    except (OSError, ValueError):
        return f"cannot read the boot id ({env.boot_id_file}): a restart could not be seen"
    return _command_missing(env.restart_command)


def _shutdown_unsupported(env: ActionEnv) -> str | None:
    return _command_missing(env.shutdown_command)


# -- signal-process ----------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    """What ``/proc/PID/stat`` says of a process."""

    pid: int
    name: str
    state: str
    ppid: int
    pgid: int
    flags: int

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X", "x")


def parse_stat(pid: int, text: str) -> ProcInfo:
    """``/proc/PID/stat``'s text: the name is between the first ``(`` and the last ``)``
    (it may hold spaces and parentheses). ``ValueError`` if it is not that."""
    head, sep, tail = text.rpartition(")")
    name = head.partition("(")[2]
    fields = tail.split()
    if not sep or len(fields) < 7:
        raise ValueError(f"unreadable stat of process {pid}")
    return ProcInfo(pid, name, fields[0], int(fields[1]), int(fields[2]), int(fields[6]))


def read_proc(pid: int, proc: Path = PROC) -> ProcInfo | None:
    """The process ``pid``, or None if there is none (or it cannot be read)."""
    try:
        return parse_stat(pid, (proc / str(pid) / "stat").read_text(errors="replace"))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Agent:
    """Who the agent is: the processes a signal never reaches because of it."""

    pid: int
    pgid: int
    ancestors: frozenset[int]


def agent_facts(own_pid: int, proc: Path = PROC) -> Agent:
    ancestors: set[int] = set()
    me = read_proc(own_pid, proc)
    parent = me.ppid if me is not None else os.getppid()
    while parent > 0 and parent not in ancestors and len(ancestors) < 1000:
        ancestors.add(parent)
        info = read_proc(parent, proc)
        parent = info.ppid if info is not None else 0
    try:
        pgid = os.getpgid(own_pid)
    except OSError:
        pgid = me.pgid if me is not None else own_pid
    return Agent(own_pid, pgid, frozenset(ancestors))


def protected(p: ProcInfo, agent: Agent) -> str | None:
    """Why process ``p`` is never signalled, or None."""
    if p.pid == 1:
        return "PID 1 (init)"
    if p.flags & PF_KTHREAD or p.pid == KTHREADD or p.ppid == KTHREADD:
        return "a kernel thread"
    if p.pid == agent.pid:
        return "the agent itself"
    if p.pgid == agent.pgid:
        return "in the agent's process group"
    if p.pid in agent.ancestors:
        return "an ancestor of the agent"
    return None


def _send(pid: int, sig: signal.Signals, agent: Agent, proc: Path) -> tuple[str, str]:
    """Signal ``pid`` after checking it: ("sent" | "gone" | "protected" | "error", why).

    The pidfd is opened before the check: if the PID is reused meanwhile the signal goes
    to the checked process's pidfd, which then fails (gone), never to the newcomer."""
    fd: int | None = None
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return "gone", ""
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return "gone", ""  # a thread's id, not a process's
        fd = None  # no pidfd on this kernel: checked below, then os.kill
    try:
        info = read_proc(pid, proc)
        if info is None or not info.alive:
            return "gone", ""
        why = protected(info, agent)
        if why is not None:
            return "protected", why
        try:
            if fd is not None:
                signal.pidfd_send_signal(fd, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return "gone", ""
        except OSError as exc:
            return "error", exc.strerror or str(exc)
        return "sent", ""
    finally:
        if fd is not None:
            os.close(fd)


def matching(name: str, proc: Path = PROC) -> list[ProcInfo]:
    """The live processes named exactly ``name``, by PID."""
    out = []
    for entry in os.scandir(proc):
        if entry.name.isdigit():
            info = read_proc(int(entry.name), proc)
            if info is not None and info.name == name and info.alive:
                out.append(info)
    return sorted(out, key=lambda p: p.pid)


def signal_process(
    pid: int | None, name: str | None, sig_name: str, own_pid: int, proc: Path = PROC
) -> ActionOutcome:
    sig = signal.Signals[f"SIG{sig_name}"]
    agent = agent_facts(own_pid, proc)
    if pid is not None:
        info = read_proc(pid, proc)
        what = f"process {pid}" + (f" ({info.name})" if info is not None else "")
        result, why = _send(pid, sig, agent, proc)
        if result == "sent":
            return ActionOutcome.succeeded(f"sent {sig_name} to {what}")
        if result == "gone":
            return ActionOutcome.failed(f"no process {pid}")
        if result == "protected":
            return ActionOutcome.failed(f"{what} is {why}: it is never signalled")
        return ActionOutcome.failed(f"cannot signal {what}: {why}")
    assert name is not None
    found = matching(name, proc)
    if not found:
        return ActionOutcome.failed(f"no process named {name}")
    sent: list[int] = []
    left: list[str] = []
    for p in found:
        result, why = _send(p.pid, sig, agent, proc)
        if result == "sent":
            sent.append(p.pid)
        elif result != "gone":
            left.append(f"{p.pid} ({why})")
    also = f"; left alone: {', '.join(left)}" if left else ""
    if not sent:
        if not left:
            return ActionOutcome.failed(f"no process named {name}")
        return ActionOutcome.failed(f"no process named {name} was signalled{also}")
    n = len(sent)
    pids = ", ".join(map(str, sent))
    return ActionOutcome.succeeded(
        f"sent {sig_name} to {n} process{'es' if n > 1 else ''} named {name} "
        f"(pid{'s' if n > 1 else ''} {pids}){also}"
    )


async def signal_handler(ctx: ActionContext) -> ActionOutcome:
    p = ctx.params
    return signal_process(p["pid"], p["process"], p["signal"], ctx.env.own_pid)


def _signal_unsupported(env: ActionEnv) -> str | None:
    return None if (PROC / "self" / "stat").exists() else "no /proc to find processes in"


HANDLERS: dict[str, AgentAction] = {
    RESYNC: AgentAction(resync, _resync_unsupported),
    RESTART: AgentAction(restart, _restart_unsupported),
    SHUTDOWN: AgentAction(shutdown, _shutdown_unsupported),
    SIGNAL_PROCESS: AgentAction(signal_handler, _signal_unsupported),
}


# -- a restart's end ---------------------------------------------------------------


@dataclass(frozen=True)
class RestartVerdict:
    status: str  # "succeeded" | "failed" | "waiting"
    line: str
    wait: float = 0.0  # waiting: seconds until the verdict is due again


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def restart_verdict(awaiting: dict[str, Any], boot_id: str | None, now: float) -> RestartVerdict:
    """Whether a restart that ``awaiting`` describes happened: another boot id than the
    one read before its command is Succeeded; the same one (or none readable) waits
    until ``awaiting['until']`` (the delay plus the grace), then is Failed."""
    if boot_id is not None and boot_id != awaiting["boot_id"]:
        return RestartVerdict("succeeded", f"restarted: the computer came back at {_utc(now)}")
    until = float(awaiting["until"])
    if now < until:
        return RestartVerdict("waiting", "", until - now)
    within = max(until - float(awaiting["since"]), 0.0)
    span = f"{within:.0f} s" if within < 120 else f"{within / 60:.0f} min"
    return RestartVerdict(
        "failed",
        f"the computer did not restart within {span} of the restart command "
        "(its boot id is unchanged)",
    )


def current_boot_id(env: ActionEnv) -> str | None:
    try:
        return read_boot_id(env.boot_id_file)
    except (OSError, ValueError):
        return None
