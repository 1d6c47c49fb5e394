"""The agent's operation runs: receive, cancel, spawn, run, check.

Contract:
* ``receive`` stores the new operations and cancel orders of a parsed reply
  (``protocol.exchange.parse_server_reply``) with the new server ack in one
  transaction (``LocalState.receive``), before anything runs; then it stops
  what was canceled and starts what is new. A message whose ``seq`` is not
  above the stored ack is a resend and is dropped.
* A new message is acted on only if it is genuinely for this computer: a
  signed order (``protocol/orders.open_order``: signature, kind, op, this
  computer, this generation) and, for an operation, one this computer does not
  have yet (the server hands an operation out in one message only). Anything
  else, and a message that cannot be read, is refused: acknowledged, never
  acted on, logged, and reported to the server in a ``refused`` message queued
  in the same transaction. It is not reported as a result for its operation:
  that operation may be another computer's, whose result the server refuses.
* An operation runs at most once per attempt: ``owned`` holds every operation
  with a run task, from spawn to its end, so a run is "executing" for the
  scrubber (SPEC 5 rule 1) before its process exists and is never spawned twice.
* Before it runs, an operation is checked again (signature, this computer),
  then this computer's own policy decides (scripts enabled, the listed users
  only). What the policy refuses is reported Failed with the reason.
* Optional work outside the local run window is Deferred (SPEC 5) and started
  when the window opens; a recurring operation is run again every ``every``
  seconds until it is canceled; a failed run of a pulled, Required, Once
  operation with attempts left is Failed locally and left for the scrubber.
* Every result is written to local state (and its outbox) before the agent's
  exchange loop, woken through ``trigger``, sends it.
* A restart (``agent/actions/system.py``) is marked ``awaiting`` in local state
  before its command runs; once the command exits 0 it is Deferred locally and the
  server is told it is working ("restart initiated, waiting for the computer to come
  back"). It is never run again nor scrubbed: each time it is looked at (the agent's
  start, the end of its wait) it is Succeeded if the boot id changed, else waits
  until its delay plus the grace has passed, then Failed. A cancel ends the wait.
* A job operation (type ``job``) is checked (``jobs.check_job``: its params and
  every command against the policy) and run by ``agent/jobs.py``. A ``terminate``
  order is opened like a cancel and stored with the reply; a terminate for an
  operation this computer does not have, or that is not a job, is refused
  (``malformed``). The running job then finishes its step and stops; a job not
  started (deferred, or not yet running) ends at once, every step Skipped. A
  second terminate does nothing more. A cancel of a job stops its command at
  once, then ends it as a terminate does. A ``windows`` order (a job's
  maintenance windows changed after hand-out) is checked and stored the same way
  (the latest by ``issued_at`` wins); a job waiting for its windows looks again at
  once, a running one checks the new windows before its next action step.

Why one class of about 700 lines: a script, a typed activity (its restart wait
included) and a job share what makes a run truthful — the executor lock, the
processes a cancel or a stop must reach, and one way to record an end (``_ended``)
— so they live together; the checks before a run are in ``agent/checks.py``, a
job's phases in ``agent/jobs.py``, a typed activity's work in ``agent/actions/``.

The agent (``agent/main.py``) owns the event loop, the exchange and the
scrubber; it hands this class its local state, the trigger, its policy, and,
once enrolled, its identity and the server's signature verifier (``bind``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskfleet.agent import state as st
from taskfleet.agent.actions.context import ActionEnv
from taskfleet.agent.checks import check_operation
from taskfleet.agent.scrub import executor_lock, process_start
from taskfleet.domain.actions import ACTION_TYPES
from taskfleet.domain.actions.system import RESTART
from taskfleet.domain.kinds import JOB
from taskfleet.domain.policy import Interval, Mode, RunWindow, validate_policy
from taskfleet.domain.results import describe_script_outcome, result_line
from taskfleet.domain.scripts import EXECUTE_SCRIPT
from taskfleet.domain.scrubber import after_failure
from taskfleet.process import RunningScript, ScriptSpec, start_script
from taskfleet.protocol.exchange import (
    CancelMessage,
    MalformedMessage,
    OperationMessage,
    ServerMessage,
    SignedOrder,
    TerminateMessage,
    WindowsMessage,
    operation_message,
    operation_result,
    operation_status,
    refused_message,
)
from taskfleet.protocol.orders import (
    CANCEL,
    OPERATION,
    TERMINATE,
    WINDOWS,
    Refusal,
    open_order,
)
from taskfleet.protocol.signing import Verifier
from taskfleet.settings import RECURRING_EVERY

if TYPE_CHECKING:  # loaded when a job or typed activity arrives (agent memory)
    from taskfleet.agent import jobs
    from taskfleet.agent.actions.runner import Action
    from taskfleet.domain.jobs import JobSpec

log = logging.getLogger("taskfleet.agent")


@dataclasses.dataclass
class _Received:
    """What one reply's new messages ask for, gathered before one transaction stores it."""

    ops: list[st.NewOperation] = dataclasses.field(default_factory=list)
    taken: set[int] = dataclasses.field(default_factory=set)
    cancels: list[int] = dataclasses.field(default_factory=list)
    terminates: list[int] = dataclasses.field(default_factory=list)
    windows: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)


