"""Brute force (issue 15): failed API tokens and enrollments are counted per source
address on a real server; past the limit the address gets 429 with Retry-After, even
with a valid credential, and the metrics say so."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from taskfleet.protocol.exchange import ENROLL_PATH
from tests.conftest import Server, enroll_token

LIMIT = 5


def _enroll(server: Server, token: str) -> httpx.Response:
    body = {"token": token, "hostname": "pc", "machine_id": "m-1"}
    return httpx.post(server.url + ENROLL_PATH, json=body, timeout=30)


def test_an_address_that_keeps_guessing_tokens_is_refused_for_a_while(
    start_server: Callable[..., Server],
) -> None:
    server = start_server("--auth-failure-limit", str(LIMIT))
    good = enroll_token(server)
    with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as c:
        for i in range(LIMIT):
            r = c.get("/whoami", headers={"Authorization": f"Bearer tfa_guess{i}"})
            assert r.status_code == 401, r.text
        r = c.get("/whoami", headers={"Authorization": f"Bearer {server.admin_token}"})
        assert r.status_code == 429 and "too many failed attempts" in r.json()["error"]
        assert 0 < int(r.headers["Retry-After"]) <= 301
    # Enrollments are counted on their own: still open, until they fail as often.
    for i in range(LIMIT):
        assert _enroll(server, f"tfe_guess{i}").status_code == 401
    r = _enroll(server, good)
    assert r.status_code == 429
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert f'taskfleet_auth_failures_total{{kind="token"}} {LIMIT}.0' in metrics
    assert f'taskfleet_auth_failures_total{{kind="enroll"}} {LIMIT}.0' in metrics
    assert 'taskfleet_auth_refused_total{kind="token"} 1.0' in metrics
    assert 'taskfleet_auth_refused_total{kind="enroll"} 1.0' in metrics
    assert "computer" not in r.text  # the valid token was not even looked at


def test_bad_input_is_not_counted_as_a_guess(start_server: Callable[..., Server]) -> None:
    server = start_server("--auth-failure-limit", "2")
    good = enroll_token(server)
    for _ in range(4):
        body = {"token": good, "hostname": "", "machine_id": "m"}
        r = httpx.post(server.url + ENROLL_PATH, json=body, timeout=30)
        assert r.status_code in (400, 422), r.text
    assert _enroll(server, good).status_code == 201
