"""Jobs and maintenance windows end to end (issue 12: "Install waits for the window;
Download may run outside it"): a real server and agent, the window set with
``taskfleet group window`` and the job created with ``taskfleet job create``.

The window is in whole minutes, so the test that waits for it chooses one that opens
at a minute boundary at least 15 s ahead (room for Analyze and Download while it is
closed) and polls with a deadline; the terminate and cancel tests use a window hours
away and never wait for it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acceptance.test_jobs_end_to_end import _content, _job, tf
from tests.conftest import Agent, Server, enroll_token, wait_until

DEFERRED = 7  # SPEC 5's local status code


def _hhmm(t: float) -> str:
    return time.strftime("%H:%M", time.gmtime(t))


def _setup(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path, opens: float
) -> tuple[Agent, Path, Path]:
    """One agent in group ``web`` whose window (UTC) opens at ``opens``; an items file
    whose detect and install leave marks (each detection, the install's time)."""
    agent = start_agent(server, enroll_token(server))
    tf(server, "group", "create", "web")
    tf(server, "group", "add", "web", str(agent.computer_id))
    window = f"{_hhmm(opens)}-{_hhmm(opens + 30 * 60)}"
    shown = tf(server, "group", "window", "web", window, "--utc-offset", "+00:00").stdout
    assert window in shown
    sha = _content(server, tmp_path, "pkg.bin", os.urandom(50_000))
    marks = tmp_path / "marks"
    marks.mkdir()
    items = tmp_path / "items.toml"
    items.write_text(
        f"""
[[items]]
name = "pkg"
detect = {{ script = "echo run >> {marks}/detected" }}
content = [{{ sha256 = "{sha}", name = "pkg.bin" }}]
install = {{ script = "test -s pkg.bin && date +%s > {marks}/installed" }}
"""
    )
    return agent, items, marks


def _create(server: Server, items: Path) -> int:
    out = tf(
        server, "job", "create", "--name", "night patches", "--target", "group:web",
        "--items", str(items), "--json",
    )  # fmt: skip
    return int(json.loads(out.stdout)["id"])


def _waiting(server: Server, agent: Agent, job_id: int) -> dict[str, object] | None:
    """The job's computer once it waits for the window: Analyze and Download done, the
    activity saying why, the agent's record Deferred."""
    [computer] = _job(server, job_id)["computers"]
    steps = {(s["phase"], s["item"]): s["status"] for s in computer["steps"]}
    if steps != {("analyze", 0): "succeeded", ("download", 0): "succeeded"}:
        return None
    if "waits for the maintenance window" not in str(computer["reason"]):
        return None
    [record] = agent.status()["records"]
    return dict(computer) if record["status"] == DEFERRED else None


def test_analyze_and_download_run_while_the_window_is_closed_install_waits_for_it(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    opens = math.ceil((time.time() + 15) / 60) * 60  # a minute boundary 15..75 s ahead
    agent, items, marks = _setup(server, start_agent, tmp_path, opens)
    job_id = _create(server, items)
    computer = wait_until(lambda: _waiting(server, agent, job_id), 60, "the job to wait")
    assert time.time() < opens, "the window opened before the job got to Install: slow machine"
    assert f"{_hhmm(opens)}-" in str(computer["reason"])
    assert not (marks / "installed").exists()
    done = wait_until(
        lambda: (j := _job(server, job_id))["state"] == "succeeded" and j,
        opens - time.time() + 60,
        "the job to end once the window opened",
    )
    [computer] = done["computers"]
    # (A resumed run reports its finished steps again: only the install's time tells.)
    at = {(s["phase"], s["item"]): s["at"] for s in computer["steps"]}
    assert at[("install", 0)] >= opens, at
    assert int((marks / "installed").read_text()) >= opens


@pytest.mark.parametrize(
    ("stop", "why"),
    [(("job", "terminate"), "terminated"), (("request", "cancel"), "canceled")],
)
def test_a_job_stopped_while_it_waits_for_the_window_never_installs(
    server: Server,
    start_agent: Callable[..., Agent],
    tmp_path: Path,
    stop: tuple[str, str],
    why: str,
) -> None:
    agent, items, marks = _setup(server, start_agent, tmp_path, time.time() + 2 * 3600)
    job_id = _create(server, items)
    wait_until(lambda: _waiting(server, agent, job_id), 60, "the job to wait")
    assert any((agent.state_dir / "jobs").iterdir()), "the download is staged"
    tf(server, *stop, str(job_id), "--reason", "no window tonight")
    # (A cancel makes the activity Canceled at once; the computer's report follows.)
    done = wait_until(
        lambda: (
            (j := _job(server, job_id))["state"] in ("terminated", "canceled")
            and any(s["phase"] == "install" for s in j["computers"][0]["steps"])
            and j
        ),
        30,
        "the job to stop and the computer to report its install step",
    )
    [computer] = done["computers"]
    assert computer["state"] == "canceled", computer
    steps = {(s["phase"], s["item"]): (s["status"], s["detail"]) for s in computer["steps"]}
    assert steps[("install", 0)] == ("skipped", why), steps
    assert steps[("download", 0)][0] == "succeeded"
    assert not (marks / "installed").exists()
    assert not any((agent.state_dir / "jobs").iterdir()), "staged content is removed"


def test_an_agent_restarted_while_its_job_waits_waits_again_without_redoing_a_step(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    agent, items, marks = _setup(server, start_agent, tmp_path, time.time() + 2 * 3600)
    job_id = _create(server, items)
    wait_until(lambda: _waiting(server, agent, job_id), 60, "the job to wait")
    agent.proc.stop()
    again = start_agent(server, None, state_dir=agent.state_dir)
    # The scrubber continues it (it has a checkpoint); it finds the window closed and
    # waits again: Deferred, no step run again, and that run is not counted an attempt.
    wait_until(lambda: "continues (attempt 2)" in again.proc.text(), 30, "the resumed run")
    wait_until(lambda: _waiting(server, again, job_id), 30, "the job to wait again")
    [record] = again.status()["records"]
    assert record["attempts"] == 1 and record["next_run_at"] > time.time() + 3600, record
    assert (marks / "detected").read_text() == "run\n"  # Analyze did not run again
    tf(server, "job", "terminate", str(job_id))
    done = wait_until(
        lambda: (j := _job(server, job_id))["state"] == "terminated" and j, 30, "Terminated"
    )
    [computer] = done["computers"]
    assert computer["state"] == "canceled"
    assert not (marks / "installed").exists()


@pytest.mark.parametrize(
    "change",
    [
        ("window", "web", "--clear"),
        ("window", "web", "OPEN-NOW", "--utc-offset", "+00:00"),
        ("remove", "web", "COMPUTER"),
    ],
    ids=["window cleared", "window widened", "computer left the group"],
)
def test_a_window_changed_while_a_job_waits_reaches_the_computer_and_it_installs(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path, change: tuple[str, ...]
) -> None:
    # The window was two hours away when the job was handed out; the administrator
    # opens it (or takes the computer out of the group) without touching the job.
    agent, items, marks = _setup(server, start_agent, tmp_path, time.time() + 2 * 3600)
    job_id = _create(server, items)
    wait_until(lambda: _waiting(server, agent, job_id), 60, "the job to wait")
    now = time.time()
    fill = {
        "COMPUTER": str(agent.computer_id),
        "OPEN-NOW": f"{_hhmm(now - 3600)}-{_hhmm(now + 7200)}",
    }
    tf(server, "group", *(fill.get(a, a) for a in change))
    done = wait_until(
        lambda: (j := _job(server, job_id))["state"] == "succeeded" and j,
        30,
        "the job to install with the new window",
    )
    [computer] = done["computers"]
    steps = {(s["phase"], s["item"]): s["status"] for s in computer["steps"]}
    assert steps[("install", 0)] == "succeeded", steps
    assert (marks / "installed").exists()
    assert (marks / "detected").read_text() == "run\n"  # nothing ran twice
