"""What `taskfleet request show` says holds a request (pure formatting)."""

from __future__ import annotations

from typing import Any

from taskfleet.cli.requests import lifecycle_lines

ROLLOUT = {"canary": 1, "size": None, "share": 50.0, "success": 100.0, "max_failures": 10.0}


def _rollout_line(**extra: Any) -> str:
    req: dict[str, Any] = {"rollout": {**ROLLOUT, "waves": 2, "paused": False}, **extra}
    if "pause_reason" in extra:
        req["rollout"].update(paused=True, pause_reason=extra["pause_reason"])
    [line] = lifecycle_lines(req)
    return line


def test_rollout_line_says_running_paused_or_finished() -> None:
    running = _rollout_line(progress={"done": False})
    assert running.startswith("rollout: 2 waves (canary 1, then 50%)")
    assert running.endswith("; running")
    assert _rollout_line(progress={"done": True}).endswith("; finished")
    paused = _rollout_line(progress={"done": False}, pause_reason="2 of 3 failed")
    assert paused.endswith("; PAUSED: 2 of 3 failed")


def test_approval_and_dependency_lines() -> None:
    lines = lifecycle_lines(
        {
            "depends_on": {"kind": "request", "on": 4, "percent": 90.0, "metric": "succeeded"},
            "approval": {"decision": None, "separation": True, "expires_at": None},
        }
    )
    assert lines == [
        "after: request 4 90% succeeded",
        "approval: awaiting approval (requester may not approve)",
    ]
