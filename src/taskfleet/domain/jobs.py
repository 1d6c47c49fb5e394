"""Multi-phase jobs (SPEC 6): what a job may say, and the pure rules of its run and its end.

Contract (pure: no I/O; the server checks a job with ``validate_job_spec`` before
anything is stored, the agent checks it again before it runs):

* A job's params: ``name``, ``phases`` (a non-empty ordered part of Analyze,
  Download, then ONE of Install, Uninstall or Remediate) and ``items``; each item has
  a ``name``, an optional ``detect`` command (Analyze: exit 0 applicable, 1 not
  applicable, anything else a failed step), ``content`` (references by SHA-256, size
  and a relative file ``name`` inside the item's staging folder) and a command per
  action phase it takes part in (``install``, ``uninstall``, ``remediate``). A
  command is what an execute-script activity takes (``domain/scripts.py``: argv or
  script, interpreter, env, cwd, user, output_cap) plus ``timeout``.
* The steps of one computer (``steps``): Analyze for every item; then, for each item
  Analyze found applicable (every item when there is no Analyze), Download if it has
  content, and the action. An item whose Download failed is not acted on: its action
  step is Skipped. ``next_step`` is the one step to run next, or None.
* Termination (``next_step`` with ``terminating``): during Analyze the phase is
  completed and nothing later starts; in any later phase the step being run is
  finished (the caller does not interrupt it) and no other starts. What did not run
  is Skipped (``unfinished``).
* ``computer_outcome``: Canceled if not every step ran, because it was terminated or
  canceled; Failed if a step failed; Succeeded otherwise (SPEC 6).
* Maintenance windows (SPEC 9; the server sends a computer's windows with its job,
  ``parse_windows``): Analyze and Download run whenever the job is handed out; an
  action step waits until every window is open (``window_wait``).
* ``job_state``: a job's state from its activities' states and whether termination
  was asked: Terminating until every computer has stopped, then Terminated;
  otherwise Pending (nothing started), Running, or, once every computer is final,
  Succeeded, Failed (one failed) or Canceled (one canceled, none failed).
"""

from __future__ import annotations

import enum
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from taskfleet.domain.kinds import JOB as JOB
from taskfleet.domain.lifecycle import (
    MAX_TZ_OFFSET_MINUTES,
    RuleError,
    next_window_open,
    validate_window,
    window_allows,
)
from taskfleet.domain.policy import RunWindow
from taskfleet.domain.scripts import validate_script_params, validate_timeout
from taskfleet.domain.states import FINAL_STATES, State
from taskfleet.settings import OUTPUT_CAP, OUTPUT_CAP_MAX

ANALYZE, DOWNLOAD = "analyze", "download"
ACTIONS = ("install", "uninstall", "remediate")  # the last phase: one of these
PHASES = (ANALYZE, DOWNLOAD, *ACTIONS)

# A step's status as the agent reports it (``protocol/jobs.py``).
STARTED, SUCCEEDED, FAILED, SKIPPED = "started", "succeeded", "failed", "skipped"
STEP_STATUSES = (STARTED, SUCCEEDED, FAILED, SKIPPED)
FINAL_STEP_STATUSES = (SUCCEEDED, FAILED, SKIPPED)

MAX_ITEMS = 1000
MAX_ITEM_CONTENT = 100
MAX_NAME_CHARS = 128  # a job's or item's name
MAX_CONTENT_NAME_CHARS = 255
MAX_CONTENT_SIZE = 1 << 40  # 1 TiB: a content reference's size
DEFAULT_STEP_TIMEOUT = 3600.0
DEFAULT_PHASES = (ANALYZE, DOWNLOAD, "install")

Step = tuple[str, int]  # (phase, item index)


class JobSpecError(ValueError):
    """A job that cannot run as given: the message names the first problem."""


@dataclass(frozen=True)
class ContentRef:
    sha256: str
    size: int
    name: str  # relative path inside the item's staging folder


@dataclass(frozen=True)
class Item:
    name: str
    detect: dict[str, Any] | None  # a command (validated script params + timeout)
    content: tuple[ContentRef, ...]
    commands: Mapping[str, dict[str, Any]]  # action phase -> command


