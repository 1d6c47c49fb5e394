"""How an operation may run on an agent (SPEC 5): its policy, and local run windows.

Contract: ``validate_policy`` normalises a request's policy or raises
``ValueError``; the server sends the result inside every signed operation.
``validate_agent_policy`` does the same for what an agent reports of its own
configuration (SPEC 7: scripts allowed, script users, activity types) at
enrollment and in its info exchanges; the server stores only its result.
Mode: a Required operation runs as soon as it arrives; an Optional one waits
(Deferred) while the agent is outside its local run window. Interval: Once, or
Recurring every ``every`` seconds until canceled. ``RunWindow`` is a daily
window in the agent's local time; pure: callers pass the time.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from taskfleet.settings import MAX_AHEAD

MIN_EVERY = 1.0  # seconds; a recurring operation may not run more often
MAX_EVERY = MAX_AHEAD


class Mode(enum.StrEnum):
    REQUIRED = "required"
    OPTIONAL = "optional"


class Interval(enum.StrEnum):
    ONCE = "once"
    RECURRING = "recurring"


DEFAULT_POLICY: dict[str, Any] = {"mode": "required", "interval": "once", "every": None}


def validate_policy(raw: Any) -> dict[str, Any]:
    if raw is None:
        return dict(DEFAULT_POLICY)
    if not isinstance(raw, dict):
        raise ValueError("policy must be an object")
    unknown = set(raw) - {"mode", "interval", "every"}
    if unknown:
        raise ValueError(f"unknown policy field(s): {', '.join(sorted(unknown))}")
    try:
        mode = Mode(raw.get("mode", "required"))
        interval = Interval(raw.get("interval", "once"))
    except ValueError:
        raise ValueError("policy mode is required|optional, interval is once|recurring") from None
    raw_every = raw.get("every")
    every: float | None = None
    if interval is Interval.RECURRING:
        if not isinstance(raw_every, int | float) or isinstance(raw_every, bool):
            raise ValueError("a recurring policy needs 'every' (seconds)")
        every = float(raw_every)
        if not MIN_EVERY <= every <= MAX_EVERY:
            raise ValueError(f"'every' must be in [{MIN_EVERY:g}, {MAX_EVERY:g}] seconds")
    elif raw_every is not None:
        raise ValueError("'every' is only for recurring policies")
    return {"mode": mode.value, "interval": interval.value, "every": every}


AGENT_POLICY_FIELDS = ("scripts", "users", "types", "unsupported")
MAX_UNSUPPORTED_REASON = 200  # characters of why an agent cannot run a type
MAX_POLICY_ITEMS = 256  # users or types an agent may list
MAX_POLICY_NAME = 64  # characters of one user or type name


def _names(raw: dict[str, Any], key: str) -> list[str]:
    value = raw.get(key, [])
    if not isinstance(value, list) or len(value) > MAX_POLICY_ITEMS:
        raise ValueError(f"policy '{key}' must be a list of at most {MAX_POLICY_ITEMS} names")
    for name in value:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_POLICY_NAME:
            raise ValueError(
                f"policy '{key}' must hold names of 1..{MAX_POLICY_NAME} characters, not {name!r}"[
                    :200
                ]
            )
        if not name.isprintable() or any(ch.isspace() for ch in name):
            raise ValueError(f"policy '{key}' has a name with spaces or control characters")
    return sorted(set(value))


def validate_agent_policy(raw: Any) -> dict[str, Any]:
    """An agent's own policy, normalised: ``{"scripts": bool, "users": [...], "types": [...],
    "unsupported": {type: why}}``.

    Users and types are lists of exact names (a user is allowed only if it is
    one of them, never a substring); a missing field means nothing allowed.
    ``unsupported``: typed activities its configuration enables but its computer
    cannot run (a tool it lacks), each with the agent's reason."""
    if not isinstance(raw, dict):
        raise ValueError("policy must be an object")
    unknown = set(raw) - set(AGENT_POLICY_FIELDS)
    if unknown:
        raise ValueError(f"unknown policy field(s): {', '.join(sorted(map(str, unknown)))}"[:200])
    scripts = raw.get("scripts", False)
    if not isinstance(scripts, bool):
        raise ValueError("policy 'scripts' must be true or false")
    return {
        "scripts": scripts,
        "users": _names(raw, "users"),
        "types": _names(raw, "types"),
        "unsupported": _reasons(raw.get("unsupported", {})),
    }


def _reasons(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_POLICY_ITEMS:
        raise ValueError(f"policy 'unsupported' must map at most {MAX_POLICY_ITEMS} types to why")
    _names({"unsupported": list(value)}, "unsupported")
    for why in value.values():
        if not isinstance(why, str) or not why.isprintable() or len(why) > MAX_UNSUPPORTED_REASON:
            raise ValueError(
                f"policy 'unsupported' reasons must be printable texts of at most "
                f"{MAX_UNSUPPORTED_REASON} characters"
            )
    return dict(sorted(value.items()))


_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class RunWindow:
    """A daily window ``HH:MM-HH:MM`` in local time; it may wrap past midnight."""

    start: int  # minutes after midnight
    end: int

    @classmethod
    def parse(cls, text: str) -> RunWindow:
        a, sep, b = text.partition("-")
        ma, mb = _HHMM.match(a.strip()), _HHMM.match(b.strip())
        if not sep or not ma or not mb:
            raise ValueError(f"invalid run window {text!r}: expected HH:MM-HH:MM")
        start = int(ma[1]) * 60 + int(ma[2])
        end = int(mb[1]) * 60 + int(mb[2])
        if start == end:
            raise ValueError(f"run window {text!r} is empty (start equals end)")
        return cls(start, end)

    def contains(self, minute_of_day: float) -> bool:
        if self.start < self.end:
            return self.start <= minute_of_day < self.end
        return minute_of_day >= self.start or minute_of_day < self.end

    def seconds_until_open(self, minute_of_day: float) -> float:
        """0 if open now, else seconds until the window next opens."""
        if self.contains(minute_of_day):
            return 0.0
        return ((self.start - minute_of_day) % 1440) * 60.0

    def __str__(self) -> str:
        return (
            f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"
        )
