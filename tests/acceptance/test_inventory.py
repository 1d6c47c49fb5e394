"""The inventory end to end: a real agent reports it, a change arrives as a delta, targets
pick computers by it (issue 13). Real server and agent processes; SQLite, or PostgreSQL
with TASKFLEET_TEST_DB=postgresql.

The agent reads this machine's own inventory, except dpkg's database: it is pointed
(``--inventory-admindir``) at a copy the test owns, so installing a package is an edit
of that status file, and apt's simulation runs against it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.test_computer_removal import enrolled, exchange
from tests.conftest import (
    Agent,
    Server,
    activities_of,
    enroll_token,
    request_done,
    run_request,
    wait_until,
)
from tests.relay_proc import Relay, start_relay

__all__ = ["start_relay"]  # the fixture, used by name

pytestmark = pytest.mark.skipif(
    not Path("/var/lib/dpkg/status").exists(), reason="needs a Debian system (dpkg, apt)"
)

STATUS = (
    "Package: {name}\nStatus: install ok installed\nPriority: optional\nArchitecture: {arch}\n"
    "Version: {version}\nMaintainer: Test <test@example.org>\nDescription: test\n\n"
)
OPENSSL = STATUS.format(name="openssl", arch="amd64", version="3.0.11-1~deb12u2")
TOOL = STATUS.format(name="taskfleet-test-tool", arch="all", version="1.0-1")
# A collection (a child process, dpkg-query, apt's simulation over this machine's lists)
# takes under 2 s on an idle host and ten times that beside the rest of the suite.
COLLECTED = 90


def computer(server: Server, cid: int) -> dict[str, Any]:
    with server.api() as api:
        r = api.get(f"/computers/{cid}")
        assert r.status_code == 200, r.text
        return dict(r.json())


def cli(server: Server, *args: str) -> str:
    env = {**os.environ, "TASKFLEET_SERVER": server.url, "TASKFLEET_TOKEN": server.admin_token}
    out = subprocess.run(
        [sys.executable, "-m", "taskfleet", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def queued(agent: Agent) -> list[tuple[str, int]]:
    """(whole|delta, bytes) of each inventory message the agent queued, from its log."""
    return [
        (m.group(1), int(m.group(2)))
        for m in re.finditer(
            r"inventory queued as message \d+ \((\w+), (\d+) bytes\)", agent.proc.text()
        )
    ]


def test_a_real_agent_reports_its_inventory_then_deltas(
    server: Server, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    adm = tmp_path / "dpkg"
    adm.mkdir()
    (adm / "status").write_text(OPENSSL + TOOL)
    agent = start_agent(
        server,
        enroll_token(server),
        "--inventory-admindir",
        str(adm),
        "--inventory-min-interval",
        "0",
        inventory=True,
    )
    cid = agent.computer_id

    def reported() -> dict[str, Any] | None:
        inv = computer(server, cid)["inventory"]
        return inv if inv and inv["packages"] == 2 else None

    inv = wait_until(reported, COLLECTED, "the inventory after enrollment")
    os_release = Path("/etc/os-release").read_text()
    assert f"ID={inv['os']['id']}" in os_release
    assert inv["kernel"]["release"] == os.uname().release
    assert inv["cpu"]["count"] == os.cpu_count()
    assert inv["memory"]["total_kb"] > 0 and inv["users"]["root"]["uid"] == 0
    assert "missing" not in inv, inv.get("missing")
    openssl = [u for u in inv["upgrades"] if u["name"] == "openssl"]
    assert openssl and openssl[0]["version"] == "3.0.11-1~deb12u2" and openssl[0]["security"]
    shown = cli(server, "computer", "show", str(cid))
    assert "2 installed" in shown and "openssl" in shown and inv["os"]["pretty_name"] in shown
    listed = cli(server, "computer", "show", str(cid), "--packages")
    assert "taskfleet-test-tool" in listed and "3.0.11-1~deb12u2" in listed
    [(kind, whole_size)] = queued(agent)
    assert kind == "whole"

    # A package installed (the status file edited), then an operation finishes: a delta.
    new = STATUS.format(name="taskfleet-new", arch="amd64", version="2:0.9~beta1-3")
    (adm / "status").write_text(OPENSSL + TOOL + new)
    req = run_request(server, f"computer:{cid}", {"argv": ["true"]})
    wait_until(lambda: activities_of(server, req["id"])[0]["state"] == "succeeded", 30, "the run")
    wait_until(lambda: computer(server, cid)["inventory"]["packages"] == 3, COLLECTED, "the delta")
    kinds = queued(agent)
    assert [k for k, _ in kinds] == ["whole", "delta"], kinds
    assert kinds[1][1] < 600 < whole_size // 10, kinds  # the change, not the whole list
    with server.api() as api:
        rows = api.get(f"/computers/{cid}/packages", params={"limit": 10000}).json()
    installed = {(r["name"], r["arch"], r["version"]) for r in rows if r["version"]}
    assert installed == {
        ("openssl", "amd64", "3.0.11-1~deb12u2"),
        ("taskfleet-test-tool", "all", "1.0-1"),
        ("taskfleet-new", "amd64", "2:0.9~beta1-3"),
    }

    # A package removed: the server's rows follow.
    (adm / "status").write_text(OPENSSL + new)
    req = run_request(server, f"computer:{cid}", {"argv": ["true"]})
    wait_until(
        lambda: computer(server, cid)["inventory"]["packages"] == 2, COLLECTED, "the removal"
    )
    with server.api() as api:
        names = {r["name"] for r in api.get(f"/computers/{cid}/packages").json() if r["version"]}
        assert names == {"openssl", "taskfleet-new"}
        # Targets by inventory pick this computer (the rest of the targets: below).
        for target in ("package:openssl<3.0.13", "package:taskfleet-new", "os:" + inv["os"]["id"]):
            r = api.post(
                "/requests",
                json={"type": "execute-script", "target": target, "params": {"argv": ["true"]}},
            )
            assert r.status_code == 201, (target, r.text)
        r = api.post(
            "/requests",
            json={
                "type": "execute-script",
                "target": "package:openssl>=3.0.13",
                "params": {"argv": ["true"]},
            },
        )
        assert r.status_code == 404 and "nothing to target" in r.json()["error"]


# -- raw agents: exact messages, several computers ------------------------------------


def full_inventory(os_id: str, version: str, packages: dict[str, str]) -> dict[str, Any]:
    from taskfleet.domain import inventory as inv

    snap = {
        "os": {"id": os_id, "version_id": version, "pretty_name": f"{os_id} {version}"},
        "packages": {k: {"version": v} for k, v in packages.items()},
        "upgrades": {},
    }
    return {
        "type": "inventory",
        "full": True,
        "base": "",
        "digest": inv.digest(snap),
        "sections": snap,
    }


def report(server: Server, cid: int, secret: str, *messages: dict[str, Any]) -> dict[str, Any]:
    body = {"ack": 0, "messages": [{**m, "seq": i + 1} for i, m in enumerate(messages)]}
    r = exchange(server, cid, secret, body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def request_computers(server: Server, target: str) -> list[int] | str:
    with server.api() as api:
        r = api.post(
            "/requests",
            json={"type": "execute-script", "target": target, "params": {"argv": ["true"]}},
        )
    if r.status_code != 201:
        return f"{r.status_code}: {r.json()['error']}"
    return sorted(a["computer_id"] for a in activities_of(server, r.json()["id"]))


def test_targets_by_package_version_and_os(server: Server) -> None:
    token = enroll_token(server)
    a, sa = enrolled(server, token, "old-openssl")
    b, sb = enrolled(server, token, "new-openssl")
    c, sc = enrolled(server, token, "ubuntu")
    d, _ = enrolled(server, token, "silent")  # never reported: no inventory target picks it
    report(server, a, sa, full_inventory("debian", "12", {"openssl:amd64": "3.0.11-1~deb12u2"}))
    report(server, b, sb, full_inventory("debian", "12", {"openssl:amd64": "3.0.13-1~deb12u1"}))
    report(
        server,
        c,
        sc,
        full_inventory(
            "ubuntu", "22.04", {"openssl:amd64": "3.0.2-0ubuntu1.15", "openssl:i386": "3.0.14-1"}
        ),
    )
    assert request_computers(server, "package:openssl<3.0.13") == [a, c]
    assert request_computers(server, "package:openssl>=3.0.13") == [b, c]  # any architecture
    assert request_computers(server, "package:openssl=3.0.13-1~deb12u1") == [b]
    assert request_computers(server, "package:openssl") == [a, b, c]
    assert request_computers(server, "os:debian-12") == [a, b]
    assert request_computers(server, "os:ubuntu") == [c]
    assert request_computers(server, "os:ubuntu-22.04") == [c]
    none = request_computers(server, "os:debian-13")
    assert none == "404: nothing to target: no computer runs debian-13"
    none = request_computers(server, "package:openssl<1.0")
    assert isinstance(none, str) and none.startswith("404: nothing to target: no computer has")
    assert request_computers(server, "package:Bad;Name").startswith("400")  # type: ignore[union-attr]
    assert d not in request_computers(server, "package:openssl")  # type: ignore[operator]
    # A removed computer is no target any more.
    with server.api() as api:
        assert api.delete(f"/computers/{a}").status_code == 200
    assert request_computers(server, "package:openssl<3.0.13") == [c]
    assert computer(server, a)["inventory"]["os"] == {
        "id": "debian",
        "pretty_name": "debian 12",
        "version_id": "12",
    }  # its history (and inventory) still reads


# -- behind a relay ---------------------------------------------------------------------


def test_an_agent_behind_a_relay_is_asked_for_its_whole_inventory_when_a_delta_misses(
    server: Server,
    start_relay: Callable[..., Relay],
    start_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    """The server asks for the whole inventory when a delta does not fit what it holds;
    an agent behind a relay hears it too (the relay passes the ask on)."""
    adm = tmp_path / "dpkg"
    adm.mkdir()
    (adm / "status").write_text(OPENSSL + TOOL)
    relay = start_relay(server, "--poll-interval", "1")
    agent = start_agent(
        relay.url,
        enroll_token(server),
        "--inventory-admindir",
        str(adm),
        "--inventory-min-interval",
        "0",
        inventory=True,
    )
    cid = agent.computer_id
    wait_until(
        lambda: (computer(server, cid)["inventory"] or {}).get("packages") == 2,
        COLLECTED,
        "the first inventory through the relay",
    )
    # The agent's record of what it last sent no longer matches the server's: its next
    # delta is made against another base, which the server cannot apply.
    snap = agent.state_dir / "inventory.json"
    state = json.loads(snap.read_text())
    snap.write_text(json.dumps({**state, "digest": "0" * 32}))
    new = STATUS.format(name="taskfleet-new", arch="amd64", version="1.0-1")
    (adm / "status").write_text(OPENSSL + TOOL + new)
    req = run_request(server, f"computer:{cid}", {"argv": ["true"]})
    request_done(server, req["id"])
    wait_until(
        lambda: computer(server, cid)["inventory"]["packages"] == 3,
        2 * COLLECTED,  # a delta the server refuses, then the whole one
        "the whole inventory the server asked for",
    )
    assert [k for k, _ in queued(agent)] == ["whole", "delta", "whole"]
