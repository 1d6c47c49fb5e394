"""The system activities' pure rules: who is never signalled, how /proc is read, the power
command's argv, a restart's verdict, the message and --delay checks (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskfleet.agent.actions.system import (
    PF_KTHREAD,
    Agent,
    ProcInfo,
    minutes_of,
    parse_stat,
    power_argv,
    protected,
    restart_verdict,
)
from taskfleet.domain.actions.system import validate_power

ME = Agent(pid=500, pgid=480, ancestors=frozenset({480, 300, 1}))


def proc(pid: int, *, ppid: int = 400, pgid: int = 700, flags: int = 0) -> ProcInfo:
    return ProcInfo(pid, "x", "S", ppid, pgid, flags)


@pytest.mark.parametrize(
    ("p", "why"),
    [
        (proc(1, ppid=0, pgid=1), "PID 1 (init)"),
        (proc(2, ppid=0, pgid=0), "a kernel thread"),
        (proc(57, ppid=2, pgid=0), "a kernel thread"),
        (proc(58, ppid=9, flags=PF_KTHREAD | 0x40), "a kernel thread"),
        (proc(500, pgid=480), "the agent itself"),
        (proc(501, ppid=500, pgid=480), "in the agent's process group"),
        (proc(300, pgid=300), "an ancestor of the agent"),
        (proc(480, pgid=480), "in the agent's process group"),
        (proc(600, ppid=500, pgid=600), None),  # the agent's child in its own group
        (proc(4000, flags=0x400000), None),  # other flags
    ],
)
def test_who_is_never_signalled(p: ProcInfo, why: str | None) -> None:
    assert protected(p, ME) == why


def test_parse_stat_takes_the_name_between_the_first_and_last_parenthesis() -> None:
    text = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 0 0 0 0 5 1 0 0 20 0 1 0 99 0 0\n"
    p = parse_stat(4242, text)
    assert (p.name, p.state, p.ppid, p.pgid, p.flags) == ("a) b (c)", "S", 1, 4242, 4194560)
    assert p.alive and not parse_stat(1, "1 (z) Z 0 1 1 0 -1 0").alive
    with pytest.raises(ValueError):
        parse_stat(1, "garbage")


def test_parse_stat_reads_this_process() -> None:
    import os

    p = parse_stat(os.getpid(), Path("/proc/self/stat").read_text())
    assert p.pid == os.getpid() and p.pgid == os.getpgid(0) and p.ppid == os.getppid()
    assert not p.flags & PF_KTHREAD


@pytest.mark.parametrize(
    ("delay", "minutes"), [(0, 0), (0.5, 1), (60, 1), (61, 2), (300, 5), (86400, 1440)]
)
def test_the_delay_is_rounded_up_to_whole_minutes(delay: float, minutes: int) -> None:
    assert minutes_of(delay) == minutes


def test_power_argv_fills_the_words_and_drops_an_empty_message() -> None:
    default = ("shutdown", "-r", "+{minutes}", "{message}")
    assert power_argv(default, 0, None) == ["shutdown", "-r", "+0"]
    assert power_argv(default, 5, "") == ["shutdown", "-r", "+5"]
    assert power_argv(default, 5, "back at 14:00, sorry") == [
        "shutdown",
        "-r",
        "+5",
        "back at 14:00, sorry",
    ]
    # One pass: a message holding a placeholder stays as typed; no shell, one word.
    assert power_argv(("t", "m={message}", "{message}"), 3, "{minutes} $(x); y") == [
        "t",
        "m={minutes} $(x); y",
        "{minutes} $(x); y",
    ]
    assert power_argv(("t", "m={message}"), 3, None) == ["t", "m="]


def test_the_message_cannot_be_read_as_an_option() -> None:
    assert validate_power({"message": "back at 14:00, sorry"})["message"] == "back at 14:00, sorry"
    assert validate_power({}) == {"delay": 60.0, "message": None}
    for bad in ("-c", "--no-wall", "a\nb", "x" * 257, 5):
        with pytest.raises(ValueError, match="message must"):
            validate_power({"message": bad})


AWAITING = {"boot_id": "old", "since": 1000.0, "until": 1000.0 + 300 + 900, "minutes": 5}


def test_a_restart_is_succeeded_on_another_boot_id_only() -> None:
    v = restart_verdict(AWAITING, "new", 1010.0)
    assert v.status == "succeeded" and v.line.startswith("restarted: the computer came back at ")
    assert restart_verdict(AWAITING, "new", 99999.0).status == "succeeded"  # late, still back


@pytest.mark.parametrize("boot", ["old", None])
def test_the_same_boot_waits_out_the_delay_and_grace_then_fails(boot: str | None) -> None:
    waiting = restart_verdict(AWAITING, boot, 1100.0)
    assert (waiting.status, waiting.wait) == ("waiting", 1100.0)
    failed = restart_verdict(AWAITING, boot, 2200.0)
    assert failed.status == "failed"
    assert "did not restart within 20 min of the restart command" in failed.line
    short = {**AWAITING, "until": 1003.0}
    assert "within 3 s" in restart_verdict(short, boot, 1003.0).line


def test_delay_option_takes_zero_and_durations() -> None:
    from taskfleet.cli.system import delay_arg

    assert [delay_arg(v) for v in (None, "0", "0s", "0m", "90", "5m", "1h")] == [
        None,
        0.0,
        0.0,
        0.0,
        90.0,
        300.0,
        3600.0,
    ]
    for bad in ("soon", "-5m", "2d", "nan", "inf"):
        with pytest.raises(SystemExit):
            delay_arg(bad)


def test_normalised_parameters_validate_again_unchanged() -> None:
    # The server stores the normalised parameters; the agent validates them again.
    from taskfleet.domain.actions import ACTION_TYPES

    for kind, raw in [
        ("signal-process", {"pid": 42}),
        ("signal-process", {"process": "sleep", "signal": "sigkill"}),
        ("restart", {"delay": 0, "message": "bye"}),
        ("shutdown", {}),
        ("resync", {}),
    ]:
        once = ACTION_TYPES[kind].validate(raw)
        assert ACTION_TYPES[kind].validate(once) == once, kind


@pytest.mark.parametrize("pushed", [True, False])
def test_a_restart_awaiting_the_computer_survives_reopening_and_is_never_scrubbed(
    tmp_path: Path, pushed: bool
) -> None:
    """Killed while the command ran (Working) or after (Deferred): the record keeps its
    wait and the scrubber, which would continue (pushed) or scrub (pulled) a Working
    record, does not see it; a record without the wait is still scrubbed as before."""
    from taskfleet.agent import state as st
    from taskfleet.agent.scrub import plan

    folder = tmp_path / "state"
    state = st.LocalState(folder)
    state.receive([st.NewOperation(op, op, "restart", "{}", pushed) for op in (1, 2, 3)], [], 3)
    for op in (1, 2, 3):
        state.start(op)
    state.expect_restart(1, AWAITING)  # the command was running
    state.expect_restart(2, AWAITING)
    state.await_restart(2, AWAITING, {"type": "operation-status", "op": 2})  # it ran
    state.close()

    state = st.LocalState(folder)  # the agent starts again
    one, two = state.operation(1), state.operation(2)
    assert one is not None and one.awaiting == AWAITING and one.status == st.WORKING
    assert two is not None and two.awaiting == AWAITING and two.status == st.DEFERRED
    assert two.next_run_at == AWAITING["until"]
    decided, ops = plan(state, folder, executor_running=False, max_attempts=3)
    assert set(ops) == {3}  # only the restart whose command never started
    assert [d.action.value for _, d in decided.decisions] == ["continue" if pushed else "scrub"]
    state.expect_restart(1, None)  # a command that failed: an ordinary record again
    assert {o.op for o in state.unfinished() if o.awaiting is None} == {1, 3}
