"""API tokens: bootstrap (tenant, server keys, first admin token), resolve, create, list,
revoke, and mint one from the server's data folder.

Contract: a token is stored only as its hash (``kernel.token_hash``); the
tenant's last valid admin token cannot be revoked; every change is audited.
Kinds: ``admin`` (API access, with a role), ``enroll`` (agents enroll with it),
``relay`` (relays enroll with it, ``tfr_``; revoking it revokes the relays
enrolled with it, whose exchanges are refused from then on).
"""

from __future__ import annotations

import secrets
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.protocol.signing import new_signing_seed
from taskfleet.server.inventory import group_id
from taskfleet.server.kernel import DEFAULT_TENANT, ROLES, ApiError, Principal, audit, token_hash
from taskfleet.store.schema import api_tokens, audit_log, relays, server_secrets, tenants

TOKEN_PREFIX = {"admin": "tfa_", "enroll": "tfe_", "relay": "tfr_"}


async def bootstrap(conn: AsyncConnection, now: float) -> tuple[dict[str, bytes], str | None]:
    """Create the default tenant and server keys; return (keys, new admin token or None)."""
    tenant = (
        await conn.execute(sa.select(tenants.c.id).where(tenants.c.name == DEFAULT_TENANT))
    ).scalar()
    if tenant is None:
        tenant = (
            await conn.execute(
                tenants.insert().values(name=DEFAULT_TENANT, created_at=now).returning(tenants.c.id)
            )
        ).scalar_one()
    keys = {r.name: r.value for r in await conn.execute(sa.select(server_secrets))}
    for name in ("signing_seed", "tickle_master"):
        if name not in keys:
            keys[name] = new_signing_seed() if name == "signing_seed" else secrets.token_bytes(32)
            await conn.execute(server_secrets.insert().values(name=name, value=keys[name]))
    has_admin = (
        await conn.execute(
            sa.select(sa.func.count())
            .select_from(api_tokens)
            .where(api_tokens.c.kind == "admin", api_tokens.c.role == "admin")
        )
    ).scalar_one()
    token = None
    if not has_admin:
        token = "tfa_" + secrets.token_urlsafe(32)
        await conn.execute(
            api_tokens.insert().values(
                tenant_id=tenant,
                name="bootstrap",
                kind="admin",
                role="admin",
                token_hash=token_hash(token),
                created_at=now,
                revoked=False,
                super_admin=True,  # the bootstrap token manages tenants (docs/tenants.md)
            )
        )
    return keys, token


async def resolve_token(conn: AsyncConnection, token: str, now: float) -> Principal | None:
    return await resolve_token_hash(conn, token_hash(token), now)


async def resolve_token_hash(conn: AsyncConnection, digest: str, now: float) -> Principal | None:
    """The caller an API token's SHA-256 names (a dashboard session keeps only that)."""
    row = (
        await conn.execute(
            sa.select(api_tokens).where(
                api_tokens.c.token_hash == digest, api_tokens.c.kind == "admin"
            )
        )
    ).first()
    if row is None or row.revoked or (row.expires_at is not None and row.expires_at < now):
        return None
    return Principal(row.id, row.tenant_id, row.role, row.name, super_admin=row.super_admin)


async def create_token(
    conn: AsyncConnection,
    p: Principal,
    now: float,
    *,
    kind: str,
    name: str,
    role: str | None,
    expires_in: float | None,
    max_uses: int | None,
    group: str | None,
) -> dict[str, Any]:
    if kind not in TOKEN_PREFIX:
        raise ApiError(400, "kind must be admin, enroll or relay")
    if kind == "admin" and role not in ROLES:
        raise ApiError(400, f"role must be one of {', '.join(ROLES)}")
    if kind != "admin" and role is not None:
        raise ApiError(400, "enrollment tokens have no role (agent or relay enrollment)")
    if not name or len(name) > 128:
        raise ApiError(400, "name must be 1..128 characters")
    if expires_in is not None and expires_in <= 0:
        raise ApiError(400, "expires_in must be a positive number of seconds")
    if max_uses is not None and (kind != "enroll" or max_uses <= 0):
        raise ApiError(400, "max_uses is a positive number, for agent enrollment tokens only")
    if group is not None:
        if kind != "enroll":
            raise ApiError(400, "group is for agent enrollment tokens only")
        await group_id(conn, p.tenant_id, group)
    token = TOKEN_PREFIX[kind] + secrets.token_urlsafe(32)
    token_id = (
        await conn.execute(
            api_tokens.insert()
            .values(
                tenant_id=p.tenant_id,
                name=name,
                kind=kind,
                role=role,
                token_hash=token_hash(token),
                created_at=now,
                expires_at=None if expires_in is None else now + expires_in,
                uses_left=max_uses,
                group_name=group,
                revoked=False,
            )
            .returning(api_tokens.c.id)
        )
    ).scalar_one()
    await audit(conn, p, "token.create", now, id=token_id, kind=kind, role=role, name=name)
    return {"id": token_id, "token": token, "kind": kind, "role": role, "name": name}


