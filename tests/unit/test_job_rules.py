"""The pure job rules (domain/jobs.py): a table per SPEC 6 line, and the job's params."""

from __future__ import annotations

from typing import Any

import pytest

from taskfleet.domain.jobs import (
    ANALYZE,
    DOWNLOAD,
    FAILED,
    SKIPPED,
    SUCCEEDED,
    JobSpec,
    JobSpecError,
    JobState,
    MaintenanceWindow,
    Outcome,
    Step,
    computer_outcome,
    job_state,
    next_step,
    parse_windows,
    skipped_for_failure,
    steps,
    unfinished,
    validate_content_name,
    validate_job_spec,
    window_wait,
)
from taskfleet.domain.states import State

SHA = "ab" * 32
INSTALL = "install"


def _item(name: str, content: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "detect": {"argv": ["true"]},
        "content": [{"sha256": SHA, "size": 5, "name": f"{name}.deb"}] if content else [],
        "install": {"argv": ["dpkg", "-i", f"{name}.deb"], "timeout": 60},
    }


def _spec(n: int = 3, phases: tuple[str, ...] = (ANALYZE, DOWNLOAD, INSTALL)) -> JobSpec:
    return validate_job_spec(
        {"name": "May patches", "phases": list(phases), "items": [_item(f"p{i}") for i in range(n)]}
    )


def _run(
    spec: JobSpec,
    *,
    terminate_after: Step | None = None,
    applicable: dict[int, bool] | None = None,
    fail: set[Step] | None = None,
) -> tuple[dict[Step, str], bool]:
    """Drive next_step as an agent would; terminate once ``terminate_after`` finished."""
    app = dict(applicable or {})
    done: dict[Step, str] = {}
    terminating = False
    while (step := next_step(spec, app, done, terminating=terminating)) is not None:
        done[step] = FAILED if step in (fail or set()) else SUCCEEDED
        if step == terminate_after:
            terminating = True
        for s in skipped_for_failure(spec, done):
            done[s] = SKIPPED
    for s in unfinished(spec, app, done):
        done[s] = SKIPPED
    return done, terminating


# -- SPEC 6: "phases in order on each computer" ------------------------------------


def test_a_computer_runs_analyze_then_download_then_install_item_by_item() -> None:
    spec = _spec(2)
    done, _ = _run(spec)
    assert list(done) == [
        (ANALYZE, 0),
        (ANALYZE, 1),
        (DOWNLOAD, 0),
        (DOWNLOAD, 1),
        (INSTALL, 0),
        (INSTALL, 1),
    ]
    assert computer_outcome(done, stopped=False) is Outcome.SUCCEEDED


def test_only_applicable_items_go_on_after_analyze() -> None:
    spec = _spec(3)
    done, _ = _run(spec, applicable={1: False})
    assert (DOWNLOAD, 1) not in done and (INSTALL, 1) not in done
    assert steps(spec, {1: False})[-1] == (INSTALL, 2)


def test_an_item_whose_download_failed_is_not_installed_and_the_computer_failed() -> None:
    done, _ = _run(_spec(2), fail={(DOWNLOAD, 0)})
    assert done[(INSTALL, 0)] == SKIPPED and done[(INSTALL, 1)] == SUCCEEDED
    assert computer_outcome(done, stopped=False) is Outcome.FAILED


# -- SPEC 6 termination, line by line ------------------------------------------------

TERMINATION_TABLE = [
    # (terminated right after this step, steps that must have run, first skipped step)
    pytest.param((ANALYZE, 0), [(ANALYZE, 0), (ANALYZE, 1), (ANALYZE, 2)], (DOWNLOAD, 0),
                 id="in Analyze: Analyze completes, no later phase starts"),
    pytest.param((DOWNLOAD, 1), [(ANALYZE, 2), (DOWNLOAD, 0), (DOWNLOAD, 1)], (DOWNLOAD, 2),
                 id="in Download: the item in hand finishes, the rest is skipped"),
    pytest.param((INSTALL, 0), [(DOWNLOAD, 2), (INSTALL, 0)], (INSTALL, 1),
                 id="in Install: the item in hand finishes, the rest is skipped"),
]  # fmt: skip


@pytest.mark.parametrize(("after", "ran", "first_skipped"), TERMINATION_TABLE)
def test_termination_in_each_phase(after: Step, ran: list[Step], first_skipped: Step) -> None:
    spec = _spec(3)
    done, terminating = _run(spec, terminate_after=after)
    assert terminating
    for step in ran:
        assert done[step] == SUCCEEDED, step
    assert done[first_skipped] == SKIPPED
    later = list(done)[list(done).index(first_skipped) :]
    assert all(done[s] == SKIPPED for s in later), "no later step ran"
    assert computer_outcome(done, stopped=True) is Outcome.CANCELED  # not all steps ran


