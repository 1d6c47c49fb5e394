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