async def list_tokens(conn: AsyncConnection, p: Principal) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(
            api_tokens.c.id,
            api_tokens.c.name,
            api_tokens.c.kind,
            api_tokens.c.role,
            api_tokens.c.created_at,
            api_tokens.c.expires_at,
            api_tokens.c.uses_left,
            api_tokens.c.group_name,
            api_tokens.c.revoked,
            api_tokens.c.super_admin,
        )
        .where(api_tokens.c.tenant_id == p.tenant_id)
        .order_by(api_tokens.c.id)
    )
    return [dict(r._mapping) for r in rows]


def _valid_admin(tenant_id: int, now: float) -> Any:
    """Where-clause: the tenant's admin-role API tokens that authenticate at ``now``."""
    return sa.and_(
        api_tokens.c.tenant_id == tenant_id,
        api_tokens.c.kind == "admin",
        api_tokens.c.role == "admin",
        api_tokens.c.revoked.is_(False),
        sa.or_(api_tokens.c.expires_at.is_(None), api_tokens.c.expires_at >= now),
    )


async def revoke_token(conn: AsyncConnection, p: Principal, token_id: int, now: float) -> list[int]:
    """Revoke a token; the ids of the relays revoked with it (a relay token's)."""
    row = (
        await conn.execute(
            sa.select(api_tokens.c.id, api_tokens.c.kind).where(
                api_tokens.c.id == token_id, api_tokens.c.tenant_id == p.tenant_id
            )
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no token {token_id}")
    # Revoking the tenant's last valid admin token would lock everyone out for good
    # (no token could create another); the single writer serialises this check.
    valid_admins = set(
        (await conn.execute(sa.select(api_tokens.c.id).where(_valid_admin(p.tenant_id, now))))
        .scalars()
        .all()
    )
    if valid_admins == {token_id}:
        raise ApiError(
            409,
            f"token {token_id} is the last valid admin token of this tenant: create another "
            "admin token first (or mint one on the server: taskfleet server mint-admin-token)",
        )
    await conn.execute(api_tokens.update().where(api_tokens.c.id == token_id).values(revoked=True))
    revoked: list[int] = []
    if row.kind == "relay":
        revoked = sorted(
            (
                await conn.execute(
                    sa.select(relays.c.id).where(
                        relays.c.token_id == token_id, relays.c.revoked_at.is_(None)
                    )
                )
            )
            .scalars()
            .all()
        )
        if revoked:
            await conn.execute(
                relays.update().where(relays.c.id.in_(revoked)).values(revoked_at=now)
            )
    await audit(
        conn, p, "token.revoke", now, id=token_id, **({"relays": revoked} if revoked else {})
    )
    return revoked


async def mint_admin_token(
    conn: AsyncConnection, now: float, *, tenant: str = DEFAULT_TENANT, actor: str
) -> tuple[int, str]:
    """A new admin-role token for ``tenant`` (recovery from the server's data folder).

    Run by ``taskfleet server mint-admin-token`` with direct database access, not
    through the API: it is the way back in when no admin token is left."""
    tenant_id = (
        await conn.execute(sa.select(tenants.c.id).where(tenants.c.name == tenant))
    ).scalar()
    if tenant_id is None:
        raise ApiError(404, f"no tenant {tenant!r}")
    token = "tfa_" + secrets.token_urlsafe(32)
    token_id = (
        await conn.execute(
            api_tokens.insert()
            .values(
                tenant_id=tenant_id,
                name="minted",
                kind="admin",
                role="admin",
                token_hash=token_hash(token),
                created_at=now,
                revoked=False,
                # Whoever holds the data folder owns the server: the default tenant's
                # minted token is the super-admin again (the way back in).
                super_admin=tenant == DEFAULT_TENANT,
            )
            .returning(api_tokens.c.id)
        )
    ).scalar_one()
    await conn.execute(
        audit_log.insert().values(
            tenant_id=tenant_id,
            at=now,
            actor=actor,
            action="token.mint",
            object=f"token:{token_id}",
            detail={"id": token_id, "kind": "admin", "role": "admin", "name": "minted"},
        )
    )
    return int(token_id), token
