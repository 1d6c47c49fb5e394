"""Results of client activities (SPEC 2.2, 9): the human-readable result line.

Contract: ``result_line`` renders
``Stage: <stage>, Status: <status>, Result: <text>, Return code: <n>`` and
``describe_script_outcome`` says what happened to a script in words an
administrator can act on (exit code, killed by timeout, killed by cancel, could
not start, lost, scrubbed, expired, refused by the agent's policy).
"""

from __future__ import annotations

from dataclasses import dataclass


def result_line(stage: str, status: str, result: str, return_code: int | None) -> str:
    rc = "none" if return_code is None else str(return_code)
    return f"Stage: {stage}, Status: {status}, Result: {result}, Return code: {rc}"


@dataclass(frozen=True)
class ScriptOutcome:
    succeeded: bool
    line: str


def describe_script_outcome(
    *,
    exit_code: int | None,
    signal: int | None,
    timed_out: bool,
    canceled: bool,
    error: str | None,
    timeout: float,
) -> ScriptOutcome:
    if error is not None:
        return ScriptOutcome(False, result_line("Starting", "Failed", error, None))
    if timed_out:
        return ScriptOutcome(
            False,
            result_line("Running", "Failed", f"Killed at its time limit of {timeout:g} s", None),
        )
    if canceled:
        return ScriptOutcome(False, result_line("Running", "Canceled", "Killed by cancel", None))
    if signal is not None:
        return ScriptOutcome(
            False, result_line("Running", "Failed", f"Ended by signal {signal}", None)
        )
    if exit_code == 0:
        return ScriptOutcome(True, result_line("Completed", "Succeeded", "Exited with code 0", 0))
    return ScriptOutcome(
        False, result_line("Completed", "Failed", f"Exited with code {exit_code}", exit_code)
    )


LOST_LINE = result_line(
    "Running", "Failed", "Lost: no result within the time limit plus grace", None
)
REFUSED_PREFIX = "Refused by the agent's policy"