@dataclass(frozen=True)
class JobSpec:
    name: str
    phases: tuple[str, ...]
    items: tuple[Item, ...]

    @property
    def action(self) -> str | None:
        last = self.phases[-1]
        return last if last in ACTIONS else None

    def as_json(self) -> dict[str, Any]:
        """The params as stored and sent (``validate_job_spec`` of it gives it back)."""
        return {
            "name": self.name,
            "phases": list(self.phases),
            "items": [
                {
                    "name": it.name,
                    **({"detect": it.detect} if it.detect is not None else {}),
                    "content": [
                        {"sha256": c.sha256, "size": c.size, "name": c.name} for c in it.content
                    ],
                    **dict(it.commands),
                }
                for it in self.items
            ],
        }

    def content_hashes(self) -> set[str]:
        return {c.sha256 for it in self.items for c in it.content}


def validate_phases(phases: Any) -> tuple[str, ...]:
    if not isinstance(phases, list | tuple) or not phases:
        raise JobSpecError("phases must be a non-empty list")
    if not all(isinstance(p, str) and p in PHASES for p in phases):
        raise JobSpecError(f"phases must be taken from {', '.join(PHASES)}")
    actions = [p for p in phases if p in ACTIONS]
    if len(actions) > 1:
        raise JobSpecError("a job has at most one of install, uninstall, remediate")
    order = {ANALYZE: 0, DOWNLOAD: 1, **dict.fromkeys(ACTIONS, 2)}
    ranks = [order[p] for p in phases]
    if ranks != sorted(set(ranks)):
        raise JobSpecError("phases must be in order analyze, download, then the action, once each")
    return tuple(phases)


