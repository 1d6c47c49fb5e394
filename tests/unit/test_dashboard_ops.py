"""The pure parts of the dashboard's operations pages: a heartbeat's age as a person
reads it, a group's UTC offset as ``PUT .../window`` takes it back, each action's role."""

from __future__ import annotations

import pytest

from taskfleet.server.dashboard.ops import _age
from taskfleet.server.lifecycle.windows import format_offset, parse_offset


@pytest.mark.parametrize(
    ("ago", "shown"),
    [
        (0, "0s"),
        (59.9, "59s"),
        (60, "1m 0s"),
        (3599, "59m 59s"),
        (3600, "1h 0m"),
        (86400 + 7200, "1d 2h"),
        (-5, "0s"),
    ],
)
def test_an_age_is_rounded_for_a_person(ago: float, shown: str) -> None:
    assert _age(1000.0 + ago, 1000.0) == shown


def test_no_time_is_a_dash() -> None:
    assert _age(1000.0, None) == "-"


@pytest.mark.parametrize("minutes", [0, 120, -330, 14 * 60, -12 * 60, 45])
def test_an_offset_is_shown_as_it_is_given(minutes: int) -> None:
    text = format_offset(minutes)
    assert len(text) == 6 and text[0] in "+-"
    assert parse_offset(text) == minutes


def test_each_ops_action_needs_the_role_of_the_api_route_it_calls() -> None:
    from taskfleet.server.dashboard.ops import NEEDS

    assert NEEDS == {
        "task_cancel": "operator",
        "job_terminate": "operator",
        "schedule_cancel": "operator",
        "window_set": "admin",
        "window_clear": "admin",
    }
