"""Failed authentication counted per source address, and refused for a while past a limit.

Contract: a ``Failures`` port, one per kind of credential, with two adapters.
``LocalFailures`` (SQLite: one server process) keeps a ``FailureLimiter`` in memory:
``allowed(address)`` is False while ``address`` has ``limit`` failures within the last
``window`` seconds (a sliding window); at most ``max_addresses`` addresses are
tracked, past that the one that failed longest ago is forgotten. ``SharedFailures``
(PostgreSQL: several server processes on one database) counts in the
``auth_failures`` table, one row per (kind, address), so the limit is per deployment,
not per process: a window opens at an address's first failure and the address is
refused once ``limit`` failures fall in it, until it ends (at most ``limit`` failures
per window, whichever process saw them). Rows whose last failure is older than the
window are pruned, and at most ``max_addresses`` rows per kind are kept (the least
recently failing go first), so a flood from many addresses cannot grow the table
without bound. Either way ``succeeded`` forgets the address (a person who logs in at
last starts afresh); callers call it only when ``standing`` saw failures, so a
success costs no write. Checking costs one indexed read on PostgreSQL, a failure one
upsert.
``Guards`` holds the API's limiters (bearer tokens, agent and relay enrollments;
the dashboard's logins have their own, ``dashboard/routes.py``). A refused attempt
answers 429 before the credential is even looked at, so a locked-out address learns
nothing; every failure and refusal is counted in ``taskfleet_auth_failures_total``
and ``taskfleet_auth_refused_total`` by kind.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from taskfleet.server import metrics
from taskfleet.server.kernel import ApiError
from taskfleet.settings import (
    AUTH_FAILURE_ADDRESSES,
    AUTH_FAILURE_LIMIT,
    AUTH_FAILURE_PRUNE_EVERY,
    AUTH_FAILURE_WINDOW,
    ENROLL_FAILURE_LIMIT,
)
from taskfleet.store.schema import auth_failures


@dataclass(frozen=True)
class Standing:
    """An address's failures within the window, and whole seconds until it may try
    again (0: now)."""

    failures: int
    wait: int


class Failures(Protocol):
    """The port: failures of one kind of credential, per source address."""

    async def standing(self, address: str) -> Standing: ...

    async def failed(self, address: str) -> None: ...

    async def succeeded(self, address: str) -> None: ...


class FailureLimiter:
    def __init__(
        self,
        clock: Callable[[], float],
        limit: int,
        window: float,
        max_addresses: int = AUTH_FAILURE_ADDRESSES,
    ) -> None:
        self._clock = clock
        self._limit = limit
        self._window = window
        self._max = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def allowed(self, address: str) -> bool:
        recent = self._recent(address)
        return recent is None or len(recent) < self._limit

    def failed(self, address: str) -> None:
        q = self._failures.pop(address, None) or deque(maxlen=self._limit)
        q.append(self._clock())
        self._failures[address] = q  # the most recent failure last
        while len(self._failures) > self._max:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def retry_after(self, address: str) -> int:
        """Whole seconds until ``address`` may try again (0: now)."""
        return self.standing(address).wait

    def standing(self, address: str) -> Standing:
        recent = self._recent(address)
        if recent is None:
            return Standing(0, 0)
        if len(recent) < self._limit:
            return Standing(len(recent), 0)
        return Standing(len(recent), max(1, int(recent[0] + self._window - self._clock()) + 1))

    def tracked(self) -> int:
        return len(self._failures)

    def _recent(self, address: str) -> deque[float] | None:
        q = self._failures.get(address)
        if q is None:
            return None
        cutoff = self._clock() - self._window
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self._failures[address]
            return None
        return q


class LocalFailures:
    """The embedded adapter: a ``FailureLimiter`` in this process's memory."""

    def __init__(self, limiter: FailureLimiter) -> None:
        self.limiter = limiter

    async def standing(self, address: str) -> Standing:
        return self.limiter.standing(address)

    async def failed(self, address: str) -> None:
        self.limiter.failed(address)

    async def succeeded(self, address: str) -> None:
        self.limiter.succeeded(address)


