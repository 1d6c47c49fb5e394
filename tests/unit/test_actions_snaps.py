"""The snaps types: their parameters (domain/actions/snaps.py) and their agent handlers
(agent/actions/snaps.py).

snapd cannot be had on the machines taskfleet is built on (no snapd, no systemd to run
it), so ``unsupported`` is tested for real here (no snap command: "snapd is not
installed"), and the handlers' argv and how they read snap's answers are tested with a
fake ``snap`` executable put first on PATH for those tests only: it records its argv
and answers as snap does.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from taskfleet.agent.actions import snaps as handlers
from taskfleet.agent.actions.context import ActionContext, ActionEnv, ActionOutcome
from taskfleet.agent.actions.registry import capabilities, handler
from taskfleet.domain.actions import ACTION_TYPES, allowed_types, validate_action
from taskfleet.process import start_script

SNAP_TYPES = ["snap-hold", "snap-install", "snap-refresh", "snap-remove", "snap-unhold"]


def refused(type_: str, params: Any, says: str) -> None:
    with pytest.raises(ValueError) as err:
        validate_action(type_, params)
    assert says in str(err.value), str(err.value)


def test_the_types_are_the_snaps_family() -> None:
    assert set(allowed_types(["snaps"])) == {*SNAP_TYPES, "resync"}
    assert all(ACTION_TYPES[t].changes_system for t in SNAP_TYPES)


def test_parameters_are_normalised() -> None:
    assert validate_action("snap-install", {"names": ["hello", "lxd"]}) == {
        "names": ["hello", "lxd"],
        "channel": None,
        "classic": False,
    }
    for channel in ("stable", "latest/edge", "3.2", "1.0/beta/fix-123", "edge/hotfix"):
        out = validate_action("snap-install", {"names": ["code"], "channel": channel})
        assert out["channel"] == channel
    assert validate_action("snap-install", {"names": ["code"], "classic": True})["classic"]
    assert validate_action("snap-refresh", {}) == {"names": [], "channel": None}
    assert validate_action("snap-hold", {"names": ["a1"]}) == {
        "names": ["a1"],
        "hold_for": "forever",
    }
    assert validate_action("snap-hold", {"names": ["a1"], "hold_for": 3600})["hold_for"] == 3600
    assert validate_action("snap-unhold", {"names": ["a-b-c"]}) == {"names": ["a-b-c"]}
    assert validate_action("snap-remove", {"names": ["x" * 40]}) == {"names": ["x" * 40]}


@pytest.mark.parametrize(
    "name",
    [
        "Hello",
        "hello world",
        "-hello",
        "hello-",
        "he--llo",
        "--devmode",
        "-oDir=/",
        "hello;reboot",
        "$(id)",
        "",
        "x" * 41,
        "héllo",
        "hello_world",
        "hello\n",
        5,
        None,
        True,
    ],
)
def test_bad_snap_names_are_refused(name: Any) -> None:
    for type_ in SNAP_TYPES:
        refused(type_, {"names": [name]}, "is not a valid snap name")


@pytest.mark.parametrize(
    ("type_", "params", "says"),
    [
        ("snap-install", {}, "missing parameter(s): names"),
        ("snap-install", {"names": []}, "names must be a non-empty list"),
        ("snap-install", {"names": "hello"}, "names must be a non-empty list"),
        ("snap-install", {"names": ["a1"] * 1001}, "at most 1000"),
        ("snap-install", {"names": ["a1", "b2"], "channel": "edge"}, "exactly one snap"),
        ("snap-install", {"names": ["a1", "b2"], "classic": True}, "exactly one snap"),
        ("snap-install", {"names": ["a1"], "classic": "yes"}, "classic must be true or false"),
        (
            "snap-install",
            {"names": ["a1"], "channel": "latest/edge;id"},
            "not a valid snap channel",
        ),
        ("snap-install", {"names": ["a1"], "channel": "--edge"}, "not a valid snap channel"),
        ("snap-install", {"names": ["a1"], "channel": "a/b/c/d"}, "not a valid snap channel"),
        ("snap-install", {"names": ["a1"], "channel": "latest/nightly"}, "snap channel"),
        ("snap-install", {"names": ["a1"], "channel": 5}, "not a valid snap channel"),
        ("snap-install", {"names": ["a1"], "devmode": True}, "unknown parameter(s): devmode"),
        ("snap-refresh", {"channel": "edge"}, "exactly one snap"),
        ("snap-refresh", {"names": None}, "names must be a list"),
        ("snap-hold", {"names": ["a1"], "hold_for": 0}, "hold_for must be an integer"),
        ("snap-hold", {"names": ["a1"], "hold_for": -5}, "hold_for must be an integer"),
        ("snap-hold", {"names": ["a1"], "hold_for": True}, "hold_for must be an integer"),
        ("snap-hold", {"names": ["a1"], "hold_for": 1.5}, "hold_for must be an integer"),
        ("snap-hold", {"names": ["a1"], "hold_for": "1h"}, "hold_for must be an integer"),
        ("snap-hold", {"names": ["a1"], "hold_for": 10**12}, "hold_for must be an integer"),
        ("snap-hold", {"hold_for": 60}, "missing parameter(s): names"),
        ("snap-unhold", {"names": []}, "non-empty list"),
        ("snap-remove", ["hello"], "params must be an object"),
    ],
)
def test_refusals(type_: str, params: Any, says: str) -> None:
    refused(type_, params, says)


def test_unsupported_for_real_without_snapd(tmp_path: Path) -> None:
    if shutil.which("snap") is not None:
        pytest.skip("this machine has a snap command")
    env = ActionEnv()
    assert handlers.unsupported(env) == "snapd is not installed (no snap command)"
    runs, cannot = capabilities(env, SNAP_TYPES)
    assert runs == [] and cannot == dict.fromkeys(SNAP_TYPES, handlers.unsupported(env))


FAKE_SNAP = """#!{python}
import json, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
names = [a for a in args[1:] if not a.startswith("-")]
if "nosuch" in names:
    print('error: snap "nosuch" not found', file=sys.stderr)
    sys.exit(1)
