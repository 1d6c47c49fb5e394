"""The ``taskfleet`` command: one subcommand per part and per kind of work.

Subcommands load on demand: ``taskfleet agent`` imports only ``cli/agent.py``
(an agent runs on production machines and must stay lean); every other
command lives in ``cli/main.py``, imported when one of them runs or for help.
"""

from __future__ import annotations

import math
from typing import Any

import click

from taskfleet import __version__


class FiniteFloat(click.ParamType):
    """A float option that refuses nan and infinity with a usage error (exit 2)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float) and math.isfinite(value):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE_FLOAT = FiniteFloat()


class _Commands(click.Group):
    @staticmethod
    def _admin() -> click.Group:
        from taskfleet.cli.main import cli

        return cli

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self._admin().list_commands(ctx), "agent"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "agent":
            from taskfleet.cli.agent import agent

            return agent
        return self._admin().get_command(ctx, cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="taskfleet")
def root() -> None:
    """taskfleet: run work on a fleet of computers and see where it truly stands."""


def main() -> None:
    root(prog_name="taskfleet")
