"""The agent's typed activities (SPEC 2.3): how each type runs on this computer.

Contract: ``HANDLERS`` maps each typed activity (``domain/actions``) to an
:class:`AgentAction`: ``run`` does the work through ``ActionContext.run``, which
starts the system's own tools as argv (never a shell) in a process group the
agent tracks like a script's (a cancel stops it, the scrubber sees its PID), and
returns an :class:`ActionOutcome` whose line says what changed; ``unsupported``
says why this computer cannot run the type (a tool it lacks), or None.
Parameters reach a handler already validated by ``domain/actions`` (the agent
checks them again when the operation arrives). Each family's handlers live in
their own module; this module only gathers them. ``agent/actions/context.py``
holds what a handler is given.
"""

from __future__ import annotations

from taskfleet.agent.actions import accounts, packages, snaps, system
from taskfleet.agent.actions.context import (
    ActionCanceled,
    ActionContext,
    ActionEnv,
    ActionOutcome,
    AgentAction,
    Ran,
)
from taskfleet.domain.actions import ACTION_TYPES

HANDLERS: dict[str, AgentAction] = {
    **accounts.HANDLERS,
    **packages.HANDLERS,
    **snaps.HANDLERS,
    **system.HANDLERS,
}

__all__ = [
    "HANDLERS",
    "ActionCanceled",
    "ActionContext",
    "ActionEnv",
    "ActionOutcome",
    "AgentAction",
    "Ran",
    "capabilities",
]


def capabilities(env: ActionEnv, enabled: list[str]) -> tuple[list[str], dict[str, str]]:
    """(types this agent runs, type -> why it cannot) for the ``enabled`` typed
    activities: a type without a handler, or whose tool this computer lacks, is
    unsupported, with the reason the server quotes when it refuses work up front."""
    runs: list[str] = []
    cannot: dict[str, str] = {}
    for name in enabled:
        handler = HANDLERS.get(name)
        why = "this agent has no handler for it" if handler is None else handler.unsupported(env)
        if why is None and name in ACTION_TYPES:
            runs.append(name)
        elif why is not None:
            cannot[name] = why[:200]
    return sorted(runs), cannot
