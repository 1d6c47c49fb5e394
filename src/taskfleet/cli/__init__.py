"""The ``taskfleet`` command: one subcommand per part and per kind of work.

Contract: subcommands load on demand, one module each (``COMMANDS`` says
which): ``taskfleet agent`` imports only ``cli/agent.py`` and the lean shared
helpers (an agent runs on production machines and must stay lean; see
``benchmarks/real_agents.py``), and ``taskfleet COMMAND`` imports only the
module of COMMAND. Only ``--help`` of ``taskfleet`` itself loads them all (for
each command's short help).
"""

from __future__ import annotations

import importlib

import click

from taskfleet import __version__

# Command name -> the module under taskfleet.cli that defines it under that name
# ("-" spelled "_": ``unix-group`` is ``unix_group``).
COMMANDS = {
    "account": "login_accounts",
    "activity": "activities",
    "agent": "agent",
    "approval": "requests",
    "audit": "audit",
    "computer": "computers",
    "content": "content",
    "demo": "demo",
    "group": "groups",
    "job": "jobs",
    "login-link": "login_accounts",
    "packages": "packages",
    "relay": "relays",
    "request": "requests",
    "restart": "system",
    "resync": "system",
    "run": "requests",
    "schedule": "schedules",
    "server": "server",
    "shutdown": "system",
    "signal": "system",
    "snap": "snaps",
    "task": "tasks",
    "tenant": "tenants",
    "token": "tokens",
    "unix-group": "accounts",
    "user": "accounts",
    "worker": "worker",
}


class _Commands(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        loaded = importlib.import_module(f"taskfleet.cli.{module}")
        command = getattr(loaded, cmd_name.replace("-", "_"))
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="taskfleet")
def root() -> None:
    """taskfleet: run work on a fleet of computers and see where it truly stands."""


def main() -> None:
    root(prog_name="taskfleet")
