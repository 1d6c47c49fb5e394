"""``taskfleet packages`` and ``taskfleet snap`` (cli/packages.py, cli/snaps.py): each
command posts its typed activity with the parameters its arguments and options give, a
body the server's schema accepts; what the CLI itself refuses, it refuses before
posting."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from taskfleet.cli import root
from taskfleet.domain.actions import validate_action


@pytest.mark.parametrize(
    ("args", "type_", "params"),
    [
        (["packages", "install", "tf-hello", "libc6:amd64=2.36-9"], "change-packages",
         {"install": ["tf-hello", {"name": "libc6:amd64", "version": "2.36-9"}]}),
        (["packages", "remove", "a1", "b2", "--purge"], "change-packages",
         {"remove": ["a1", "b2"], "purge": True}),
        (["packages", "remove", "a1"], "change-packages", {"remove": ["a1"], "purge": False}),
        (["packages", "hold", "a1"], "change-packages", {"hold": ["a1"]}),
        (["packages", "unhold", "a1"], "change-packages", {"unhold": ["a1"]}),
        (["packages", "upgrade"], "upgrade-packages",
         {"security_only": False, "dist_upgrade": False}),
        (["packages", "upgrade", "--all"], "upgrade-packages",
         {"security_only": False, "dist_upgrade": False}),
        (["packages", "upgrade", "--security-only", "--dist-upgrade"], "upgrade-packages",
         {"security_only": True, "dist_upgrade": True}),
        (["packages", "upgrade-kernel"], "upgrade-kernel", {}),
        (["packages", "upgrade-kernel", "--package", "linux-image-amd64", "--version", "6.1-1"],
         "upgrade-kernel", {"package": "linux-image-amd64", "version": "6.1-1"}),
        (["packages", "downgrade-kernel", "--package", "linux-image-x", "--version", "1.0"],
         "downgrade-kernel", {"package": "linux-image-x", "version": "1.0"}),
        (["snap", "install", "hello", "jq"], "snap-install",
         {"names": ["hello", "jq"], "classic": False}),
        (["snap", "install", "code", "--channel", "latest/edge", "--classic"], "snap-install",
         {"names": ["code"], "classic": True, "channel": "latest/edge"}),
        (["snap", "remove", "hello"], "snap-remove", {"names": ["hello"]}),
        (["snap", "refresh"], "snap-refresh", {"names": []}),
        (["snap", "refresh", "jq", "--channel", "beta"], "snap-refresh",
         {"names": ["jq"], "channel": "beta"}),
        (["snap", "hold", "jq"], "snap-hold", {"names": ["jq"], "hold_for": "forever"}),
        (["snap", "hold", "jq", "--for", "3600"], "snap-hold", {"names": ["jq"], "hold_for": 3600}),
        (["snap", "unhold", "jq"], "snap-unhold", {"names": ["jq"]}),
    ],
)  # fmt: skip
def test_each_command_posts_its_type(
    monkeypatch: pytest.MonkeyPatch, args: list[str], type_: str, params: dict[str, Any]
) -> None:
    sent: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    module = "packages" if args[0] == "packages" else "snaps"
    monkeypatch.setattr(
        f"taskfleet.cli.{module}.submit", lambda t, p, **common: sent.append((t, p, common))
    )
    out = CliRunner().invoke(root, [*args, "--target", "computer:7", "--wait"])
    assert out.exit_code == 0, out.output
    ((t, p, common),) = sent
    assert (t, p) == (type_, params)
    assert common["target"] == "computer:7" and common["wait"] is True
    validate_action(t, p)  # the server takes it


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["packages", "remove", "a1=1.0"], "takes package names, not NAME=VERSION"),
        (["packages", "hold", "a1=1.0"], "takes package names, not NAME=VERSION"),
        (["snap", "hold", "jq", "--for", "1h"], "--for takes whole seconds or forever"),
        (["packages", "install"], "Missing argument"),
        (["packages", "downgrade-kernel", "--package", "linux-image-x"], "--version"),
    ],
)
def test_refused_before_posting(
    monkeypatch: pytest.MonkeyPatch, args: list[str], says: str
) -> None:
    sent: list[Any] = []
    for module in ("packages", "snaps"):
        monkeypatch.setattr(f"taskfleet.cli.{module}.submit", lambda *a, **k: sent.append(a))
    out = CliRunner().invoke(root, [*args, "--target", "all"])
    assert out.exit_code != 0
    assert says in out.output, out.output
    assert sent == []
