"""Cron schedules: create, read and cancel them (audited), and fire one run.

A run that cannot be created is recorded on the schedule, which goes on.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.domain.lifecycle import RuleError, next_cron, validate_cron
from taskfleet.server import requests
from taskfleet.server.kernel import ApiError, Principal, audit, tenant_disabled
from taskfleet.server.lifecycle import parse_options
from taskfleet.store.schema import schedules

log = logging.getLogger("taskfleet.lifecycle")  # its messages kept their logger


async def create_schedule(
    conn: AsyncConnection, p: Principal, now: float, cron: str, template: dict[str, Any]
) -> dict[str, Any]:
    try:
        normal = validate_cron(cron)
    except RuleError as exc:
        raise ApiError(400, str(exc)) from None
    for key in ("at", "after"):
        if template.get(key) is not None:
            raise ApiError(400, f"a cron schedule cannot also have {key!r}: each run starts then")
    first = next_cron(normal, now)
    sid = (
        await conn.execute(
            schedules.insert()
            .values(
                tenant_id=p.tenant_id,
                cron=normal,
                template=template,
                created_by=p.actor,
                created_at=now,
                next_at=first,
                runs=0,
            )
            .returning(schedules.c.id)
        )
    ).scalar_one()
    await audit(conn, p, "schedule.create", now, id=sid, cron=normal, target=template["target"])
    return await get_schedule(conn, p, sid)


async def get_schedule(conn: AsyncConnection, p: Principal, sid: int) -> dict[str, Any]:
    row = (
        await conn.execute(
            sa.select(schedules).where(schedules.c.id == sid, schedules.c.tenant_id == p.tenant_id)
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no schedule {sid}")
    out = dict(row._mapping)
    out.pop("tenant_id")
    return out


async def list_schedules(conn: AsyncConnection, p: Principal) -> list[dict[str, Any]]:
    ids = (
        await conn.execute(
            sa.select(schedules.c.id)
            .where(schedules.c.tenant_id == p.tenant_id)
            .order_by(schedules.c.id)
        )
    ).scalars()
    return [await get_schedule(conn, p, i) for i in ids]


async def cancel_schedule(
    conn: AsyncConnection, p: Principal, now: float, sid: int
) -> dict[str, Any]:
    sched = await get_schedule(conn, p, sid)
    if sched["canceled_at"] is not None:
        raise ApiError(409, f"schedule {sid} is already canceled")
    await conn.execute(
        schedules.update().where(schedules.c.id == sid).values(canceled_at=now, next_at=None)
    )
    await audit(conn, p, "schedule.cancel", now, id=sid)
    return await get_schedule(conn, p, sid)


async def fire_schedule(
    conn: AsyncConnection, now: float, sid: int
) -> tuple[requests.Created | None, float | None]:
    """Create one run of schedule ``sid``; return (Created or None, the next firing or None).

    A run that cannot be created (its group emptied, say) is recorded on the
    schedule as ``last_error`` and audited; the schedule goes on. After
    downtime a schedule fires once, not once per missed time.
    """
    row = (await conn.execute(sa.select(schedules).where(schedules.c.id == sid))).first()
    if row is None or row.canceled_at is not None or row.next_at is None:
        return None, None
    if now < row.next_at:  # a stale timer (the time moved): not yet
        return None, row.next_at
    creator = row.created_by
    token_id = int(creator.split(":", 1)[1]) if creator.startswith("token:") else 0
    p = Principal(token_id, row.tenant_id, "operator", f"schedule {sid}", via=f"schedule:{sid}")
    t = row.template
    created = None
    error = None
    savepoint = await conn.begin_nested()
    try:
        if await tenant_disabled(conn, row.tenant_id):
            raise ApiError(403, "the tenant is disabled: no new work (docs/tenants.md)")
        opts = parse_options(now, approval=t.get("approval"), rollout=t.get("rollout"))
        created = await requests.create_request(
            conn,
            p,
            now,
            type=t["type"],
            target=t["target"],
            params=t["params"],
            timeout=t["timeout"],
            policy=t.get("policy"),
            expires_in=t.get("expires_in"),
            options=opts,
            schedule_id=sid,
        )
    except ApiError as exc:
        await savepoint.rollback()
        error = exc.message
        log.warning("schedule %d: run not created: %s", sid, error)
    else:
        await savepoint.commit()
    next_at = next_cron(row.cron, now)
    await conn.execute(
        schedules.update()
        .where(schedules.c.id == sid)
        .values(
            next_at=next_at,
            runs=row.runs + (1 if created else 0),
            last_request_id=created.request["id"] if created else row.last_request_id,
            last_error=error,
        )
    )
    if error is not None:
        await audit(conn, p, "schedule.error", now, id=sid, error=error)
    return created, next_at
