"""System activities: Resynchronize, Restart, Shutdown, Signal Process (SPEC 2.3).

Contract: see ``domain/actions/base.py``. Resynchronize changes nothing (every agent
runs it); the others change the system and run only where enabled.
* ``resync``: no parameters; the agent reports its whole inventory again.
* ``restart`` / ``shutdown``: ``delay`` seconds before the computer goes down (0..1
  day, default 60, rounded up to whole minutes by ``shutdown``), ``message`` an
  optional printable text for logged-in users, at most 256 characters, not starting
  with ``-`` (``shutdown`` would read it as an option). A restart is Succeeded only when the agent
  comes back after it; a shutdown when the agent reports it initiated.
* ``signal-process``: exactly one of ``pid`` (an integer above 1) or ``process`` (an
  exact process name, as ``/proc/PID/comm`` shows it: at most 15 characters), and
  ``signal`` by name (``TERM``, ``KILL``, ...; default TERM). PID 1 and the agent
  itself are never signalled (the agent checks its own PID and process group).
"""

from __future__ import annotations

import re
from typing import Any

from taskfleet.domain.actions.base import (
    MAX_TEXT,
    ActionType,
    check_name,
    integer,
    number,
    params_object,
)

RESYNC = "resync"
RESTART = "restart"
SHUTDOWN = "shutdown"
SIGNAL_PROCESS = "signal-process"

MAX_DELAY = 86400.0  # a restart or shutdown at most a day away
DEFAULT_DELAY = 60.0
MAX_PID = 2**22  # Linux's pid_max limit (PID_MAX_LIMIT)
# Signals an administrator may send by name (POSIX names without SIG).
SIGNALS = (
    "HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM", "CONT", "STOP", "TSTP",
)  # fmt: skip
_COMM = re.compile(r"[^\x00-\x1f/\x7f]{1,15}")


def validate_resync(raw: Any) -> dict[str, Any]:
    params_object(raw, set())
    return {}


def validate_power(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"delay", "message"})
    return {
        "delay": number(p, "delay", minimum=0, maximum=MAX_DELAY, default=DEFAULT_DELAY),
        "message": _message(p.get("message")),
    }


def _message(value: Any) -> str | None:
    """The wall message: one argv word of ``shutdown`` after the time, never an option."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT or not value.isprintable():
        raise ValueError(f"message must be a printable text of at most {MAX_TEXT} characters")
    if value.startswith("-"):
        raise ValueError("message must not start with '-' (shutdown would read it as an option)")
    return value


def validate_signal(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"pid", "process", "signal"})
    # Normalised parameters (the agent checks what the server stored) say null for the other.
    has_pid, has_process = p.get("pid") is not None, p.get("process") is not None
    if has_pid == has_process:
        raise ValueError("give exactly one of pid or process")
    pid = integer(p, "pid", minimum=2, maximum=MAX_PID) if has_pid else None
    process = check_name(p["process"], _COMM, "process name", "process") if has_process else None
    signal = p.get("signal", "TERM")
    if isinstance(signal, str) and signal.upper().removeprefix("SIG") in SIGNALS:
        signal = signal.upper().removeprefix("SIG")
    else:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}")
    return {"pid": pid, "process": process, "signal": signal}


_POWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "delay": {
            "type": "number",
            "minimum": 0,
            "maximum": MAX_DELAY,
            "default": DEFAULT_DELAY,
            "description": "seconds before the computer goes down (whole minutes)",
        },
        "message": {
            "type": "string",
            "maxLength": MAX_TEXT,
            "pattern": "^[^-]",
            "description": "told to logged-in users (not starting with '-')",
        },
    },
}

TYPES: tuple[ActionType, ...] = (
    ActionType(
        RESYNC,
        "Resynchronize",
        validate_resync,
        {"type": "object", "additionalProperties": False, "properties": {}},
        changes_system=False,
        default_timeout=300.0,
        description="the agent reports its whole inventory again",
    ),
    ActionType(
        RESTART,
        "Restart",
        validate_power,
        _POWER_SCHEMA,
        default_timeout=MAX_DELAY + 3600,
        description="restart the computer; Succeeded when its agent comes back",
        tools=("shutdown",),
    ),
    ActionType(
        SHUTDOWN,
        "Shutdown",
        validate_power,
        _POWER_SCHEMA,
        default_timeout=300.0,
        description="shut the computer down; Succeeded once the agent reports it initiated",
        tools=("shutdown",),
    ),
    ActionType(
        SIGNAL_PROCESS,
        "Signal process",
        validate_signal,
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "pid": {"type": "integer", "minimum": 2, "maximum": MAX_PID},
                "process": {"type": "string", "maxLength": 15, "description": "exact name"},
                "signal": {"type": "string", "enum": list(SIGNALS), "default": "TERM"},
            },
            "oneOf": [{"required": ["pid"]}, {"required": ["process"]}],
        },
        default_timeout=60.0,
        description="send a signal to a process by PID or exact name",
    ),
)
