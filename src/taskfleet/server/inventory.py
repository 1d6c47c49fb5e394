"""Inventory: computers (read, remove), groups and their members, tags, and targets.

Contract: every function is scoped to the caller's tenant; a group named
that does not exist is a 404 (``group_id``, the one place that says so); a
target resolves to the ids of computers that are enrolled and not removed, or
raises (``package:`` and ``os:`` targets read the reported inventory through
``server/computer_inventory.py``); every change is audited. ``get_computer``
adds the computer's inventory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.states import ActivityKind, Cause, State, transition
from taskfleet.domain.targets import (
    Target,
    TargetKind,
    tag_value_problem,
    valid_name,
    valid_tag_key,
)
from taskfleet.server import computer_inventory
from taskfleet.server.activities import list_activities
from taskfleet.server.kernel import ApiError, Principal, audit
from taskfleet.store.activities import Change, apply_changes
from taskfleet.store.schema import (
    activities,
    computer_tags,
    computers,
    group_members,
    groups,
    outbox,
)


async def cancel_open_work(
    conn: AsyncConnection,
    tenant_id: int,
    computer_id: int,
    now: float,
    *,
    cause: Cause = Cause.REENROLLED,
    actor: str = "server",
    reason: str = "re-enrolled",
) -> list[int]:
    rows = (
        await conn.execute(
            sa.select(activities.c.id, activities.c.state).where(
                activities.c.computer_id == computer_id,
                activities.c.tenant_id == tenant_id,
                activities.c.state.notin_(
                    [s.value for s in (State.FAILED, State.SUCCEEDED, State.CANCELED)]
                ),
            )
        )
    ).all()
    changes = [
        Change(
            r.id,
            tenant_id,
            transition(
                ActivityKind.CLIENT,
                State(r.state),
                State.CANCELED,
                cause=cause,
                actor=actor,
                at=now,
                reason=reason,
            ),
            {"finished_at": now},
        )
        for r in rows
    ]
    await conn.run_sync(apply_changes, changes)
    return [r.id for r in rows]


@dataclass
class Removed:
    computer_id: int
    hostname: str
    removed_at: float
    canceled: list[int]


async def remove_computer(
    conn: AsyncConnection, p: Principal, computer_id: int, now: float
) -> Removed:
    """Take a computer off the fleet; its row, activities and events stay readable.

    Its open activities are Canceled (with the reason), its queued messages,
    group memberships and tags go; the caller drops it from the in-memory fleet
    after the commit, so its credentials stop working at once."""
    row = (
        await conn.execute(
            sa.select(computers.c.hostname, computers.c.removed_at).where(
                computers.c.id == computer_id, computers.c.tenant_id == p.tenant_id
            )
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no computer {computer_id}")
    if row.removed_at is not None:
        raise ApiError(409, f"computer {computer_id} was already removed")
    canceled = await cancel_open_work(
        conn,
        p.tenant_id,
        computer_id,
        now,
        cause=Cause.ADMIN,
        actor=p.actor,
        reason=f"computer {computer_id} ({row.hostname}) was removed from the fleet",
    )
    await conn.execute(outbox.delete().where(outbox.c.computer_id == computer_id))
    await conn.execute(group_members.delete().where(group_members.c.computer_id == computer_id))
    await conn.execute(computer_tags.delete().where(computer_tags.c.computer_id == computer_id))
    await conn.execute(
        computers.update().where(computers.c.id == computer_id).values(removed_at=now)
    )
    await audit(
        conn,
        p,
        "computer.remove",
        now,
        computer_id=computer_id,
        hostname=row.hostname,
        canceled=len(canceled),
    )
    return Removed(computer_id, row.hostname, now, canceled)


async def group_id(conn: AsyncConnection, tenant_id: int, name: str) -> int:
    gid = (
        await conn.execute(
            sa.select(groups.c.id).where(groups.c.tenant_id == tenant_id, groups.c.name == name)
        )
    ).scalar()
    if gid is None:
        raise ApiError(404, f"unknown group {name!r}")
    return int(gid)


async def check_computers(conn: AsyncConnection, tenant_id: int, ids: list[int]) -> None:
    if not ids:
        raise ApiError(400, "no computer ids given")
    rows = (
        await conn.execute(
            sa.select(computers.c.id, computers.c.removed_at).where(
                computers.c.tenant_id == tenant_id, computers.c.id.in_(ids)
            )
        )
    ).all()
    found = {r.id for r in rows}
    missing = [i for i in ids if i not in found]
    if missing:
        raise ApiError(404, f"unknown computer(s): {', '.join(map(str, missing))}")
    removed = sorted(r.id for r in rows if r.removed_at is not None)
    if removed:
        raise ApiError(404, f"removed computer(s): {', '.join(map(str, removed))}")


async def create_group(
    conn: AsyncConnection, p: Principal, name: str, now: float
) -> dict[str, Any]:
    if not valid_name(name):
        raise ApiError(400, f"invalid group name {name!r}: letters, digits, _ . - (max 64)")
    exists = (
        await conn.execute(
            sa.select(groups.c.id).where(groups.c.tenant_id == p.tenant_id, groups.c.name == name)
        )
    ).scalar()
    if exists is not None:
        raise ApiError(409, f"group {name!r} already exists")
    gid = (
        await conn.execute(
            groups.insert()
            .values(tenant_id=p.tenant_id, name=name, created_at=now)
            .returning(groups.c.id)
        )
    ).scalar_one()
    await audit(conn, p, "group.create", now, name=name)
    return {"id": gid, "name": name, "members": []}


async def delete_group(conn: AsyncConnection, p: Principal, name: str, now: float) -> None:
    gid = await group_id(conn, p.tenant_id, name)
    await conn.execute(group_members.delete().where(group_members.c.group_id == gid))
    await conn.execute(groups.delete().where(groups.c.id == gid))
    await audit(conn, p, "group.delete", now, name=name)


async def set_members(
    conn: AsyncConnection, p: Principal, name: str, ids: list[int], add: bool, now: float
) -> None:
    gid = await group_id(conn, p.tenant_id, name)
    if len(set(ids)) != len(ids):
        raise ApiError(400, "computer ids repeat; give each once")
    await check_computers(conn, p.tenant_id, ids)
    await conn.execute(
        group_members.delete().where(
            group_members.c.group_id == gid, group_members.c.computer_id.in_(ids)
        )
    )
    if add:
        await conn.execute(
            group_members.insert(),
            [{"group_id": gid, "computer_id": i, "tenant_id": p.tenant_id} for i in ids],
        )
    await audit(conn, p, "group.add" if add else "group.remove", now, name=name, computers=ids)


async def list_groups(conn: AsyncConnection, p: Principal) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(groups.c.name, sa.func.count(group_members.c.computer_id).label("size"))
        .select_from(groups.outerjoin(group_members, group_members.c.group_id == groups.c.id))
        .where(groups.c.tenant_id == p.tenant_id)
        .group_by(groups.c.name)
        .order_by(groups.c.name)
    )
    return [{"name": r.name, "size": r.size} for r in rows]


async def set_tag(
    conn: AsyncConnection, p: Principal, computer_id: int, key: str, value: str | None, now: float
) -> None:
    if not valid_tag_key(key):
        raise ApiError(400, f"invalid tag key {key!r}")
    problem = None if value is None else tag_value_problem(value)
    if problem is not None:
        raise ApiError(400, problem)
    await check_computers(conn, p.tenant_id, [computer_id])
    existed = await conn.execute(
        computer_tags.delete().where(
            computer_tags.c.computer_id == computer_id, computer_tags.c.key == key
        )
    )
    if value is None and existed.rowcount == 0:
        raise ApiError(404, f"computer {computer_id} has no tag {key!r}")
    if value is not None:
        await conn.execute(
            computer_tags.insert().values(
                computer_id=computer_id, key=key, value=value, tenant_id=p.tenant_id
            )
        )
    await audit(
        conn,
        p,
        "tag.set" if value is not None else "tag.remove",
        now,
        computer=computer_id,
        key=key,
        value=value,
    )


async def resolve_target(conn: AsyncConnection, tenant_id: int, target: Target) -> list[int]:
    c = computers.c
    if target.kind is TargetKind.ALL:
        q = sa.select(c.id).where(c.tenant_id == tenant_id, c.removed_at.is_(None))
    elif target.kind is TargetKind.GROUP:
        gid = await group_id(conn, tenant_id, target.name)
        q = sa.select(group_members.c.computer_id).where(group_members.c.group_id == gid)
    elif target.kind is TargetKind.TAG:
        q = sa.select(computer_tags.c.computer_id).where(
            computer_tags.c.tenant_id == tenant_id,
            computer_tags.c.key == target.name,
            computer_tags.c.value == target.value,
        )
    elif target.kind is TargetKind.COMPUTER:
        await check_computers(conn, tenant_id, list(target.computer_ids))
        return list(target.computer_ids)
    else:
        q = None
    if target.kind is TargetKind.PACKAGE:
        ids = await computer_inventory.computers_with_package(
            conn, tenant_id, target.name, target.op or None, target.value or None
        )
    elif target.kind is TargetKind.OS:
        ids = await computer_inventory.computers_with_os(
            conn, tenant_id, target.name, target.value or None
        )
    else:
        assert q is not None
        ids = sorted(int(i) for i in (await conn.execute(q)).scalars())
    if not ids:
        what = {
            "all": "no computers are enrolled",
            "group": f"group {target.name!r} is empty",
            "tag": f"no computer has tag {target.name}={target.value}",
            "package": f"no computer has package {str(target)[8:]} installed",
            "os": f"no computer runs {str(target)[3:]}",
        }[target.kind.value]
        raise ApiError(400 if target.kind in _EMPTY_IS_400 else 404, f"nothing to target: {what}")
    return ids


_EMPTY_IS_400 = (TargetKind.ALL, TargetKind.GROUP)


async def list_computers(
    conn: AsyncConnection, p: Principal, *, only: int | None = None, removed: bool = False
) -> list[dict[str, Any]]:
    """The tenant's computers under management; with ``removed``, those removed (their
    records and history kept: the archive); removed ones also when asked for by id
    (``only``)."""
    if only is not None:
        where = [computers.c.id == only]
    elif removed:
        where = [computers.c.removed_at.is_not(None)]
    else:
        where = [computers.c.removed_at.is_(None)]
    rows = (
        await conn.execute(
            sa.select(
                computers.c.id,
                computers.c.hostname,
                computers.c.enrolled_at,
                computers.c.last_seen_at,
                computers.c.address,
                computers.c.tickle_port,
                computers.c.agent_version,
                computers.c.generation,
                computers.c.policy,
                computers.c.removed_at,
                computers.c.identity_conflict_at,
                computers.c.identity_conflict_reason,
            )
            .where(computers.c.tenant_id == p.tenant_id, *where)
            .order_by(computers.c.id)
        )
    ).all()
    # One computer (``only``): its own tags and groups, not the whole tenant's.
    tag_q = sa.select(computer_tags).where(computer_tags.c.tenant_id == p.tenant_id)
    member_q = (
        sa.select(group_members.c.computer_id, groups.c.name)
        .join(groups, groups.c.id == group_members.c.group_id)
        .where(groups.c.tenant_id == p.tenant_id)
    )
    if only is not None:
        tag_q = tag_q.where(computer_tags.c.computer_id == only)
        member_q = member_q.where(group_members.c.computer_id == only)
    tags: dict[int, dict[str, str]] = {}
    for t in await conn.execute(tag_q):
        tags.setdefault(t.computer_id, {})[t.key] = t.value
    member: dict[int, list[str]] = {}
    for m in await conn.execute(member_q):
        member.setdefault(m.computer_id, []).append(m.name)
    out = []
    for r in rows:
        c = dict(r._mapping)
        # Two agents used its identity (server/identity.py): when, and why; None: not.
        at, why = c.pop("identity_conflict_at"), c.pop("identity_conflict_reason")
        c["identity_conflict"] = None if at is None else {"at": at, "reason": why or ""}
        out.append({**c, "tags": tags.get(r.id, {}), "groups": sorted(member.get(r.id, []))})
    return out


async def get_computer(conn: AsyncConnection, p: Principal, computer_id: int) -> dict[str, Any]:
    """One computer (removed ones too), read by its id, with its latest activities."""
    found = await list_computers(conn, p, only=computer_id)
    if not found:
        raise ApiError(404, f"no computer {computer_id}")
    c = found[0]
    c["activities"] = await list_activities(
        conn, p, request_id=None, computer_id=computer_id, state=None, limit=20
    )
    c["inventory"] = await computer_inventory.inventory_of(conn, p.tenant_id, computer_id)
    return c
