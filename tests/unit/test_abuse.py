"""server/abuse.py: failures per address within a window, then refused; bounded memory."""

from __future__ import annotations

import asyncio

import pytest

from taskfleet.server.abuse import FailureLimiter, Guards
from taskfleet.server.api.deps import guarded
from taskfleet.server.kernel import ApiError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_is_refused_at_the_limit_until_its_oldest_failure_ages_out() -> None:
    clock = Clock()
    lim = FailureLimiter(clock, limit=3, window=60)
    for _ in range(2):
        lim.failed("10.0.0.1")
        clock.now += 10
    assert lim.allowed("10.0.0.1") and lim.retry_after("10.0.0.1") == 0
    lim.failed("10.0.0.1")
    assert not lim.allowed("10.0.0.1")
    assert lim.allowed("10.0.0.2")  # per address
    assert lim.retry_after("10.0.0.1") == 41  # the first failure (t=1000) ages out at 1060
    clock.now = 1060.0
    assert lim.allowed("10.0.0.1")
    lim.succeeded("10.0.0.1")
    assert lim.tracked() == 0


def test_a_flood_of_addresses_keeps_memory_bounded_forgetting_the_oldest() -> None:
    clock = Clock()
    lim = FailureLimiter(clock, limit=1, window=60, max_addresses=100)
    for i in range(1000):
        lim.failed(f"10.0.{i // 256}.{i % 256}")
    assert lim.tracked() == 100
    assert lim.allowed("10.0.0.0")  # the oldest was forgotten
    assert not lim.allowed("10.0.3.231")  # the newest is still refused


def test_guards_answer_429_with_retry_after_and_count_only_credential_failures() -> None:
    guards = Guards(token_limit=2, enroll_limit=2, clock=Clock())

    async def refused() -> None:
        raise ApiError(401, "invalid enrollment token")

    async def bad_input() -> None:
        raise ApiError(400, "hostname is required")

    for _ in range(5):
        with pytest.raises(ApiError) as bad:
            asyncio.run(guarded(guards, "enroll", "10.0.0.9", bad_input()))
        assert bad.value.status == 400  # bad input is not a guess at a credential
    for _ in range(2):
        with pytest.raises(ApiError):
            asyncio.run(guarded(guards, "enroll", "10.0.0.9", refused()))
    with pytest.raises(ApiError) as exc:
        asyncio.run(guarded(guards, "enroll", "10.0.0.9", refused()))
    assert exc.value.status == 429 and exc.value.headers == {"Retry-After": "301"}
    asyncio.run(guards.check("token", "10.0.0.9"))  # the other kind is not affected
