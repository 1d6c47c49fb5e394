"""Multi-phase jobs end to end (issue 12), every part real: the server, a relay, real
agents (one behind the relay, one direct), content added with ``taskfleet content add``,
the job created, shown and terminated with ``taskfleet job``.

The commands the items run are real scripts on this machine; the install of the
terminate test blocks on a gate file the test creates after it asked for the
termination (so the item in hand finishes, as SPEC 6 says), never on a sleep.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import Agent, Server, enroll_token, wait_until
from tests.relay_fleet import RealRelay, relay_agent, start_real_relay

__all__ = ["start_real_relay"]  # the fixture


def tf(server: Server, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TASKFLEET_SERVER": server.url,
        "TASKFLEET_TOKEN": server.admin_token,
        "COLUMNS": "220",
    }
    out = subprocess.run(
        [sys.executable, "-m", "taskfleet", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def _content(server: Server, tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    added = json.loads(tf(server, "content", "add", str(path), "--json").stdout)
    assert added["sha256"] == hashlib.sha256(data).hexdigest()
    return str(added["sha256"])


def _job(server: Server, job_id: int) -> dict[str, Any]:
    return dict(json.loads(tf(server, "job", "show", str(job_id), "--json").stdout))


def _fleet(
    server: Server,
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
) -> tuple[RealRelay, list[Agent]]:
    relay = start_real_relay(server)
    token = enroll_token(server)
    agents = [relay_agent(start_agent, server, relay, token), start_agent(server, token)]
    tf(server, "group", "create", "web")
    for a in agents:
        tf(server, "group", "add", "web", str(a.computer_id))
    return relay, agents


def test_a_job_downloads_through_the_relay_installs_and_tells_each_step(
    server: Server,
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    relay, agents = _fleet(server, start_real_relay, start_agent)
    payload = os.urandom(300_000)
    sha = _content(server, tmp_path, "pkg.bin", payload)
    items = tmp_path / "items.toml"
    items.write_text(
        f"""
[[items]]
name = "pkg"
detect = {{ argv = ["true"] }}
content = [{{ sha256 = "{sha}", name = "pkg.bin" }}]
install = {{ script = "test \\"$(sha256sum pkg.bin | cut -c1-64)\\" = {sha} && echo installed" }}

[[items]]
name = "not-here"
detect = {{ argv = ["false"] }}
install = {{ argv = ["false"] }}
"""
    )
    created = json.loads(
        tf(
            server, "job", "create", "--name", "May patches", "--target", "group:web",
            "--items", str(items), "--json",
        ).stdout
    )  # fmt: skip
    job_id = int(created["id"])
    done = wait_until(
        lambda: (j := _job(server, job_id))["state"] == "succeeded" and j, 90, "the job to end"
    )
    for computer in done["computers"]:
        steps = {(s["phase"], s["item"]): s["status"] for s in computer["steps"]}
        assert steps == {
            ("analyze", 0): "succeeded",
            ("analyze", 1): "succeeded",  # exit 1: not applicable, goes no further
            ("download", 0): "succeeded",
            ("install", 0): "succeeded",
        }, computer
    # Fetched from the server once, by the relay; the direct agent fetched it itself.
    assert relay.metric("taskfleet_relay_content_fetched_bytes_total") == len(payload)
    for agent in agents:
        assert not (agent.state_dir / "jobs").exists() or not any(
            (agent.state_dir / "jobs").iterdir()
        ), "staged content is removed at the end"
    shown = tf(server, "job", "show", str(job_id)).stdout
    assert "May patches" in shown and "Succeeded" in shown
    finished = tf(server, "job", "terminate", str(job_id), check=False)
    assert finished.returncode != 0 and "has finished" in finished.stdout + finished.stderr


def test_terminating_in_install_finishes_the_item_in_hand_and_skips_the_rest(
    server: Server,
    start_real_relay: Callable[..., RealRelay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    _, agents = _fleet(server, start_real_relay, start_agent)
    gate, started = tmp_path / "gate", tmp_path / "started"
    started.mkdir()
    items = tmp_path / "items.toml"
    block = f"touch {started}/$TASKFLEET_COMPUTER_ID; while [ ! -e {gate} ]; do sleep 0.05; done"
    items.write_text(
        "\n".join(
            f"""
[[items]]
name = "item-{k}"
install = {{ script = "{block if k == 0 else "true"}" }}
"""
            for k in range(3)
        )
    )
    created = json.loads(
        tf(
            server, "job", "create", "--name", "stop me", "--target", "group:web",
            "--items", str(items), "--phases", "install", "--json",
        ).stdout
    )  # fmt: skip
    job_id = int(created["id"])
    wait_until(lambda: len(list(started.iterdir())) == 2, 60, "both computers in item 0")
    out = tf(server, "job", "terminate", str(job_id), "--reason", "window over", "--json")
    assert json.loads(out.stdout)["state"] == "terminating"
    again = json.loads(tf(server, "job", "terminate", str(job_id), "--json").stdout)
    assert again["state"] == "terminating"  # the same answer, nothing more sent
    for agent in agents:  # the order reached each agent while item 0 still runs ...
        wait_until(
            lambda agent=agent: any(r["terminate_requested"] for r in agent.status()["records"]),
            30,
            "the terminate order at the agent",
        )
    gate.touch()  # ... and now the item in hand finishes
    done = wait_until(
        lambda: (j := _job(server, job_id))["state"] == "terminated" and j, 60, "Terminated"
    )
    assert done["terminate"]["by"] and done["terminate"]["reason"] == "window over"
    assert done["terminate"]["terminated_at"] is not None
    for computer in done["computers"]:
        assert computer["state"] == "canceled", computer  # not every step ran
        steps = {(s["phase"], s["item"]): s["status"] for s in computer["steps"]}
        assert steps == {
            ("install", 0): "succeeded",
            ("install", 1): "skipped",
            ("install", 2): "skipped",
        }, computer
    for agent in agents:
        assert not (agent.state_dir / "jobs").exists() or not any(
            (agent.state_dir / "jobs").iterdir()
        )
