"""Pure rules that decide when an activity leaves Scheduled, Waiting or Blocked (SPEC 2.1).

Contract: every function here is pure. No I/O and no clock reads: callers pass
``now`` (epoch seconds, UTC) and the facts they read from the store, and get
back a decision. Bad input from an administrator (a threshold, a wave size, a
window, a cron expression) raises :class:`RuleError`, a ``ValueError`` whose
message can be shown to that administrator as is.

Time boundaries are half-open everywhere, so one instant is never both sides:
``release_at`` is true from ``not_before`` on, ``expired`` is true from
``expires_at`` on, and a run window contains its start minute but not its end.

Only the cron functions need a third-party library (croniter); it is imported
inside them so the rest of the domain, which the agent also imports, stays
stdlib-only.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from taskfleet.domain.policy import RunWindow
from taskfleet.domain.progress import Progress
from taskfleet.domain.states import State


class RuleError(ValueError):
    """Input that a lifecycle rule refuses; the message is meant for an administrator."""


# --------------------------------------------------------------------------- thresholds

METRICS = frozenset({"finished", "succeeded"})


def _number(value: object, what: str) -> float:
    # bool is an int subclass; True as "100 percent" is a caller bug, not a threshold.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RuleError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise RuleError(f"{what} must be a number, got NaN")
    return number


def validate_threshold(percent: float) -> float:
    """A dependency threshold: ``0 < percent <= 100``.

    0 is refused because "wait until 0% succeeded" is not waiting at all: the
    administrator should create the activity Queued instead.
    """
    value = _number(percent, "threshold")
    if not 0.0 < value <= 100.0:
        raise RuleError(f"threshold must be in (0, 100] percent, got {value:g}")
    return value


@dataclass(frozen=True)
class Dependency:
    """Wait until request/activity ``on`` has ``percent`` of its children ``metric``."""

    on: int  # request or activity id; the caller knows which
    metric: str  # "finished" (any final state) or "succeeded"
    percent: float = 100.0

    def __post_init__(self) -> None:
        # Checked at construction so an invalid dependency can never be stored.
        if self.metric not in METRICS:
            raise RuleError(
                f"dependency metric must be 'finished' or 'succeeded', got {self.metric!r}"
            )
        object.__setattr__(self, "percent", validate_threshold(self.percent))


def _count(dep: Dependency, progress: Progress) -> int:
    return progress.succeeded if dep.metric == "succeeded" else progress.finished


def _reaches(count: int, total: int, percent: float) -> bool:
    # count/total*100 >= percent, multiplied out so 1 of 3 meets 33.33...% exactly
    # as entered, without a division rounding it just below.
    return count * 100.0 >= percent * total


def dependency_met(dep: Dependency, progress: Progress) -> bool:
    """True once ``metric`` has reached ``percent`` of the children in ``progress``.

    An empty target (``total == 0``) is never met, as ``Progress.done`` is never
    true for it; :func:`dependency_doomed` reports it instead.
    """
    if progress.total <= 0:
        return False
    return _reaches(_count(dep, progress), progress.total, dep.percent)


def dependency_doomed(dep: Dependency, progress: Progress) -> bool:
    """True when the threshold can no longer be reached, so the waiter should be canceled.

    Best case: every unfinished child still ends in the wanted state. For
    "finished" that is always 100%, so only an empty target dooms it; for
    "succeeded" too many Failed/Canceled children do. Never true together with
    :func:`dependency_met`.
    """
    if progress.total <= 0:
        # Nothing there can ever finish, so waiting would never end.
        return True
    if dep.metric == "finished":
        return False
    best = progress.succeeded + (progress.total - progress.finished)
    return not _reaches(best, progress.total, dep.percent)


def find_cycle(edges: Mapping[int, Iterable[int]]) -> list[int] | None:
    """One dependency cycle as a path ``[a, b, ..., a]``, or None if ``edges`` is acyclic.

    ``edges`` maps a waiter to the ids it depends on. Iterative depth-first
    search, so a long chain of waiters cannot exhaust the recursion limit.
    """
    graph: dict[int, list[int]] = {node: list(targets) for node, targets in edges.items()}
    done: set[int] = set()
    for root in graph:
        if root in done:
            continue
        path: list[int] = [root]
        on_path: dict[int, int] = {root: 0}  # node -> index in path
        stack = [iter(graph.get(root, ()))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                finished = path.pop()
                del on_path[finished]
                done.add(finished)
                continue
            if nxt in on_path:
                return [*path[on_path[nxt] :], nxt]
            if nxt in done:
                continue
            on_path[nxt] = len(path)
            path.append(nxt)
            stack.append(iter(graph.get(nxt, ())))
    return None


# --------------------------------------------------------------------------- approvals


@dataclass(frozen=True)
class Approval:
    """A Blocked activity's pending approval."""

    requested_by: str  # actor, e.g. "token:3"
    requested_at: float  # epoch seconds
    expires_at: float | None  # None: the request for approval never expires
    separation: bool  # separation of duties: the requester may not approve


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def approval_refusal(a: Approval, approver: str, now: float) -> str | None:
    """Why ``approver`` may not approve now, or None if the approval is accepted."""
    if not approver.strip():
        return "an approval needs an identified approver"
    if a.expires_at is not None and expired(a.expires_at, now):
        return f"approval expired at {_iso(a.expires_at)}"
    if a.separation and approver == a.requested_by:
        return "the requester cannot approve their own request (separation of duties)"
    return None