def validate_content_name(name: Any) -> str:
    """A file name inside the staging folder: relative, no ``..``, nothing that leaves it."""
    if not isinstance(name, str) or not name or len(name) > MAX_CONTENT_NAME_CHARS:
        raise JobSpecError(f"a content name must be 1..{MAX_CONTENT_NAME_CHARS} characters")
    if "\x00" in name or "\\" in name:
        raise JobSpecError(f"content name {name!r} holds a NUL or a backslash")
    if name.startswith("/"):
        raise JobSpecError(f"content name {name!r} is an absolute path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(name) != name:
        raise JobSpecError(f"content name {name!r} must stay inside the staging folder")
    return name


def _content(raw: Any, where: str) -> ContentRef:
    if not isinstance(raw, dict) or set(raw) - {"sha256", "size", "name"}:
        raise JobSpecError(f"{where}: a content reference is {{sha256, size, name}}")
    sha, size = raw.get("sha256"), raw.get("size")
    if not isinstance(sha, str) or len(sha) != 64 or set(sha) - set("0123456789abcdef"):
        raise JobSpecError(f"{where}: sha256 must be 64 lowercase hex digits")
    if type(size) is not int or not 0 <= size <= MAX_CONTENT_SIZE:
        raise JobSpecError(f"{where}: size must be an integer 0..{MAX_CONTENT_SIZE}")
    try:
        name = validate_content_name(raw.get("name"))
    except JobSpecError as exc:
        raise JobSpecError(f"{where}: {exc}") from None
    return ContentRef(sha, size, name)


def _command(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise JobSpecError(f"{where} must be an object (argv or script, ...)")
    params = {k: v for k, v in raw.items() if k != "timeout"}
    try:
        clean = validate_script_params(params, default_cap=OUTPUT_CAP, max_cap=OUTPUT_CAP_MAX)
        clean["timeout"] = validate_timeout(raw.get("timeout", DEFAULT_STEP_TIMEOUT))
    except ValueError as exc:
        raise JobSpecError(f"{where}: {exc}") from None
    return clean


def _name(raw: Any, what: str) -> str:
    if not isinstance(raw, str) or not raw.strip() or len(raw) > MAX_NAME_CHARS:
        raise JobSpecError(
            f"{what} must be a non-empty text of at most {MAX_NAME_CHARS} characters"
        )
    if "\x00" in raw:
        raise JobSpecError(f"{what} holds a NUL")
    return raw


def validate_job_spec(params: Any) -> JobSpec:
    """The job ``params`` checked whole (module docstring); ``JobSpecError`` otherwise."""
    if not isinstance(params, dict):
        raise JobSpecError("a job's params must be an object")
    unknown = set(params) - {"name", "phases", "items"}
    if unknown:
        raise JobSpecError(f"unknown job field(s): {', '.join(sorted(unknown))}")
    name = _name(params.get("name"), "the job's name")
    phases = validate_phases(params.get("phases", list(DEFAULT_PHASES)))
    raw_items = params.get("items")
    if not isinstance(raw_items, list) or not raw_items:
        raise JobSpecError("items must be a non-empty list")
    if len(raw_items) > MAX_ITEMS:
        raise JobSpecError(f"{len(raw_items)} items, the limit is {MAX_ITEMS}")
    action = phases[-1] if phases[-1] in ACTIONS else None
    items = []
    for i, raw in enumerate(raw_items):
        where = f"item {i}"
        if not isinstance(raw, dict):
            raise JobSpecError(f"{where} must be an object")
        unknown = set(raw) - {"name", "detect", "content", *ACTIONS}
        if unknown:
            raise JobSpecError(f"{where}: unknown field(s): {', '.join(sorted(unknown))}")
        item_name = _name(raw.get("name"), f"{where}'s name")
        where = f"item {i} ({item_name[:40]})"
        detect = None if raw.get("detect") is None else _command(raw["detect"], f"{where} detect")
        if ANALYZE in phases and detect is None:
            raise JobSpecError(f"{where}: the analyze phase needs a detect command")
        raw_content = raw.get("content", [])
        if not isinstance(raw_content, list) or len(raw_content) > MAX_ITEM_CONTENT:
            raise JobSpecError(f"{where}: content must be a list of at most {MAX_ITEM_CONTENT}")
        content = tuple(_content(c, f"{where} content {k}") for k, c in enumerate(raw_content))
        names = [c.name for c in content]
        if len(set(names)) != len(names):
            raise JobSpecError(f"{where}: two content references share a name")
        commands = {a: _command(raw[a], f"{where} {a}") for a in ACTIONS if raw.get(a) is not None}
        if action is not None and action not in commands:
            raise JobSpecError(f"{where}: the {action} phase needs an {action} command")
        items.append(Item(item_name, detect, content, commands))
    return JobSpec(name, phases, tuple(items))


# -- the run on one computer ------------------------------------------------------


def steps(spec: JobSpec, applicable: Mapping[int, bool]) -> list[Step]:
    """Every step of this computer, in order, as far as Analyze has decided: an item
    not analyzed yet counts as applicable (its later steps may still come)."""
    out: list[Step] = []
    n = range(len(spec.items))
    if ANALYZE in spec.phases:
        out += [(ANALYZE, i) for i in n]
    go = [i for i in n if applicable.get(i, True)]
    if DOWNLOAD in spec.phases:
        out += [(DOWNLOAD, i) for i in go if spec.items[i].content]
    if spec.action is not None:
        out += [(spec.action, i) for i in go]
    return out


def next_step(
    spec: JobSpec,
    applicable: Mapping[int, bool],
    done: Mapping[Step, str],
    *,
    terminating: bool,
) -> Step | None:
    """The step to run next, or None when the run is over (module docstring).
    ``done`` maps each finished step to its status (succeeded, failed, skipped)."""
    for step in steps(spec, applicable):
        if step in done:
            continue
        phase, item = step
        if terminating and phase != ANALYZE:
            return None
        if phase == spec.action and done.get((DOWNLOAD, item), SUCCEEDED) != SUCCEEDED:
            continue  # its content is not there: skipped (``skipped_for_failure``)
        return step
    return None


def skipped_for_failure(spec: JobSpec, done: Mapping[Step, str]) -> list[Step]:
    """Action steps not to run because their item's Download did not succeed."""
    if spec.action is None:
        return []
    return [
        (spec.action, i)
        for i in range(len(spec.items))
        if done.get((DOWNLOAD, i)) in (FAILED, SKIPPED) and (spec.action, i) not in done
    ]


def unfinished(
    spec: JobSpec, applicable: Mapping[int, bool], done: Mapping[Step, str]
) -> list[Step]:
    """The steps that did not run: each is reported Skipped when the run ends early."""
    return [s for s in steps(spec, applicable) if s not in done]


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


def computer_outcome(done: Mapping[Step, str], *, stopped: bool) -> Outcome:
    """SPEC 6 per computer. ``stopped``: terminated or canceled before the end."""
    statuses = set(done.values())
    if stopped and SKIPPED in statuses:
        return Outcome.CANCELED
    # Not stopped, a step is Skipped only because an earlier step of its item failed.
    return Outcome.FAILED if FAILED in statuses else Outcome.SUCCEEDED


# -- maintenance windows ------------------------------------------------------------

MAX_WINDOWS = 100  # a computer's windows in one job operation (one per windowed group)
_WINDOW_SEARCH = 3 * 86_400  # daily windows that do not meet within this never meet


@dataclass(frozen=True)
class MaintenanceWindow:
    """A group's window ``HH:MM-HH:MM`` in its local time, ``utc_offset`` minutes east."""

    window: RunWindow
    utc_offset: int

    def as_json(self) -> dict[str, Any]:
        return {"window": str(self.window), "utc_offset": self.utc_offset}

    def is_open(self, now: float) -> bool:
        return window_allows(self.window, ((now + self.utc_offset * 60) % 86_400) / 60.0)

    def __str__(self) -> str:
        return f"{self.window} (UTC{self.utc_offset / 60:+g}h)"


def parse_windows(raw: Any) -> tuple[MaintenanceWindow, ...]:
    """A job operation's ``windows`` field (absent: none); ``JobSpecError`` if malformed."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_WINDOWS:
        raise JobSpecError(f"windows must be a list of at most {MAX_WINDOWS}")
    out = []
    for k, w in enumerate(raw):
        if not isinstance(w, dict) or set(w) != {"window", "utc_offset"}:
            raise JobSpecError(f"window {k} must be {{window, utc_offset}}")
        off = w["utc_offset"]
        if type(off) is not int or not -MAX_TZ_OFFSET_MINUTES <= off <= MAX_TZ_OFFSET_MINUTES:
            raise JobSpecError(f"window {k}: utc_offset must be minutes within +-14 h")
        try:
            out.append(MaintenanceWindow(validate_window(str(w["window"])), off))
        except RuleError as exc:
            raise JobSpecError(f"window {k}: {exc}") from None
    return tuple(out)


def window_wait(step: Step, windows: Iterable[MaintenanceWindow], now: float) -> float | None:
    """None if ``step`` may run at ``now``; else when to look again (epoch seconds).

    Only an action step (install, uninstall, remediate) waits; Analyze and Download
    run outside the windows. An action runs while EVERY window is open; the answer
    is the first second from ``now`` at which they all are, found by moving to the
    latest next opening of those closed until none is. Windows that never overlap
    (none found within three days) give the latest next opening: the caller looks
    again then and keeps waiting, as the server holds other work for ever.
    """
    ws = list(windows)
    if step[0] not in ACTIONS or all(w.is_open(now) for w in ws):
        return None
    t, first = now, None
    while t - now <= _WINDOW_SEARCH:
        closed = [w for w in ws if not w.is_open(t)]
        if not closed:
            return t
        t = max(next_window_open(w.window, t, w.utc_offset) for w in closed)
        first = t if first is None else first
    return first


# -- the job as a whole -----------------------------------------------------------


class JobState(enum.StrEnum):
    PENDING = "pending"  # no computer has started (queued, scheduled, waiting, blocked)
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    TERMINATING = "terminating"
    TERMINATED = "terminated"

    @property
    def label(self) -> str:
        return self.value.title()


def job_state(states: Iterable[State], *, terminate_asked: bool) -> JobState:
    """The job's state from its computers' activity states (module docstring)."""
    seen = list(states)
    final = all(s in FINAL_STATES for s in seen)
    if terminate_asked:
        return JobState.TERMINATED if final else JobState.TERMINATING
    if not final:
        started = any(s == State.IN_PROGRESS or s in FINAL_STATES for s in seen)
        return JobState.RUNNING if started else JobState.PENDING
    if State.FAILED in seen:
        return JobState.FAILED
    if State.CANCELED in seen:
        return JobState.CANCELED
    return JobState.SUCCEEDED
