"""Failed authentication counted per source address, and refused for a while past a limit.

Contract: ``FailureLimiter.allowed(address)`` is False while ``address`` has ``limit``
failures within the last ``window`` seconds; ``failed`` counts one; ``succeeded``
forgets the address (a person who logs in at last starts afresh). At most
``max_addresses`` addresses are tracked: past that the one that failed longest ago is
forgotten, so a flood from many addresses cannot grow the server's memory.
``Guards`` holds the API's limiters (bearer tokens, agent and relay enrollments;
the dashboard's logins have their own, ``dashboard/routes.py``). A refused attempt
answers 429 before the credential is even looked at, so a locked-out address learns
nothing; every failure and refusal is counted in ``taskfleet_auth_failures_total``
and ``taskfleet_auth_refused_total`` by kind. One process's memory: with several
server processes, each counts what it sees (the limit is per process).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from taskfleet.server import metrics
from taskfleet.server.kernel import ApiError
from taskfleet.settings import (
    AUTH_FAILURE_ADDRESSES,
    AUTH_FAILURE_LIMIT,
    AUTH_FAILURE_WINDOW,
    ENROLL_FAILURE_LIMIT,
)


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
        recent = self._recent(address)
        if recent is None or len(recent) < self._limit:
            return 0
        return max(1, int(recent[0] + self._window - self._clock()) + 1)

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


class Guards:
    """The API's limiters, by kind of credential."""

    def __init__(
        self,
        token_limit: int = AUTH_FAILURE_LIMIT,
        enroll_limit: int = ENROLL_FAILURE_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limiters = {
            "token": FailureLimiter(clock, token_limit, AUTH_FAILURE_WINDOW),
            "enroll": FailureLimiter(clock, enroll_limit, AUTH_FAILURE_WINDOW),
        }

    def check(self, kind: str, address: str) -> None:
        """ApiError 429 while ``address`` is refused for ``kind``."""
        wait = self.limiters[kind].retry_after(address)
        if wait:
            metrics.AUTH_REFUSED.labels(kind).inc()
            raise ApiError(
                429,
                f"too many failed attempts from {address}: try again in {wait} s",
                headers={"Retry-After": str(wait)},
            )

    def failed(self, kind: str, address: str) -> None:
        metrics.AUTH_FAILURES.labels(kind).inc()
        self.limiters[kind].failed(address)
