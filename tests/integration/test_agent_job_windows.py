"""A real in-process agent holds a job's action for its maintenance windows (issue 12:
"Install waits for the window; Download may run outside it"), as the signed operation
sends them; the scrubber's hourly pass during the wait neither counts an attempt nor
leaves a second timer that could run the job again. Harness: ``test_agent_jobs.py``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from taskfleet.agent import state as st
from taskfleet.protocol.exchange import operation_message, parse_server_reply, windows_message
from taskfleet.protocol.orders import operation_body, windows_body
from tests.integration.test_agent_jobs import (
    COMPUTER,
    GENERATION,
    SERVER,
    Harness,
    _staging,
    h,
    job,
    store,
    until,
)

__all__ = ["h", "store"]  # the fixtures


def _hhmm(t: float) -> str:
    return time.strftime("%H:%M", time.gmtime(t))


def _windowed(h: Harness, op: int, params: dict[str, Any], opens: float) -> None:
    """The job as the server hands it out to a computer whose window (UTC) opens at
    ``opens`` and lasts an hour."""
    windows = [{"window": f"{_hhmm(opens)}-{_hhmm(opens + 3600)}", "utc_offset": 0}]
    body = operation_body(
        computer=COMPUTER,
        generation=GENERATION,
        op=op,
        type="job",
        params=params,
        policy={},
        timeout=600.0,
        issued_at=time.time(),
        windows=windows,
    )
    message = operation_message(h._next(), op, body, SERVER.sign(body))
    h.agent.ops.receive(parse_server_reply({"ack": 0, "messages": [message]}).messages, True)


def _deferred(h: Harness, op: int) -> list[dict[str, Any]]:
    return [
        m
        for m in h.outbox()
        if m["type"] == "operation-status" and m["op"] == op and m["status"] == "deferred"
    ]


@pytest.mark.serial  # timing-sensitive: one at a time (scripts/test)
async def test_the_install_waits_for_the_window_and_the_scrubber_does_not_count_the_wait(
    h: Harness,
) -> None:
    opens = (time.time() // 60 + 120) * 60  # two hours ahead, on a minute
    _windowed(h, 40, job(h.item("a"), h.item("b")), opens)
    await until(lambda: (o := h.agent.state.operation(40)) and o.status == st.DEFERRED)
    assert h.final_steps(40) == {
        ("analyze", 0): ("succeeded", "applicable"),
        ("analyze", 1): ("succeeded", "applicable"),
        ("download", 0): ("succeeded", "1 file(s), 100 bytes verified"),
        ("download", 1): ("succeeded", "1 file(s), 100 bytes verified"),
    }
    [told] = _deferred(h, 40)
    assert told["until"] == opens
    assert told["reason"].startswith(
        f"install of item 0 waits for the maintenance window {_hhmm(opens)}-"
    )
    record = h.agent.state.operation(40)
    assert record is not None and record.next_run_at == opens and record.attempts == 1
    assert any(_staging(h, 40).iterdir())  # the download waits with it
    first_timer = h.agent.ops.timers[40]

    # The scrubber's periodic pass continues it (it has a checkpoint): it waits again.
    h.agent.scrub_pass()
    await until(lambda: len(_deferred(h, 40)) == 2, what="the second wait")
    await until(lambda: 40 not in h.agent.ops.owned)
    assert first_timer.cancelled() and not h.agent.ops.timers[40].cancelled()
    record = h.agent.state.operation(40)
    assert record is not None and record.status == st.DEFERRED and record.attempts == 1
    assert [r for r in h.runs() if r.startswith("detect")] == ["detect a", "detect b"]
    # Resuming only to wait again sends no finished step's report a second time.
    finals = [(p, i) for p, i, s, _ in h.steps(40) if s != "started"]
    assert len(finals) == len(set(finals)) == 4

    h.terminate(40)
    res = await h.result(40)
    assert res["status"] == "canceled"
    final = h.final_steps(40)
    assert final[("install", 0)] == final[("install", 1)] == ("skipped", "terminated")
    assert not [r for r in h.runs() if r.startswith("install")]
    assert not _staging(h, 40).exists()
    assert 40 not in h.agent.ops.timers


def _windows_order(h: Harness, op: int, windows: list[dict[str, Any]], issued_at: float) -> None:
    body = windows_body(
        computer=COMPUTER, generation=GENERATION, op=op, windows=windows, issued_at=issued_at
    )
    message = windows_message(h._next(), op, body, SERVER.sign(body))
    h.agent.ops.receive(parse_server_reply({"ack": 0, "messages": [message]}).messages, True)


async def test_a_windows_order_moves_a_waiting_job_and_an_older_one_changes_nothing(
    h: Harness,
) -> None:
    opens = (time.time() // 60 + 120) * 60
    _windowed(h, 41, job(h.item("a")), opens)
    await until(lambda: (o := h.agent.state.operation(41)) and o.status == st.DEFERRED)
    # The window moved an hour later: the job looks again at once and waits for it.
    later = opens + 3600
    moved = [{"window": f"{_hhmm(later)}-{_hhmm(later + 3600)}", "utc_offset": 0}]
    _windows_order(h, 41, moved, issued_at=time.time())
    await until(lambda: _deferred(h, 41)[-1]["until"] == later, what="the wait for the new window")
    assert _deferred(h, 41)[0]["until"] == opens
    # An older order (a replay) changes nothing; one for an operation it does not
    # have is refused.
    _windows_order(h, 41, [], issued_at=time.time() - 600)
    _windows_order(h, 999, [], issued_at=time.time())
    refused = [m for m in h.outbox() if m["type"] == "refused"]
    assert [(m["op"], m["reason"]) for m in refused] == [(999, "malformed")]
    record = h.agent.state.operation(41)
    assert record is not None and record.windows_order is not None
    assert record.windows_order["windows"] == moved and record.status == st.DEFERRED
    assert not [r for r in h.runs() if r.startswith("install")]
    # No windows any more: it installs now.
    _windows_order(h, 41, [], issued_at=time.time())
    res = await h.result(41)
    assert res["status"] == "succeeded"
    assert [r.split()[0] for r in h.runs()] == ["detect", "install"]
