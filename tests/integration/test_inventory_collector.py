"""The inventory collector against a captured root, a test-owned dpkg database and as
the agent's child process (real dpkg-query and apt-get; tests/data/inventory/)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from taskfleet.agent import inventory as ai

DATA = Path(__file__).resolve().parents[1] / "data" / "inventory"


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for rel, name in [
        ("etc/os-release", "os-release"),
        ("etc/passwd", "passwd"),
        ("etc/group", "group"),
        ("proc/cpuinfo", "cpuinfo"),
        ("proc/meminfo", "meminfo"),
        ("proc/mounts", "mounts"),
        ("proc/net/if_inet6", "if_inet6"),
        ("proc/net/fib_trie", "fib_trie"),
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / name, root / rel)
    return root


def test_collect_under_a_root_reports_what_is_missing(tmp_path: Path) -> None:
    """A captured root: the file sources read, the missing ones named with the reason."""
    snap = ai.collect(_root(tmp_path))
    assert snap["os"]["id"] == "debian" and snap["cpu"]["count"] == 2
    assert snap["users"]["root"]["uid"] == 0
    assert [d["mount"] for d in snap["disks"]] == ["/"]  # /dev/vda's "/" is the test root
    missing = snap["missing"]
    assert "kernel" in missing and "cannot read" in missing["kernel"]
    assert "packages" in missing and "upgrades" in missing  # no dpkg database under it
    assert set(snap) | set(missing) >= {"os", "kernel", "cpu", "packages", "users", "groups"}


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="no dpkg here")
def test_collect_with_a_test_admindir(tmp_path: Path) -> None:
    adm = tmp_path / "dpkg"
    adm.mkdir()
    (adm / "status").write_text(
        "Package: foo\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.0-1\n"
        "Maintainer: t <t@example.org>\nDescription: x\n"
    )
    snap = ai.collect(Path("/"), adm)
    assert snap["packages"] == {"foo:amd64": {"version": "1.0-1"}}
    assert snap["os"]["id"]  # the real machine's other sources
    assert "missing" not in snap or "packages" not in snap["missing"]


def test_a_failing_tool_is_missing_not_fatal() -> None:
    with pytest.raises(ai.SourceError, match="cannot run"):
        ai.run_tool(["/nonexistent/tool"])
    with pytest.raises(ai.SourceError, match="exited 1"):
        ai.run_tool(["false"])


def test_collector_process_prints_whole_then_delta_then_nothing(tmp_path: Path) -> None:
    state = tmp_path / "inventory.json"
    adm = tmp_path / "dpkg"
    adm.mkdir()
    status = (
        "Package: {n}\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1\n"
        "Maintainer: m\n\n"
    )
    (adm / "status").write_text(status.format(n="a"))
    args = ["--state", str(state), "--root", str(_root(tmp_path)), "--admindir", str(adm)]

    def run(*extra: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "taskfleet.agent.inventory", *args, *extra],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        nxt = state.with_name("inventory.json.next")
        if out.stdout:
            nxt.replace(state)
        return out.stdout

    whole = json.loads(run())
    assert whole["full"] is True and whole["sections"]["packages"] == {"a:amd64": {"version": "1"}}
    assert run() == ""  # nothing changed
    (adm / "status").write_text(status.format(n="a") + status.format(n="b"))
    d = json.loads(run())
    assert d["full"] is False and d["base"] == whole["digest"]
    assert d["sections"] == {"packages": {"set": {"b:amd64": {"version": "1"}}, "remove": []}}


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="no dpkg here")
def test_version_order_agrees_with_dpkg() -> None:
    """Real versions from this machine's packages, ordered by us and by dpkg itself."""
    from taskfleet.domain.versions import compare

    versions = sorted(
        {p["version"] for p in ai.parse_dpkg_query((DATA / "dpkg-query.txt").read_text()).values()}
    )[::12]
    versions += ["1.0~rc1", "1.0", "1.0a", "1.0+", "1:0.1", "3.0.13", "3.0.13-1~deb12u1"]
    pairs = [(a, b) for a in versions[::3] for b in versions[1::5]]
    for a, b in pairs:
        ours = compare(a, b)
        lt = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False).returncode
        eq = subprocess.run(["dpkg", "--compare-versions", a, "eq", b], check=False).returncode
        theirs = -1 if lt == 0 else 0 if eq == 0 else 1
        assert (ours > 0) - (ours < 0) == theirs, (a, b)
