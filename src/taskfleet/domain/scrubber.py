"""The task status scrubber's decision (SPEC 5), as a pure function.

Contract: ``scrub_decision(record, max_attempts)`` says what the scrubber does
with one local record and which rule decided, applying SPEC 5's rules in
SPEC 5's order; ``plan_scrub`` applies it to every record, or skips the whole
run while any task executor is running. ``after_failure`` says whether a failed
run is final or (pulled, Required, Once, attempts left) waits for the
scrubber's next run to continue it, and the status text the server records.
No I/O: the agent applies the plan.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from taskfleet.domain.policy import Interval, Mode


class LocalStatus(enum.IntEnum):
    """Local status codes of an agent's operation record (SPEC 5)."""

    UNKNOWN = 0
    WORKING = 1
    DOWNLOADING = 2
    INSTALLING = 3
    SUCCESS = 4
    FAILED = 5
    CANCELED = 6
    DEFERRED = 7


class Action(enum.StrEnum):
    CONTINUE = "continue"  # run again under the same operation id, attempt counted
    SCRUB = "scrub"  # set Failed locally and report Failed ("scrubbed") to the server
    LEAVE = "leave"  # nothing to do


@dataclass(frozen=True)
class Record:
    op: int
    pushed: bool  # pushed by the server (True) or pulled at a poll (False)
    mode: Mode
    interval: Interval
    status: LocalStatus
    has_checkpoint: bool
    attempts: int


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: str  # which rule decided, in words an administrator can check against SPEC 5


_ACTIVE = frozenset({LocalStatus.WORKING, LocalStatus.DOWNLOADING, LocalStatus.INSTALLING})


def scrub_decision(r: Record, max_attempts: int) -> Decision:
    if r.status in (LocalStatus.SUCCESS, LocalStatus.CANCELED):
        return Decision(Action.LEAVE, "leave: finished (Success and Canceled are never scrubbed)")
    why = None
    if r.has_checkpoint:
        why = "it has a resume checkpoint"
    elif r.pushed and r.status in (LocalStatus.WORKING, LocalStatus.INSTALLING):
        why = f"pushed and {r.status.name.title()}"
    elif (
        not r.pushed
        and r.mode is Mode.REQUIRED
        and r.interval is Interval.ONCE
        and r.status is LocalStatus.FAILED
    ):
        why = "pulled, Required, Once and Failed"
    if why is not None:
        if r.attempts >= max_attempts:
            # SPEC 5: nothing retries forever.
            return Decision(
                Action.LEAVE,
                f"leave: would continue ({why}) but used {r.attempts} of {max_attempts} attempts",
            )
        return Decision(Action.CONTINUE, f"continue: {why}")
    if r.pushed and r.status is LocalStatus.DOWNLOADING:
        return Decision(Action.SCRUB, "scrub: pushed and Downloading")
    if not r.pushed and r.mode is Mode.REQUIRED and r.status in _ACTIVE:
        return Decision(Action.SCRUB, f"scrub: pulled, Required and {r.status.name.title()}")
    return Decision(Action.LEAVE, "leave: no rule applies")


@dataclass(frozen=True)
class Plan:
    skipped: bool  # True: an executor was running, nothing is decided this run
    decisions: tuple[tuple[Record, Decision], ...]

    @property
    def scrubbed(self) -> int:
        return sum(1 for _, d in self.decisions if d.action is Action.SCRUB)


def plan_scrub(records: Iterable[Record], *, executor_running: bool, max_attempts: int) -> Plan:
    if executor_running:
        return Plan(True, ())
    return Plan(False, tuple((r, scrub_decision(r, max_attempts)) for r in records))


@dataclass(frozen=True)
class AfterFailure:
    final: bool  # True: report the final Failed; False: Failed locally, continued later
    reason: str  # the status event the server records when not final ("" when final)


def after_failure(
    *, pushed: bool, mode: Mode, interval: Interval, attempt: int, max_attempts: int
) -> AfterFailure:
    """What a failed run of an operation means (SPEC 5).

    ``attempt`` is the number of the run that failed (1 for the first). A
    pulled, Required, Once operation is exactly what the scrubber continues
    when Failed, so finalising it at once would leave that rule nothing to do:
    while attempts remain it stays open and the server is told it will be
    retried; the last attempt's failure is final. Every other failure is final.
    """
    retried = not pushed and mode is Mode.REQUIRED and interval is Interval.ONCE
    if not retried or attempt >= max_attempts:
        return AfterFailure(True, "")
    return AfterFailure(False, f"failed, will retry (attempt {attempt} of {max_attempts})")
