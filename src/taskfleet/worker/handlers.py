"""Running a server task type's handler (SPEC 4) on the worker.

Contract:
- A command handler's template is rendered (``domain.task_types.render_command``) and run
  through ``taskfleet.process``: own process group, killed (SIGTERM, then SIGKILL after
  ``kill_grace``) at the type's time limit, output capped per stream. No shell is involved.
- A callable handler ``"package.module:function"`` is called as ``fn(params, context)``.
  Coroutine functions run on the worker's event loop and are cancelled at the time limit.
  Plain functions run in a daemon thread: at the time limit the result says timed out, but
  a thread cannot be killed and keeps running until it returns. Work that must be killable
  belongs in a command handler.
- ``run_handler`` never raises for a handler's failure; it returns a ``HandlerResult``.
  Cancelling ``run_handler`` itself kills a command's process group / cancels a coroutine.
- A task canceled while it runs (issue 9) is stopped through a ``StopRequest``: a command's
  process group is killed (SIGTERM, SIGKILL after ``kill_grace``) and its end awaited; a
  coroutine is cancelled and awaited until it has really ended (one that ignores the
  cancellation keeps running, and ``run_handler`` waits for it); a plain function in a
  thread cannot be interrupted: ``on_held`` is told so at once, and ``run_handler``
  returns only when the function does, whatever the time limit. ``HandlerResult.stopped``
  says whether the stop ended the handler (False: it had finished on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import shlex
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from taskfleet.domain.task_types import CALLABLE_REF, CONTEXT_KEYS, TaskTypeSpec, render_command
from taskfleet.process import ScriptResult, ScriptSpec, cap_text, start_script
from taskfleet.settings import KILL_GRACE, OUTPUT_CAP

__all__ = [
    "THREAD_HELD",
    "HandlerResult",
    "StopRequest",
    "resolve_callable",
    "run_handler",
]

# --- callables ---------------------------------------------------------------------------


def resolve_callable(handler: str) -> Callable[..., Any]:
    """Import ``"package.module:attr.attr"``; ``ValueError`` says what is missing."""
    if not isinstance(handler, str) or not CALLABLE_REF.fullmatch(handler):
        raise ValueError(f"handler {handler!r} is not of the form 'package.module:function'")
    module_name, _, attr_path = handler.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise ValueError(
                f"handler {handler!r}: no module named {missing!r}"
                + ("" if missing == module_name else f" (needed for {module_name!r})")
            ) from None
        raise ValueError(
            f"handler {handler!r}: importing {module_name!r} failed: ModuleNotFoundError: {exc}"
        ) from None
    except (Exception, SystemExit) as exc:
        raise ValueError(
            f"handler {handler!r}: importing {module_name!r} failed: {_describe(exc)}"
        ) from None
    where = module_name
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"handler {handler!r}: {where!r} has no attribute {part!r}") from None
        where = f"{where}.{part}"
    if not callable(obj):
        raise ValueError(f"handler {handler!r} is not callable (it is {type(obj).__name__})")
    fn: Callable[..., Any] = obj
    return fn


def _describe(exc: BaseException) -> str:
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# --- running -----------------------------------------------------------------------------


@dataclass(eq=False)
class StopRequest:
    """Asks ``run_handler`` to stop the handler it runs (its task was canceled).

    Plain futures rather than an ``asyncio.Event``: waiting on one costs no task, and
    a worker makes one of these for every task it runs."""

    # Called once, at the stop, when the handler cannot be interrupted: why.
    on_held: Callable[[str], None] | None = None
    _set: bool = False
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def set(self) -> None:
        self._set = True
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    def is_set(self) -> bool:
        return self._set

    def future(self) -> asyncio.Future[None]:
        """Done once the stop is asked for; cancel it to stop waiting."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._set:
            fut.set_result(None)
        else:
            self._waiters.append(fut)
        return fut

    def held(self, why: str) -> None:
        if self.on_held is not None:
            self.on_held(why)


