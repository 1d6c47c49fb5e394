"""The agent's job runner decisions that are not the pure rules (agent/jobs.py).

The rules themselves (steps, next_step, termination, outcome) are in
tests/unit/test_job_rules.py; here: the agent's check of a job against its
policy, where content may go in the staging folder, the checkpoint, the
summary line, what a scrubbed job reports, and the sweep of what finished jobs
left. Files in a temporary folder; no processes, no network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from taskfleet.agent import state as st
from taskfleet.agent.job_files import (
    Checkpoint,
    StagingError,
    content_path,
    item_folder,
    staging_root,
    sweep_staging,
)
from taskfleet.agent.jobs import check_job, scrubbed_reports, summary_line
from taskfleet.domain.jobs import Outcome, validate_job_spec

SHA = "cd" * 32
POLICY = {"scripts": True, "users": ["deploy"], "types": []}


def _params(**item: Any) -> dict[str, Any]:
    base = {
        "name": "p0",
        "detect": {"argv": ["true"]},
        "content": [{"sha256": SHA, "size": 3, "name": "p0.deb"}],
        "install": {"argv": ["true"]},
    }
    return {"name": "May patches", "items": [{**base, **item}]}


# -- the agent's check -----------------------------------------------------------


def test_check_job_gives_the_spec_of_a_job_it_may_run() -> None:
    why, spec = check_job({"params": _params()}, POLICY)
    assert why is None and spec is not None and spec.action == "install"


def test_check_job_refuses_invalid_params_with_the_reason() -> None:
    why, spec = check_job(
        {"params": _params(content=[{"sha256": "x", "size": 1, "name": "a"}])}, POLICY
    )
    assert spec is None and why is not None
    assert why.startswith("invalid parameters (item 0 (p0) content 0: sha256")


@pytest.mark.parametrize("where", ["detect", "install"])
def test_check_job_refuses_a_command_the_policy_does_not_allow_and_says_which(where: str) -> None:
    why, spec = check_job({"params": _params(**{where: {"argv": ["id"], "user": "root"}})}, POLICY)
    assert spec is None
    assert why == f"user 'root' is not in its allowed script users (item 0 {where})"


def test_check_job_ignores_commands_of_phases_the_job_does_not_run() -> None:
    params = _params(
        detect={"argv": ["id"], "user": "root"}, uninstall={"argv": ["x"], "user": "x"}
    )
    params["phases"] = ["download", "install"]
    assert check_job({"params": params}, POLICY)[0] is None


def test_check_job_refuses_everything_when_scripts_are_disabled() -> None:
    why, _ = check_job({"params": _params()}, {"scripts": False})
    assert why == "scripts are disabled in its configuration (item 0 detect)"


# -- staging ---------------------------------------------------------------------


def test_content_goes_inside_the_items_folder_through_real_folders(tmp_path: Path) -> None:
    folder = item_folder(tmp_path, 7, 2)
    assert folder == staging_root(tmp_path, 7) / "2" and folder.is_dir()
    assert (os.stat(folder).st_mode & 0o777) == 0o700
    dest = content_path(folder, "debs/sub/p0.deb")
    assert dest == folder / "debs" / "sub" / "p0.deb" and dest.parent.is_dir()


@pytest.mark.parametrize("name", ["../p0.deb", "/etc/passwd", "a/../../b", "a//b", "./a"])
def test_a_content_name_that_leaves_the_folder_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(StagingError):
        content_path(item_folder(tmp_path, 7, 0), name)


@pytest.mark.parametrize("link", ["sub", "sub/p0.deb", "sub/p0.deb.part"])
def test_a_content_path_crossing_a_symlink_is_refused(tmp_path: Path, link: str) -> None:
    folder = item_folder(tmp_path, 7, 0)
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "sub").mkdir()
    if link != "sub":
        (folder / link).symlink_to(outside / "x")
    else:
        (folder / "sub").rmdir()
        (folder / "sub").symlink_to(outside)
    with pytest.raises(StagingError, match="symlink"):
        content_path(folder, "sub/p0.deb")
    assert list(outside.iterdir()) == []


def test_a_symlink_in_place_of_a_staging_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "7").symlink_to(outside)
    with pytest.raises(StagingError, match="is a symlink or not a folder"):
        item_folder(tmp_path, 7, 0)
    assert list(outside.iterdir()) == []


# -- the checkpoint --------------------------------------------------------------


def test_a_checkpoint_is_written_whole_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "7"
    cp = Checkpoint(
        {0: True, 1: False}, {("analyze", 0): ("succeeded", "applicable")}, terminate=True
    )
    cp.save(path)
    assert Checkpoint.load(path) == cp
    assert [p.name for p in path.parent.iterdir()] == ["7"]  # no temp file left
    assert (os.stat(path).st_mode & 0o777) == 0o600


@pytest.mark.parametrize("text", [None, b"", b"{not json", b'{"v": 1}'])
def test_a_missing_or_unreadable_checkpoint_is_none(tmp_path: Path, text: bytes | None) -> None:
    path = tmp_path / "7"
    if text is not None:
        path.write_bytes(text)
    assert Checkpoint.load(path) is None


# -- the summary line ------------------------------------------------------------


def _spec(n: int = 3) -> Any:
    params = _params()
    params["items"] = [{**params["items"][0], "name": f"p{i}"} for i in range(n)]
    return validate_job_spec(params)


def test_the_summary_line_counts_what_ran_and_why_the_rest_was_skipped() -> None:
    done = {
        **{("analyze", i): ("succeeded", "applicable") for i in range(3)},
        ("download", 0): ("succeeded", "ok"),
        ("download", 1): ("skipped", "terminated"),
        ("download", 2): ("skipped", "terminated"),
        **{("install", i): ("skipped", "terminated") for i in range(3)},
    }
    line = summary_line(_spec(), Checkpoint({}, done), Outcome.CANCELED, None)
    assert line == (
        "Stage: Download, Status: Canceled, Result: 4 of 9 steps ran, 5 skipped (terminated), "
        "Return code: none"
    )


def test_the_summary_line_of_a_failed_job_names_failures_and_the_last_exit_code() -> None:
    from taskfleet.agent.jobs import _Failure

    done = {
        ("analyze", 0): ("failed", "exit code 2"),
        ("download", 1): ("failed", "p1: HTTP 404"),
        ("install", 1): ("skipped", "its download failed"),
    }
    spec = _spec(2)
    failure = _Failure(2, "", "", 0, 0)
    line = summary_line(spec, Checkpoint({0: False}, done), Outcome.FAILED, failure)
    assert line == (
        "Stage: Download, Status: Failed, Result: 2 of 3 steps ran, 2 failed, "
        "1 skipped (its download failed), Return code: 2"
    )


def test_the_summary_line_of_a_job_that_never_started() -> None:
    done = {("install", 0): ("skipped", "terminated before it started")}
    line = summary_line(_spec(1), Checkpoint({}, done), Outcome.CANCELED, None)
    assert line.startswith("Stage: Starting, Status: Canceled, Result: 0 of 1 steps ran")


# -- scrubbing and sweeping ------------------------------------------------------


def _state(tmp_path: Path, *ops: tuple[int, str]) -> st.LocalState:
    state = st.LocalState(tmp_path / "state")
    new = []
    for op, kind in ops:
        body = json.dumps({"body": json.dumps({"params": _params(), "op": op}), "sig": ""})
        new.append(st.NewOperation(op, op, kind, body, True))
    state.receive(new, [], max(o for o, _ in ops))
    return state


def test_a_scrubbed_job_reports_the_step_it_was_in_failed_and_the_rest_skipped(
    tmp_path: Path,
) -> None:
    state = _state(tmp_path, (7, "job"))
    item_folder(tmp_path / "state", 7, 0)
    op = state.operation(7)
    assert op is not None
    reports = scrubbed_reports(op, tmp_path / "state")
    assert [(m["phase"], m["item"], m["status"], m["detail"]) for m in reports] == [
        ("analyze", 0, "failed", "scrubbed: the agent stopped during this step"),
        ("download", 0, "skipped", "scrubbed"),
        ("install", 0, "skipped", "scrubbed"),
    ]
    assert not staging_root(tmp_path / "state", 7).exists()
    state.close()


def test_the_sweep_removes_only_what_finished_or_unknown_jobs_left(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    state = _state(tmp_path, (7, "job"), (8, "job"))
    state.finish(7, st.SUCCESS, {"type": "operation-result", "op": 7})
    for op in (7, 8, 9):
        item_folder(folder, op, 0)
    finished = state.operation(7)
    assert finished is not None
    Checkpoint().save(finished.checkpoint_path(folder))
    assert sorted(sweep_staging(state, folder)) == [7, 9]
    assert staging_root(folder, 8).is_dir()  # unfinished: it resumes
    assert not staging_root(folder, 7).exists() and not staging_root(folder, 9).exists()
    assert not finished.checkpoint_path(folder).exists()
    state.close()
