"""The agent's jobs (SPEC 6): one job operation run end to end on this computer.

Contract:

* ``check_job(payload, policy)`` is the agent's check of a job operation before
  anything runs: its params must pass ``domain.jobs.validate_job_spec`` and every
  command (detect and action) the agent's policy (``domain.scripts.policy_refusal``:
  scripts enabled, the listed users). A refusal is a reason text; nothing ran.
* ``JobRun.run`` follows ``domain.jobs.next_step`` exactly. Per step: the local
  status of its phase (SPEC 5: Working in Analyze, Downloading in Download,
  Installing in the action phase) with a ``job-step`` "started" report in one
  transaction; the step; the checkpoint; its final report (succeeded, failed or
  skipped with a detail line). Analyze runs ``detect`` (exit 0 applicable, 1 not
  applicable, else a failed step and the item not applicable). Download fetches
  each content reference through the injected ``fetch`` (the signature of
  ``taskfleet.agent.content.download``) from ``base_url()`` (the peer the agent
  exchanges with) into ``STATE_DIR/jobs/<op>/<item>/<name>``; a name whose path
  leaves that folder or crosses a symlink is refused (``agent/job_files.py``); a
  failed fetch fails the step with its reason and the item's action step is
  Skipped; a full disk fails the step ("disk full"), removes the job's staging
  folder and skips the rest.
  The action runs the item's command with cwd the item's staging folder (unless
  the command names its own) and ``TASKFLEET_STAGING`` set to it, through
  ``taskfleet.process.start_script`` like a script (time limit, output cap, user). A
  command run as another user gets that user's own copy of the folder instead
  (``job_files.copy_for_user``), removed when the command ends.
* The checkpoint (``job_files.Checkpoint`` at ``Operation.checkpoint_path``: what the
  scrubber calls "a resume checkpoint") holds the items' applicability, every finished step with its
  status and detail, and whether a terminate arrived; it is written atomically
  (temp file, fsync, rename, fsync of the folder) after each step, BEFORE the
  step's final report is queued. A resumed run (scrubber continue, agent restart)
  queues again the final report of every finished step, unless the checkpoint says
  they were all queued before a wait for a window (a report may come more
  than once; the last wins), never runs a finished step again, and runs the step
  that was in flight again (a download resumes from its ``.part``). So no crash
  loses a report or repeats a finished step.
* Terminate: the step in hand is finished (Analyze: the whole phase,
  ``next_step(terminating=True)``), no other starts, what did not run is reported
  Skipped "terminated". Cancel: the running command or download is stopped at once
  (its step reported Skipped, "canceled: stopped while running") and no other step
  starts. A run that had finished no step when either arrived ends at once, every
  step Skipped. The end of every run removes ``STATE_DIR/jobs/<op>`` and gives the
  operation's result: ``computer_outcome`` (stopped when terminated or canceled),
  a summary result line and the last failing command's output (capped).
* Maintenance windows: a job operation may carry its computer's windows (the
  signed ``windows`` field, ``domain.jobs.parse_windows``; ``check_job`` refuses a
  malformed one). Analyze and Download run at once; before an action step
  ``domain.jobs.window_wait`` decides, and while a window is closed the run ends
  with ``JobWait`` (until when, why): the caller records the local status Deferred,
  tells the server and runs the job again then. The checkpoint already holds every
  finished step, so that run (or one after an agent restart) goes on where this
  one stopped; a terminate or cancel meanwhile ends it with the action steps
  Skipped.
* An agent shutting down (``JobHost.shutting_down``) records nothing for the step
  its stop interrupted: the record stays as it was, for the scrubber to continue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from taskfleet.agent import state as st
from taskfleet.agent.content import ContentError, download
from taskfleet.agent.job_files import (
    Checkpoint,
    StagingError,
    content_path,
    copy_for_user,
    item_folder,
    remove_staging,
)
from taskfleet.domain.jobs import (
    ACTIONS,
    ANALYZE,
    DOWNLOAD,
    FAILED,
    SKIPPED,
    STARTED,
    SUCCEEDED,
    JobSpec,
    JobSpecError,
    MaintenanceWindow,
    Outcome,
    Step,
    computer_outcome,
    next_step,
    parse_windows,
    skipped_for_failure,
    steps,
    unfinished,
    validate_job_spec,
    window_wait,
)
from taskfleet.domain.results import result_line
from taskfleet.domain.scripts import policy_refusal
from taskfleet.process import RunningScript, ScriptResult, ScriptSpec, start_script
from taskfleet.protocol.exchange import operation_result, operation_status
from taskfleet.protocol.jobs import job_step
from taskfleet.settings import JOB_FETCH_TIMEOUT

log = logging.getLogger("taskfleet.agent")

DISK_FULL = "disk full"
SCRUBBED_IN_FLIGHT = "scrubbed: the agent stopped during this step"
PHASE_STATUS = {
    ANALYZE: st.WORKING,
    DOWNLOAD: st.DOWNLOADING,
    **dict.fromkeys(ACTIONS, st.INSTALLING),
}
_REASON_CHARS = 200  # of a command's last stderr line in a step's detail


class Fetch(Protocol):
    """``taskfleet.agent.content.download``: fetch content ``sha256`` of ``size`` bytes
    into ``dest`` (resuming from ``dest.part``), verified; raises an exception with a
    ``reason`` text (``ContentError``) when it cannot."""

    def __call__(
        self,
        base_url: str,
        computer_id: int,
        secret: str,
        sha256: str,
        size: int,
        dest: Path,
        *,
        timeout: float,
        root: Path,
    ) -> Awaitable[None]: ...


def default_fetch() -> Fetch:
    """The agent's download client (``agent/content.py``)."""
    return download


