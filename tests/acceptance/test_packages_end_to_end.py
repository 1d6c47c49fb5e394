"""Packages and snaps through the real server and agent processes (issue 13): the agent
manages a throw-away root (``--system-root``) whose apt reads a local repository of
.deb files the test builds (``tests/debrepo.py``), so installs are real; the API and the
CLI create the work, the result lines say what changed, the inventory then shows it and
``package:`` targets pick the computer by it. Agents that do not enable packages, and
snaps on a computer without snapd, are refused up front, naming the computer. This
machine's own dpkg and apt state stays as it was; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import debrepo
from tests.acceptance.test_cli import tf
from tests.conftest import (
    Agent,
    Server,
    activities_of,
    enroll_token,
    post_action,
    request_done,
    wait_until,
)

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("apt-get", "dpkg-deb", "dpkg")),
    reason="needs apt-get, dpkg and dpkg-deb",
)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    with debrepo.host_untouched():
        yield debrepo.make_root(tmp_path, debrepo.build_repo(tmp_path))


def packages_agent(
    server: Server, start_agent: Callable[..., Agent], root: Path, *allow: str
) -> Agent:
    options = [a for o in debrepo.APT_OPTIONS for a in ("--apt-option", o)]
    return start_agent(
        server,
        enroll_token(server),
        *[a for t in allow for a in ("--allow-type", t)],
        "--system-root",
        str(root),
        "--package-lock-timeout",
        "10",
        "--inventory-min-interval",
        "0",
        *options,
        inventory=True,
    )


def done(server: Server, r: Any) -> dict[str, Any]:
    assert r.status_code == 201, r.text
    req = request_done(server, r.json()["id"], timeout=120)
    (act,) = activities_of(server, req["id"])
    return dict(act)


def inventory_version(server: Server, cid: int, name: str) -> str | None:
    with server.api() as api:
        rows = api.get(f"/computers/{cid}/packages", params={"name": name}).json()
    items = rows["items"] if isinstance(rows, dict) else rows
    return next((p["version"] for p in items if p["name"] == name), None)


def test_install_through_the_api_and_the_cli_then_target_by_inventory(
    server: Server, start_agent: Callable[..., Agent], root: Path
) -> None:
    agent = packages_agent(server, start_agent, root, "packages")
    cid = agent.computer_id
    # refused at the door: an option for a package name
    r = post_action(server, "change-packages", f"computer:{cid}", {"install": ["-oDir=/"]})
    assert r.status_code == 400 and "is not a valid package name" in r.json()["error"], r.text

    act = done(
        server,
        post_action(
            server,
            "change-packages",
            f"computer:{cid}",
            {"install": [{"name": "tf-hello", "version": "1.0-1"}]},
        ),
    )
    assert act["state"] == "succeeded", act
    assert act["result_line"] == (
        "Stage: Change packages, Status: Succeeded, Result: installed tf-hello 1.0-1, "
        "Return code: 0"
    )
    assert debrepo.installed(root) == {"tf-hello": ("1.0-1", False)}
    wait_until(lambda: inventory_version(server, cid, "tf-hello") == "1.0-1", 120, "inventory")

    # the inventory picks it: tf-hello older than 2.0
    out = tf(
        server,
        "packages",
        "install",
        "tf-tool",
        "--target",
        "package:tf-hello<2.0",
        "--wait",
        "--json",
    )
    (act,) = json.loads(out.stdout)["activities"]
    assert act["computer_id"] == cid and act["state"] == "succeeded", act
    assert "Result: installed tf-lib 1.0-1, tf-tool 1.0-1," in act["result_line"]

    out = tf(server, "packages", "install", "tf-hello", "--target", f"computer:{cid}", "--wait")
    assert "succeeded" in out.stdout.lower(), out.stdout
    req = json.loads(tf(server, "request", "list", "--json").stdout)
    last = max(req, key=lambda r: r["id"])
    (act,) = activities_of(server, last["id"])
    assert "Result: upgraded tf-hello 1.0-1 -> 2.0-1," in act["result_line"], act
    wait_until(lambda: inventory_version(server, cid, "tf-hello") == "2.0-1", 120, "inventory")
    out = tf(
        server, "packages", "hold", "tf-hello", "--target", "package:tf-hello<2.0", check=False
    )
    assert out.returncode != 0 and "nothing to target" in out.stdout + out.stderr

    out = tf(server, "packages", "hold", "tf-hello", "--target", f"computer:{cid}", "--wait")
    assert debrepo.installed(root)["tf-hello"] == ("2.0-1", True)


def test_refused_up_front_where_packages_are_not_enabled_or_snapd_is_missing(
    server: Server, start_agent: Callable[..., Agent], root: Path
) -> None:
    if shutil.which("snap") is not None:
        pytest.skip("this machine has snap")
    enabled = packages_agent(server, start_agent, root, "packages", "snaps")
    plain = start_agent(server, enroll_token(server), name="plain")
    with server.api() as api:
        before = len(api.get("/requests").json())
    r = post_action(server, "change-packages", "all", {"install": ["tf-hello"]})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert (
        f"{plain.computer_id} (plain): activity type 'change-packages' is not enabled" in error
    ), error
    assert f"{enabled.computer_id} (" not in error
    r = post_action(server, "snap-install", f"computer:{enabled.computer_id}", {"names": ["hello"]})
    assert r.status_code == 409, r.text
    assert (
        f"{enabled.computer_id} (agent-1): snap-install is not supported on it: "
        "snapd is not installed" in r.json()["error"]
    ), r.text
    out = tf(server, "snap", "refresh", "--target", f"computer:{enabled.computer_id}", check=False)
    assert out.returncode != 0 and "snapd is not installed" in out.stdout + out.stderr
    with server.api() as api:
        assert len(api.get("/requests").json()) == before
    assert debrepo.installed(root) == {}