THREAD_HELD = "handler cannot be interrupted, slot held until it returns"


@dataclass(frozen=True)
class HandlerResult:
    ok: bool  # the task Succeeded
    return_code: int | None  # None: no exit code (could not start, killed, exception)
    output: str  # stdout then stderr, or a callable's output / traceback; capped
    error: str | None  # why it failed (or how a stop ended), one line; None when ok
    timed_out: bool  # stopped at the type's time limit
    argv: list[str] | None  # the command line run (commands only), for the worker's log
    started_at: float  # wall clock, seconds
    ended_at: float
    stopped: bool = False  # a StopRequest ended it before it finished on its own

    @property
    def command_line(self) -> str | None:
        """``argv`` as one shell-quoted line, for logs."""
        return None if self.argv is None else shlex.join(self.argv)


async def run_handler(
    spec: TaskTypeSpec,
    params: Mapping[str, Any],
    context: Mapping[str, Any],
    *,
    output_cap: int = OUTPUT_CAP,
    kill_grace: float = KILL_GRACE,
    stop: StopRequest | None = None,
) -> HandlerResult:
    """Run ``spec``'s handler with validated ``params``; never raises for handler failures.

    ``context`` holds task_id, type, tenant, group (None where absent). ``output_cap`` is in
    bytes per stream (a command's stdout and stderr each; a callable's output).
    ``kill_grace``: seconds between SIGTERM and SIGKILL for a command, and how long a
    cancelled coroutine gets to finish before it is abandoned (at the time limit).
    ``stop``: set it to stop the handler (see the module docstring).
    """
    if spec.kind == "command":
        return await _run_command(spec, params, context, output_cap, kill_grace, stop)
    return await _run_callable(spec, params, context, output_cap, kill_grace, stop)


