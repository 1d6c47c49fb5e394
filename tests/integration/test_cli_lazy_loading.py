"""`taskfleet COMMAND` imports only COMMAND's module; `taskfleet agent` stays lean.

The agent runs on production machines (README, architecture: idle RSS), so it
must not pay for the admin commands, httpx or rich, nor for a compiled library
(issue 11: it verifies signatures in pure Python, without PyNaCl and cffi). Run
in a fresh interpreter: the test process has imported everything already.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from taskfleet.cli import COMMANDS

PROBE = """\
import json, sys
from taskfleet.cli import root
try:
    root(sys.argv[1:], prog_name="taskfleet")
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""
IMPORT_AGENT = """\
import json, sys
import taskfleet.agent.main
print(json.dumps(sorted(sys.modules)))
"""
COMPILED = {"nacl", "cffi", "_cffi_backend"}
HELPERS = {
    "taskfleet.cli.client",
    "taskfleet.cli.lifecycle",
    "taskfleet.cli.options",
    "taskfleet.cli.output",
    "taskfleet.cli.typed",
}


def _loaded(*args: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60
    )
    return set(json.loads(out.stderr.splitlines()[-1]))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_command_loads_only_its_own_module(command: str) -> None:
    cli_modules = {m for m in _loaded(command, "--help") if m.startswith("taskfleet.cli.")}
    assert cli_modules - HELPERS == {f"taskfleet.cli.{COMMANDS[command]}"}


def test_the_agent_loads_no_admin_module_nor_httpx_nor_rich() -> None:
    loaded = _loaded("agent", "--help")
    assert {m for m in loaded if m.startswith("taskfleet.cli.")} == {
        "taskfleet.cli.agent",
        "taskfleet.cli.options",
        "taskfleet.cli.output",
    }
    assert not {"httpx", "rich", "taskfleet.server"} & loaded


def test_the_agent_loads_no_compiled_crypto() -> None:
    agent = subprocess.run(
        [sys.executable, "-c", IMPORT_AGENT], capture_output=True, text=True, timeout=60
    )
    for loaded in (set(json.loads(agent.stdout)), _loaded("agent", "--help")):
        assert not {m.split(".")[0] for m in loaded} & COMPILED


def test_the_relay_process_loads_no_admin_module_nor_httpx_nor_the_server(
    tmp_path: Path,
) -> None:
    # The relay runs (imports everything it needs) and stops at once: its port is taken.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        loaded = _loaded(
            "relay",
            "--server",
            "http://127.0.0.1:9",
            "--state-dir",
            str(tmp_path / "relay"),
            "--listen",
            f"127.0.0.1:{port}",
            "--tickle-port",
            "0",
        )
    assert "taskfleet.relay.main" in loaded and "uvicorn" in loaded
    assert {m for m in loaded if m.startswith("taskfleet.cli.")} == {
        "taskfleet.cli.relays",
        "taskfleet.cli.client",  # for the admin subcommands' options; httpx stays out
        "taskfleet.cli.options",
        "taskfleet.cli.output",
    }
    assert not {"httpx", "rich", "taskfleet.server", "fastapi"} & loaded
