"""The CLI's results table shows a typed activity's result, not its tool's chatter."""

from __future__ import annotations

from taskfleet.cli.client import result_part


def test_the_result_part_of_a_result_line() -> None:
    line = "Stage: Change packages, Status: Succeeded, Result: installed a 1, b 2, Return code: 0"
    assert result_part(line) == "installed a 1, b 2"
    assert result_part("Stage: X, Status: Failed, Result: no, Return code: none") == "no"
    assert result_part("something else\nsecond") == "something else"
    assert result_part(None) == "" and result_part("") == ""
