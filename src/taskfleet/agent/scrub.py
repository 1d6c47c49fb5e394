"""Applying the scrubber (SPEC 5) to the agent's local records.

Contract: ``plan`` reads the local records and asks the pure
``domain.scrubber.plan_scrub`` what to do, skipping the whole run while any
task executor holds the executor lock (an flock, so a crashed executor cannot
leave it held). ``scrub`` marks a record Failed and queues the Failed result,
with the old status in its result line, for the server; the line says whether
a leftover process was killed or nothing was running. Continuing is the
agent's job (it reruns the operation under the same id, counting an attempt).
Scrubbing a job's record removes its staging folder and reports its steps
(``jobs.scrubbed_reports``).
A restart awaiting the computer's return (``Operation.awaiting``) is no candidate:
the agent ends it by the boot id (``agent/operations.py``), it is never re-run.
Before either, ``kill_leftover`` stops a process group the old attempt left
running, if it is still the same process.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
from pathlib import Path
from typing import Any

from taskfleet.agent import state as st
from taskfleet.domain.kinds import JOB
from taskfleet.domain.policy import Interval, Mode
from taskfleet.domain.results import result_line
from taskfleet.domain.scrubber import Decision, LocalStatus, Plan, Record, plan_scrub
from taskfleet.protocol.exchange import operation_result

log = logging.getLogger("taskfleet.agent.scrub")


class FileLock:
    """An flock on a file: released by the kernel if its holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def held_elsewhere(self) -> bool:
        if self.fd is not None:
            return False
        if self.acquire():
            self.release()
            return False
        return True


def executor_lock(folder: Path) -> FileLock:
    return FileLock(folder / "executor.lock")


def agent_lock(folder: Path) -> FileLock:
    return FileLock(folder / "agent.lock")


def as_record(op: st.Operation, folder: Path) -> Record:
    return Record(
        op=op.op,
        pushed=op.pushed,
        mode=Mode(op.mode),
        interval=Interval(op.interval),
        status=LocalStatus(op.status),
        has_checkpoint=op.has_checkpoint(folder),
        attempts=op.attempts,
    )


def candidates(state: st.LocalState) -> list[st.Operation]:
    # Received-but-never-started operations (Unknown, no attempt) are pending
    # work, not leftovers: the agent simply runs them. A restart whose command may
    # have run waits for the computer to come back: continuing it would restart again.
    return [
        o
        for o in state.unfinished()
        if not (o.status == st.UNKNOWN and o.attempts == 0) and o.awaiting is None
    ]


def plan(
    state: st.LocalState, folder: Path, *, executor_running: bool, max_attempts: int
) -> tuple[Plan, dict[int, st.Operation]]:
    ops = {o.op: o for o in candidates(state)}
    return (
        plan_scrub(
            [as_record(o, folder) for o in ops.values()],
            executor_running=executor_running,
            max_attempts=max_attempts,
        ),
        ops,
    )


def _stat(pid: int) -> list[str] | None:
    # The fields after the command name: [0] state, [2] process group, [19] start time.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _group_running(pgid: int) -> bool:
    """Whether any process of the group runs (a zombie is dead, only not yet reaped)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in "ZX":
                return True
    return False


def kill_leftover(op: st.Operation) -> bool:
    """Kill the process group an earlier attempt left behind, if it is still that one.

    Returns True only if something of it was still running: a leader whose
    parent (the old agent) died stays a zombie with its /proc entry when
    nothing reaps it, and killing that stops nothing.
    """
    if not op.pgid or not op.pstart or process_start(op.pgid) != op.pstart:
        return False
    running = _group_running(op.pgid)
    try:
        os.killpg(op.pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    if not running:
        return False
    log.warning("operation %d: killed process group %d left by its last attempt", op.op, op.pgid)
    return True


def scrub(
    state: st.LocalState,
    op: st.Operation,
    decision: Decision,
    *,
    killed: bool = False,
    folder: Path | None = None,
) -> None:
    """``killed``: ``kill_leftover`` just stopped the process group of its last attempt.
    A job's record (``folder``: the agent's state folder) also loses its staging folder,
    and its steps are reported: the one it was in Failed, the rest Skipped."""
    old = LocalStatus(op.status)
    found = (
        f"its last attempt's process group {op.pgid} was still running and was killed"
        if killed
        else "with nothing running"
    )
    line = result_line(
        "Recovering",
        "Failed",
        f"Scrubbed: local status was {old.name.title()} ({int(old)}) {found} ({decision.rule})",
        None,
    )
    steps: list[dict[str, Any]] = []
    if folder is not None and op.type == JOB:
        from taskfleet.agent.jobs import scrubbed_reports  # job code loads only when needed

        steps = scrubbed_reports(op, folder)
    state.finish(op.op, st.FAILED, operation_result(op.op, "failed", line), before=steps)
    log.warning("operation %d scrubbed: old status %s (%d)", op.op, old.name.title(), int(old))