if args[0] == "install":
    for n in names:
        print(f"{{n}} 1.0 from Tester installed")
elif args[0] == "remove":
    for n in names:
        print(f"{{n}} removed")
elif any(a.startswith("--hold") for a in args):
    for n in names:
        print(f'General refreshes of "{{n}}" held indefinitely')
elif "--unhold" in args:
    for n in names:
        print(f'Removed general refresh hold of "{{n}}"')
elif not names:
    print("All snaps up to date.", file=sys.stderr)
else:
    for n in names:
        print(f"{{n}} 1.1 from Tester refreshed")
"""


@pytest.fixture
def fake_snap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake ``snap`` first on PATH (this test only); returns the file of its argvs."""
    folder = tmp_path / "bin"
    folder.mkdir()
    log = tmp_path / "argv.jsonl"
    script = folder / "snap"
    script.write_text(FAKE_SNAP.format(python=sys.executable, log=str(log)))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', os.defpath)}")
    return log


def run(type_: str, params: dict[str, Any]) -> ActionOutcome:
    ctx = ActionContext(
        ActionEnv(), op=1, params=validate_action(type_, params), timeout=30, start=start_script
    )
    return asyncio.run(_handler(type_).run(ctx))


def argvs(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_handlers_run_snap_with_these_arguments_and_say_what_it_said(fake_snap: Path) -> None:
    cases = [
        ("snap-install", {"names": ["hello", "jq"]}, ["install", "hello", "jq"]),
        (
            "snap-install",
            {"names": ["code"], "channel": "latest/edge", "classic": True},
            ["install", "--channel=latest/edge", "--classic", "code"],
        ),
        ("snap-remove", {"names": ["hello"]}, ["remove", "hello"]),
        ("snap-refresh", {}, ["refresh"]),
        ("snap-refresh", {"names": ["jq"], "channel": "beta"}, ["refresh", "--channel=beta", "jq"]),
        ("snap-hold", {"names": ["jq"]}, ["refresh", "--hold=forever", "jq"]),
        ("snap-hold", {"names": ["jq"], "hold_for": 7200}, ["refresh", "--hold=7200s", "jq"]),
        ("snap-unhold", {"names": ["jq", "hello"]}, ["refresh", "--unhold", "jq", "hello"]),
    ]
    lines = []
    for type_, params, _ in cases:
        out = run(type_, params)
        assert out.status == "succeeded", out
        lines.append(out.line)
    assert argvs(fake_snap) == [argv for _, _, argv in cases]
    assert lines == [
        "hello 1.0 from Tester installed; jq 1.0 from Tester installed",
        "code 1.0 from Tester installed",
        "hello removed",
        "All snaps up to date.",
        "jq 1.1 from Tester refreshed",
        'General refreshes of "jq" held indefinitely',
        'General refreshes of "jq" held indefinitely',
        'Removed general refresh hold of "jq"; Removed general refresh hold of "hello"',
    ]


def test_a_failure_says_snaps_error(fake_snap: Path) -> None:
    out = run("snap-install", {"names": ["nosuch"]})
    assert out.status == "failed"
    assert out.line == 'snap exited 1: error: snap "nosuch" not found'


def test_unsupported_with_a_snap_command(
    fake_snap: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = tmp_path / "snapd.socket"
    monkeypatch.setattr(handlers, "SNAPD_SOCKET", sock)
    assert handlers.unsupported(ActionEnv()) == (
        f"snapd is not installed or not running (no {sock})"
    )
    assert handlers.unsupported(ActionEnv(root=tmp_path)) == (
        f"snapd manages only the system the agent runs on, not the root {tmp_path}"
    )
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
        assert handlers.unsupported(ActionEnv()) is None


def test_the_schemas_patterns_are_plain_ecma_regexes() -> None:
    """JSON Schema patterns are ECMA-262: no Python-only syntax such as ``\\Z``."""
    text = json.dumps([ACTION_TYPES[t].schema for t in SNAP_TYPES])
    assert "\\\\Z" not in text and "(?P<" not in text


def _handler(name: str) -> Any:
    found = handler(name)
    assert found is not None, name
    return found