async def _first(main: asyncio.Future[Any], stop: StopRequest | None) -> bool:
    """Wait for ``main`` or for ``stop``; True if the stop came first."""
    if stop is None:
        await asyncio.wait({main})
        return False
    halt = stop.future()
    try:
        await asyncio.wait({main, halt}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        halt.cancel()
    return not main.done()


async def _run_command(
    spec: TaskTypeSpec,
    params: Mapping[str, Any],
    context: Mapping[str, Any],
    output_cap: int,
    kill_grace: float,
    stop: StopRequest | None = None,
) -> HandlerResult:
    started_at = time.time()
    argv: list[str] | None = None
    try:
        argv = render_command(spec.handler, params, context)
        script = ScriptSpec(
            argv=argv, env=_task_env(context), timeout=spec.time_limit, output_cap=output_cap
        )
    except ValueError as exc:
        return HandlerResult(
            ok=False,
            return_code=None,
            output="",
            error=f"cannot build the command line: {exc}",
            timed_out=False,
            argv=argv,
            started_at=started_at,
            ended_at=time.time(),
        )
    running = await start_script(script, kill_grace=kill_grace)
    waiting = asyncio.ensure_future(running.wait())
    try:
        if await _first(waiting, stop):
            running.cancel()  # the whole process group; wait() returns once it is gone
        result = await waiting
    except asyncio.CancelledError:
        # The worker is giving up on this task: the process group must not outlive it.
        running.cancel()
        with contextlib.suppress(Exception):
            await running.wait()
        raise
    return HandlerResult(
        ok=result.succeeded,
        return_code=result.exit_code,
        output=_join_streams(result.stdout, result.stderr),
        error=_command_error(result, spec.time_limit),
        timed_out=result.timed_out,
        argv=argv,
        started_at=result.started_at,
        ended_at=result.ended_at,
        stopped=result.canceled,
    )


def _task_env(context: Mapping[str, Any]) -> dict[str, str]:
    return {
        f"TASKFLEET_{'TASK_TYPE' if key == 'type' else key.upper()}": str(context[key])
        for key in CONTEXT_KEYS
        if context.get(key) is not None
    }


def _join_streams(stdout: str, stderr: str) -> str:
    if stdout and stderr and not stdout.endswith("\n"):
        return f"{stdout}\n{stderr}"
    return stdout + stderr


def _command_error(result: ScriptResult, time_limit: float) -> str | None:
    problems: list[str] = []
    if result.canceled:
        problems.append("stopped by cancel; process group killed")
    elif result.timed_out:
        problems.append(f"time limit of {time_limit:g} s exceeded; process group killed")
    elif result.signal is not None:
        problems.append(f"killed by signal {_signal_name(result.signal)}")
    elif result.exit_code not in (None, 0):
        problems.append(f"exited with code {result.exit_code}")
    if result.error:
        problems.append(result.error)
    return "; ".join(problems) or None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


@dataclass
class _Outcome:
    value: Any = None
    exc: BaseException | None = None
    trace: str = ""


class _Call:
    """One callable invocation; remembers whether it is stuck in a thread."""

    def __init__(self, fn: Callable[..., Any], params: dict[str, Any], context: dict[str, Any]):
        self.fn = fn
        self.params = params
        self.context = context
        self.in_thread = False

    async def run(self) -> _Outcome:
        try:
            if _is_coroutine_function(self.fn):
                value = self.fn(self.params, self.context)
            else:
                self.in_thread = True
                outcome = await self._in_thread()
                self.in_thread = False
                if outcome.exc is not None:
                    return outcome
                value = outcome.value
            if inspect.isawaitable(value):
                value = await value
            return _Outcome(value=value)
        except (Exception, SystemExit) as exc:  # SystemExit must not stop the worker's loop
            return _Outcome(exc=exc, trace=traceback.format_exc())

    def _in_thread(self) -> asyncio.Future[_Outcome]:
        # A daemon thread rather than asyncio.to_thread: a handler that never returns must
        # not hold a slot of the default executor, nor block the worker's exit (the default
        # executor is joined at shutdown).
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Outcome] = loop.create_future()
        ctx = contextvars.copy_context()

        def deliver(outcome: _Outcome) -> None:
            if not future.done():  # cancelled at the time limit
                future.set_result(outcome)

        def target() -> None:
            try:
                outcome = _Outcome(value=ctx.run(self.fn, self.params, self.context))
            except BaseException as exc:
                outcome = _Outcome(exc=exc, trace=traceback.format_exc())
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(deliver, outcome)

        threading.Thread(target=target, name="taskfleet-handler", daemon=True).start()
        return future


