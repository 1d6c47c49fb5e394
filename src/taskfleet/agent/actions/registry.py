"""Each typed activity's agent handler (``handler``), and what this agent can run
(``capabilities``).

A family's handlers (``agent/actions/<family>.py``, one module per family of
``domain/actions.FAMILIES``) are imported the first time one of its types is
needed: enabled at start, or an operation of that type arriving. An agent that
runs scripts only loads the ``system`` family (its always-enabled resync) and
never the others: each costs memory in every agent process (benchmarks/README.md,
agent idle RSS).
"""

from __future__ import annotations

import importlib

from taskfleet.agent.actions.context import ActionEnv, AgentAction
from taskfleet.domain.actions import ACTION_TYPES, FAMILIES

_FAMILY_OF = {t.name: f.name for f in FAMILIES for t in f.types}


def handler(name: str) -> AgentAction | None:
    """The handler of typed activity ``name`` (its family's module loads now), or None."""
    family = _FAMILY_OF.get(name)
    if family is None:
        return None
    module = importlib.import_module(f"taskfleet.agent.actions.{family}")
    handlers: dict[str, AgentAction] = module.HANDLERS
    return handlers.get(name)


def capabilities(env: ActionEnv, enabled: list[str]) -> tuple[list[str], dict[str, str]]:
    """(types this agent runs, type -> why it cannot) for the ``enabled`` typed
    activities: a type without a handler, or whose tool this computer lacks, is
    unsupported, with the reason the server quotes when it refuses work up front."""
    runs: list[str] = []
    cannot: dict[str, str] = {}
    for name in enabled:
        found = handler(name)
        why = "this agent has no handler for it" if found is None else found.unsupported(env)
        if why is None and name in ACTION_TYPES:
            runs.append(name)
        elif why is not None:
            cannot[name] = why[:200]
    return sorted(runs), cannot