def after_approval(dependency_met: bool) -> State:
    """The state a Blocked activity takes when approved (SPEC 2.1: Blocked -> Queued|Waiting)."""
    return State.QUEUED if dependency_met else State.WAITING


# --------------------------------------------------------------------------- rollouts


def plan_waves(
    computer_ids: Sequence[int],
    *,
    canary: int = 0,
    size: int | None = None,
    share: float | None = None,
) -> list[list[int]]:
    """Split ``computer_ids`` into rollout waves, keeping their order.

    First a canary wave of ``canary`` computers (if > 0), then waves of ``size``
    computers or of ``ceil(share% of all computers)`` (exactly one of the two).
    The share is of the whole target, not of what is left after the canary, so
    "25%" means the same wave size whatever the canary. The last wave may be
    smaller; no wave is empty; every id appears exactly once.
    """
    if (size is None) == (share is None):
        raise RuleError("give exactly one of a wave size or a wave share")
    total = len(computer_ids)
    if len(set(computer_ids)) != total:
        raise RuleError("a computer appears more than once in the rollout")
    if isinstance(canary, bool) or not isinstance(canary, int) or canary < 0:
        raise RuleError(f"canary must be a whole number >= 0, got {canary!r}")
    if canary > total:
        raise RuleError(f"canary of {canary} is larger than the {total} targeted computers")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise RuleError(f"wave size must be a whole number >= 1, got {size!r}")
        step = size
    else:
        percent = _number(share, "wave share")
        if not 0.0 < percent <= 100.0:
            raise RuleError(f"wave share must be in (0, 100] percent, got {percent:g}")
        # At least one computer per wave, or an empty target would loop forever.
        step = max(1, math.ceil(total * percent / 100.0))
    ids = list(computer_ids)
    waves: list[list[int]] = [ids[:canary]] if canary else []
    waves.extend(ids[i : i + step] for i in range(canary, total, step))
    return waves


def rollout_should_pause(progress_so_far: Progress, max_failure_percent: float) -> bool:
    """True when the failure share of the FINISHED children exceeds the limit.

    Failures are Failed + Canceled, i.e. every finished child that did not
    succeed: a canceled or lost computer did not get the change either, and
    pausing is the safe side (an administrator resumes). The share is of the
    finished children, not of all, so an early failure pauses before the wave
    completes. Nothing finished yet: no evidence, no pause. A limit of 0 pauses
    on the first failure; 100 never pauses.
    """
    limit = _number(max_failure_percent, "maximum failure percent")
    if not 0.0 <= limit <= 100.0:
        raise RuleError(f"maximum failure percent must be in [0, 100], got {limit:g}")
    if progress_so_far.finished <= 0:
        return False
    failures = progress_so_far.finished - progress_so_far.succeeded
    return failures * 100.0 > limit * progress_so_far.finished


