"""Where the dashboard's sessions live: one port, two adapters.

Contract: ``Sessions.open(token_hash, account_id, tenant_id)`` starts a session and
answers it (its ``id`` is the cookie's value); ``get(id)`` answers it, or None for an
unknown, closed or expired id; ``close(id)`` ends it everywhere. ``LocalSessions``
(SQLite: one server process) keeps ``sessions.SessionStore`` in memory: a restart logs
everyone out. ``SharedSessions`` (PostgreSQL: several server processes behind a load
balancer, docs/scale-out.md) keeps them in the ``dashboard_sessions`` table, so a
session opened through one process is valid in all and a logout through one ends it in
all at once. The table holds the SHA-256 of the session id, never the id itself (the
cookie's value is the secret), with the session's CSRF token, its token hash or
account, its tenant, and when it was opened, last seen and ends. ``get`` is one
indexed read; it writes ``last_seen_at`` at most once every
``DASHBOARD_SESSION_TOUCH_EVERY`` seconds per session, not on every page view;
``open`` deletes the expired rows. Revocation needs nothing here: every request
re-checks the session's token, account and tenant (``login_accounts.session_caller``)
in the database, and the route then closes the session.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Protocol

import sqlalchemy as sa

from taskfleet.server.dashboard.sessions import Session, SessionStore
from taskfleet.settings import DASHBOARD_SESSION_TOUCH_EVERY
from taskfleet.store.schema import dashboard_sessions


class Sessions(Protocol):
    async def open(
        self, token_hash: str, account_id: int | None, tenant_id: int | None
    ) -> Session: ...

    async def get(self, session_id: str | None) -> Session | None: ...

    async def close(self, session_id: str | None) -> None: ...


class LocalSessions:
    """The embedded adapter: this process's memory."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    async def open(self, token_hash: str, account_id: int | None, tenant_id: int | None) -> Session:
        return self.store.open(token_hash, account_id)

    async def get(self, session_id: str | None) -> Session | None:
        return self.store.get(session_id)

    async def close(self, session_id: str | None) -> None:
        self.store.close(session_id)


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class SharedSessions:
    """The scaled adapter: the ``dashboard_sessions`` table. ``rt`` is the server's
    runtime (its read engine, writer and clock)."""

    def __init__(self, rt: Any, ttl: float) -> None:
        self._rt = rt
        self._ttl = ttl

    async def open(self, token_hash: str, account_id: int | None, tenant_id: int | None) -> Session:
        t = dashboard_sessions
        now = self._rt.now()
        s = Session(
            id=secrets.token_urlsafe(32),
            token_hash=token_hash,
            csrf=secrets.token_urlsafe(32),
            expires_at=now + self._ttl,
            account_id=account_id,
        )

        async def write(conn: Any) -> None:
            await conn.execute(sa.delete(t).where(t.c.expires_at <= now))
            await conn.execute(
                sa.insert(t).values(
                    id_hash=_hash(s.id),
                    token_hash=token_hash,
                    account_id=account_id,
                    tenant_id=tenant_id,
                    csrf=s.csrf,
                    created_at=now,
                    last_seen_at=now,
                    expires_at=s.expires_at,
                )
            )

        await self._rt.writer.run(write)
        return s

    async def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        t = dashboard_sessions
        now = self._rt.now()
        key = _hash(session_id)
        async with self._rt.read.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        t.c.token_hash, t.c.account_id, t.c.csrf, t.c.expires_at, t.c.last_seen_at
                    ).where(t.c.id_hash == key, t.c.expires_at > now)
                )
            ).first()
        if row is None:
            return None
        if now - row.last_seen_at >= DASHBOARD_SESSION_TOUCH_EVERY:

            async def touch(conn: Any) -> None:
                await conn.execute(sa.update(t).where(t.c.id_hash == key).values(last_seen_at=now))

            await self._rt.writer.run(touch)
        return Session(session_id, row.token_hash, row.csrf, row.expires_at, row.account_id)

    async def close(self, session_id: str | None) -> None:
        if not session_id:
            return
        t = dashboard_sessions
        key = _hash(session_id)

        async def write(conn: Any) -> None:
            await conn.execute(sa.delete(t).where(t.c.id_hash == key))

        await self._rt.writer.run(write)
