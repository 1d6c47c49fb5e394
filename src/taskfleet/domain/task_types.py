"""Server task types (SPEC 4): the one model of a declaration, its parameters and command.

Contract:
- ``TaskTypeSpec`` is a task type as declared (by an administrator's TOML file, loaded by
  ``taskfleet.task_type_file``, or in code for the built-ins). Constructing one validates it;
  every problem raises ``TaskTypeError`` naming the type and the key. The server validates
  submissions with it, the worker runs handlers from it, and the scheduler takes its limits
  from it (``domain.scheduling.from_spec``).
- Parameters are declared with a type (``str``, ``int``, ``float``, ``bool``). Every declared
  parameter is required unless ``defaults`` gives it a default; ``ranges`` bound an int or
  float parameter, and an int must fit in 64 bits. ``validate_params`` converts submitted
  values (CLI strings or JSON scalars) and fills in defaults, so equal submissions compare
  equal (SPEC 4.2 duplicates).
- A command handler is a template: it is split into words by ``shlex`` FIRST and the
  ``{name}`` placeholders are filled in each word afterwards (``render_command``), so a
  parameter value is always exactly one argument, never more arguments or shell syntax. The
  executable (first word) may not contain a placeholder.

Pure: no I/O, no clock; a callable handler is only named here, never imported.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import math
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskfleet.settings import INT64_MAX, INT64_MIN, TASK_TIME_LIMIT

__all__ = [
    "CALLABLE_REF",
    "CONTEXT_KEYS",
    "PARAM_TYPES",
    "SCOPES",
    "Scope",
    "TaskTypeError",
    "TaskTypeSpec",
    "alternatives",
    "did_you_mean",
    "is_concurrency",
    "is_time_limit",
    "render_command",
    "validate_params",
]


class Scope(enum.StrEnum):
    """What a submission of the type must name (SPEC 4.1)."""

    NONE = "none"
    TENANT = "tenant"
    GROUP = "group"


SCOPES = tuple(s.value for s in Scope)  # as plain strings: what a declaration may say
KINDS = ("callable", "command")
PARAM_TYPES = ("str", "int", "float", "bool")
CONTEXT_KEYS = ("task_id", "type", "tenant", "group")  # given by the worker, not the submitter

_TYPE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_PARAM_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
CALLABLE_REF = re.compile(rf"{_DOTTED}:{_DOTTED}")
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
# {{ and }} are literal braces, {name} a placeholder; any other brace is an error.
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


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
    """A server task type as declared; the one model the server, worker and scheduler use."""

    name: str  # [a-z0-9][a-z0-9_.-]{0,63}
    scope: str  # "none" | "tenant" | "group": what a submission must name (SPEC 4.1)
    handler: str  # "package.module:function" or a command template
    kind: str  # "callable" | "command"
    time_limit: float = TASK_TIME_LIMIT  # seconds; the handler is stopped after this
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

        # Checked in this order so the first problem reported is the same as ever.
        self._check_handler(bad)
        self._check_limits(bad)
        self._check_excludes(bad)
        self._check_params(bad)
        self._check_ranges(bad)
        self._check_defaults(bad)
        if self.kind == "command":
            self._check_template()

    def _check_handler(self, bad: Callable[[str, str], TaskTypeError]) -> None:
        if not isinstance(self.name, str) or not _TYPE_NAME.fullmatch(self.name):
            raise TaskTypeError(
                f"invalid task type name {self.name!r}: use 1-64 characters a-z 0-9 _ . -, "
                "starting with a letter or digit",
                field="name",
            )
        if self.scope not in SCOPES:
            raise bad("scope", f"must be one of {alternatives(SCOPES)}, got {self.scope!r}")
        if self.kind not in KINDS:
            raise bad("kind", f"must be one of {alternatives(KINDS)}, got {self.kind!r}")
        if not isinstance(self.handler, str) or not self.handler.strip():
            raise bad(self.kind, "must be a non-empty string")
        if self.kind == "callable" and not CALLABLE_REF.fullmatch(self.handler):
            raise bad("callable", f"must look like 'package.module:function', got {self.handler!r}")

    def _check_limits(self, bad: Callable[[str, str], TaskTypeError]) -> None:
        limit = self.time_limit
        if not is_time_limit(limit):
            raise bad("time_limit", f"must be a number of seconds > 0, got {limit!r}")
        object.__setattr__(self, "time_limit", float(limit))

        conc = self.concurrency
        if not is_concurrency(conc):
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

    def _check_excludes(self, bad: Callable[[str, str], TaskTypeError]) -> None:
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

    def _check_params(self, bad: Callable[[str, str], TaskTypeError]) -> None:
        if not isinstance(self.params, Mapping):
            raise bad("params", "must be a table of name = type")
        for pname, ptype in self.params.items():
            where = f"params.{pname}"
            if not isinstance(pname, str) or not _PARAM_NAME.fullmatch(pname):
                raise bad(where, "invalid parameter name: use a-z 0-9 _, not starting with a digit")
            if pname in CONTEXT_KEYS:
                raise bad(where, f"{pname!r} is reserved for the task context")
            if ptype not in PARAM_TYPES:
                raise bad(where, f"type must be one of {alternatives(PARAM_TYPES)}, got {ptype!r}")
        object.__setattr__(self, "params", dict(self.params))

    def _check_defaults(self, bad: Callable[[str, str], TaskTypeError]) -> None:
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
                f"unknown placeholder {{{name}}}{hint}; known: {alternatives(sorted(allowed))}",
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


def is_time_limit(value: object) -> bool:
    """A time limit is a finite number of seconds > 0 (true and false are not numbers)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def is_concurrency(value: object) -> bool:
    """A concurrency limit is None (no limit) or an integer >= 1."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def _context_keys(scope: str) -> tuple[str, ...]:
    keys = ["task_id", "type"]
    if scope in ("tenant", "group"):
        keys.append(scope)
    return tuple(keys)


def alternatives(values: Iterable[str]) -> str:
    """The values quoted and comma-separated, for error messages."""
    return ", ".join(repr(v) for v in values) or "(none)"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A hint naming the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- parameters --------------------------------------------------------------------------


def validate_params(spec: TaskTypeSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """Submitted values converted to their declared types, defaults filled in.

    Raises ``ValueError`` listing every problem (unknown, missing or bad parameters), each
    naming its parameter.
    """
    problems: list[str] = []
    for pname in params:
        if pname not in spec.params:
            declared = alternatives(spec.params) if spec.params else "none"
            problems.append(
                f"unknown parameter {pname!r}{did_you_mean(str(pname), spec.params)} "
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
    convert = _CONVERTERS.get(ptype)
    if convert is None:
        raise ValueError(f"unsupported parameter type {ptype!r}")
    return convert(value)


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__} {value!r}")
    if "\0" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _to_int(value: Any) -> int:
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


def _to_float(value: Any) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        number = float(value.strip())
    if number is None or not math.isfinite(number):
        raise ValueError(f"must be a finite number, got {value!r}")
    return number


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError(f"must be true or false (yes/no, on/off, 1/0), got {value!r}")


# One converter per entry of PARAM_TYPES.
_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "str": _to_str,
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
}


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
                known = alternatives(sorted({*params, *context}))
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
