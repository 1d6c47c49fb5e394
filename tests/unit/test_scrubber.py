"""The scrubber's full truth table against SPEC 5, rule order included."""

from __future__ import annotations

import itertools

import pytest

from taskfleet.domain.scrubber import (
    Action,
    Interval,
    LocalStatus,
    Mode,
    Record,
    after_failure,
    plan_scrub,
    scrub_decision,
)

W, D, INST = LocalStatus.WORKING, LocalStatus.DOWNLOADING, LocalStatus.INSTALLING


def spec5(pushed: bool, mode: Mode, interval: Interval, status: LocalStatus, cp: bool) -> Action:
    """SPEC 5 read literally, written independently of the implementation."""
    if status in (LocalStatus.SUCCESS, LocalStatus.CANCELED):
        return Action.LEAVE
    if (
        cp
        or (pushed and status in (W, INST))
        or (
            not pushed
            and mode == Mode.REQUIRED
            and interval == Interval.ONCE
            and status == LocalStatus.FAILED
        )
    ):
        return Action.CONTINUE
    if (pushed and status == D) or (
        not pushed and mode == Mode.REQUIRED and status in (W, D, INST)
    ):
        return Action.SCRUB
    return Action.LEAVE


COMBOS = list(itertools.product([True, False], Mode, Interval, LocalStatus, [True, False]))


def test_the_table_has_every_combination():
    assert len(COMBOS) == 2 * 2 * 2 * 8 * 2


@pytest.mark.parametrize(("pushed", "mode", "interval", "status", "cp"), COMBOS)
def test_decision_matches_spec5(pushed, mode, interval, status, cp):
    r = Record(1, pushed, mode, interval, status, cp, attempts=0)
    d = scrub_decision(r, max_attempts=3)
    assert d.action is spec5(pushed, mode, interval, status, cp)
    assert d.rule.startswith(d.action.value)


def test_checkpoint_wins_over_scrub_rules_because_continue_is_checked_first():
    r = Record(1, True, Mode.REQUIRED, Interval.ONCE, D, has_checkpoint=True, attempts=0)
    assert scrub_decision(r, 3).action is Action.CONTINUE
    assert scrub_decision(r.__class__(**{**r.__dict__, "has_checkpoint": False}), 3).action is (
        Action.SCRUB
    )


@pytest.mark.parametrize(
    ("attempts", "action"),
    [(0, Action.CONTINUE), (2, Action.CONTINUE), (3, Action.LEAVE), (7, Action.LEAVE)],
)
def test_a_record_that_used_its_attempts_is_left_as_it_is(attempts, action):
    r = Record(1, True, Mode.REQUIRED, Interval.ONCE, W, False, attempts)
    d = scrub_decision(r, max_attempts=3)
    assert d.action is action
    if action is Action.LEAVE:
        assert "3 of 3" in d.rule or f"{attempts} of 3" in d.rule


def test_a_run_is_skipped_whole_while_an_executor_runs():
    records = [Record(i, False, Mode.REQUIRED, Interval.ONCE, W, False, 0) for i in range(3)]
    assert plan_scrub(records, executor_running=True, max_attempts=3).skipped
    plan = plan_scrub(records, executor_running=False, max_attempts=3)
    assert not plan.skipped and plan.scrubbed == 3


@pytest.mark.parametrize(
    ("pushed", "mode", "interval"), list(itertools.product([True, False], Mode, Interval))
)
def test_only_a_failed_pulled_required_once_run_with_attempts_left_is_not_final(
    pushed, mode, interval
):
    retried = not pushed and mode is Mode.REQUIRED and interval is Interval.ONCE
    for attempt in (1, 2, 3):
        a = after_failure(
            pushed=pushed, mode=mode, interval=interval, attempt=attempt, max_attempts=3
        )
        assert a.final is (not retried or attempt == 3)
        if not a.final:
            assert a.reason == f"failed, will retry (attempt {attempt} of 3)"


def test_a_failed_run_left_open_is_exactly_what_the_scrubber_continues():
    # The two halves of SPEC 5 agree: the record a non-final failure leaves
    # (pulled, Required, Once, Failed, attempts used < max) is continued.
    for attempt in (1, 2):
        a = after_failure(
            pushed=False,
            mode=Mode.REQUIRED,
            interval=Interval.ONCE,
            attempt=attempt,
            max_attempts=3,
        )
        assert not a.final
        r = Record(1, False, Mode.REQUIRED, Interval.ONCE, LocalStatus.FAILED, False, attempt)
        assert scrub_decision(r, max_attempts=3).action is Action.CONTINUE
    last = after_failure(
        pushed=False, mode=Mode.REQUIRED, interval=Interval.ONCE, attempt=3, max_attempts=3
    )
    assert last.final
