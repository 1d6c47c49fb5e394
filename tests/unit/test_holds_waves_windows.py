"""Pure lifecycle rules: thresholds, dependencies, approvals, rollouts, windows, schedules."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskfleet.domain.lifecycle import (
    Approval,
    Dependency,
    RuleError,
    after_approval,
    approval_refusal,
    dependency_doomed,
    dependency_met,
    expired,
    find_cycle,
    next_cron,
    next_window_open,
    plan_waves,
    release_at,
    rollout_should_pause,
    validate_cron,
    validate_threshold,
    validate_window,
    window_allows,
)
from taskfleet.domain.policy import RunWindow
from taskfleet.domain.progress import Progress, progress
from taskfleet.domain.states import State


def prog(*, succeeded: int = 0, failed: int = 0, canceled: int = 0, pending: int = 0) -> Progress:
    return progress(
        {
            State.SUCCEEDED: succeeded,
            State.FAILED: failed,
            State.CANCELED: canceled,
            State.QUEUED: pending,
        }
    )


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# --------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("percent", [0.001, 1, 50.5, 100])
def test_threshold_accepts_values_in_zero_exclusive_to_hundred_inclusive(percent: float) -> None:
    assert validate_threshold(percent) == float(percent)


@pytest.mark.parametrize("percent", [0, -1, 100.01, math.nan, math.inf, True])
def test_threshold_refuses_zero_above_hundred_nan_and_bool(percent: float) -> None:
    with pytest.raises(RuleError):
        validate_threshold(percent)


def test_dependency_refuses_unknown_metric_and_bad_threshold() -> None:
    with pytest.raises(RuleError, match="metric"):
        Dependency(1, "started")
    with pytest.raises(RuleError, match="threshold"):
        Dependency(1, "succeeded", 0)


@pytest.mark.parametrize(
    ("metric", "percent", "p", "met", "doomed"),
    [
        ("succeeded", 100, prog(succeeded=3), True, False),
        ("succeeded", 100, prog(succeeded=2, pending=1), False, False),
        ("succeeded", 100, prog(succeeded=2, failed=1), False, True),
        ("succeeded", 50, prog(succeeded=1, failed=1, pending=2), False, False),
        ("succeeded", 50, prog(succeeded=2, failed=1, pending=1), True, False),
        ("succeeded", 50, prog(failed=2, canceled=1, pending=1), False, True),
        ("succeeded", 100 / 3, prog(succeeded=1, failed=2), True, False),
        ("finished", 100, prog(succeeded=1, failed=1, canceled=1), True, False),
        ("finished", 100, prog(failed=1, pending=1), False, False),
        ("finished", 50, prog(canceled=1, pending=1), True, False),
    ],
)
def test_dependency_met_and_doomed_examples(
    metric: str, percent: float, p: Progress, met: bool, doomed: bool
) -> None:
    dep = Dependency(7, metric, percent)
    assert dependency_met(dep, p) is met
    assert dependency_doomed(dep, p) is doomed


@pytest.mark.parametrize("metric", ["finished", "succeeded"])
def test_dependency_on_empty_target_is_doomed_not_met(metric: str) -> None:
    dep = Dependency(1, metric)
    assert not dependency_met(dep, prog())
    assert dependency_doomed(dep, prog())


counts = st.integers(min_value=0, max_value=20)
metrics = st.sampled_from(["finished", "succeeded"])
percents = st.floats(min_value=0.01, max_value=100)


@given(counts, counts, counts, counts, metrics, percents)
def test_met_and_doomed_are_never_both_true(
    s: int, f: int, c: int, q: int, metric: str, percent: float
) -> None:
    dep = Dependency(1, metric, percent)
    p = prog(succeeded=s, failed=f, canceled=c, pending=q)
    assert not (dependency_met(dep, p) and dependency_doomed(dep, p))


@given(counts, counts, counts, st.integers(min_value=1, max_value=20), metrics, percents)
def test_met_is_monotonic_as_a_pending_child_succeeds(
    s: int, f: int, c: int, q: int, metric: str, percent: float
) -> None:
    dep = Dependency(1, metric, percent)
    before = prog(succeeded=s, failed=f, canceled=c, pending=q)
    after = prog(succeeded=s + 1, failed=f, canceled=c, pending=q - 1)
    assert dependency_met(dep, after) or not dependency_met(dep, before)
    # and a met dependency is never doomed afterwards
    assert not dependency_doomed(dep, after) or not dependency_met(dep, before)


def test_find_cycle_returns_none_for_a_dag() -> None:
    assert find_cycle({}) is None
    assert find_cycle({1: [2, 3], 2: [3], 3: [], 4: [1, 99]}) is None


def test_find_cycle_reports_a_self_loop() -> None:
    assert find_cycle({5: [5]}) == [5, 5]


def test_find_cycle_reports_a_long_cycle_as_a_closed_path() -> None:
    n = 5000  # deeper than the recursion limit: the search is iterative
    edges = {i: [i + 1] for i in range(1, n)}
    edges[n] = [1]
    edges[0] = [1]  # a tail leading into the cycle is not part of it
    cycle = find_cycle(edges)
    assert cycle is not None
    assert cycle[0] == cycle[-1]
    assert sorted(cycle[:-1]) == list(range(1, n + 1))


def test_find_cycle_path_follows_real_edges() -> None:
    edges = {1: [2], 2: [3, 4], 3: [], 4: [2]}
    cycle = find_cycle(edges)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {2, 4}
    assert all(b in edges[a] for a, b in itertools.pairwise(cycle))


# --------------------------------------------------------------------------- approvals

T0 = 1_700_000_000.0


def test_approval_expires_exactly_at_its_boundary() -> None:
    a = Approval("token:1", T0, T0 + 60, separation=False)
    assert approval_refusal(a, "token:2", T0 + 59.999) is None
    refusal = approval_refusal(a, "token:2", T0 + 60)
    assert refusal is not None and refusal.startswith("approval expired at 2023-11-14T")


def test_approval_without_expiry_never_expires() -> None:
    a = Approval("token:1", T0, None, separation=False)
    assert approval_refusal(a, "token:2", T0 + 10**9) is None


def test_separation_of_duties_refuses_the_requester() -> None:
    a = Approval("token:1", T0, None, separation=True)
    assert approval_refusal(a, "token:1", T0) == (
        "the requester cannot approve their own request (separation of duties)"
    )


def test_separation_of_duties_accepts_a_different_approver() -> None:
    a = Approval("token:1", T0, None, separation=True)
    assert approval_refusal(a, "token:2", T0) is None


def test_requester_may_approve_without_separation() -> None:
    assert approval_refusal(Approval("token:1", T0, None, False), "token:1", T0) is None


def test_approval_needs_an_approver() -> None:
    assert approval_refusal(Approval("token:1", T0, None, False), " ", T0) is not None


def test_after_approval_goes_queued_or_waiting() -> None:
    assert after_approval(True) is State.QUEUED
    assert after_approval(False) is State.WAITING


# --------------------------------------------------------------------------- rollouts

IDS = list(range(101, 111))  # 10 computers


def test_plan_waves_canary_then_fixed_size() -> None:
    assert plan_waves(IDS, canary=1, size=4) == [
        [101],
        [102, 103, 104, 105],
        [106, 107, 108, 109],
        [110],
    ]


def test_plan_waves_canary_then_share_of_the_whole_target() -> None:
    # 25% of 10 computers rounds up to 3 per wave
    assert plan_waves(IDS, canary=2, share=25) == [
        [101, 102],
        [103, 104, 105],
        [106, 107, 108],
        [109, 110],
    ]


def test_plan_waves_without_canary_and_with_everything_in_the_canary() -> None:
    assert plan_waves(IDS, size=10) == [IDS]
    assert plan_waves(IDS, canary=10, share=100) == [IDS]
    assert plan_waves([], size=3) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 2, "share": 50.0},
        {},
        {"share": 0.0},
        {"share": 100.5},
        {"share": math.nan},
        {"size": 0},
        {"size": -1},
        {"canary": 11, "size": 2},
        {"canary": -1, "size": 2},
    ],
)
def test_plan_waves_refuses_bad_numbers(kwargs: dict[str, float]) -> None:
    with pytest.raises(RuleError):
        plan_waves(IDS, **kwargs)  # type: ignore[arg-type]


def test_plan_waves_refuses_duplicate_computers() -> None:
    with pytest.raises(RuleError, match="more than once"):
        plan_waves([1, 2, 1], size=1)


@given(
    st.lists(st.integers(), unique=True, max_size=60),
    st.data(),
    st.one_of(
        st.builds(lambda n: {"size": n}, st.integers(1, 70)),
        st.builds(lambda x: {"share": x}, st.floats(0.01, 100)),
    ),
)
def test_waves_cover_every_id_exactly_once_in_order(
    ids: list[int], data: st.DataObject, kwargs: dict[str, float]
) -> None:
    canary = data.draw(st.integers(0, len(ids)))
    waves = plan_waves(ids, canary=canary, **kwargs)  # type: ignore[arg-type]
    assert [i for wave in waves for i in wave] == ids
    assert all(waves)
    if canary:
        assert len(waves[0]) == canary


def test_rollout_pauses_only_when_failures_exceed_the_limit() -> None:
    assert not rollout_should_pause(prog(pending=10), 0)  # nothing finished: no evidence
    assert not rollout_should_pause(prog(succeeded=3, failed=1, pending=6), 25)  # exactly 25%
    assert rollout_should_pause(prog(succeeded=2, failed=1, pending=7), 25)
    assert rollout_should_pause(prog(succeeded=3, canceled=1, pending=6), 20)  # canceled counts
    assert rollout_should_pause(prog(succeeded=9, failed=1), 0)  # 0: first failure pauses
    assert not rollout_should_pause(prog(failed=5), 100)


@pytest.mark.parametrize("limit", [-0.1, 100.1, math.nan])
def test_rollout_pause_refuses_a_bad_limit(limit: float) -> None:
    with pytest.raises(RuleError):
        rollout_should_pause(prog(failed=1), limit)


# --------------------------------------------------------------------------- windows, expiry


def test_no_window_always_allows() -> None:
    assert window_allows(None, 0) and window_allows(None, 1439.9)


def test_daytime_window_includes_start_excludes_end() -> None:
    w = validate_window("09:00-17:00")
    assert not window_allows(w, 8 * 60 + 59)
    assert window_allows(w, 9 * 60)
    assert window_allows(w, 16 * 60 + 59.9)
    assert not window_allows(w, 17 * 60)


def test_window_wrapping_past_midnight() -> None:
    w = validate_window("22:00-02:00")
    assert window_allows(w, 23 * 60) and window_allows(w, 0) and window_allows(w, 60)
    assert not window_allows(w, 2 * 60) and not window_allows(w, 12 * 60)


@pytest.mark.parametrize("text", ["03:00-03:00", "3:00-04:00", "24:00-01:00", "09:00", ""])
def test_validate_window_refuses_empty_and_bad_syntax(text: str) -> None:
    with pytest.raises(RuleError):
        validate_window(text)


def test_next_window_open_is_now_when_open() -> None:
    now = ts("2024-05-01T10:30:00")
    assert next_window_open(RunWindow.parse("09:00-17:00"), now) == now


def test_next_window_open_later_today_and_tomorrow() -> None:
    w = RunWindow.parse("22:00-02:00")
    assert next_window_open(w, ts("2024-05-01T12:00:30")) == ts("2024-05-01T22:00:00")
    day = RunWindow.parse("09:00-17:00")
    assert next_window_open(day, ts("2024-05-01T17:00:00")) == ts("2024-05-02T09:00:00")


def test_next_window_open_uses_the_local_offset() -> None:
    # 09:00 local at UTC+02:00 is 07:00 UTC
    w = RunWindow.parse("09:00-17:00")
    assert next_window_open(w, ts("2024-05-01T05:00:00"), 120) == ts("2024-05-01T07:00:00")
    assert next_window_open(w, ts("2024-05-01T20:00:00"), -300) == ts("2024-05-01T20:00:00")
    with pytest.raises(RuleError):
        next_window_open(w, 0.0, 15 * 60)


@given(st.floats(0, 4e9), st.integers(-840, 840), st.integers(0, 1439), st.integers(1, 1439))
def test_next_window_open_is_open_and_not_in_the_past(
    now: float, offset: int, start: int, length: int
) -> None:
    w = RunWindow(start, (start + length) % 1440)
    at = next_window_open(w, now, offset)
    assert now <= at < now + 86_400
    assert window_allows(w, ((at + offset * 60) % 86_400) / 60)


def test_expired_is_inclusive_and_none_never_expires() -> None:
    assert not expired(None, 1e12)
    assert not expired(100.0, 99.999)
    assert expired(100.0, 100.0)


# --------------------------------------------------------------------------- schedules


def test_validate_cron_normalises_whitespace() -> None:
    assert validate_cron("  */15   2 * * 1-5 ") == "*/15 2 * * 1-5"


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("* * * *", "5 fields"),
        ("* * * * * *", "5 fields"),
        ("", "5 fields"),
        ("61 * * * *", "invalid"),
        ("* * * * mon-funday", "invalid"),
        ("0 0 30 2 *", "never fires"),
    ],
)
def test_validate_cron_refuses_bad_expressions(expr: str, why: str) -> None:
    with pytest.raises(RuleError, match=why):
        validate_cron(expr)


def test_next_cron_is_strictly_after_a_matching_instant() -> None:
    at = ts("2024-05-01T02:00:00")
    assert next_cron("0 2 * * *", at) == ts("2024-05-02T02:00:00")
    assert next_cron("0 2 * * *", at - 0.5) == at
    assert next_cron("*/15 * * * *", ts("2024-05-01T02:07:13")) == ts("2024-05-01T02:15:00")


@given(st.floats(0, 4e9))
def test_next_cron_is_always_strictly_after(after: float) -> None:
    nxt = next_cron("*/5 * * * *", after)
    assert after < nxt <= after + 300


def test_release_at_is_inclusive_of_not_before() -> None:
    assert not release_at(100.0, 99.9)
    assert release_at(100.0, 100.0)
    assert release_at(100.0, 100.1)
