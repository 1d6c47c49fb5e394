"""Typed client activities (SPEC 2.3): every type's name, parameter schema and rules.

Contract: ``ACTION_TYPES`` maps each typed activity's wire name (the request's
``type``) to an :class:`ActionType`: ``validate`` returns the normalised
parameters or raises ``ValueError`` naming the first bad field (the server
checks a request with it before anything is stored, the agent again before it
runs), ``schema`` is the JSON Schema the OpenAPI document shows. Each family of
types lives in its own module (``accounts``, ``packages``, ``snaps``,
``system``); this module only gathers them.

The computer's owner keeps the last word: an agent runs a type only if its own
configuration enables it (``allowed_types``: default none of the types that
change the system) and the computer has the tool it needs. The agent reports
both in its policy (``types``: what it runs; ``unsupported``: type -> why it
cannot), and :func:`action_refusal` is the one rule both sides apply.
Execute Script and Job keep their own modules (``domain/scripts.py``,
``domain/jobs.py``); they are enabled by the agent's script switch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from taskfleet.domain.actions import accounts, packages, snaps, system
from taskfleet.domain.actions.base import ActionType


@dataclass(frozen=True)
class Family:
    name: str  # what an agent's --allow-type may name for all its types
    types: tuple[ActionType, ...]


FAMILIES: tuple[Family, ...] = (
    Family("accounts", accounts.TYPES),
    Family("packages", packages.TYPES),
    Family("snaps", snaps.TYPES),
    Family("system", system.TYPES),
)

ACTION_TYPES: dict[str, ActionType] = {t.name: t for f in FAMILIES for t in f.types}

__all__ = [
    "ACTION_TYPES",
    "FAMILIES",
    "ActionType",
    "action_refusal",
    "allowed_types",
    "validate_action",
]


def validate_action(type: str, params: Any) -> dict[str, Any]:
    """``params`` of typed activity ``type`` normalised; ``ValueError`` if bad or unknown."""
    action = ACTION_TYPES.get(type)
    if action is None:
        raise ValueError(f"unknown activity type {type!r}")
    return action.validate(params)


def allowed_types(names: Iterable[str]) -> list[str]:
    """The typed activities an agent's ``--allow-type`` names enable: each name is a type
    or a family (``accounts``, ``packages``, ``snaps``, ``system``); ``all`` is every one.
    The types that change nothing are always enabled. ``ValueError`` for an unknown name."""
    out = {t.name for t in ACTION_TYPES.values() if not t.changes_system}
    families = {f.name: f for f in FAMILIES}
    for name in names:
        if name == "all":
            out |= set(ACTION_TYPES)
        elif name in families:
            out |= {t.name for t in families[name].types}
        elif name in ACTION_TYPES:
            out.add(name)
        else:
            known = ", ".join(["all", *families, *sorted(ACTION_TYPES)])
            raise ValueError(f"unknown activity type or family {name!r} (known: {known})")
    return sorted(out)


def action_refusal(policy: dict[str, Any] | None, type: str) -> str | None:
    """Why an agent with this reported policy would refuse typed activity ``type``, or None."""
    # Exact checks only: a policy stored by an older agent may lack the fields.
    if not isinstance(policy, dict):
        return f"activity type {type!r} is not enabled in its configuration"
    unsupported = policy.get("unsupported")
    if isinstance(unsupported, dict) and isinstance(unsupported.get(type), str):
        return f"{type} is not supported on it: {unsupported[type]}"
    types = policy.get("types")
    if not (isinstance(types, list) and type in types):
        return f"activity type {type!r} is not enabled in its configuration"
    return None