class SharedFailures:
    """The scaled adapter: the ``auth_failures`` table every server process shares.
    ``rt`` is the server's runtime (its read engine, writer and clock)."""

    def __init__(
        self,
        rt: Any,
        kind: str,
        limit: int,
        window: float,
        max_addresses: int = AUTH_FAILURE_ADDRESSES,
    ) -> None:
        self._rt = rt
        self._kind = kind
        self._limit = limit
        self._window = window
        self._max = max_addresses
        self._writes = 0

    async def standing(self, address: str) -> Standing:
        t = auth_failures
        now = self._rt.now()
        async with self._rt.read.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(t.c.count, t.c.first_at).where(
                        t.c.kind == self._kind, t.c.address == address[:64]
                    )
                )
            ).first()
        if row is None or row.first_at <= now - self._window:
            return Standing(0, 0)
        if row.count < self._limit:
            return Standing(row.count, 0)
        return Standing(row.count, max(1, int(row.first_at + self._window - now) + 1))

    async def failed(self, address: str) -> None:
        t = auth_failures
        now = self._rt.now()
        cutoff = now - self._window
        self._writes += 1
        prune = self._writes % AUTH_FAILURE_PRUNE_EVERY == 1

        async def write(conn: Any) -> None:
            ins = pg_insert(t).values(
                kind=self._kind, address=address[:64], count=1, first_at=now, last_at=now
            )
            ended = t.c.first_at <= cutoff  # the row's window is over: a new one opens
            await conn.execute(
                ins.on_conflict_do_update(
                    index_elements=[t.c.kind, t.c.address],
                    set_={
                        "count": sa.case((ended, 1), else_=t.c.count + 1),
                        "first_at": sa.case((ended, now), else_=t.c.first_at),
                        "last_at": now,
                    },
                )
            )
            if prune:
                await self._prune(conn, cutoff)

        await self._rt.writer.run(write)

    async def _prune(self, conn: Any, cutoff: float) -> None:
        """Forget rows past their window; keep at most ``max_addresses`` of this kind."""
        t = auth_failures
        mine = t.c.kind == self._kind
        await conn.execute(sa.delete(t).where(mine, t.c.last_at <= cutoff))
        oldest_kept = (
            sa.select(t.c.last_at)
            .where(mine)
            .order_by(t.c.last_at.desc())
            .offset(self._max - 1)
            .limit(1)
            .scalar_subquery()
        )
        await conn.execute(sa.delete(t).where(mine, t.c.last_at < oldest_kept))

    async def succeeded(self, address: str) -> None:
        t = auth_failures

        async def write(conn: Any) -> None:
            await conn.execute(
                sa.delete(t).where(t.c.kind == self._kind, t.c.address == address[:64])
            )

        await self._rt.writer.run(write)


class Guards:
    """The API's limiters, by kind of credential."""

    def __init__(
        self,
        token_limit: int = AUTH_FAILURE_LIMIT,
        enroll_limit: int = ENROLL_FAILURE_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        rt: Any = None,
    ) -> None:
        """In memory on ``clock``; in the database with the runtime ``rt`` (PostgreSQL)."""
        limits = {"token": token_limit, "enroll": enroll_limit}
        self.limiters: dict[str, Failures] = {
            kind: LocalFailures(FailureLimiter(clock, limit, AUTH_FAILURE_WINDOW))
            if rt is None
            else SharedFailures(rt, kind, limit, AUTH_FAILURE_WINDOW)
            for kind, limit in limits.items()
        }

    async def check(self, kind: str, address: str) -> None:
        """ApiError 429 while ``address`` is refused for ``kind``."""
        wait = (await self.limiters[kind].standing(address)).wait
        if wait:
            metrics.AUTH_REFUSED.labels(kind).inc()
            raise ApiError(
                429,
                f"too many failed attempts from {address}: try again in {wait} s",
                headers={"Retry-After": str(wait)},
            )

    async def failed(self, kind: str, address: str) -> None:
        metrics.AUTH_FAILURES.labels(kind).inc()
        await self.limiters[kind].failed(address)
