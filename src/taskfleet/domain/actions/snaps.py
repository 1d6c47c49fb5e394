"""Snaps activities (SPEC 2.3): Install, Remove, Refresh, Hold and Unhold Snaps.

Contract: see ``domain/actions/base.py``. A snap name is snapd's rule (lower-case
letters, digits and single inner hyphens, 1..40 characters); a channel is
``[TRACK/]RISK[/BRANCH]`` with RISK one of stable, candidate, beta, edge, or a
TRACK alone (snap reads it as TRACK/stable). snap takes a channel (and
``--classic``) for one snap at a time, so those need exactly one name.

* ``snap-install``: ``names`` (not empty), ``channel``, ``classic`` (default false).
* ``snap-remove``: ``names`` (not empty).
* ``snap-refresh``: ``names`` (empty or absent: every snap), ``channel``.
* ``snap-hold``: ``names`` (not empty), ``hold_for``: seconds (1..10 years) or
  ``"forever"`` (the default): automatic refreshes of those snaps wait that long.
* ``snap-unhold``: ``names`` (not empty).
"""

from __future__ import annotations

import re
from typing import Any

from taskfleet.domain.actions.base import (
    MAX_ITEMS,
    ActionType,
    boolean,
    integer,
    matching,
    name_list,
    params_object,
)

SNAP_INSTALL = "snap-install"
SNAP_REMOVE = "snap-remove"
SNAP_REFRESH = "snap-refresh"
SNAP_HOLD = "snap-hold"
SNAP_UNHOLD = "snap-unhold"

SNAP_NAME = re.compile(r"(?=[a-z0-9-]{1,40}\Z)[a-z0-9](?:-?[a-z0-9])*")
RISKS = ("stable", "candidate", "beta", "edge")
_TRACK = r"[a-z0-9][a-z0-9._\-]{0,27}"
_RISK = "|".join(RISKS)
CHANNEL = re.compile(
    rf"(?:(?:{_TRACK})/)?(?:{_RISK})(?:/[a-z0-9][a-z0-9._\-]{{0,63}})?|{_TRACK}",
)
MAX_HOLD = 10 * 365 * 86400  # seconds: "forever" is the way to say longer
FOREVER = "forever"


def _names(p: dict[str, Any], *, required: bool = True) -> list[str]:
    return name_list(p, "names", SNAP_NAME, "snap name", required=required)


def _one_for(names: list[str], what: str) -> None:
    if len(names) != 1:
        raise ValueError(f"{what} is for exactly one snap: give one name")


def validate_install(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"names", "channel", "classic"}, frozenset({"names"}))
    names = _names(p)
    channel = matching(p, "channel", CHANNEL, "snap channel", required=False)
    classic = boolean(p, "classic")
    if channel is not None:
        _one_for(names, "channel")
    if classic:
        _one_for(names, "classic")
    return {"names": names, "channel": channel, "classic": classic}


def validate_names(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"names"}, frozenset({"names"}))
    return {"names": _names(p)}


def validate_refresh(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"names", "channel"})
    names = _names(p, required=False)
    channel = matching(p, "channel", CHANNEL, "snap channel", required=False)
    if channel is not None:
        _one_for(names, "channel")
    return {"names": names, "channel": channel}


def validate_hold(raw: Any) -> dict[str, Any]:
    p = params_object(raw, {"names", "hold_for"}, frozenset({"names"}))
    names = _names(p)
    hold_for: int | str = FOREVER
    if p.get("hold_for", FOREVER) != FOREVER:
        value = integer(p, "hold_for", minimum=1, maximum=MAX_HOLD)
        assert value is not None
        hold_for = value
    return {"names": names, "hold_for": hold_for}


_NAMES_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string", "pattern": "^[a-z0-9](?:-?[a-z0-9])*$", "maxLength": 40},
    "maxItems": MAX_ITEMS,
    "uniqueItems": True,
}
_CHANNEL_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": f"^(?:{CHANNEL.pattern})$",
    "description": "[TRACK/]RISK[/BRANCH] (one snap only)",
}


def _schema(required: bool, **extra: Any) -> dict[str, Any]:
    names = {**_NAMES_SCHEMA, "minItems": 1} if required else _NAMES_SCHEMA
    out: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"names": names, **extra},
    }
    if required:
        out["required"] = ["names"]
    return out


TYPES: tuple[ActionType, ...] = (
    ActionType(
        SNAP_INSTALL,
        "Install snaps",
        validate_install,
        _schema(
            True,
            channel=_CHANNEL_SCHEMA,
            classic={"type": "boolean", "default": False, "description": "classic confinement"},
        ),
        default_timeout=1800.0,
        description="install snaps (snap install)",
        tools=("snap",),
    ),
    ActionType(
        SNAP_REMOVE,
        "Remove snaps",
        validate_names,
        _schema(True),
        description="remove snaps (snap remove)",
        tools=("snap",),
    ),
    ActionType(
        SNAP_REFRESH,
        "Refresh snaps",
        validate_refresh,
        _schema(False, channel=_CHANNEL_SCHEMA),
        default_timeout=1800.0,
        description="refresh the named snaps, or every snap (snap refresh)",
        tools=("snap",),
    ),
    ActionType(
        SNAP_HOLD,
        "Hold snaps",
        validate_hold,
        _schema(
            True,
            hold_for={
                "oneOf": [
                    {"type": "integer", "minimum": 1, "maximum": MAX_HOLD},
                    {"const": FOREVER},
                ],
                "default": FOREVER,
                "description": "seconds, or forever",
            },
        ),
        default_timeout=300.0,
        description="hold automatic refreshes of snaps (snap refresh --hold)",
        tools=("snap",),
    ),
    ActionType(
        SNAP_UNHOLD,
        "Unhold snaps",
        validate_names,
        _schema(True),
        default_timeout=300.0,
        description="let snaps refresh automatically again (snap refresh --unhold)",
        tools=("snap",),
    ),
)
