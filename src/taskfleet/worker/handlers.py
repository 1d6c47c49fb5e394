"""Server task types (SPEC 4): their declarations, parameters and handlers.

Contract:
- Administrators declare task types in a TOML file, one ``[types.NAME]`` table each (see
  ``docs/task-types.example.toml``). ``load_task_types`` reads it; every problem (TOML syntax,
  an unknown key, a bad value, an exclusion of an unknown type, redefining a built-in) raises
  ``TaskTypeError`` naming the file, the type and the key. Nothing is imported at load time.
- Parameters are declared with a type (``str``, ``int``, ``float``, ``bool``). Every declared
  parameter is required unless ``[types.NAME.defaults]`` gives it a default.
  ``validate_params`` converts submitted values (CLI strings or JSON scalars) and fills in
  defaults, so equal submissions compare equal (SPEC 4.2 duplicates).
- A command handler is a template: it is split into words by ``shlex`` FIRST and the
  ``{name}`` placeholders are filled in each word afterwards, so a parameter value is always
  exactly one argument, never more arguments or shell syntax. No shell is involved. The
  executable (first word) may not contain a placeholder. It runs through the agent's
  executor: own process group, killed (SIGTERM, then SIGKILL after ``kill_grace``) at the
  type's time limit, output capped per stream.
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
import difflib
import importlib
import inspect
import math
import re
import shlex
import signal
import threading
import time
import tomllib
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskfleet.process import TRUNCATION_MARKER, ScriptResult, ScriptSpec, start_script
from taskfleet.settings import INT64_MAX, INT64_MIN, OUTPUT_CAP

__all__ = [
    "CONTEXT_KEYS",
    "DEFAULT_TIME_LIMIT",
    "PARAM_TYPES",
    "SCOPES",
    "HandlerResult",
    "StopRequest",
    "TaskTypeError",
    "TaskTypeSpec",
    "load_task_types",
    "render_command",
    "resolve_callable",
    "run_handler",
    "validate_params",
]

DEFAULT_TIME_LIMIT = 3600.0  # seconds; a server task with no declared limit still ends
SCOPES = ("none", "tenant", "group")  # SPEC 4.1: what a submission must name
KINDS = ("callable", "command")
PARAM_TYPES = ("str", "int", "float", "bool")
CONTEXT_KEYS = ("task_id", "type", "tenant", "group")  # given by the worker, not the submitter

_TYPE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_PARAM_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_CALLABLE_REF = re.compile(rf"{_DOTTED}:{_DOTTED}")
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
# {{ and }} are literal braces, {name} a placeholder; any other brace is an error.
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")

_KNOWN_KEYS = (
    "callable",
    "command",
    "scope",
    "time_limit",
    "concurrency",
    "per_tenant",
    "excludes",
    "retry_safe",
    "params",
    "defaults",
    "ranges",
    "description",
)


class TaskTypeError(ValueError):
    """A bad task type declaration; the message names the file, the type and the key."""

    def __init__(
        self,
        problem: str,
        *,
        path: Path | str | None = None,
        type_name: str | None = None,
        field: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.type_name = type_name
        self.field = field
        parts = [p for p in (self.path, _type_label(type_name), field) if p]
        super().__init__(": ".join([*parts, problem]))


def _type_label(name: str | None) -> str | None:
    return None if name is None else f"task type {name!r}"


@dataclass(frozen=True)
class TaskTypeSpec:
    name: str  # [a-z0-9][a-z0-9_.-]{0,63}
    scope: str  # "none" | "tenant" | "group": what a submission must name (SPEC 4.1)
    handler: str  # "package.module:function" or a command template
    kind: str  # "callable" | "command"
    time_limit: float = DEFAULT_TIME_LIMIT  # seconds; the handler is stopped after this
    concurrency: int | None = None  # at most this many running at once; None: no limit
    per_tenant: bool = False  # concurrency and excludes count within one tenant
    excludes: tuple[str, ...] = ()  # may not start while one of these types runs
    retry_safe: bool = False  # may be run again after a lost worker
    params: dict[str, str] = field(default_factory=dict)  # name -> one of PARAM_TYPES
    defaults: dict[str, Any] = field(default_factory=dict)  # params that are optional
    # int/float params: inclusive [min, max]; a value outside is refused at submission
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    description: str = ""  # one line for listings

    def __post_init__(self) -> None:
        def bad(key: str, problem: str) -> TaskTypeError:
            return TaskTypeError(problem, type_name=self.name, field=key)

        if not isinstance(self.name, str) or not _TYPE_NAME.fullmatch(self.name):
            raise TaskTypeError(
                f"invalid task type name {self.name!r}: use 1-64 characters a-z 0-9 _ . -, "
                "starting with a letter or digit",
                field="name",
            )
        if self.scope not in SCOPES:
            raise bad("scope", f"must be one of {_alternatives(SCOPES)}, got {self.scope!r}")
        if self.kind not in KINDS:
            raise bad("kind", f"must be one of {_alternatives(KINDS)}, got {self.kind!r}")
        if not isinstance(self.handler, str) or not self.handler.strip():
            raise bad(self.kind, "must be a non-empty string")
        if self.kind == "callable" and not _CALLABLE_REF.fullmatch(self.handler):
            raise bad("callable", f"must look like 'package.module:function', got {self.handler!r}")

        limit = self.time_limit
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int | float)
            or not math.isfinite(limit)
            or limit <= 0
        ):
            raise bad("time_limit", f"must be a number of seconds > 0, got {limit!r}")
        object.__setattr__(self, "time_limit", float(limit))

        conc = self.concurrency
        if conc is not None and (isinstance(conc, bool) or not isinstance(conc, int) or conc < 1):
            raise bad("concurrency", f"must be an integer >= 1 (or left out), got {conc!r}")
        for key in ("per_tenant", "retry_safe"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, f"must be true or false, got {getattr(self, key)!r}")
        if self.per_tenant and self.scope != "tenant":
            raise bad(
                "per_tenant",
                f'needs scope = "tenant" (a task of scope {self.scope!r} has no tenant)',
            )
        if not isinstance(self.description, str):
            raise bad("description", "must be a string")

        if not isinstance(self.excludes, list | tuple):
            raise bad("excludes", f"must be a list of task type names, got {self.excludes!r}")
        for other in self.excludes:
            if not isinstance(other, str) or not _TYPE_NAME.fullmatch(other):
                raise bad("excludes", f"{other!r} is not a valid task type name")
            if other == self.name:
                raise bad("excludes", "a type cannot exclude itself (use concurrency = 1)")
        if len(set(self.excludes)) != len(self.excludes):
            raise bad("excludes", "names a type more than once")
        object.__setattr__(self, "excludes", tuple(self.excludes))

        if not isinstance(self.params, Mapping):
            raise bad("params", "must be a table of name = type")
        for pname, ptype in self.params.items():
            where = f"params.{pname}"
            if not isinstance(pname, str) or not _PARAM_NAME.fullmatch(pname):
                raise bad(where, "invalid parameter name: use a-z 0-9 _, not starting with a digit")
            if pname in CONTEXT_KEYS:
                raise bad(where, f"{pname!r} is reserved for the task context")
            if ptype not in PARAM_TYPES:
                raise bad(where, f"type must be one of {_alternatives(PARAM_TYPES)}, got {ptype!r}")
        object.__setattr__(self, "params", dict(self.params))

        self._check_ranges(bad)
        if not isinstance(self.defaults, Mapping):
            raise bad("defaults", "must be a table of name = value")
        converted: dict[str, Any] = {}
        for pname, value in self.defaults.items():
            if pname not in self.params:
                raise bad(f"defaults.{pname}", "is not a declared parameter")
            try:
                converted[pname] = _convert(self.params[pname], value, self.ranges.get(pname))
            except ValueError as exc:
                raise bad(f"defaults.{pname}", str(exc)) from None
        object.__setattr__(self, "defaults", converted)

        if self.kind == "command":
            self._check_template()

    def _check_ranges(self, bad: Callable[[str, str], TaskTypeError]) -> None:
        if not isinstance(self.ranges, Mapping):
            raise bad("ranges", "must be a table of name = [min, max]")
        checked: dict[str, tuple[float, float]] = {}
        for pname, bounds in self.ranges.items():
            where = f"ranges.{pname}"
            if self.params.get(pname) not in ("int", "float"):
                raise bad(where, "is not a declared int or float parameter")
            ok = (
                isinstance(bounds, list | tuple)
                and len(bounds) == 2
                and all(
                    isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b)
                    for b in bounds
                )
                and bounds[0] <= bounds[1]
            )
            if not ok:
                raise bad(where, f"must be [min, max] with finite min <= max, got {bounds!r}")
            checked[pname] = (bounds[0], bounds[1])
        object.__setattr__(self, "ranges", checked)

    def _check_template(self) -> None:
        try:
            words = _split_template(self.handler)
            parsed = [_parse_word(word) for word in words]
        except ValueError as exc:
            raise TaskTypeError(str(exc), type_name=self.name, field="command") from None
        if any(is_placeholder for _, is_placeholder in parsed[0]):
            raise TaskTypeError(
                "the executable (first word) may not contain a placeholder",
                type_name=self.name,
                field="command",
            )
        allowed = set(self.params) | set(_context_keys(self.scope))
        used = {text for word in parsed for text, is_placeholder in word if is_placeholder}
        for name in sorted(used - allowed):
            hint = ""
            if name in CONTEXT_KEYS:
                hint = f" (a task of scope {self.scope!r} has no {name})"
            raise TaskTypeError(
                f"unknown placeholder {{{name}}}{hint}; known: {_alternatives(sorted(allowed))}",
                type_name=self.name,
                field="command",
            )
        for name in self.params:
            if name not in used:
                raise TaskTypeError(
                    f"parameter {name!r} is declared but the command never uses {{{name}}}",
                    type_name=self.name,
                    field=f"params.{name}",
                )


def _context_keys(scope: str) -> tuple[str, ...]:
    keys = ["task_id", "type"]
    if scope in ("tenant", "group"):
        keys.append(scope)
    return tuple(keys)


def _alternatives(values: Iterable[str]) -> str:
    return ", ".join(repr(v) for v in values) or "(none)"


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- loading -----------------------------------------------------------------------------


def load_task_types(
    path: Path | str | None, builtins: Iterable[TaskTypeSpec] = ()
) -> dict[str, TaskTypeSpec]:
    """Built-in types plus those declared in the TOML file at ``path`` (None: built-ins only)."""
    types: dict[str, TaskTypeSpec] = {}
    for spec in builtins:
        if not isinstance(spec, TaskTypeSpec):
            raise TypeError(f"built-in task types must be TaskTypeSpec, got {spec!r}")
        if spec.name in types:
            raise TaskTypeError("built-in task type declared twice", type_name=spec.name)
        types[spec.name] = spec
    builtin_names = set(types)
    if path is None:
        return types

    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except OSError as exc:
        raise TaskTypeError(f"cannot read: {exc.strerror or exc}", path=path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TaskTypeError(f"not valid TOML: {exc}", path=path) from None

    for key in document:
        if key != "types":
            raise TaskTypeError(
                "unknown top-level key; declare each type as a [types.NAME] table",
                path=path,
                field=key,
            )
    declared = document.get("types", {})
    if not isinstance(declared, dict):
        raise TaskTypeError("must be tables [types.NAME]", path=path, field="types")

    loaded: dict[str, TaskTypeSpec] = {}
    for name, table in declared.items():
        if name in builtin_names:
            raise TaskTypeError(
                "redefines a built-in task type; choose another name", path=path, type_name=name
            )
        if not isinstance(table, dict):
            raise TaskTypeError(
                f"must be a table [types.{name}], got {table!r}", path=path, type_name=name
            )
        try:
            loaded[name] = _spec_from_table(name, table)
        except TaskTypeError as exc:
            raise TaskTypeError(
                exc.problem, path=path, type_name=exc.type_name or name, field=exc.field
            ) from None

    known = builtin_names | set(loaded)
    for spec in loaded.values():
        for other in spec.excludes:
            if other not in known:
                raise TaskTypeError(
                    f"names unknown task type {other!r}{_did_you_mean(other, known)}",
                    path=path,
                    type_name=spec.name,
                    field="excludes",
                )
    types.update(loaded)
    return types


def _spec_from_table(name: str, table: dict[str, Any]) -> TaskTypeSpec:
    for key in table:
        if key not in _KNOWN_KEYS:
            raise TaskTypeError(
                f"unknown key{_did_you_mean(key, _KNOWN_KEYS)}; known keys: "
                + ", ".join(_KNOWN_KEYS),
                type_name=name,
                field=key,
            )
    has_callable, has_command = "callable" in table, "command" in table
    if has_callable == has_command:
        problem = "both are set" if has_callable else "missing handler"
        raise TaskTypeError(
            f'{problem}: set exactly one of callable = "package.module:function" '
            'or command = "program --option {param}"',
            type_name=name,
            field="callable / command",
        )
    kind = "callable" if has_callable else "command"
    if "scope" not in table:
        raise TaskTypeError(
            f"missing; set one of {_alternatives(SCOPES)}", type_name=name, field="scope"
        )
    return TaskTypeSpec(
        name=name,
        scope=table["scope"],
        handler=table[kind],
        kind=kind,
        time_limit=table.get("time_limit", DEFAULT_TIME_LIMIT),
        concurrency=table.get("concurrency"),
        per_tenant=table.get("per_tenant", False),
        excludes=table.get("excludes", ()),
        retry_safe=table.get("retry_safe", False),
        params=table.get("params", {}),
        defaults=table.get("defaults", {}),
        ranges=table.get("ranges", {}),
        description=table.get("description", ""),
    )


# --- parameters --------------------------------------------------------------------------


def validate_params(spec: TaskTypeSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """Submitted values converted to their declared types, defaults filled in.

    Raises ``ValueError`` listing every problem (unknown, missing or bad parameters), each
    naming its parameter.
    """
    problems: list[str] = []
    for pname in params:
        if pname not in spec.params:
            declared = _alternatives(spec.params) if spec.params else "none"
            problems.append(
                f"unknown parameter {pname!r}{_did_you_mean(str(pname), spec.params)} "
                f"(declared: {declared})"
            )
    result: dict[str, Any] = {}
    for pname, ptype in spec.params.items():
        if pname in params:
            try:
                result[pname] = _convert(ptype, params[pname], spec.ranges.get(pname))
            except ValueError as exc:
                problems.append(f"parameter {pname!r}: {exc}")
        elif pname in spec.defaults:
            result[pname] = spec.defaults[pname]
        else:
            problems.append(f"missing parameter {pname!r} ({ptype})")
    if problems:
        raise ValueError(f"task type {spec.name!r}: " + "; ".join(problems))
    return result


def _convert(ptype: str, value: Any, bounds: tuple[float, float] | None = None) -> Any:
    out = _convert_type(ptype, value)
    if bounds is not None and not bounds[0] <= out <= bounds[1]:
        raise ValueError(f"must be between {bounds[0]} and {bounds[1]}, got {value!r}")
    return out


def _convert_type(ptype: str, value: Any) -> Any:
    if value is None:
        raise ValueError(f"needs a {ptype} value, got null")
    if ptype == "str":
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {type(value).__name__} {value!r}")
        if "\0" in value:
            raise ValueError("must not contain NUL characters")
        return value
    if ptype == "int":
        number_: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number_ = value
        elif isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
            with contextlib.suppress(ValueError):  # beyond Python's digit limit
                number_ = int(value.strip())
        if number_ is None:
            raise ValueError(f"must be an integer, got {value!r}")
        if not INT64_MIN <= number_ <= INT64_MAX:
            raise ValueError(f"must fit in 64 bits, got {str(number_)[:40]}")
        return number_
    if ptype == "float":
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            number = float(value.strip())
        if number is None or not math.isfinite(number):
            raise ValueError(f"must be a finite number, got {value!r}")
        return number
    if ptype == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
        raise ValueError(f"must be true or false (yes/no, on/off, 1/0), got {value!r}")
    raise ValueError(f"unsupported parameter type {ptype!r}")


# --- command templates -------------------------------------------------------------------


def _split_template(template: str) -> list[str]:
    try:
        words = shlex.split(template)
    except ValueError as exc:  # e.g. "No closing quotation"
        raise ValueError(f"cannot split command template {template!r}: {exc}") from None
    if not words:
        raise ValueError("command template is empty")
    return words


def _parse_word(word: str) -> list[tuple[str, bool]]:
    """``word`` as (text, is_placeholder) pieces; literal braces already unescaped."""
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for match in _TEMPLATE_TOKEN.finditer(word):
        if match.start() > pos:
            pieces.append((word[pos : match.start()], False))
        token = match.group(0)
        if token in ("{{", "}}"):
            pieces.append((token[0], False))
        elif match.group(1) is not None:
            name = match.group(1)
            if not _PARAM_NAME.fullmatch(name):
                raise ValueError(
                    f"invalid placeholder {token!r} in {word!r}: a placeholder is {{name}} "
                    "with a-z 0-9 _ only"
                )
            pieces.append((name, True))
        else:
            raise ValueError(f"single {token!r} in {word!r}: write {token * 2!r} for a literal")
        pos = match.end()
    if pos < len(word):
        pieces.append((word[pos:], False))
    return pieces


def render_command(
    template: str, params: Mapping[str, Any], context: Mapping[str, Any]
) -> list[str]:
    """The argv for ``template``: split by shlex first, then ``{name}`` filled per word.

    A value never adds or splits arguments. Booleans render as ``true``/``false``, other
    values with ``str``. Raises ``ValueError`` for an unknown placeholder, a placeholder
    naming both a parameter and a context key, or a missing (None) value.
    """
    argv: list[str] = []
    for word in _split_template(template):
        out: list[str] = []
        for text, is_placeholder in _parse_word(word):
            if not is_placeholder:
                out.append(text)
                continue
            in_params, in_context = text in params, text in context
            if in_params and in_context:
                raise ValueError(f"placeholder {{{text}}} names both a parameter and context")
            if not in_params and not in_context:
                known = _alternatives(sorted({*params, *context}))
                raise ValueError(f"unknown placeholder {{{text}}}; known: {known}")
            out.append(_format_value(text, params[text] if in_params else context[text]))
        argv.append("".join(out))
    return argv


def _format_value(name: str, value: Any) -> str:
    if value is None:
        raise ValueError(f"placeholder {{{name}}} has no value")
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    if "\0" in text:
        raise ValueError(f"value of {{{name}}} contains a NUL character")
    return text


# --- callables ---------------------------------------------------------------------------


def resolve_callable(handler: str) -> Callable[..., Any]:
    """Import ``"package.module:attr.attr"``; ``ValueError`` says what is missing."""
    if not isinstance(handler, str) or not _CALLABLE_REF.fullmatch(handler):
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
    kill_grace: float = 2.0,
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
            output=_cap_text(output, output_cap),
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


def _cap_text(text: str, cap: int) -> str:
    data = text.encode("utf-8", errors="replace")
    if len(data) <= cap:
        return text
    kept = data[:cap].decode("utf-8", errors="ignore")  # never split a character
    return kept + TRUNCATION_MARKER.format(dropped=len(data) - len(kept.encode("utf-8")))
