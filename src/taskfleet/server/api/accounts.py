"""Login accounts of the dashboard (``server/accounts.py``), and one-time login links."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from taskfleet.server import accounts
from taskfleet.server.api.deps import Admin, Rt, Viewer, read, router_for

router = router_for()


class AccountIn(BaseModel):
    name: str
    role: str = Field(description="viewer, operator or admin")
    password: str = Field(description="at least ACCOUNT_PASSWORD_MIN characters")


class PasswordIn(BaseModel):
    password: str


@router.post("/api/v1/accounts", status_code=201, tags=["accounts"])
async def create_account(rt: Rt, body: AccountIn, p: Admin) -> dict[str, Any]:
    accounts.check_name(body.name)
    accounts.check_role(body.role)
    digest = await accounts.hash_password(body.password)
    return await rt.writer.run(
        lambda c: accounts.create_account(
            c, p, rt.now(), name=body.name, role=body.role, password_hash=digest
        )
    )


@router.get("/api/v1/accounts", tags=["accounts"])
async def list_accounts(rt: Rt, p: Admin) -> list[dict[str, Any]]:
    return await read(rt, lambda c: accounts.list_accounts(c, p))


@router.post("/api/v1/accounts/{name}/disable", tags=["accounts"])
async def disable_account(rt: Rt, name: str, p: Admin) -> dict[str, Any]:
    """Its dashboard sessions end at once."""
    return await rt.writer.run(lambda c: accounts.set_disabled(c, p, rt.now(), name, True))


@router.post("/api/v1/accounts/{name}/enable", tags=["accounts"])
async def enable_account(rt: Rt, name: str, p: Admin) -> dict[str, Any]:
    return await rt.writer.run(lambda c: accounts.set_disabled(c, p, rt.now(), name, False))


@router.put("/api/v1/accounts/{name}/password", tags=["accounts"])
async def set_password(rt: Rt, name: str, body: PasswordIn, p: Admin) -> dict[str, Any]:
    digest = await accounts.hash_password(body.password)
    return await rt.writer.run(lambda c: accounts.set_password(c, p, rt.now(), name, digest))


@router.post("/api/v1/login-links", status_code=201, tags=["accounts"])
async def create_login_link(rt: Rt, p: Viewer) -> dict[str, Any]:
    """A one-time dashboard login link for the caller (``path`` on this server)."""
    return await rt.writer.run(lambda c: accounts.create_login_code(c, p, rt.now()))