def _is_coroutine_function(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


_abandoned: set[asyncio.Task[_Outcome]] = set()  # coroutines that ignored cancellation


async def _run_callable(
    spec: TaskTypeSpec,
    params: Mapping[str, Any],
    context: Mapping[str, Any],
    output_cap: int,
    kill_grace: float,
    stop: StopRequest | None = None,
) -> HandlerResult:
    started_at = time.time()

    def finish(
        ok: bool,
        return_code: int | None,
        output: str = "",
        error: str | None = None,
        timed_out: bool = False,
        stopped: bool = False,
    ) -> HandlerResult:
        return HandlerResult(
            ok=ok,
            return_code=return_code,
            output=cap_text(output, output_cap),
            error=error,
            timed_out=timed_out,
            argv=None,
            started_at=started_at,
            ended_at=time.time(),
            stopped=stopped,
        )

    try:
        fn = resolve_callable(spec.handler)
    except ValueError as exc:
        return finish(False, None, error=str(exc))

    call = _Call(fn, dict(params), dict(context))
    task = asyncio.create_task(call.run(), name=f"{spec.name}[{context.get('task_id')}]")
    halt = stop.future() if stop is not None else None
    waits: set[asyncio.Future[Any]] = {task} if halt is None else {task, halt}
    try:
        done, _ = await asyncio.wait(
            waits,
            timeout=spec.time_limit,
            return_when=asyncio.FIRST_COMPLETED,
        )
    except asyncio.CancelledError:
        await _stop(task, kill_grace)
        raise
    finally:
        if halt is not None:
            halt.cancel()
    if task not in done and halt is not None and halt in done:
        return await _stop_callable(task, call, stop, finish)
    if task not in done:
        in_thread = call.in_thread
        stopped = await _stop(task, kill_grace)
        error = f"time limit of {spec.time_limit:g} s exceeded; "
        if in_thread:
            error += "the handler's thread cannot be killed and may still be running"
        elif stopped:
            error += "handler cancelled"
        else:
            error += f"handler ignored cancellation for {kill_grace:g} s and was abandoned"
        return finish(False, None, error=error, timed_out=True)
    if task.cancelled():  # the handler raised CancelledError on its own
        return finish(False, None, error="CancelledError: the handler cancelled itself")

    outcome = task.result()
    if outcome.exc is not None:
        return finish(False, None, output=outcome.trace, error=_describe(outcome.exc))
    try:
        return_code, output = _interpret(outcome.value)
    except ValueError as exc:
        return finish(False, None, error=f"handler returned {exc}")
    failure = None if return_code == 0 else f"handler returned code {return_code}"
    return finish(return_code == 0, return_code, output, failure)


async def _stop_callable(
    task: asyncio.Task[_Outcome],
    call: _Call,
    stop: StopRequest | None,
    finish: Callable[..., HandlerResult],
) -> HandlerResult:
    """A stop came while the callable runs: end it if it can be ended, and in any case
    return only once it has really ended (its slot is held until then)."""
    if call.in_thread:
        if stop is not None:
            stop.held(THREAD_HELD)
        await asyncio.wait({task})  # no time limit: the thread runs on until it returns
        ended = "cancel requested; the handler could not be interrupted and returned on its own"
        stopped = False
    else:
        task.cancel()
        await asyncio.wait({task})  # a coroutine that ignores the cancel is waited for
        stopped = task.cancelled()
        ended = (
            "stopped by cancel; handler cancelled"
            if stopped
            else "cancel requested; the handler ignored it and returned on its own"
        )
    if stopped:
        return finish(False, None, error=ended, stopped=True)
    outcome = task.result()
    if outcome.exc is not None:
        return finish(False, None, output=outcome.trace, error=f"{ended}: {_describe(outcome.exc)}")
    try:
        return_code, output = _interpret(outcome.value)
    except ValueError as exc:
        return finish(False, None, error=f"{ended}: handler returned {exc}")
    return finish(return_code == 0, return_code, output, f"{ended} (code {return_code})")


async def _stop(task: asyncio.Task[_Outcome], grace: float) -> bool:
    """Cancel ``task``; True if it ended within ``grace`` seconds."""
    task.cancel()
    await asyncio.wait({task}, timeout=grace)
    if task.done():
        return True
    _abandoned.add(task)  # keep a reference so the pending task is not garbage-collected
    task.add_done_callback(_abandoned.discard)
    return False


def _interpret(value: Any) -> tuple[int, str]:
    """(return code, output) from a callable's return value."""
    if value is None:
        return 0, ""
    if isinstance(value, bool):
        raise ValueError(f"a bool ({value!r}); return None, an int, a str or a dict")
    if isinstance(value, int):
        return value, ""
    if isinstance(value, str):
        return 0, value
    if isinstance(value, Mapping):
        extra = set(value) - {"return_code", "output"}
        if extra:
            raise ValueError(f"a dict with unknown keys {sorted(map(str, extra))}")
        code = value.get("return_code", 0)
        if code is None:
            code = 0
        output = value.get("output", "")
        if output is None:
            output = ""
        if isinstance(code, bool) or not isinstance(code, int):
            raise ValueError(f"a non-integer return_code {code!r}")
        if not isinstance(output, str):
            raise ValueError(f"a non-string output of type {type(output).__name__}")
        return code, output
    raise ValueError(f"an unsupported {type(value).__name__}; return None, an int, a str or a dict")
