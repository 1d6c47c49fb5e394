"""The packages handlers with the real apt-get, apt-mark and dpkg against a throw-away
root and a local repository of .deb files built by the test (``tests/debrepo.py``):
install, hold, upgrade, remove and kernel changes are real, and this machine's own dpkg
and apt state stays as it was (checked around every test). No network.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskfleet.agent.actions import packages as handlers
from taskfleet.agent.actions.context import ActionContext, ActionEnv, ActionOutcome
from taskfleet.agent.actions.registry import handler
from taskfleet.domain.actions import validate_action
from taskfleet.process import start_script
from tests import debrepo

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("apt-get", "dpkg-deb", "dpkg")),
    reason="needs apt-get, dpkg and dpkg-deb",
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> debrepo.Repo:
    return debrepo.build_repo(tmp_path_factory.mktemp("debrepo"))


@pytest.fixture
def root(tmp_path: Path, repo: debrepo.Repo) -> Iterator[Path]:
    with debrepo.host_untouched():
        yield debrepo.make_root(tmp_path, repo)


def env_for(root: Path, **kw: Any) -> ActionEnv:
    options: dict[str, Any] = {"lock_timeout": 5, **kw}
    return ActionEnv(root=root, apt_options=debrepo.APT_OPTIONS, tmp_dir=root.parent, **options)


def run(env: ActionEnv, type_: str, params: dict[str, Any], timeout: float = 120) -> ActionOutcome:
    ctx = ActionContext(
        env, op=1, params=validate_action(type_, params), timeout=timeout, start=start_script
    )
    return asyncio.run(_handler(type_).run(ctx))


def ok(env: ActionEnv, type_: str, params: dict[str, Any]) -> str:
    out = run(env, type_, params)
    assert out.status == "succeeded", (out.line, out.stdout[-2000:], out.stderr[-2000:])
    return out.line


def test_install_with_and_without_version_and_a_dependency(root: Path) -> None:
    env = env_for(root)
    line = ok(env, "change-packages", {"install": [{"name": "tf-hello", "version": "1.0-1"}]})
    assert line == "installed tf-hello 1.0-1"
    assert debrepo.installed(root) == {"tf-hello": ("1.0-1", False)}
    assert (root / "usr/share/tf/tf-hello").read_text() == "1.0-1\n"
    line = ok(env, "change-packages", {"install": ["tf-tool"]})
    assert line == "installed tf-lib 1.0-1, tf-tool 1.0-1"
    assert ok(env, "change-packages", {"install": ["tf-tool"]}) == "nothing changed"
    assert set(debrepo.installed(root)) == {"tf-hello", "tf-lib", "tf-tool"}
    # apt's own lists, caches and logs are the root's
    assert any((root / "var/lib/apt/lists").glob("*Packages"))
    assert (root / "var/log/dpkg.log").read_text().count("status installed") == 3
    assert "tf-tool" in (root / "var/log/apt/history.log").read_text()


def test_hold_upgrade_unhold_remove(root: Path) -> None:
    env = env_for(root)
    ok(env, "change-packages", {"install": [{"name": "tf-other", "version": "1.0-1"}]})
    ok(env, "change-packages", {"install": [{"name": "tf-hello", "version": "1.0-1"}]})
    assert ok(env, "change-packages", {"hold": ["tf-other"]}) == "held tf-other"
    line = ok(env, "upgrade-packages", {})
    assert line == "upgraded tf-hello 1.0-1 -> 2.0-1"  # the held one stays
    assert debrepo.installed(root)["tf-other"] == ("1.0-1", True)
    assert ok(env, "change-packages", {"unhold": ["tf-other"]}) == "unheld tf-other"
    assert ok(env, "upgrade-packages", {}) == "upgraded tf-other 1.0-1 -> 1.1-1"
    assert ok(env, "upgrade-packages", {}) == "nothing to upgrade"
    line = ok(env, "change-packages", {"remove": ["tf-other"], "hold": ["tf-hello"]})
    assert line == "removed tf-other 1.1-1; held tf-hello"
    assert debrepo.installed(root) == {"tf-hello": ("2.0-1", True)}


def test_install_and_remove_in_one_transaction_with_purge(root: Path) -> None:
    env = env_for(root)
    ok(env, "change-packages", {"install": ["tf-hello"]})
    line = ok(
        env, "change-packages", {"install": ["tf-lib"], "remove": ["tf-hello"], "purge": True}
    )
    assert line == "installed tf-lib 1.0-1; removed tf-hello 2.0-1"
    assert not (root / "usr/share/tf/tf-hello").exists()


def test_upgrade_security_only_takes_only_security_upgrades(root: Path) -> None:
    env = env_for(root)
    ok(
        env,
        "change-packages",
        {
            "install": [
                {"name": "tf-hello", "version": "1.0-1"},
                {"name": "tf-other", "version": "1.0-1"},
            ]
        },
    )
    line = ok(env, "upgrade-packages", {"security_only": True})
    assert line == "upgraded tf-hello 1.0-1 -> 2.0-1"
    assert debrepo.installed(root)["tf-other"] == ("1.0-1", False)
    assert ok(env, "upgrade-packages", {"security_only": True}) == "no security upgrades pending"
    assert ok(env, "upgrade-packages", {"dist_upgrade": True}) == "upgraded tf-other 1.0-1 -> 1.1-1"


def test_kernel_upgrade_and_downgrade(root: Path) -> None:
    env = env_for(root)
    line = ok(env, "upgrade-kernel", {"package": "linux-image-tf", "version": "1.0-1"})
    assert line == "installed linux-image-tf 1.0-1"
    assert ok(env, "upgrade-kernel", {}) == "upgraded linux-image-tf 1.0-1 -> 2.0-1"
    out = run(env, "upgrade-kernel", {"package": "linux-image-tf", "version": "1.0-1"})
    assert out.status == "failed" and "older than the installed 2.0-1" in out.line
    line = ok(env, "downgrade-kernel", {"package": "linux-image-tf", "version": "1.0-1"})
    assert line == "downgraded linux-image-tf 2.0-1 -> 1.0-1"
    out = run(env, "downgrade-kernel", {"package": "linux-image-tf", "version": "2.0-1"})
    assert out.status == "failed" and "is not older than the installed 1.0-1" in out.line
    assert debrepo.installed(root)["linux-image-tf"] == ("1.0-1", False)


def test_an_unknown_package_fails_with_apts_reason_and_changes_nothing(root: Path) -> None:
    env = env_for(root)
    out = run(env, "change-packages", {"install": ["tf-hello", "tf-nosuch"]})
    assert out.status == "failed"
    assert "Unable to locate package tf-nosuch" in out.line, out.line
    assert debrepo.installed(root) == {}


@pytest.mark.parametrize(
    ("type_", "params"),
    [
        ("change-packages", {"install": ["tf-hello"]}),
        ("change-packages", {"hold": ["tf-lib"]}),
    ],
)
def test_a_held_dpkg_lock_is_waited_for_then_fails_saying_so(
    root: Path, type_: str, params: dict[str, Any]
) -> None:
    env = env_for(root, lock_timeout=2)
    ok(env, "change-packages", {"install": ["tf-lib"]})
    before = debrepo.installed(root)
    with debrepo.dpkg_lock_held(root) as pid:
        started = time.monotonic()
        out = run(env, type_, params)
        waited = time.monotonic() - started
    assert out.status == "failed", out.line
    assert f"the dpkg lock is held by another process (pid {pid}, python" in out.line, out.line
    assert out.line.endswith("after waiting 2 s"), out.line
    assert waited >= 1.9
    assert debrepo.installed(root) == before
    assert run(env, type_, params).status == "succeeded"  # released: it goes through


def test_unsupported_without_a_dpkg_database_or_apt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = ActionEnv(root=tmp_path)
    assert handlers.unsupported(env) == (
        f"no dpkg database at {tmp_path}/var/lib/dpkg (not a Debian system?)"
    )
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_text("")
    assert handlers.unsupported(env) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get here
    assert handlers.unsupported(env) == "apt-get is not installed (not a Debian system?)"


def test_the_apt_configuration_file_is_removed_and_host_config_not_read(root: Path) -> None:
    env = env_for(root)
    with handlers.apt_for(env) as apt:
        config = Path(apt.env["APT_CONFIG"])
        assert config.read_text() == (
            f'Dir "{root}/";\nDir::State::status "{root}/var/lib/dpkg/status";\n'
        )
    assert not config.exists()
    assert not list(root.parent.glob("apt-*.conf"))


def test_apt_reads_the_roots_configuration_not_this_machines(root: Path) -> None:
    (root / "etc/apt/apt.conf.d/50taskfleet-test").write_text('Taskfleet::Marker "root";\n')
    with handlers.apt_for(env_for(root)) as apt:
        dump = subprocess.run(
            ["apt-config", *apt.options, "dump"],
            env={**os.environ, **apt.env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    assert 'Taskfleet::Marker "root";' in dump
    assert f'Dir::Etc::parts "{root}/etc/apt/apt.conf.d/"' in dump or (
        f'Dir "{root}/";' in dump and 'Dir::Etc::parts "apt.conf.d";' in dump
    )
    # this machine's hooks (debconf, packagekit, ...) would run here: none is read
    for hook in ("DPkg::Pre-Install-Pkgs", "DPkg::Post-Invoke", "DPkg::Pre-Invoke"):
        assert hook not in dump, hook


def test_a_failed_list_refresh_is_said_and_the_old_lists_used(root: Path) -> None:
    env = env_for(root)
    ok(env, "change-packages", {"install": ["tf-lib"]})  # the lists are fetched
    sources = root / "etc/apt/sources.list"
    missing = root.parent / "no-such-repository"
    sources.write_text(sources.read_text() + f"deb [trusted=yes] file://{missing} ./\n")
    line = ok(env, "change-packages", {"install": ["tf-hello"]})
    assert line.startswith("installed tf-hello 2.0-1 (apt-get update failed, the package lists")
    assert "E: Some index files failed to download" in line, line


def _handler(name: str) -> Any:
    found = handler(name)
    assert found is not None, name
    return found