# -- checking ---------------------------------------------------------------------


def check_job(payload: dict[str, Any], policy: dict[str, Any]) -> tuple[str | None, JobSpec | None]:
    """(refusal, None) or (None, the job's spec): module docstring."""
    try:
        spec = validate_job_spec(payload.get("params"))
        parse_windows(payload.get("windows"))
    except JobSpecError as exc:
        return f"invalid parameters ({exc})", None
    for i, item in enumerate(spec.items):
        run = [("detect", item.detect)] if ANALYZE in spec.phases else []
        if spec.action is not None:
            run.append((spec.action, item.commands[spec.action]))
        for what, command in run:
            why = policy_refusal(policy, command or {})
            if why:
                return f"{why} (item {i} {what})", None
    return None, spec


def order_windows(op: st.Operation) -> tuple[MaintenanceWindow, ...]:
    """The job's maintenance windows: those of its latest windows order (checked when
    it arrived), else those it was sent with (checked by ``check_job``)."""
    try:
        if op.windows_order is not None:
            return parse_windows(op.windows_order["windows"])
        return parse_windows(json.loads(json.loads(op.body)["body"]).get("windows"))
    except (JobSpecError, ValueError, KeyError, TypeError):
        return ()


# -- the run ----------------------------------------------------------------------


@dataclass
class JobHost:
    """What a run needs from the agent (``agent/operations.py`` builds it)."""

    state: st.LocalState
    state_dir: Path
    computer_id: int
    secret: str
    fetch: Fetch
    base_url: Callable[[], str]  # the peer the agent exchanges with: relay, else server
    script_spec: Callable[[dict[str, Any], dict[str, str], str | None], ScriptSpec]
    started: Callable[[int, RunningScript], None]  # a command runs (cancel, scrubber)
    ended: Callable[[int], None]
    notify: Callable[[], None]  # something is queued to send
    shutting_down: Callable[[], bool]


@dataclass(frozen=True)
class JobEnd:
    code: int  # local status: SUCCESS, FAILED or CANCELED
    message: dict[str, Any]  # the operation-result
    before: list[dict[str, Any]]  # the last step reports, queued with it


@dataclass(frozen=True)
class JobWait:
    """The run stopped before an action step: a maintenance window is closed."""

    until: float  # when to run the job again (epoch seconds)
    reason: str
    ran: int  # steps this run ran (0: it only found the window still closed)

    def record(self, state: st.LocalState, op: st.Operation) -> None:
        """SPEC 5 Deferred until ``until``, the server told why; a run that only found
        the windows still closed (a scrubber continue, a restart) is no attempt."""
        state.set_status(
            op.op,
            st.DEFERRED,
            next_run_at=self.until,
            message=operation_status(op.op, "deferred", op.attempts, self.until, self.reason),
            attempts=op.attempts if self.ran else max(op.attempts - 1, 0),
        )


class _Shutdown(Exception):
    """The agent stops: record nothing more, the scrubber continues the run."""


@dataclass
class _Failure:
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_dropped: int
    stderr_dropped: int


