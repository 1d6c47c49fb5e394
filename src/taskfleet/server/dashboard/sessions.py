"""The dashboard's sessions and CSRF tokens: pure, on a clock it is given.

Contract: a session is a random id (the cookie's value) naming a server-side
entry that holds the SHA-256 of the API token it was opened with (never the
token itself: the cookie carries only the id), its own CSRF token and when it
ends. ``SessionStore.get`` answers None for an unknown or expired id and
forgets expired ones. ``csrf_ok`` compares in constant time. Failed logins are
counted per client address by ``server/abuse.py`` (the API's limiter, shared by
every server process on PostgreSQL): past its limit a login is refused without
looking at what it sends, so guessing is bounded. Nothing here does I/O; the clock
is a parameter (tests fake it). ``SessionStore`` is the in-memory store of one
server process (SQLite); ``session_stores.py`` holds the port it is one adapter of,
and the database's adapter that several server processes share.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Session:
    id: str  # the cookie's value: 256 random bits
    token_hash: str  # SHA-256 of the API token it was opened with (re-checked every request)
    csrf: str  # every form of this session carries it; every POST must send it back
    expires_at: float  # on the store's clock
    account_id: int | None = None  # a login account's session (token_hash is "" then)


class SessionStore:
    """Sessions by id, each ending ``ttl`` seconds after it was opened."""

    def __init__(self, clock: Callable[[], float], ttl: float) -> None:
        self._clock = clock
        self._ttl = ttl
        self._by_id: dict[str, Session] = {}

    def open(self, token_hash: str, account_id: int | None = None) -> Session:
        self._sweep()
        s = Session(
            id=secrets.token_urlsafe(32),
            token_hash=token_hash,
            csrf=secrets.token_urlsafe(32),
            expires_at=self._clock() + self._ttl,
            account_id=account_id,
        )
        self._by_id[s.id] = s
        return s

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        s = self._by_id.get(session_id)
        if s is None:
            return None
        if self._clock() >= s.expires_at:
            del self._by_id[session_id]
            return None
        return s

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._by_id.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._by_id)

    def _sweep(self) -> None:
        now = self._clock()
        for sid in [sid for sid, s in self._by_id.items() if now >= s.expires_at]:
            del self._by_id[sid]


def csrf_ok(expected: str | None, sent: str | None) -> bool:
    """True only when both are present and equal (compared in constant time)."""
    if not expected or not sent:
        return False
    return hmac.compare_digest(expected.encode(), sent.encode())
