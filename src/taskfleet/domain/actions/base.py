"""What every typed activity is, and the field checks their parameter schemas share.

Contract: an :class:`ActionType` names a type, says whether it changes the system
(then an agent runs it only when its configuration enables it) and which tool it
needs, gives its default time limit, and validates its parameters: ``validate``
returns them normalised (every field present, defaults filled) or raises
``ValueError`` naming the first bad field. ``schema`` is the JSON Schema of the
parameters (OpenAPI); the validators are the rule, the schema documents it.

The shared checks refuse, for their whole class: anything not of the exact JSON
type (a bool is not an int), integers outside their range, text with control
characters, names that could be read as an option (a leading ``-``) or a shell
word (metacharacters), unknown fields, and lists longer than ``MAX_ITEMS``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_ITEMS = 1000  # names in one list parameter (packages, groups, snaps)
MAX_TEXT = 256  # characters of one free text parameter (a user's full name)
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class ActionType:
    name: str  # the request's ``type`` on the wire
    title: str  # what a person calls it ("Change packages")
    validate: Callable[[Any], dict[str, Any]]
    schema: dict[str, Any]
    changes_system: bool = True  # run only where the agent's configuration enables it
    default_timeout: float = 600.0  # seconds, when the request gives none
    description: str = ""
    tools: tuple[str, ...] = field(default=())  # programs it needs (documentation)


def params_object(
    raw: Any, known: set[str], required: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``raw`` as a parameters object: a JSON object with only ``known`` keys and every
    ``required`` one."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError("params must be an object")
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(sorted(map(str, unknown)))}"[:300])
    missing = required - set(raw)
    if missing:
        raise ValueError(f"missing parameter(s): {', '.join(sorted(missing))}")
    return raw


def boolean(raw: dict[str, Any], key: str, default: bool = False) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


def integer(
    raw: dict[str, Any], key: str, *, minimum: int, maximum: int, default: int | None = None
) -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if type(value) is not int or not minimum <= value <= maximum:
        raise ValueError(f"{key} must be an integer in [{minimum}, {maximum}]")
    return value


def number(
    raw: dict[str, Any], key: str, *, minimum: float, maximum: float, default: float
) -> float:
    value = raw.get(key, default)
    if type(value) not in (int, float) or not minimum <= value <= maximum:
        raise ValueError(f"{key} must be a number in [{minimum:g}, {maximum:g}]")
    return float(value)


def text(raw: dict[str, Any], key: str, *, limit: int = MAX_TEXT) -> str | None:
    """Free text (a comment, a full name): printable, no ``:`` or ``,`` (passwd fields)."""
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{key} must be a text of at most {limit} characters")
    if not value.isprintable() or any(ch in value for ch in ":,\n"):
        raise ValueError(f"{key} must not hold control characters, ':' or ','")
    return value


def matching(
    raw: dict[str, Any], key: str, pattern: re.Pattern[str], what: str, *, required: bool = True
) -> str | None:
    """A name that ``pattern`` matches whole; never one that starts with ``-``."""
    value = raw.get(key)
    if value is None and not required:
        return None
    return check_name(value, pattern, what, key)


def check_name(value: Any, pattern: re.Pattern[str], what: str, key: str) -> str:
    if not isinstance(value, str) or value.startswith("-") or not pattern.fullmatch(value):
        shown = repr(value)[:80]
        raise ValueError(f"{key}: {shown} is not a valid {what}")
    return value


def name_list(
    raw: dict[str, Any],
    key: str,
    pattern: re.Pattern[str],
    what: str,
    *,
    required: bool = False,
) -> list[str]:
    """A list of distinct names, each matching ``pattern``, in the order given."""
    value = raw.get(key, [] if not required else None)
    if not isinstance(value, list) or len(value) > MAX_ITEMS or (required and not value):
        need = "a non-empty" if required else "a"
        raise ValueError(f"{key} must be {need} list of at most {MAX_ITEMS} {what}s")
    out: list[str] = []
    for item in value:
        name = check_name(item, pattern, what, key)
        if name not in out:
            out.append(name)
    return out