# --------------------------------------------------------------------------- windows, expiry

_DAY = 86_400
MAX_TZ_OFFSET_MINUTES = 14 * 60  # UTC-12:00 .. UTC+14:00 covers every real zone


def window_allows(window: RunWindow | None, minute_of_day: float) -> bool:
    """True when local ``minute_of_day`` (0 <= m < 1440) is inside ``window``; None: always."""
    if window is None:
        return True
    return window.contains(minute_of_day % 1440)


def next_window_open(window: RunWindow, now: float, tz_offset_minutes: int = 0) -> float:
    """Epoch seconds when ``window`` next opens: ``now`` itself if it is open now.

    ``tz_offset_minutes`` is the group's local offset from UTC (east positive).
    The opening is computed as a whole number of seconds (local midnight plus
    the start minute) rather than ``now + seconds_until_open``, whose float
    rounding could land a hair before the opening, i.e. still outside it.
    """
    if not -MAX_TZ_OFFSET_MINUTES <= tz_offset_minutes <= MAX_TZ_OFFSET_MINUTES:
        raise RuleError(f"time zone offset {tz_offset_minutes} minutes is out of range")
    offset = tz_offset_minutes * 60
    if window.contains(((now + offset) % _DAY) / 60.0):
        return now
    opening = math.floor((now + offset) / _DAY) * _DAY - offset + window.start * 60
    # The division may round across midnight; settle on the first opening after now.
    while opening < now:
        opening += _DAY
    while opening - _DAY >= now:
        opening -= _DAY
    return float(opening)


def validate_window(text: str) -> RunWindow:
    """Parse ``HH:MM-HH:MM``; RuleError for bad syntax or a window that never opens."""
    try:
        return RunWindow.parse(text)
    except ValueError as exc:
        raise RuleError(str(exc)) from None


def expired(expires_at: float | None, now: float) -> bool:
    """True from ``expires_at`` on (inclusive); None never expires."""
    return expires_at is not None and now >= expires_at


# --------------------------------------------------------------------------- schedules


def _croniter() -> Any:
    # Lazy, and through importlib: croniter ships no type information, and the
    # agent never schedules, so it must not need the package.
    return importlib.import_module("croniter").croniter


# Any start works for probing; the epoch keeps validation independent of the clock.
_PROBE = datetime.fromtimestamp(0, tz=UTC)


def validate_cron(expr: str) -> str:
    """A standard 5-field cron expression (minute hour day month weekday), normalised.

    Refused: other field counts (croniter's seconds and year fields would let a
    schedule fire every second), bad fields, and dates that never occur
    (``0 0 30 2 *``).
    """
    fields = expr.split()
    if len(fields) != 5:
        raise RuleError(
            f"cron expression {expr!r} must have 5 fields: minute hour day month weekday"
        )
    normal = " ".join(fields)
    croniter = _croniter()
    if not croniter.is_valid(normal):
        raise RuleError(f"invalid cron expression {expr!r}")
    try:
        croniter(normal, _PROBE).get_next(datetime)
    except ValueError:  # CroniterBadDateError: no date ever matches
        raise RuleError(f"cron expression {expr!r} never fires") from None
    return normal


def next_cron(expr: str, after: float) -> float:
    """Epoch seconds of the first firing of ``expr`` strictly after ``after`` (UTC)."""
    normal = validate_cron(expr)
    start = datetime.fromtimestamp(after, tz=UTC)
    fired: datetime = _croniter()(normal, start).get_next(datetime)
    result = fired.timestamp()
    # croniter already skips a firing equal to the start; this guards the contract.
    if result <= after:  # pragma: no cover
        fired = _croniter()(normal, fired).get_next(datetime)
        result = fired.timestamp()
    return result


