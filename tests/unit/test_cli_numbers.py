"""Every number option of the CLI refuses nan and infinity with a usage error, not a traceback."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from taskfleet.cli import root

RUN = ["run", "--target", "all"]
CASES = [
    [*RUN, "--timeout", "{}", "--", "true"],
    [*RUN, "--expires-in", "{}", "--", "true"],
    [*RUN, "--every", "{}", "--", "true"],
    [*RUN, "--threshold", "{}", "--after", "1", "--", "true"],
    [*RUN, "--wave-share", "{}", "--", "true"],
    [*RUN, "--wave-success", "{}", "--", "true"],
    [*RUN, "--max-failures", "{}", "--", "true"],
    ["token", "create", "--name", "x", "--role", "viewer", "--expires-in", "{}"],
    ["activity", "cancel-bulk", "--older-than", "{}"],
    ["request", "wait", "1", "--after", "2", "--threshold", "{}"],
    ["server", "--tickle-rate", "{}"],
    ["server", "--tickle-min-interval", "{}"],
    ["server", "--poll-interval", "{}"],
    ["server", "--lost-grace", "{}"],
    ["server", "--reaper-interval", "{}"],
    ["server", "--heartbeat-timeout", "{}"],
    ["worker", "--queue", "amqp://x", "--database", "sqlite:///x", "--heartbeat-interval", "{}"],
    ["agent", "--server", "http://x", "--poll-interval", "{}"],
    ["agent", "--server", "http://x", "--scrub-interval", "{}"],
]


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "1e999"])
@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a[:2] + a[-3:-1]))
def test_float_options_refuse_non_finite_numbers(args, value):
    argv = [a.replace("{}", value) for a in args]
    result = CliRunner().invoke(root, argv, env={"TASKFLEET_SERVER": "http://127.0.0.1:9"})
    assert result.exit_code == 2, (result.output, result.exception)
    assert "is not a finite number" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        [*RUN, "--at", "nan", "--", "true"],
        [*RUN, "--at", "inf", "--", "true"],
        [*RUN, "--approval-expires-in", "inf", "--", "true"],
        ["task", "submit", "purge-history", "--not-before", "+infh"],
        ["task", "submit", "purge-history", "--not-before", "-inf"],
    ],
)
def test_time_options_refuse_non_finite_numbers(args):
    env = {"TASKFLEET_SERVER": "http://127.0.0.1:9", "TASKFLEET_TOKEN": "tfa_x"}
    result = CliRunner().invoke(root, args, env=env)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "finite" in result.output, result.output
