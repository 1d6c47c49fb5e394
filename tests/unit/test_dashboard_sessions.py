"""The dashboard's session, CSRF and login-limit rules (server/dashboard/sessions.py),
on a fake clock; and the role each dashboard action needs (the API route's own)."""

from __future__ import annotations

from taskfleet.server.abuse import FailureLimiter as LoginLimiter
from taskfleet.server.dashboard.sessions import SessionStore, csrf_ok


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_is_found_by_its_random_id_until_it_expires() -> None:
    clock = Clock()
    store = SessionStore(clock, ttl=60)
    s = store.open("h" * 64)
    assert store.get(s.id) is s
    clock.now += 59.9
    assert store.get(s.id) is s
    clock.now += 0.1
    assert store.get(s.id) is None
    assert len(store) == 0  # an expired session is forgotten, not kept


def test_session_ids_and_csrf_tokens_are_random_and_hold_no_token() -> None:
    store = SessionStore(Clock(), ttl=60)
    a, b = store.open("digest-a"), store.open("digest-a")
    assert len({a.id, b.id, a.csrf, b.csrf}) == 4
    assert len(a.id) >= 43 and len(a.csrf) >= 43  # 256 bits, URL-safe
    assert "digest-a" not in a.id


def test_unknown_empty_and_closed_sessions_are_not_found() -> None:
    store = SessionStore(Clock(), ttl=60)
    s = store.open("d")
    assert store.get(None) is None
    assert store.get("") is None
    assert store.get(s.id + "x") is None
    store.close(s.id)
    assert store.get(s.id) is None
    store.close(s.id)  # twice: no error


def test_opening_a_session_sweeps_the_expired_ones() -> None:
    clock = Clock()
    store = SessionStore(clock, ttl=10)
    for _ in range(5):
        store.open("d")
    clock.now += 11
    store.open("d")
    assert len(store) == 1


def test_csrf_needs_both_tokens_and_equal() -> None:
    assert csrf_ok("abc", "abc")
    assert not csrf_ok("abc", "abd")
    assert not csrf_ok("abc", None)
    assert not csrf_ok("abc", "")
    assert not csrf_ok(None, "abc")
    assert not csrf_ok("", "")


def test_the_login_limit_counts_failures_per_address_in_a_sliding_window() -> None:
    clock = Clock()
    limit = LoginLimiter(clock, limit=3, window=100)
    for _ in range(3):
        assert limit.allowed("10.0.0.1")
        limit.failed("10.0.0.1")
        clock.now += 10
    assert not limit.allowed("10.0.0.1")
    assert limit.allowed("10.0.0.2")  # another address is not held back
    clock.now += 71  # the first failure (at 1000) leaves the window at 1100
    assert limit.allowed("10.0.0.1")
    limit.failed("10.0.0.1")
    assert not limit.allowed("10.0.0.1")


def test_a_successful_login_clears_the_failures_of_its_address() -> None:
    limit = LoginLimiter(Clock(), limit=2, window=100)
    limit.failed("a")
    limit.succeeded("a")
    limit.failed("a")
    assert limit.allowed("a")


def test_each_dashboard_action_needs_the_role_of_the_api_route_it_calls() -> None:
    from taskfleet.server.api import approvals, requests
    from taskfleet.server.api.deps import needed_role
    from taskfleet.server.dashboard.routes import NEEDS

    assert needed_role(requests.create_request) == "operator"
    assert needed_role(requests.list_requests) == "viewer"
    assert needed_role(approvals.approve) == "admin"
    assert NEEDS == {
        "run": "operator",
        "cancel": "operator",
        "rerun": "operator",
        "approve": "admin",
        "reject": "admin",
        "audit": "admin",  # the audit page: GET /api/v1/audit's role
    }