class JobRun:
    def __init__(
        self,
        host: JobHost,
        op: st.Operation,
        spec: JobSpec,
        windows: tuple[MaintenanceWindow, ...] = (),
    ) -> None:
        self.host = host
        self.op = op.op
        self.spec = spec
        self.windows = windows
        self.ran = 0  # steps run by this run
        self.path = op.checkpoint_path(host.state_dir)
        self.terminating = False
        self.canceled = False
        self._cancel = asyncio.Event()  # stops the command or download in hand
        self.failure: _Failure | None = None
        self.cp = Checkpoint()
        self.started_at = time.time()

    # -- orders (agent/operations.py calls these; the order is already stored) ----

    def terminate(self) -> None:
        self.terminating = True

    def cancel(self) -> None:
        self.canceled = self.terminating = True
        self._cancel.set()

    # -- the run ------------------------------------------------------------------

    async def run(self) -> JobEnd | JobWait | None:
        """Run (or resume) the job; its end, its wait for a maintenance window, or None
        when the agent stops meanwhile."""
        record = self.host.state.operation(self.op)
        if record is not None:
            self.terminating |= record.terminate_requested or record.cancel_requested
            self.canceled |= record.cancel_requested
        cp = Checkpoint.load(self.path)
        if cp is not None:
            self.cp = cp
            self.terminating |= cp.terminate
            if not cp.reported:
                self._report_again()
        why = "canceled" if self.canceled else "terminated"
        if self.terminating and not self.cp.done:
            return self._end(f"{why} before it started")
        if any(detail == DISK_FULL for _, detail in self.cp.done.values()):
            return self._end(DISK_FULL, stopped=False)  # the crash came right after it
        try:
            while not self.canceled:
                step = next_step(
                    self.spec, self.cp.applicable, self.cp.statuses, terminating=self.terminating
                )
                if step is None:
                    break
                until = window_wait(step, self.windows, time.time())
                if until is not None:
                    return self._wait(step, until)
                if await self._step(step) == DISK_FULL:
                    # The staging folder goes at once: what the others staged too.
                    return self._end(DISK_FULL, stopped=False)
        except _Shutdown:
            return None
        why = "canceled" if self.canceled else "terminated"
        return self._end(why if self.terminating else "download failed")

    def _wait(self, step: Step, until: float) -> JobWait:
        now = time.time()
        closed = ", ".join(str(w) for w in self.windows if not w.is_open(now))
        reason = (
            f"{step[0]} of item {step[1]} waits for the maintenance window {closed}; "
            f"{len(self.cp.done)} step(s) done"
        )
        log.info("operation %d: %s, for %.0fs", self.op, reason, until - now)
        if not self.cp.reported:
            # Each finished step's report is queued by now: the hourly scrubber pass and
            # the window's opening resume the run without sending them all again.
            self.cp.reported = True
            self.cp.save(self.path)
        return JobWait(until, reason, self.ran)

    def _report_again(self) -> None:
        # A crash may have come between a checkpoint and its step's report.
        self.host.state.queue(
            [self._report(step, status, detail) for step, (status, detail) in self.cp.done.items()]
        )
        self.host.notify()

    def _report(self, step: Step, status: str, detail: str) -> dict[str, Any]:
        return job_step(self.op, step[0], step[1], status, detail, time.time())

    def _record(self, results: list[tuple[Step, str, str]]) -> None:
        for step, status, detail in results:
            self.cp.done[step] = (status, detail)
        self.cp.terminate = self.terminating
        self.cp.reported = False
        self.cp.save(self.path)  # before the reports: a resumed run sends them again
        self.host.state.queue([self._report(s, status, d) for s, status, d in results])
        self.host.notify()

    async def _step(self, step: Step) -> str:
        phase, i = step
        self.ran += 1
        self.host.state.job_phase(self.op, PHASE_STATUS[phase], [self._report(step, STARTED, "")])
        self.host.notify()
        if phase == ANALYZE:
            status, detail = await self._analyze(i)
        elif phase == DOWNLOAD:
            status, detail = await self._download(i)
        else:
            status, detail = await self._action(phase, i)
        log.debug("operation %d: %s step of item %d %s (%s)", self.op, phase, i, status, detail)
        results = [(step, status, detail)]
        if detail == DISK_FULL:
            self._record(results)
            return DISK_FULL
        if phase == DOWNLOAD and status == FAILED:  # (one stopped by a cancel: see _end)
            statuses = {**self.cp.statuses, step: status}
            results += [
                (s, SKIPPED, "its download failed")
                for s in skipped_for_failure(self.spec, statuses)
            ]
        self._record(results)
        return status

    async def _analyze(self, i: int) -> tuple[str, str]:
        detect = self.spec.items[i].detect
        assert detect is not None  # validate_job_spec: Analyze needs a detect command
        res = await self._command(detect, i, None)
        if res.canceled and self.canceled:
            return SKIPPED, "canceled: stopped while running"
        if res.exit_code in (0, 1):
            self.cp.applicable[i] = res.exit_code == 0
            return SUCCEEDED, "applicable" if res.exit_code == 0 else "not applicable"
        self.cp.applicable[i] = False
        self._failed(res)
        return FAILED, f"{_command_detail(res, detect)}; item not applicable"

    async def _action(self, phase: str, i: int) -> tuple[str, str]:
        command = self.spec.items[i].commands[phase]
        try:
            folder = item_folder(self.host.state_dir, self.op, i)
        except (StagingError, OSError) as exc:
            return FAILED, f"staging folder: {exc}"
        res = await self._command(command, i, folder)
        if res.canceled and self.canceled:
            return SKIPPED, "canceled: stopped while running"
        if res.exit_code == 0 and res.error is None:
            return SUCCEEDED, "exit code 0"
        self._failed(res)
        return FAILED, _command_detail(res, command)

    async def _command(self, command: dict[str, Any], i: int, folder: Path | None) -> ScriptResult:
        env = {"TASKFLEET_OPERATION_ID": str(self.op), "TASKFLEET_ITEM": str(i)}
        if folder is not None:
            env["TASKFLEET_STAGING"] = str(folder)
        try:
            spec = self.host.script_spec(command, env, str(folder) if folder is not None else None)
        except ValueError as exc:  # what the process runner itself refuses (a NUL, ...)
            now = time.time()
            return ScriptResult(None, None, False, False, "", "", 0, 0, now, now, error=str(exc))
        own_copy = None
        if spec.user is not None and folder is not None and spec.cwd == str(folder):
            try:
                own_copy = copy_for_user(folder, spec.user)
            except KeyError:
                pass  # an unknown user: start_script says so
            except OSError as exc:
                now = time.time()
                why = f"cannot copy the staging folder for user {spec.user!r}: {exc}"
                return ScriptResult(None, None, False, False, "", "", 0, 0, now, now, error=why)
            else:
                env["TASKFLEET_STAGING"] = str(own_copy)
                spec = dataclasses.replace(spec, cwd=str(own_copy), env={**(spec.env or {}), **env})
        try:
            return await self._run(spec)
        finally:
            if own_copy is not None:
                shutil.rmtree(own_copy, ignore_errors=True)

    async def _run(self, spec: ScriptSpec) -> ScriptResult:
        running = await start_script(spec)
        self.host.started(self.op, running)
        if self._cancel.is_set() or self.host.shutting_down():
            running.cancel()  # the cancel (or the agent's stop) came while it started
        waiter = asyncio.ensure_future(self._cancel.wait())
        try:
            result = asyncio.ensure_future(running.wait())
            await asyncio.wait({result, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not result.done():
                running.cancel()
            res = await result
        finally:
            waiter.cancel()
            self.host.ended(self.op)
        if self.host.shutting_down():
            raise _Shutdown
        return res

    async def _download(self, i: int) -> tuple[str, str]:
        item = self.spec.items[i]
        try:
            folder = item_folder(self.host.state_dir, self.op, i)
            targets = [(ref, content_path(folder, ref.name)) for ref in item.content]
        except StagingError as exc:
            return FAILED, str(exc)
        except OSError as exc:
            return _os_failure(exc, "staging folder")
        for ref, dest in targets:
            fetch = asyncio.ensure_future(
                self.host.fetch(
                    self.host.base_url(),
                    self.host.computer_id,
                    self.host.secret,
                    ref.sha256,
                    ref.size,
                    dest,
                    timeout=JOB_FETCH_TIMEOUT,
                    root=folder,
                )
            )
            waiter = asyncio.ensure_future(self._cancel.wait())
            try:
                await asyncio.wait({fetch, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if not fetch.done():
                await _stop(fetch)
                return SKIPPED, "canceled: stopped while downloading"
            if self.host.shutting_down():
                raise _Shutdown
            error = fetch.exception()
            if isinstance(error, OSError):
                return _os_failure(error, ref.name)
            if isinstance(error, ContentError) and error.reason.startswith(DISK_FULL):
                return FAILED, DISK_FULL
            if error is not None:
                reason = str(getattr(error, "reason", "") or error or type(error).__name__)
                return FAILED, f"{ref.name}: {reason}"
        total = sum(ref.size for ref in item.content)
        return SUCCEEDED, f"{len(item.content)} file(s), {total} bytes verified"

    def _failed(self, res: ScriptResult) -> None:
        self.failure = _Failure(
            res.exit_code, res.stdout, res.stderr, res.stdout_dropped, res.stderr_dropped
        )

    # -- the end ------------------------------------------------------------------

    def _end(self, why: str, *, stopped: bool | None = None) -> JobEnd:
        """Every step that did not run is Skipped (``why``), the staging folder goes,
        and the operation's result is ``computer_outcome``."""
        stopped = self.terminating if stopped is None else stopped
        rest = unfinished(self.spec, self.cp.applicable, self.cp.statuses)
        skipped = [(s, SKIPPED, why) for s in rest]
        for step, status, detail in skipped:
            self.cp.done[step] = (status, detail)
        self.cp.terminate = self.terminating
        if skipped:
            self.cp.save(self.path)  # a crash before the end resumes with nothing to run
        remove_staging(self.host.state_dir, self.op)
        statuses = self.cp.statuses
        outcome = computer_outcome(statuses, stopped=stopped)
        line = summary_line(self.spec, self.cp, outcome, self.failure)
        f = self.failure if outcome is Outcome.FAILED else None
        message = operation_result(
            self.op,
            outcome.value,
            line,
            exit_code=f.exit_code if f else None,
            stdout=f.stdout if f else "",
            stderr=f.stderr if f else "",
            stdout_dropped=f.stdout_dropped if f else 0,
            stderr_dropped=f.stderr_dropped if f else 0,
            started_at=self.started_at,
            ended_at=time.time(),
        )
        code = {Outcome.SUCCEEDED: st.SUCCESS, Outcome.CANCELED: st.CANCELED}.get(
            outcome, st.FAILED
        )
        return JobEnd(code, message, [self._report(s, status, d) for s, status, d in skipped])


def summary_line(spec: JobSpec, cp: Checkpoint, outcome: Outcome, failure: _Failure | None) -> str:
    """``Stage: Install, Status: Canceled, Result: 4 of 7 steps ran, 3 skipped
    (terminated), Return code: none``: the stage is the phase of the last step that ran."""
    ran = [s for s, (status, _) in cp.done.items() if status in (SUCCEEDED, FAILED)]
    failed = sum(1 for status, _ in cp.done.values() if status == FAILED)
    skips = [detail for status, detail in cp.done.values() if status == SKIPPED]
    text = f"{len(ran)} of {len(cp.done)} steps ran"
    if failed:
        text += f", {failed} failed"
    if skips:
        text += f", {len(skips)} skipped ({', '.join(dict.fromkeys(skips))})"
    order = {s: k for k, s in enumerate(steps(spec, cp.applicable))}
    last = max(ran, key=lambda s: order.get(s, -1), default=None)
    stage = last[0].title() if last else "Starting"
    rc = failure.exit_code if failure is not None and outcome is Outcome.FAILED else None
    return result_line(stage, outcome.value.title(), text, rc)


def _command_detail(res: ScriptResult, command: dict[str, Any]) -> str:
    """``exit code 3: <last stderr line>``, or why it did not exit by itself."""
    if res.error is not None:
        return f"could not start: {res.error}"
    if res.timed_out:
        return f"killed at its time limit of {command['timeout']:g} s"
    if res.signal is not None:
        return f"ended by signal {res.signal}"
    last = next((ln.strip() for ln in reversed(res.stderr.splitlines()) if ln.strip()), "")
    return f"exit code {res.exit_code}" + (f": {last[:_REASON_CHARS]}" if last else "")


async def _stop(task: asyncio.Future[None]) -> None:
    """Cancel ``task`` until it has ended: a cancel that lands as an awaited read
    completes can be lost inside ``asyncio.wait_for`` (Python 3.11), so one is not
    enough."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()  # retrieved: the step is reported canceled whatever it was


def _os_failure(exc: OSError, what: str) -> tuple[str, str]:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return FAILED, DISK_FULL
    return FAILED, f"{what}: {exc.strerror or exc}"


def scrubbed_reports(op: st.Operation, state_dir: Path) -> list[dict[str, Any]]:
    """A job record the scrubber scrubs (it had no checkpoint: no step finished): the
    step it was in is Failed, the rest Skipped, and its staging folder is removed."""
    remove_staging(state_dir, op.op)
    try:
        spec = validate_job_spec(json.loads(json.loads(op.body)["body"]).get("params"))
    except (JobSpecError, ValueError, KeyError, TypeError):
        return []
    now = time.time()
    todo = steps(spec, {})
    return [
        job_step(
            op.op, p, i, *((FAILED, SCRUBBED_IN_FLIGHT) if k == 0 else (SKIPPED, "scrubbed")), now
        )
        for k, (p, i) in enumerate(todo)
    ]
