"""Tenants: create, list, disable, enable; who may act in which (docs/tenants.md).

Contract: only a super-admin (``Principal.super_admin``: the bootstrap token, or
one minted from the data folder for the default tenant) manages tenants; anyone
else is answered 403. Creating a tenant makes its first admin token, returned
once. A super-admin works in its own (default) tenant unless it names another
with ``X-Taskfleet-Tenant`` (``admit``): then it is that tenant's admin, and what
it does is recorded in that tenant's audit log as ``superadmin:TOKEN_ID``. A
disabled tenant's callers are refused (403) and its enrollments too
(``enrollment.py``, ``relays.py``); its agents' exchanges go on, so running
work ends and is recorded, but no work is created for it (API refused,
schedules skip). Names: 1..TENANT_NAME_MAX letters, digits, ``.``, ``_``, ``-``.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.server.kernel import DEFAULT_TENANT, ApiError, Principal, audit, token_hash
from taskfleet.settings import TENANT_NAME_MAX
from taskfleet.store.schema import accounts, api_tokens, computers, tenants

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: str) -> str:
    if not name:
        raise ApiError(400, "a tenant name is required")
    if len(name) > TENANT_NAME_MAX:
        raise ApiError(400, f"a tenant name is at most {TENANT_NAME_MAX} characters")
    if not _NAME.fullmatch(name):
        raise ApiError(
            400,
            "a tenant name is letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    return name


def sees_infrastructure(p: Principal) -> bool:
    """Workers and server processes serve every tenant (no tenant's): only the
    super-admin, in its own tenant, sees them (the API's /workers and /servers, the
    dashboard's tasks page)."""
    return p.super_admin and p.via is None


def require_super_admin(p: Principal) -> None:
    if not p.super_admin:
        raise ApiError(403, "only the super-admin manages tenants")


async def tenant_by_name(conn: AsyncConnection, name: str) -> Any:
    row = (await conn.execute(sa.select(tenants).where(tenants.c.name == name))).first()
    if row is None:
        raise ApiError(404, f"no tenant {name!r}")
    return row


async def admit(conn: AsyncConnection, p: Principal, act_in: str | None) -> Principal:
    """The caller as it acts: refused if its tenant is disabled; a super-admin naming
    another tenant becomes that tenant's admin (``superadmin:ID`` in its audit log)."""
    if act_in and not p.super_admin:
        # One answer whatever the name: a tenant's existence is not for others to learn.
        home = (
            await conn.execute(sa.select(tenants.c.name).where(tenants.c.id == p.tenant_id))
        ).scalar()
        if act_in != home:
            raise ApiError(403, "only the super-admin may act in another tenant")
        act_in = None
    if act_in:
        row = await tenant_by_name(conn, act_in)
        if row.disabled:
            raise ApiError(403, f"tenant {row.name!r} is disabled: enable it to act in it")
        if row.id == p.tenant_id:
            return p
        return replace(p, tenant_id=row.id, role="admin", via=f"superadmin:{p.token_id}")
    row = (await conn.execute(sa.select(tenants).where(tenants.c.id == p.tenant_id))).first()
    if row is None or row.disabled:
        raise ApiError(403, "this tenant is disabled: ask the super-admin to enable it")
    return p


def _row(r: Any, n_computers: int = 0, n_accounts: int = 0) -> dict[str, Any]:
    return {
        "id": r.id,
        "name": r.name,
        "created_at": r.created_at,
        "disabled": r.disabled,
        "computers": n_computers,
        "accounts": n_accounts,
    }


async def create_tenant(
    conn: AsyncConnection, p: Principal, now: float, name: str
) -> dict[str, Any]:
    """A new tenant and its first admin token (its secret is in the answer, once)."""
    require_super_admin(p)
    check_name(name)
    exists = (await conn.execute(sa.select(tenants.c.id).where(tenants.c.name == name))).scalar()
    if exists is not None:
        raise ApiError(409, f"tenant {name!r} exists")
    tid = (
        await conn.execute(
            tenants.insert()
            .values(name=name, created_at=now, disabled=False)
            .returning(tenants.c.id)
        )
    ).scalar_one()
    token = "tfa_" + secrets.token_urlsafe(32)
    token_id = (
        await conn.execute(
            api_tokens.insert()
            .values(
                tenant_id=tid,
                name="first-admin",
                kind="admin",
                role="admin",
                token_hash=token_hash(token),
                created_at=now,
                revoked=False,
                super_admin=False,
            )
            .returning(api_tokens.c.id)
        )
    ).scalar_one()
    await audit(conn, p, "tenant.create", now, id=tid, name=name, token_id=token_id)
    acting = replace(p, tenant_id=tid, via=f"superadmin:{p.token_id}")
    await audit(conn, acting, "tenant.create", now, id=tid, name=name, token_id=token_id)
    return {
        **_row(
            (await conn.execute(sa.select(tenants).where(tenants.c.id == tid))).one(),
        ),
        "token_id": token_id,
        "token": token,
    }


async def list_tenants(conn: AsyncConnection, p: Principal) -> list[dict[str, Any]]:
    require_super_admin(p)
    n_comp = {
        r.tenant_id: r.n
        for r in await conn.execute(
            sa.select(computers.c.tenant_id, sa.func.count().label("n"))
            .where(computers.c.removed_at.is_(None))
            .group_by(computers.c.tenant_id)
        )
    }
    n_acc = {
        r.tenant_id: r.n
        for r in await conn.execute(
            sa.select(accounts.c.tenant_id, sa.func.count().label("n")).group_by(
                accounts.c.tenant_id
            )
        )
    }
    rows = await conn.execute(sa.select(tenants).order_by(tenants.c.id))
    return [_row(r, n_comp.get(r.id, 0), n_acc.get(r.id, 0)) for r in rows]


async def set_disabled(
    conn: AsyncConnection, p: Principal, now: float, name: str, disabled: bool
) -> dict[str, Any]:
    """Disable or enable a tenant (idempotent); the default tenant cannot be disabled
    (the super-admin lives there)."""
    require_super_admin(p)
    row = await tenant_by_name(conn, name)
    if disabled and row.name == DEFAULT_TENANT:
        raise ApiError(409, "the default tenant cannot be disabled: the super-admin is in it")
    if row.disabled != disabled:
        await conn.execute(tenants.update().where(tenants.c.id == row.id).values(disabled=disabled))
        action = "tenant.disable" if disabled else "tenant.enable"
        await audit(conn, p, action, now, id=row.id, name=name)
        acting = replace(p, tenant_id=row.id, via=f"superadmin:{p.token_id}")
        await audit(conn, acting, action, now, id=row.id, name=name)
    return _row((await conn.execute(sa.select(tenants).where(tenants.c.id == row.id))).one())