def test_a_computer_that_has_not_started_never_starts() -> None:
    spec = _spec(2)
    assert next_step(spec, {}, {}, terminating=True) == (ANALYZE, 0)  # Analyze completes ...
    no_analyze = _spec(2, (DOWNLOAD, INSTALL))
    assert next_step(no_analyze, {}, {}, terminating=True) is None  # ... nothing else starts
    assert unfinished(no_analyze, {}, {}) == steps(no_analyze, {})


def test_terminated_after_its_last_step_a_computer_succeeded() -> None:
    spec = _spec(1)
    done, _ = _run(spec, terminate_after=(INSTALL, 0))
    assert set(done.values()) == {SUCCEEDED}
    assert computer_outcome(done, stopped=True) is Outcome.SUCCEEDED  # all steps ran


def test_terminated_with_a_failed_step_that_did_not_finish_the_rest_is_canceled() -> None:
    spec = _spec(3)
    done, _ = _run(spec, terminate_after=(INSTALL, 0), fail={(INSTALL, 0)})
    assert done[(INSTALL, 0)] == FAILED and done[(INSTALL, 1)] == SKIPPED
    assert computer_outcome(done, stopped=True) is Outcome.CANCELED


JOB_STATE_TABLE = [
    ([State.QUEUED, State.SCHEDULED], False, JobState.PENDING),
    ([State.BLOCKED], False, JobState.PENDING),
    ([State.IN_PROGRESS, State.QUEUED], False, JobState.RUNNING),
    ([State.SUCCEEDED, State.QUEUED], False, JobState.RUNNING),
    ([State.SUCCEEDED, State.SUCCEEDED], False, JobState.SUCCEEDED),
    ([State.SUCCEEDED, State.FAILED, State.CANCELED], False, JobState.FAILED),
    ([State.SUCCEEDED, State.CANCELED], False, JobState.CANCELED),
    # "Terminating until every computer has stopped, then Terminated"
    ([State.IN_PROGRESS, State.CANCELED], True, JobState.TERMINATING),
    ([State.SUCCEEDED, State.CANCELED], True, JobState.TERMINATED),
    ([State.CANCELED, State.CANCELED], True, JobState.TERMINATED),
]


@pytest.mark.parametrize(("states", "asked", "expected"), JOB_STATE_TABLE)
def test_job_state(states: list[State], asked: bool, expected: JobState) -> None:
    assert job_state(states, terminate_asked=asked) is expected


# -- the job's params ------------------------------------------------------------------


def test_a_job_spec_round_trips() -> None:
    spec = _spec(2)
    assert validate_job_spec(spec.as_json()) == spec
    assert spec.action == INSTALL and spec.content_hashes() == {SHA}


@pytest.mark.parametrize(
    ("phases", "error"),
    [
        ([], "non-empty"),
        (["install", "analyze"], "in order"),
        (["analyze", "install", "remediate"], "at most one"),
        (["analyze", "analyze"], "in order"),
        (["reboot"], "taken from"),
    ],
)
def test_bad_phases_are_refused(phases: list[str], error: str) -> None:
    with pytest.raises(JobSpecError, match=error):
        validate_job_spec({"name": "j", "phases": phases, "items": [_item("a")]})


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "", "a\\b", "a\x00b", "x" * 256, "."],
)
def test_a_content_name_that_leaves_the_staging_folder_is_refused(name: str) -> None:
    with pytest.raises(JobSpecError):
        validate_content_name(name)


def test_good_content_names() -> None:
    assert validate_content_name("pkg/a.deb") == "pkg/a.deb"
    assert validate_content_name("caf\u00e9 \u2603.bin") == "caf\u00e9 \u2603.bin"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"install": None}, "needs an install command"),
        ({"detect": None}, "needs a detect command"),
        ({"content": [{"sha256": "AB" * 32, "size": 1, "name": "a"}]}, "lowercase hex"),
        ({"content": [{"sha256": SHA, "size": -1, "name": "a"}]}, "size"),
        ({"content": [{"sha256": SHA, "size": 2**63, "name": "a"}]}, "size"),
        ({"content": [{"sha256": SHA, "size": True, "name": "a"}]}, "size"),
        ({"install": {"argv": []}}, "argv"),
        ({"install": {"argv": ["x"], "timeout": float("nan")}}, "timeout"),
        ({"reboot": True}, "unknown field"),
        (
            {"content": [{"sha256": SHA, "size": 1, "name": "a"}] * 2},
            "share a name",
        ),
    ],
)
def test_bad_items_are_refused_naming_the_item(change: dict[str, Any], error: str) -> None:
    item = {**_item("a"), **change}
    with pytest.raises(JobSpecError, match=error) as exc:
        validate_job_spec({"name": "j", "items": [_item("ok"), item]})
    assert "item 1" in str(exc.value)