class Operations:
    def __init__(
        self,
        state: st.LocalState,
        trigger: asyncio.Event,
        *,
        state_dir: Path,
        policy: dict[str, Any],
        own_user: str,
        window: RunWindow | None,
        max_attempts: int,
        next_scrub_at: Callable[[], float],
        content_base: Callable[[], str] | None = None,
        fetch: jobs.Fetch | None = None,
        action_env: ActionEnv | None = None,
        resync: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.state = state
        self.trigger = trigger  # set: the exchange loop has something to send
        self.state_dir = state_dir
        self.policy = policy
        self.own_user = own_user
        self.window = window
        self.max_attempts = max_attempts
        self.next_scrub_at = next_scrub_at  # when the scrubber runs next (a retry starts then)
        self.identity: st.Identity | None = None
        self.verifier: Verifier | None = None
        self.running: dict[int, RunningScript] = {}
        # Operations with a run task, from spawn to its end (module docstring).
        self.owned: set[int] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.timers: dict[int, asyncio.TimerHandle] = {}
        self.exec_lock = executor_lock(state_dir)
        # Jobs: where content comes from (the peer the agent exchanges with), how.
        self.content_base = content_base or (lambda: "")
        self._fetch = fetch
        self.jobs: dict[int, jobs.JobRun] = {}  # the running ones
        self.shutting_down = False
        # Typed activities (``agent/actions``): how they run here, and the inventory hook.
        self.action_env = action_env or ActionEnv(own_user=own_user, tmp_dir=state_dir)
        self.resync = resync

    def bind(self, identity: st.Identity, verifier: Verifier) -> None:
        """Who this computer is, and the key its operations must be signed with."""
        self.identity = identity
        self.verifier = verifier

    def stop(self) -> None:
        """At shutdown: no timer fires and every running process group is stopped
        (a job records nothing for the step this interrupts: it resumes at the next start)."""
        self.shutting_down = True
        for timer in self.timers.values():
            timer.cancel()
        for running in self.running.values():
            running.cancel()

    # -- receiving -------------------------------------------------------------

    def receive(self, messages: list[ServerMessage], pushed: bool) -> None:
        """Store what a reply brought, then act on it (module docstring)."""
        last = self.state.server_seq
        got = _Received()
        refusals: list[dict[str, Any]] = []
        top = last
        for m in messages:
            if m.seq <= last:
                continue  # already stored: a resend
            top = max(top, m.seq)
            try:
                self._take(m, got, pushed)
            except Refusal as refusal:
                log.warning(
                    "server message %d%s refused, %s",
                    m.seq,
                    f" (operation {m.op})" if m.op is not None else "",
                    refusal,
                )
                refusals.append(refused_message(m.seq, m.op, refusal.reason, refusal.text))
        if top == last:
            return
        new = self.state.receive(got.ops, got.cancels, top, refusals, got.terminates, got.windows)
        if refusals:
            self.trigger.set()
        for op_id in got.cancels:
            self._cancel(op_id)
        for op_id in new:
            op = self.state.operation(op_id)
            if op is not None:
                self.spawn(op)
        for op_id in got.terminates:
            self._terminate(op_id)
        for op_id in got.windows:
            if op_id not in new:  # a job new in this reply starts with them anyway
                self._windows_changed(op_id)

    def _take(self, m: ServerMessage, got: _Received, pushed: bool) -> None:
        """Open one new server message into ``got``; :class:`Refusal` if it is not
        genuinely for this computer or makes no sense here."""
        if isinstance(m, MalformedMessage):
            raise Refusal("malformed", m.error)
        if isinstance(m, TerminateMessage):
            self._open(m, TERMINATE)
            self._job_named(m.op, got.ops, "a terminate")
            got.terminates.append(m.op)
        elif isinstance(m, WindowsMessage):
            order = self._windows_order(self._open(m, WINDOWS))
            self._job_named(m.op, got.ops, "a windows order")
            kept = got.windows.get(m.op)
            if kept is None or kept["issued_at"] <= order["issued_at"]:
                got.windows[m.op] = order
        elif isinstance(m, CancelMessage):
            self._open(m, CANCEL)
            got.cancels.append(m.op)
        else:
            got.ops.append(self._operation(m, self._open(m, OPERATION), got.taken, pushed))
            got.taken.add(m.op)

    def _job_named(self, op_id: int, new: list[st.NewOperation], what: str) -> None:
        """``what`` names a job operation this computer has (or gets in this reply)."""
        have = self.state.operation(op_id)
        kind = have.type if have is not None else next((o.type for o in new if o.op == op_id), None)
        if kind is None:
            raise Refusal("malformed", f"{what} for operation {op_id}, which it does not have")
        if kind != JOB:
            raise Refusal("malformed", f"{what} for operation {op_id}, which is not a job")

    @staticmethod
    def _windows_order(payload: dict[str, Any]) -> dict[str, Any]:
        """The checked content of a signed windows order; ``malformed`` otherwise."""
        issued_at = payload.get("issued_at")
        if not isinstance(issued_at, int | float) or not math.isfinite(issued_at):
            raise Refusal("malformed", "a windows order without a finite issued_at")
        from taskfleet.domain.jobs import JobSpecError, parse_windows

        try:
            parse_windows(payload.get("windows"))
        except JobSpecError as exc:
            raise Refusal("malformed", f"a windows order: {exc}") from None
        return {"windows": payload.get("windows") or [], "issued_at": issued_at}

    def _windows_changed(self, op_id: int) -> None:
        """A job's windows changed: a run in hand checks the new ones before its next
        action step; a job waiting for its old windows looks again now (it runs, or
        waits for the new ones). A finished job ignores them."""
        op = self.state.operation(op_id)
        if op is None or op.finished:
            return
        from taskfleet.agent import jobs

        run = self.jobs.get(op_id)
        if run is not None:
            run.windows = jobs.order_windows(op)
            log.info("operation %d: its maintenance windows changed", op_id)
            return
        timer = self.timers.pop(op_id, None)
        if timer is not None:
            timer.cancel()
            log.info("operation %d: its maintenance windows changed: looking again", op_id)
            self.spawn_now(op_id)

    def _operation(
        self,
        m: OperationMessage,
        payload: dict[str, Any],
        taken: set[int],
        pushed: bool,
    ) -> st.NewOperation:
        """A genuine operation to store, unless this computer has it already.

        The server hands an operation out once, in one message, and resends that
        message under its own ``seq``, which is dropped above: the same operation
        in a newer message is a replay (by a relay), whatever its text."""
        before = self.state.operation(m.op)
        if before is not None:
            same = json.loads(before.body).get("body") == m.body
            raise Refusal(
                "replayed",
                f"operation {m.op} was received before, in server message {before.seq}"
                + ("" if same else ", with another signed text"),
            )
        if m.op in taken:
            raise Refusal("replayed", f"operation {m.op} came twice in one reply")
        policy = _policy_of(payload)
        return st.NewOperation(
            m.op,
            m.seq,
            _local_type(payload.get("type")),
            json.dumps(operation_message(m.seq, m.op, m.body, m.sig)),
            pushed,
            policy["mode"],
            policy["interval"],
            policy["every"],
        )

    def _open(self, m: SignedOrder, kind: str) -> dict[str, Any]:
        """The signed payload of ``m``, if it is genuinely for this computer (``open_order``)."""
        assert self.identity is not None and self.verifier is not None
        return open_order(
            self.verifier,
            m.body,
            m.sig,
            kind=kind,
            op=m.op,
            computer=self.identity.computer_id,
            generation=self.identity.generation,
        )

    def _cancel(self, op_id: int) -> None:
        run = self.jobs.get(op_id)
        if run is not None:
            log.info("operation %d: cancel received, stopping the job's step at once", op_id)
            run.cancel()
            return
        op = self.state.operation(op_id)
        if op is not None and op.type == JOB and not op.finished:
            self._end_unstarted(op_id)
            return
        running = self.running.get(op_id)
        if running is not None:
            log.info("operation %d: cancel received, stopping its process group", op_id)
            running.cancel()
            return
        timer = self.timers.pop(op_id, None)
        op = self.state.operation(op_id)
        if op is not None and timer is not None:
            # Waiting for its window or its next recurring run: it ends here.
            timer.cancel()
            why = "Canceled before its next run"
            if op.awaiting is not None:
                why = "Canceled while waiting for the computer to restart (already initiated)"
            line = result_line("Waiting", "Canceled", why, None)
            self.state.finish(op_id, st.CANCELED, operation_result(op_id, "canceled", line))
            self.trigger.set()
        elif op is not None and not op.finished and op.status == st.FAILED:
            # A failed attempt waiting for the scrubber to continue it: not retried.
            line = result_line(
                "Waiting", "Canceled", f"Canceled before attempt {op.attempts + 1}", None
            )
            self.state.finish(op_id, st.CANCELED, operation_result(op_id, "canceled", line))
            self.trigger.set()

    def _terminate(self, op_id: int) -> None:
        """The stored terminate order acts: a running job finishes its step and stops; a
        job not started ends at once (module docstring). Again: nothing more."""
        run = self.jobs.get(op_id)
        if run is not None:
            if not run.terminating:
                log.info("operation %d: terminate received, finishing the step in hand", op_id)
            run.terminate()
            return
        self._end_unstarted(op_id)

    def _end_unstarted(self, op_id: int) -> None:
        """A job that is not running (waiting for its window, or spawned and not yet
        started) runs now: it sees the stored order and ends at once."""
        op = self.state.operation(op_id)
        if op is None or op.finished:
            return
        timer = self.timers.pop(op_id, None)
        if timer is not None:
            timer.cancel()
        self.spawn_now(op_id)

    # -- running ---------------------------------------------------------------

    def spawn(self, op: st.Operation, delay: float = 0.0) -> None:
        """Run ``op`` now, or after ``delay`` seconds (its window, its next run)."""
        if delay > 0:
            self.timers[op.op] = asyncio.get_running_loop().call_later(delay, self.spawn_now, op.op)
            return
        self.spawn_now(op.op)

    def spawn_now(self, op_id: int) -> None:
        """Start a run task for ``op_id`` unless one exists (``owned``)."""
        timer = self.timers.pop(op_id, None)
        if timer is not None:
            timer.cancel()  # run now: that timer would start it a second time
        op = self.state.operation(op_id)
        if op is None or op.finished or op_id in self.owned:
            return
        self.owned.add(op_id)
        task = asyncio.create_task(self._owned_run(op))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _owned_run(self, op: st.Operation) -> None:
        try:
            await self._run(op)
        finally:
            # Released by the run itself, in the step that records how it ended (a
            # wait's timer included), not by a done-callback a loop turn later: a
            # spawn_now in between (a windows order, the scrubber) would find the op
            # still owned, cancel the wait's timer and start nothing.
            self.owned.discard(op.op)

    def _minute_of_day(self) -> float:
        t = time.localtime()
        return t.tm_hour * 60 + t.tm_min + t.tm_sec / 60

    async def _run(self, op: st.Operation) -> None:
        op = self.state.operation(op.op) or op  # the orders stored since it was spawned
        if op.awaiting is not None:
            self._restart_check(op)  # its command ran (or may have): never again
            return
        assert self.identity is not None and self.verifier is not None
        refusal, spec, timeout, job = check_operation(
            op,
            self.verifier,
            self.identity,
            self.policy,
            own_user=self.own_user,
            state_dir=self.state_dir,
        )
        action = None if spec is None or isinstance(spec, ScriptSpec) else spec
        # A job ends a cancel or terminate that came before it started itself: its
        # steps are reported Skipped.
        stopped = job is not None and (op.cancel_requested or op.terminate_requested)
        if op.cancel_requested and job is None:
            refusal = "Canceled before it started"
        if refusal is not None or (spec is None and job is None):
            status = "canceled" if op.cancel_requested else "failed"
            line = result_line("Starting", status.title(), refusal or "invalid", None)
            self.state.finish(
                op.op,
                st.CANCELED if op.cancel_requested else st.FAILED,
                operation_result(op.op, status, line),
            )
            log.warning("operation %d refused: %s", op.op, refusal)
            self.trigger.set()
            return
        if op.mode == "optional" and self.window is not None and not stopped:
            wait = self.window.seconds_until_open(self._minute_of_day())
            if wait > 0:
                # SPEC 5 Deferred: this computer's policy says not now.
                until = time.time() + wait
                reason = f"optional work waits for the local run window {self.window}"
                self.state.set_status(
                    op.op,
                    st.DEFERRED,
                    next_run_at=until,
                    message=operation_status(op.op, "deferred", op.attempts, until, reason),
                )
                log.info("operation %d deferred %.0fs: %s", op.op, wait, reason)
                self.spawn(op, wait)
                self.trigger.set()
                return
        # Tell the server about runs it cannot know of (a continued attempt, a
        # deferred or recurring run), so its lost-deadline follows this run.
        tell = op.attempts > 0 or op.status == st.DEFERRED or op.interval == "recurring"
        attempt = self.state.start(
            op.op, operation_status(op.op, "working", 0, None, "") if tell else None
        )
        if tell:
            self.trigger.set()
        if job is not None:
            await self._run_job(op.op, job)
            return
        if action is not None:
            message, awaiting = await self._run_action(op, action)
            self._action_ended(op, attempt, message, awaiting)
            return
        assert isinstance(spec, ScriptSpec)
        checkpoint = op.checkpoint_path(self.state_dir)
        checkpoint.parent.mkdir(mode=0o700, exist_ok=True)
        spec = dataclasses.replace(
            spec,
            env={
                **(spec.env or {}),
                "TASKFLEET_CHECKPOINT": str(checkpoint),
                "TASKFLEET_ATTEMPT": str(attempt),
            },
        )
        if not self.running and self.exec_lock.fd is None:
            self.exec_lock.acquire()
        running = await start_script(spec)
        self.running[op.op] = running
        latest = self.state.operation(op.op)
        if latest is not None and latest.cancel_requested:
            running.cancel()  # the cancel arrived while the process was starting
        if running.pid:
            self.state.running(op.op, running.pid, process_start(running.pid))
        try:
            res = await running.wait()
        finally:
            self.running.pop(op.op, None)
            if not self.running and not self.jobs:
                self.exec_lock.release()
        outcome = describe_script_outcome(
            exit_code=res.exit_code,
            signal=res.signal,
            timed_out=res.timed_out,
            canceled=res.canceled,
            error=res.error,
            timeout=timeout,
        )
        status = "succeeded" if outcome.succeeded else "canceled" if res.canceled else "failed"
        message = operation_result(
            op.op,
            status,
            outcome.line,
            exit_code=res.exit_code,
            stdout=res.stdout,
            stderr=res.stderr,
            stdout_dropped=res.stdout_dropped,
            stderr_dropped=res.stderr_dropped,
            started_at=res.started_at,
            ended_at=res.ended_at,
        )
        self._ended(op, attempt, status, message, outcome.line, checkpoint)

    def _ended(
        self,
        op: st.Operation,
        attempt: int,
        status: str,
        message: dict[str, Any],
        line: str,
        checkpoint: Path | None,
    ) -> None:
        """Record a run's end: the next recurring run, a retry left for the scrubber,
        or the operation's result."""
        code = {"succeeded": st.SUCCESS, "canceled": st.CANCELED}.get(status, st.FAILED)
        latest = self.state.operation(op.op)
        cancel_asked = bool(latest and latest.cancel_requested)
        after = after_failure(
            pushed=op.pushed,
            mode=Mode(op.mode),
            interval=Interval(op.interval),
            attempt=attempt,
            max_attempts=self.max_attempts,
        )
        if op.interval == "recurring" and status != "canceled" and not cancel_asked:
            every = op.every or RECURRING_EVERY
            self.state.set_status(
                op.op,
                code,
                next_run_at=time.time() + every,
                message={**message, "recurring": True},
            )
            log.info("operation %d run %d %s; next run in %gs", op.op, attempt, status, every)
            self.spawn(op, every)
        elif status == "failed" and not cancel_asked and not after.final:
            # SPEC 5: not final while attempts remain; the scrubber continues it.
            retry_at = self.next_scrub_at()
            reason = f"{after.reason}; {line}"
            self.state.set_status(
                op.op,
                st.FAILED,
                message=operation_status(op.op, "failed", attempt, retry_at, reason),
            )
            log.warning(
                "operation %d %s; the scrubber continues it in %.0fs",
                op.op,
                reason,
                max(0.0, retry_at - time.time()),
            )
        else:
            if checkpoint is not None:
                checkpoint.unlink(missing_ok=True)
            self.state.finish(op.op, code, message)
            log.info("operation %d %s: %s", op.op, status, line)
        self.trigger.set()

    async def _run_action(
        self, op: st.Operation, action: Action
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Run a typed activity (``agent/actions``); its result message, and what a
        restart that was initiated waits for."""

        async def start(spec: ScriptSpec) -> RunningScript:
            running = await start_script(spec)
            self._job_process(op.op, running)  # tracked like a script's: cancel, scrubber
            latest = self.state.operation(op.op)
            if latest is not None and latest.cancel_requested:
                running.cancel()  # the cancel arrived while the process was starting
            return running

        from taskfleet.agent.actions.runner import run_action

        if self.exec_lock.fd is None:
            self.exec_lock.acquire()
        try:
            return await run_action(
                action,
                self.action_env,
                op=op.op,
                start=start,
                ended=lambda: self._job_process_ended(op.op),
                canceled=lambda: bool((o := self.state.operation(op.op)) and o.cancel_requested),
                resync=self.resync,
                expect_restart=lambda awaiting: self.state.expect_restart(op.op, awaiting),
            )
        finally:
            self.running.pop(op.op, None)
            if not self.running and not self.jobs:
                self.exec_lock.release()

    def _action_ended(
        self,
        op: st.Operation,
        attempt: int,
        message: dict[str, Any],
        awaiting: dict[str, Any] | None,
    ) -> None:
        if awaiting is not None:
            self._await_restart(op, attempt, awaiting, message)
            return
        if op.type == RESTART:
            if self.shutting_down:
                return  # stopped mid-command (the computer going down?): the boot id decides
            self.state.expect_restart(op.op, None)  # its command did not start it
        self._ended(op, attempt, message["status"], message, message["result_line"], None)

    def _await_restart(
        self, op: st.Operation, attempt: int, awaiting: dict[str, Any], message: dict[str, Any]
    ) -> None:
        """The restart command ran: wait for the computer to come back (module docstring);
        the command's output is kept for the final result."""
        keep = ("exit_code", "stdout", "stderr", "started_at")
        awaiting = {**awaiting, "ran": {k: message.get(k) for k in keep}}
        why = "restart initiated, waiting for the computer to come back"
        self.state.await_restart(
            op.op, awaiting, operation_status(op.op, "working", attempt, awaiting["until"], why)
        )
        log.info(
            "operation %d: %s (until %.0fs from now)", op.op, why, awaiting["until"] - time.time()
        )
        self.spawn(op, max(awaiting["until"] - time.time(), 0.001))
        self.trigger.set()

    def _restart_check(self, op: st.Operation) -> None:
        """A restart's end, if it is due: Succeeded on another boot, Failed after its wait."""
        from taskfleet.agent.actions.system import current_boot_id, restart_verdict

        assert op.awaiting is not None
        verdict = restart_verdict(op.awaiting, current_boot_id(self.action_env), time.time())
        if op.cancel_requested:
            verdict = dataclasses.replace(
                verdict,
                status="canceled",
                line="Canceled while waiting for the computer to restart (already initiated)",
            )
        elif verdict.status == "waiting":
            log.info("operation %d: waiting %.0fs more for the restart", op.op, verdict.wait)
            self.spawn(op, verdict.wait)
            return
        ran = op.awaiting.get("ran") or {}
        message = operation_result(
            op.op,
            verdict.status,
            result_line(ACTION_TYPES[RESTART].title, verdict.status.title(), verdict.line, None),
            exit_code=ran.get("exit_code"),
            stdout=ran.get("stdout") or "",
            stderr=ran.get("stderr") or "",
            started_at=ran.get("started_at"),
            ended_at=time.time(),
        )
        code = {"succeeded": st.SUCCESS, "canceled": st.CANCELED}.get(verdict.status, st.FAILED)
        self.state.finish(op.op, code, message)
        log.info("operation %d (restart) %s: %s", op.op, verdict.status, verdict.line)
        self.trigger.set()

    async def _run_job(self, op_id: int, spec: JobSpec) -> None:
        """Run (or resume) a job operation (``agent/jobs.py``) and record its end."""
        op = self.state.operation(op_id)
        assert op is not None and self.identity is not None
        from taskfleet.agent import jobs

        run = jobs.JobRun(self._job_host(), op, spec, jobs.order_windows(op))
        self.jobs[op_id] = run  # before any await: a terminate from now on reaches it
        if self.exec_lock.fd is None:
            self.exec_lock.acquire()
        try:
            end = await run.run()
        finally:
            self.jobs.pop(op_id, None)
            if not self.running and not self.jobs:
                self.exec_lock.release()
        if end is None:
            return  # the agent stops: the record stays for the scrubber
        if isinstance(end, jobs.JobWait):
            end.record(self.state, op)  # Deferred until the windows open: run it then
            self.spawn(op, max(end.until - time.time(), 0.001))
            self.trigger.set()
            return
        self.state.finish(op_id, end.code, end.message, before=end.before)
        op.checkpoint_path(self.state_dir).unlink(missing_ok=True)
        log.info(
            "operation %d (job) %s: %s", op_id, end.message["status"], end.message["result_line"]
        )
        self.trigger.set()

    def idle(self) -> bool:
        """No operation is running or about to run."""
        return not self.owned

    @property
    def fetch(self) -> jobs.Fetch:
        """How job content is downloaded (``agent/content.py`` unless a test sets one)."""
        if self._fetch is None:
            from taskfleet.agent import jobs

            self._fetch = jobs.default_fetch()
        return self._fetch

    @fetch.setter
    def fetch(self, fetch: jobs.Fetch) -> None:
        self._fetch = fetch

    def _job_host(self) -> jobs.JobHost:
        from taskfleet.agent import jobs

        assert self.identity is not None
        return jobs.JobHost(
            state=self.state,
            state_dir=self.state_dir,
            computer_id=self.identity.computer_id,
            secret=self.identity.secret,
            fetch=self.fetch,
            base_url=self.content_base,
            script_spec=self._command_spec,
            started=self._job_process,
            ended=self._job_process_ended,
            notify=self.trigger.set,
            shutting_down=lambda: self.shutting_down,
        )

    def _command_spec(
        self, command: dict[str, Any], env: dict[str, str], cwd: str | None
    ) -> ScriptSpec:
        """A job's command (validated script params + timeout) as a process to start."""
        assert self.identity is not None
        user = command.get("user")
        return ScriptSpec(
            argv=command.get("argv"),
            script=command.get("script"),
            interpreter=command.get("interpreter") or "/bin/sh",
            env={
                **command.get("env", {}),
                "TASKFLEET_COMPUTER_ID": str(self.identity.computer_id),
                **env,
            },
            cwd=command.get("cwd") or cwd,
            timeout=command["timeout"],
            output_cap=command["output_cap"],
            user=None if user in (None, self.own_user) else user,
            tmp_dir=str(self.state_dir),
        )

    def _job_process(self, op_id: int, running: RunningScript) -> None:
        self.running[op_id] = running  # stop() and a cancel reach it
        if running.pid:
            self.state.running(op_id, running.pid, process_start(running.pid))

    def _job_process_ended(self, op_id: int) -> None:
        self.running.pop(op_id, None)
        self.state.running(op_id, None, None)


def _local_type(kind: Any) -> str:
    """The type an operation is stored under: a job, a typed activity, else a script."""
    return kind if kind == JOB or kind in ACTION_TYPES else EXECUTE_SCRIPT


def _policy_of(payload: dict[str, Any]) -> dict[str, Any]:
    try:
        return validate_policy(payload.get("policy"))
    except (ValueError, TypeError, AttributeError):
        return validate_policy(None)  # _check refuses what it cannot run