def release_at(not_before: float, now: float) -> bool:
    """A "not earlier than" schedule releases from ``not_before`` on (inclusive)."""
    return now >= not_before


# --------------------------------------------------------------------------- initial states


def initial_state(*, approval: bool, waits: bool, not_before: float | None, now: float) -> State:
    """The state a new activity starts in (SPEC 2.1 initial states).

    Approval comes first: nothing moves before a person said yes. Then a
    dependency (or an earlier rollout wave) not met yet: Waiting. Then a time
    in the future: Scheduled. Otherwise Queued.
    """
    if approval:
        return State.BLOCKED
    if waits:
        return State.WAITING
    if not_before is not None and not release_at(not_before, now):
        return State.SCHEDULED
    return State.QUEUED


# --------------------------------------------------------------------------- rollout steps


@dataclass(frozen=True)
class RolloutPolicy:
    """Waves and the rules between them (SPEC 7 and 9)."""

    canary: int = 0
    size: int | None = None
    share: float | None = None
    success: float = 100.0  # percent of a wave that must succeed before the next starts
    max_failures: float = 100.0  # percent of finished children failed that pauses it

    def __post_init__(self) -> None:
        object.__setattr__(self, "success", validate_threshold(self.success))
        limit = _number(self.max_failures, "maximum failure percent")
        if not 0.0 <= limit <= 100.0:
            raise RuleError(f"maximum failure percent must be in [0, 100], got {limit:g}")
        object.__setattr__(self, "max_failures", limit)


@dataclass(frozen=True)
class RolloutStep:
    """What a rollout does now: pause (with a reason), release a wave, or nothing."""

    pause: bool = False
    release: int | None = None
    reason: str = ""


def _sum(parts: Iterable[Progress]) -> tuple[int, int]:
    finished = succeeded = 0
    for p in parts:
        finished += p.finished
        succeeded += p.succeeded
    return finished, succeeded


def rollout_step(
    policy: RolloutPolicy,
    waves: Sequence[Progress],
    waiting: Sequence[int],
    *,
    baseline: tuple[int, int] = (0, 0),
    override: bool = False,
) -> RolloutStep:
    """Decide the next step of an unpaused rollout.

    ``waves[i]`` is wave i's progress, ``waiting[i]`` how many of its
    activities are still Waiting (a wave is released once none is).
    ``baseline`` is (finished, succeeded) counted when a person last resumed:
    the failure rule judges only what finished since, so a resume is not undone
    by the failures it already accepted. ``override`` (set once, at a resume)
    releases a wave whose predecessor can no longer reach the threshold instead
    of pausing again.
    """
    finished, succeeded = _sum(waves)
    since = Progress({}, 0, finished - baseline[0], succeeded - baseline[1])
    if rollout_should_pause(since, policy.max_failures):
        failed = since.finished - since.succeeded
        return RolloutStep(
            pause=True,
            reason=f"rollout paused: {failed} of {since.finished} finished failed "
            f"(more than {policy.max_failures:g}%)",
        )
    for k, left in enumerate(waiting):
        if left == 0:
            continue
        if k == 0:  # nothing before the first wave: it is never held back
            return RolloutStep(release=0, reason="first wave")
        dep = Dependency(k - 1, "succeeded", policy.success)
        prev = waves[k - 1]
        if dependency_met(dep, prev):
            return RolloutStep(
                release=k,
                reason=f"wave {k - 1} reached {policy.success:g}% succeeded "
                f"({prev.succeeded} of {prev.total})",
            )
        if dependency_doomed(dep, prev):
            if override:
                return RolloutStep(release=k, reason="resumed by an administrator")
            return RolloutStep(
                pause=True,
                reason=f"rollout paused: wave {k - 1} can no longer reach "
                f"{policy.success:g}% succeeded ({prev.succeeded} of {prev.total})",
            )
        return RolloutStep()
    return RolloutStep()
