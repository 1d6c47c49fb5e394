"""An agent that runs scripts only never loads the job runner or the handlers of the
typed activities it has not enabled (each module costs memory in every agent process:
benchmarks/README.md, agent idle RSS); they load when a job or such an activity
arrives, or when the agent enables the family."""

from __future__ import annotations

import subprocess
import sys

JOBS = {
    "taskfleet.agent.jobs",
    "taskfleet.agent.content",
    "taskfleet.agent.job_files",
    "taskfleet.domain.jobs",
}
FAMILIES = {f"taskfleet.agent.actions.{f}" for f in ("accounts", "packages", "snaps")}


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


START = (
    "from taskfleet.agent.actions.context import ActionEnv\n"
    "from taskfleet.agent.actions.registry import capabilities\n"
    "from taskfleet.domain.actions import allowed_types\n"
    "import taskfleet.agent.main\n"
    "capabilities(ActionEnv(own_user='nobody'), allowed_types({}))"
)


def test_starting_the_agent_loads_neither_jobs_nor_the_handlers_it_does_not_enable() -> None:
    loaded = _loaded_after(START.format("[]"))
    assert "taskfleet.agent.operations" in loaded  # the check sees the agent's own code
    assert "taskfleet.agent.actions.system" in loaded  # resync is always enabled
    assert not loaded & (JOBS | FAMILIES), sorted(loaded & (JOBS | FAMILIES))


def test_they_load_when_enabled_or_needed() -> None:
    assert "taskfleet.agent.actions.packages" in _loaded_after(START.format("['packages']"))
    loaded = _loaded_after(
        "from taskfleet.agent.actions.registry import handler\n"
        "from taskfleet.agent.jobs import check_job\n"
        "handler('user-create')"
    )
    assert JOBS | {"taskfleet.agent.actions.accounts"} <= loaded
