"""Targets, script parameters, agent policy, results and progress: pure rules."""

from __future__ import annotations

import pytest

from taskfleet.domain.progress import progress
from taskfleet.domain.results import describe_script_outcome, result_line
from taskfleet.domain.scripts import policy_refusal, validate_script_params, validate_timeout
from taskfleet.domain.states import State
from taskfleet.domain.targets import TargetError, TargetKind, parse_target


@pytest.mark.parametrize(
    ("spec", "kind", "text"),
    [
        ("all", TargetKind.ALL, "all"),
        ("group:web-1", TargetKind.GROUP, "group:web-1"),
        ("tag:role=db", TargetKind.TAG, "tag:role=db"),
        ("tag:env=", TargetKind.TAG, "tag:env="),
        ("computer:3,1", TargetKind.COMPUTER, "computer:3,1"),
    ],
)
def test_valid_targets_parse_and_print_back(spec, kind, text):
    t = parse_target(spec)
    assert t.kind is kind and str(t) == text


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "nope",
        "group:",
        "group:bad name",
        "tag:role",
        "computer:abc",
        "computer:0",
        "computer:1,1",
        "rack:7",
    ],
)
def test_bad_targets_are_refused_with_a_reason(spec):
    with pytest.raises(TargetError):
        parse_target(spec)


def _v(params):
    return validate_script_params(params, default_cap=100, max_cap=1000)


def test_script_params_are_normalised():
    assert _v({"argv": ["ls", "-l"]}) == {
        "argv": ["ls", "-l"],
        "env": {},
        "cwd": None,
        "user": None,
        "output_cap": 100,
    }
    got = _v({"script": "echo hi", "env": {"A": "1"}, "output_cap": 0})
    assert got["interpreter"] == "/bin/sh" and got["env"] == {"A": "1"} and got["output_cap"] == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "exactly one"),
        ({"argv": ["a"], "script": "b"}, "exactly one"),
        ({"argv": []}, "non-empty list"),
        ({"argv": "ls"}, "non-empty list"),
        ({"script": "  "}, "non-empty text"),
        ({"argv": ["a"], "env": {"A=B": "1"}}, "env"),
        ({"argv": ["a"], "output_cap": 1001}, "output_cap"),
        ({"argv": ["a"], "colour": "red"}, "unknown script parameter"),
        ({"argv": ["a"], "cwd": ""}, "cwd"),
        ("argv", "object"),
    ],
)
def test_bad_script_params_name_the_problem(params, message):
    with pytest.raises(ValueError, match=message):
        _v(params)


@pytest.mark.parametrize("bad", [0, -1, "5", None, 10**9])
def test_bad_timeouts_are_refused(bad):
    with pytest.raises(ValueError):
        validate_timeout(bad)


def test_agent_policy_decides_what_it_runs():
    params = {"argv": ["x"], "user": None}
    assert policy_refusal(None, params) == "scripts are disabled in its configuration"
    assert policy_refusal({"scripts": False}, params)
    assert policy_refusal({"scripts": True, "users": ["me"]}, params) is None
    refusal = policy_refusal({"scripts": True, "users": ["me"]}, {**params, "user": "root"})
    assert refusal and "root" in refusal


def test_result_lines_say_what_happened():
    assert result_line("Completed", "Failed", "x", 16386) == (
        "Stage: Completed, Status: Failed, Result: x, Return code: 16386"
    )
    base = dict(
        exit_code=None, signal=None, timed_out=False, canceled=False, error=None, timeout=5.0
    )
    assert describe_script_outcome(**{**base, "exit_code": 0}).succeeded
    assert "Exited with code 3" in describe_script_outcome(**{**base, "exit_code": 3}).line
    assert "time limit of 5 s" in describe_script_outcome(**{**base, "timed_out": True}).line
    assert "Killed by cancel" in describe_script_outcome(**{**base, "canceled": True}).line
    assert "no such file" in describe_script_outcome(**{**base, "error": "no such file"}).line
    assert "signal 9" in describe_script_outcome(**{**base, "signal": 9}).line


def test_progress_counts_finished_and_succeeded_shares():
    p = progress({State.SUCCEEDED: 3, State.FAILED: 1, State.IN_PROGRESS: 4})
    assert (p.total, p.finished, p.succeeded, p.done) == (8, 4, 3, False)
    assert p.finished_share == 0.5 and p.succeeded_share == 3 / 8
    assert progress({State.CANCELED: 2}).done
    assert not progress({}).done
