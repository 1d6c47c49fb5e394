"""Maintenance windows: set or clear a group's window (audited), load them per
computer, and tell which of a computer's windows are closed at a given time.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.lifecycle import (
    RuleError,
    next_window_open,
    validate_window,
    window_allows,
)
from taskfleet.domain.policy import RunWindow
from taskfleet.server.inventory import group_id
from taskfleet.server.kernel import ApiError, Principal, audit
from taskfleet.store.schema import group_members, groups


def parse_offset(text: Any) -> int:
    """``+02:00`` / ``-05:30`` / ``0`` -> minutes east of UTC."""
    if isinstance(text, int) and not isinstance(text, bool):
        minutes = text
    else:
        s = str(text).strip()
        sign = -1 if s.startswith("-") else 1
        body = s.lstrip("+-")
        hh, _, mm = body.partition(":")
        if not hh.isdigit() or (mm and not mm.isdigit()):
            raise ApiError(400, f"invalid UTC offset {text!r}: expected +HH:MM")
        minutes = sign * (int(hh) * 60 + int(mm or 0))
    if not -12 * 60 <= minutes <= 14 * 60:
        raise ApiError(400, f"UTC offset {text!r} is out of range (-12:00 .. +14:00)")
    return minutes


async def set_window(
    conn: AsyncConnection,
    p: Principal,
    now: float,
    group: str,
    window: str | None,
    utc_offset: Any = 0,
) -> dict[str, Any]:
    """Set (or clear, with None) a group's maintenance window."""
    gid = await group_id(conn, p.tenant_id, group)
    text = offset = None
    if window is not None:
        try:
            text = str(validate_window(window))
        except RuleError as exc:
            raise ApiError(400, f"maintenance window: {exc}") from None
        offset = parse_offset(utc_offset)
    await conn.execute(
        groups.update().where(groups.c.id == gid).values(window=text, utc_offset=offset)
    )
    await audit(conn, p, "group.window", now, name=group, window=text, utc_offset=offset)
    return {"group": group, "window": text, "utc_offset": offset}


def format_offset(minutes: int) -> str:
    """Minutes east of UTC -> ``+HH:MM`` (the form ``parse_offset`` reads)."""
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


async def list_windows(conn: AsyncConnection, p: Principal, now: float) -> list[dict[str, Any]]:
    """Each of the tenant's groups with its maintenance window (None: no window, work
    goes out at any time), whether it is open now and when it next opens."""
    out = []
    for r in await conn.execute(
        sa.select(groups.c.name, groups.c.window, groups.c.utc_offset)
        .where(groups.c.tenant_id == p.tenant_id)
        .order_by(groups.c.name)
    ):
        offset = int(r.utc_offset or 0)
        row: dict[str, Any] = {"group": r.name, "window": r.window, "utc_offset": None}
        row.update(open_now=True, next_open=None)
        if r.window is not None:
            window = RunWindow.parse(r.window)
            row["utc_offset"] = format_offset(offset)
            row["open_now"] = window_allows(window, (now / 60 + offset) % 1440)
            row["next_open"] = None if row["open_now"] else next_window_open(window, now, offset)
        out.append(row)
    return out


async def load_windows(conn: AsyncConnection) -> dict[int, list[tuple[RunWindow, int, int]]]:
    """computer id -> [(window, utc offset minutes, group id)] for windowed groups."""
    out: dict[int, list[tuple[RunWindow, int, int]]] = {}
    for r in await conn.execute(
        sa.select(group_members.c.computer_id, groups.c.id, groups.c.window, groups.c.utc_offset)
        .join(groups, groups.c.id == group_members.c.group_id)
        .where(groups.c.window.is_not(None))
    ):
        out.setdefault(r.computer_id, []).append(
            (RunWindow.parse(r.window), int(r.utc_offset or 0), int(r.id))
        )
    return out


def closed_windows(
    windows: list[tuple[RunWindow, int, int]], now: float
) -> list[tuple[RunWindow, int, int]]:
    return [w for w in windows if not window_allows(w[0], ((now + w[1] * 60) % 86400) / 60.0)]