def test_limits_on_items() -> None:
    with pytest.raises(JobSpecError, match="limit"):
        validate_job_spec({"name": "j", "items": [_item("a")] * 1001})
    with pytest.raises(JobSpecError, match="non-empty"):
        validate_job_spec({"name": "j", "items": []})
    with pytest.raises(JobSpecError, match="unknown job field"):
        validate_job_spec({"name": "j", "items": [_item("a")], "target": "all"})


# -- maintenance windows (SPEC 9: Install waits for the window; Download may run outside it)

DAY0 = 19_675 * 86_400  # a UTC midnight


def _at(hhmm: str, days: int = 0) -> float:
    h, m = hhmm.split(":")
    return float(DAY0 + days * 86_400 + int(h) * 3600 + int(m) * 60)


def _windows(*ws: tuple[str, int]) -> tuple[MaintenanceWindow, ...]:
    return parse_windows([{"window": w, "utc_offset": off} for w, off in ws])


@pytest.mark.parametrize(
    ("step", "windows", "now", "expected"),
    [
        # Analyze and Download run outside the window.
        ((ANALYZE, 0), [("01:00-02:00", 0)], "12:00", None),
        ((DOWNLOAD, 1), [("01:00-02:00", 0)], "12:00", None),
        # No window: the action runs at once.
        ((INSTALL, 0), [], "12:00", None),
        # Open: at once; the start minute is inside, the end minute is not.
        ((INSTALL, 0), [("01:00-02:00", 0)], "01:00", None),
        ((INSTALL, 0), [("01:00-02:00", 0)], "02:00", ("01:00", 1)),
        # Closed: the next opening, today or tomorrow; every action phase waits.
        ((INSTALL, 2), [("13:00-14:00", 0)], "12:00", ("13:00", 0)),
        (("uninstall", 0), [("01:00-02:00", 0)], "12:00", ("01:00", 1)),
        (("remediate", 0), [("01:00-02:00", 0)], "12:00", ("01:00", 1)),
        # A window past midnight.
        ((INSTALL, 0), [("22:00-04:00", 0)], "03:59", None),
        ((INSTALL, 0), [("22:00-04:00", 0)], "12:00", ("22:00", 0)),
        # The group's local time: 09:00 at UTC+2 is 07:00 UTC; at UTC-5:30, 14:30 UTC.
        ((INSTALL, 0), [("09:00-10:00", 120)], "06:30", ("07:00", 0)),
        ((INSTALL, 0), [("09:00-10:00", 120)], "07:30", None),
        ((INSTALL, 0), [("09:00-10:00", -330)], "12:00", ("14:30", 0)),
        # Several windows: every one must be open.
        ((INSTALL, 0), [("01:00-02:00", 0), ("01:30-03:00", 0)], "00:00", ("01:30", 0)),
        ((INSTALL, 0), [("01:00-02:00", 0), ("01:30-03:00", 0)], "01:10", ("01:30", 0)),
        ((INSTALL, 0), [("01:00-02:00", 0), ("01:30-03:00", 0)], "01:45", None),
        ((INSTALL, 0), [("01:00-02:00", 0), ("01:30-03:00", 0)], "02:30", ("01:30", 1)),
        # Windows that never meet: look again at the latest next opening.
        ((INSTALL, 0), [("01:00-02:00", 0), ("03:00-04:00", 0)], "00:00", ("03:00", 0)),
    ],
)
def test_an_action_waits_until_every_window_is_open(
    step: Step,
    windows: list[tuple[str, int]],
    now: str,
    expected: tuple[str, int] | None,
) -> None:
    got = window_wait(step, _windows(*windows), _at(now))
    assert got == (None if expected is None else _at(*expected))


def test_windows_round_trip_and_bad_ones_are_refused() -> None:
    raw = [{"window": "22:00-04:00", "utc_offset": -330}]
    assert [w.as_json() for w in parse_windows(raw)] == raw
    assert parse_windows(None) == ()
    assert str(parse_windows(raw)[0]) == "22:00-04:00 (UTC-5.5h)"
    for bad, error in [
        ({"window": "x"}, "must be a list"),
        ([{"window": "01:00-02:00"}], "window 0 must be"),
        ([{"window": "01:00-01:00", "utc_offset": 0}], "empty"),
        ([{"window": "01:00-02:00", "utc_offset": 15 * 60}], "utc_offset"),
        ([{"window": "01:00-02:00", "utc_offset": "0"}], "utc_offset"),
    ]:
        with pytest.raises(JobSpecError, match=error):
            parse_windows(bad)
