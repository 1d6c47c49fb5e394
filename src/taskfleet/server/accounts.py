"""Login accounts of the dashboard, and one-time login links (docs/tenants.md).

Contract: an account is a name (unique server-wide: the login form asks only
for it), an argon2id hash of its password (argon2-cffi; the password itself is
never stored or logged), a role (viewer, operator, admin) and a tenant. A
tenant's admins manage its accounts; the super-admin any tenant's, acting in
it (``tenants.admit``). Hashing and checking a password is slow on purpose: the
API hashes before it queues the write (``hash_password`` in a thread), and a
login with an unknown name checks a dummy hash, so unknown and wrong answer
alike and in the same time. A one-time login link holds a random code whose
SHA-256 is stored; it opens one dashboard session as its maker, once, within
``LOGIN_LINK_TTL`` seconds.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.ext.asyncio import AsyncConnection

from taskfleet.server.kernel import ROLES, ApiError, Principal, audit, token_hash
from taskfleet.settings import (
    ACCOUNT_NAME_MAX,
    ACCOUNT_PASSWORD_MAX,
    ACCOUNT_PASSWORD_MIN,
    LOGIN_LINK_TTL,
)
from taskfleet.store.schema import accounts, api_tokens, login_codes

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*")
_hasher = PasswordHasher()  # argon2id, the library's (RFC 9106) defaults
_DUMMY = _hasher.hash("not a password: unknown names check this in the same time")


def check_name(name: str) -> str:
    if not name:
        raise ApiError(400, "an account name is required")
    if len(name) > ACCOUNT_NAME_MAX:
        raise ApiError(400, f"an account name is at most {ACCOUNT_NAME_MAX} characters")
    if not _NAME.fullmatch(name):
        raise ApiError(
            400,
            "an account name is letters, digits, '.', '_', '@' and '-', "
            "starting with a letter or digit",
        )
    return name


def check_password(password: str) -> str:
    if len(password) < ACCOUNT_PASSWORD_MIN:
        raise ApiError(
            400, f"the password is too short: at least {ACCOUNT_PASSWORD_MIN} characters"
        )
    if len(password) > ACCOUNT_PASSWORD_MAX:
        raise ApiError(400, f"the password is too long: at most {ACCOUNT_PASSWORD_MAX} characters")
    if "\x00" in password:
        raise ApiError(400, "the password must not contain NUL")
    return password


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ApiError(400, f"role must be one of {', '.join(ROLES)}")
    return role


async def hash_password(password: str) -> str:
    """The argon2id hash of a checked password, computed off the event loop."""
    return await asyncio.to_thread(_hasher.hash, check_password(password))


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def _row(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "name": r.name,
        "role": r.role,
        "disabled": r.disabled,
        "created_at": r.created_at,
        "last_login_at": r.last_login_at,
    }


def _require_admin(p: Principal) -> None:
    if not p.allows("admin"):
        raise ApiError(403, f"this needs the admin role; the caller has {p.role}")


async def _mine(conn: AsyncConnection, p: Principal, name: str) -> Any:
    """The caller's tenant's account ``name``: 404 if none (another tenant's too)."""
    row = (
        await conn.execute(
            sa.select(accounts).where(accounts.c.name == name, accounts.c.tenant_id == p.tenant_id)
        )
    ).first()
    if row is None:
        raise ApiError(404, f"no account {name!r}")
    return row


async def create_account(
    conn: AsyncConnection, p: Principal, now: float, *, name: str, role: str, password_hash: str
) -> dict[str, Any]:
    _require_admin(p)
    check_name(name)
    check_role(role)
    taken = (await conn.execute(sa.select(accounts.c.id).where(accounts.c.name == name))).scalar()
    if taken is not None:
        raise ApiError(409, f"the account name {name!r} is taken")
    aid = (
        await conn.execute(
            accounts.insert()
            .values(
                tenant_id=p.tenant_id,
                name=name,
                password_hash=password_hash,
                role=role,
                disabled=False,
                created_at=now,
            )
            .returning(accounts.c.id)
        )
    ).scalar_one()
    await audit(conn, p, "account.create", now, id=aid, name=name, role=role)
    return _row((await conn.execute(sa.select(accounts).where(accounts.c.id == aid))).one())


async def list_accounts(conn: AsyncConnection, p: Principal) -> list[dict[str, Any]]:
    _require_admin(p)
    rows = await conn.execute(
        sa.select(accounts).where(accounts.c.tenant_id == p.tenant_id).order_by(accounts.c.id)
    )
    return [_row(r) for r in rows]


async def set_disabled(
    conn: AsyncConnection, p: Principal, now: float, name: str, disabled: bool
) -> dict[str, Any]:
    _require_admin(p)
    row = await _mine(conn, p, name)
    if row.disabled != disabled:
        await conn.execute(
            accounts.update().where(accounts.c.id == row.id).values(disabled=disabled)
        )
        action = "account.disable" if disabled else "account.enable"
        await audit(conn, p, action, now, id=row.id, name=name)
    return _row((await conn.execute(sa.select(accounts).where(accounts.c.id == row.id))).one())


async def set_password(
    conn: AsyncConnection, p: Principal, now: float, name: str, password_hash: str
) -> dict[str, Any]:
    _require_admin(p)
    row = await _mine(conn, p, name)
    await conn.execute(
        accounts.update().where(accounts.c.id == row.id).values(password_hash=password_hash)
    )
    await audit(conn, p, "account.password", now, id=row.id, name=name)
    return _row(row)


def _principal(r: Any) -> Principal:
    return Principal(0, r.tenant_id, r.role, r.name, account_id=r.id)


async def login(conn: AsyncConnection, name: str, password: str) -> Principal | None:
    """The account ``name`` if ``password`` is its password and it is enabled; else None,
    after the same work (an unknown name checks a dummy hash)."""
    row = (
        (await conn.execute(sa.select(accounts).where(accounts.c.name == name))).first()
        if name and len(name) <= ACCOUNT_NAME_MAX and len(password) <= ACCOUNT_PASSWORD_MAX
        else None
    )
    ok = await asyncio.to_thread(_verify, row.password_hash if row else _DUMMY, password)
    if row is None or not ok or row.disabled:
        return None
    return _principal(row)


async def resolve_account(conn: AsyncConnection, account_id: int) -> Principal | None:
    """The account a dashboard session was opened with, re-read on every request: None
    once it is disabled or gone (its sessions end at once)."""
    row = (await conn.execute(sa.select(accounts).where(accounts.c.id == account_id))).first()
    if row is None or row.disabled:
        return None
    return _principal(row)


async def logged_in(conn: AsyncConnection, p: Principal, now: float, address: str) -> None:
    if p.account_id is not None:
        await conn.execute(
            accounts.update().where(accounts.c.id == p.account_id).values(last_login_at=now)
        )
    # What logged in: the account, or the token (never the password or token itself).
    await audit(conn, replace(p, address=address), "dashboard.login", now, p.actor)


# -- one-time login links -----------------------------------------------------------------


async def create_login_code(conn: AsyncConnection, p: Principal, now: float) -> dict[str, Any]:
    """A code that opens one dashboard session as ``p`` (its token or account)."""
    if p.via is not None:  # a super-admin acting in a tenant, a schedule: not a login
        raise ApiError(403, "a login link is made by a token or account for itself")
    code = secrets.token_urlsafe(32)
    await conn.execute(
        login_codes.insert().values(
            tenant_id=p.tenant_id,
            code_hash=token_hash(code),
            token_id=p.token_id if p.account_id is None else None,
            account_id=p.account_id,
            created_at=now,
            expires_at=now + LOGIN_LINK_TTL,
        )
    )
    await audit(conn, p, "login_link.create", now, expires_at=now + LOGIN_LINK_TTL)
    return {"code": code, "path": f"/ui/login/link?code={code}", "expires_at": now + LOGIN_LINK_TTL}


async def redeem_login_code(
    conn: AsyncConnection, code: str, now: float
) -> tuple[str | None, int | None] | None:
    """Use a login code once: (the token hash or None, the account id or None) it opens
    a session for; None if it is unknown, used or expired."""
    row = (
        await conn.execute(
            sa.select(login_codes).where(login_codes.c.code_hash == token_hash(code))
        )
    ).first()
    if row is None or row.used_at is not None or row.expires_at < now:
        return None
    used = await conn.execute(
        login_codes.update()
        .where(login_codes.c.id == row.id, login_codes.c.used_at.is_(None))
        .values(used_at=now)
    )
    if used.rowcount != 1:
        return None
    if row.account_id is not None:
        return None, int(row.account_id)
    digest = (
        await conn.execute(
            sa.select(api_tokens.c.token_hash).where(api_tokens.c.id == row.token_id)
        )
    ).scalar()
    return (str(digest), None) if digest else None
