"""The dashboard's logins: by API token or by account (name and password), the caller of
a session re-checked on every request, and one-time login links (docs/tenants.md).

Contract: ``authenticate`` answers the same None for a wrong password, an
unknown name, a disabled account or tenant and a bad token (the login page
says one thing for all, and the limiter counts them alike). ``session_caller``
resolves a session's token or account and its tenant every time: a revoked
token, a disabled account or a disabled tenant ends the session at once.
``redeem_link`` is who a one-time code (``accounts.create_login_code``) opens
``/ui/login/link?code=``'s one session for; a second use, an expired or unknown
code is None (``routes.py`` refuses it and counts a failed login).
"""

from __future__ import annotations

from dataclasses import dataclass

from taskfleet.server import accounts, tenants, tokens
from taskfleet.server.api.deps import read
from taskfleet.server.dashboard.sessions import Session
from taskfleet.server.kernel import ApiError, Principal, token_hash
from taskfleet.server.runtime import Runtime


@dataclass(frozen=True)
class LoggedIn:
    p: Principal
    token_hash: str  # "" for an account's session
    account_id: int | None


async def _admitted(rt: Runtime, p: Principal | None) -> Principal | None:
    if p is None:
        return None
    principal = p
    try:
        return await read(rt, lambda c: tenants.admit(c, principal, None))
    except ApiError:  # its tenant is disabled
        return None


async def authenticate(rt: Runtime, form: dict[str, str]) -> LoggedIn | None:
    """Who the login form names: an account (``name`` and ``password``) or a ``token``."""
    name = form.get("name", "").strip()
    if name:
        password = form.get("password", "")
        p = await read(rt, lambda c: accounts.login(c, name, password))
        p = await _admitted(rt, p)
        return None if p is None else LoggedIn(p, "", p.account_id)
    token = form.get("token", "").strip()
    if not token:
        return None
    p = await _admitted(rt, await read(rt, lambda c: tokens.resolve_token(c, token, rt.now())))
    return None if p is None else LoggedIn(p, token_hash(token), None)


async def session_caller(rt: Runtime, s: Session) -> Principal | None:
    """The caller of session ``s`` now; None once its token, account or tenant is not valid."""
    if s.account_id is not None:
        aid = s.account_id
        p = await read(rt, lambda c: accounts.resolve_account(c, aid))
    else:
        p = await read(rt, lambda c: tokens.resolve_token_hash(c, s.token_hash, rt.now()))
    return await _admitted(rt, p)


async def logged_in(rt: Runtime, who: LoggedIn, address: str) -> None:
    await rt.writer.run(lambda c: accounts.logged_in(c, who.p, rt.now(), address))


async def redeem_link(rt: Runtime, code: str) -> LoggedIn | None:
    """Who a one-time login code opens a session for (using it up); None if it was
    used, has expired or is unknown, or its token, account or tenant is not valid."""
    found = await rt.writer.run(lambda c: accounts.redeem_login_code(c, code, rt.now()))
    if found is None:
        return None
    digest, account_id = found
    p = await session_caller(rt, Session("", digest or "", "", 0.0, account_id))
    return None if p is None else LoggedIn(p, digest or "", account_id)
