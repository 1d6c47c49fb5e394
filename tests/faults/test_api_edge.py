"""The edge of the admin API: ids, numbers, body sizes, error shapes, the OpenAPI document.

Each test sends what a careless or hostile client might (an id beyond 64 bits, NaN,
a time of 1e20, a body of any size, bytes that are not UTF-8, a tag value with a
newline) to a real server and checks both halves of the contract: a 400/404/413
answer shaped ``{"error": "..."}`` that names the problem, and nothing changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskfleet.server.app import create_app
from taskfleet.server.runtime import ServerConfig
from taskfleet.settings import API_BODY_MAX, DURATION_MAX, ENROLL_BODY_MAX, MAX_ID, TIME_MAX
from tests.conftest import enroll_token
from tests.raw_agent import (
    ENROLL,
    EXCHANGE,
    SCRIPTS_OK,
    enrolled,
    get,
    snapshot,
)

BIG = MAX_ID + 1  # 2^63: one beyond every id column
HUGE = 99_999_999_999_999_999_999
TF = [sys.executable, "-m", "taskfleet"]


def raw(
    server: Any, method: str, path: str, content: bytes | str, **headers: str
) -> httpx.Response:
    """A request with exactly these body bytes (json= would refuse NaN or fix the text)."""
    h = {"Authorization": f"Bearer {server.admin_token}", "Content-Type": "application/json"}
    h.update(headers)
    body = content.encode() if isinstance(content, str) else content
    return httpx.request(method, server.url + path, content=body, headers=h, timeout=60)


def assert_error(r: httpx.Response, status: int, *needles: str) -> None:
    assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), r.text
    for needle in needles:
        assert needle in body["error"], (needle, r.text)


@pytest.fixture
def fleet(server):
    """A server with one computer (scripts allowed), group web, one request, one task."""
    cid, _ = enrolled(server, enroll_token(server), "a")
    with server.api() as api:
        assert api.post("/groups", json={"name": "web"}).status_code == 201
        assert api.post("/groups/web/members", json={"computer_ids": [cid]}).status_code == 200
        r = api.post("/requests", json={"target": f"computer:{cid}", "params": {"argv": ["true"]}})
        assert r.status_code == 201, r.text
        r = api.post("/tasks", json={"type": "purge-history", "params": {"older_than_days": 3650}})
        assert r.status_code == 201, r.text
    return server, cid


# -- item 10: ids beyond 64 bits ---------------------------------------------------------


def test_ids_beyond_64_bits_are_404_in_paths_and_400_in_queries_and_bodies(fleet):
    server, cid = fleet
    before = snapshot(server)
    with server.api() as api:
        # Paths: an id that cannot exist names nothing.
        for method, path in [
            ("GET", f"/activities/{BIG}"),
            ("GET", f"/requests/{BIG}"),
            ("GET", f"/computers/{HUGE}"),
            ("GET", f"/schedules/{BIG}"),
            ("GET", f"/tasks/{BIG}"),
            ("DELETE", f"/tokens/{BIG}"),
            ("POST", f"/activities/{BIG}/cancel"),
            ("POST", f"/requests/{BIG}/cancel"),
            ("POST", f"/requests/{BIG}/approve"),
            ("POST", f"/requests/{BIG}/rerun-failed"),
            ("POST", f"/tasks/{BIG}/cancel"),
            ("POST", f"/schedules/{BIG}/cancel"),
            ("DELETE", f"/computers/{BIG}/tags/role"),
            ("GET", "/activities/0"),
            ("GET", "/activities/-1"),
            ("GET", "/activities/abc"),
        ]:
            assert_error(api.request(method, path), 404)
        r = api.put(f"/computers/{BIG}/tags", json={"key": "k", "value": "v"})
        assert_error(r, 404, f"no computer '{BIG}'")
        # The largest id is an id: it just does not exist (no overflow on the way).
        assert_error(api.get(f"/activities/{MAX_ID}"), 404)
        assert_error(api.get(f"/requests/{MAX_ID}"), 404)
        # Queries and bodies: 400, naming the field.
        assert_error(api.get("/activities", params={"request_id": BIG}), 400, "request_id")
        assert_error(api.get("/activities", params={"computer_id": HUGE}), 400, "computer_id")
        ok = {"argv": ["true"]}
        for target in (f"computer:{BIG}", f"computer:{HUGE}", f"computer:{cid},{'9' * 5000}"):
            r = api.post("/requests", json={"target": target, "params": ok})
            assert_error(r, 400, "invalid computer id list")
        for ids in ([BIG], [cid, 2**64 - 1], [HUGE]):
            assert_error(api.post("/groups/web/members", json={"computer_ids": ids}), 400)
            r = api.post("/groups/web/members/remove", json={"computer_ids": ids})
            assert_error(r, 400, "computer_ids")
        r = api.post("/activities/cancel", json={"request_id": BIG, "dry_run": True})
        assert_error(r, 400, "request_id")
        for after in ({"request": BIG}, {"activity": 2**64 - 1}):
            r = api.post("/requests", json={"target": "group:web", "params": ok, "after": after})
            assert_error(r, 400, "must be an id")
            assert_error(api.put("/requests/1/after", json={"after": after}), 400, "must be an id")
        r = api.post("/tasks", json={"type": "noop", "after": {"task": BIG}})
        assert_error(r, 400, "after.task")
        r = api.post("/tokens", json={"kind": "enroll", "name": "x", "max_uses": BIG})
        assert_error(r, 400, "max_uses")
        r = api.post("/tasks", json={"type": "purge-history", "params": {"older_than_days": BIG}})
        assert_error(r, 400, "older_than_days", "must fit in 64 bits")
        # At the edge, the same fields are ids like any other: 404, not 500.
        r = api.post("/requests", json={"target": f"computer:{MAX_ID}", "params": ok})
        assert_error(r, 404, f"unknown computer(s): {MAX_ID}")
        r = api.post("/groups/web/members", json={"computer_ids": [MAX_ID]})
        assert_error(r, 404, "unknown computer")
    assert snapshot(server) == before


# -- item 11: NaN, Infinity and numbers out of range ----------------------------------


def test_nan_and_infinity_literals_are_refused_by_the_json_parser_everywhere(fleet):
    server, _ = fleet
    token = enroll_token(server)
    before = snapshot(server)
    # Standard JSON has no NaN or Infinity; a number beyond a double is no number either.
    for literal in ("NaN", "Infinity", "-Infinity", "1e400", "-1e999"):
        r = raw(
            server, "POST", ENROLL, f'{{"token": {literal}, "hostname": "h", "machine_id": "m"}}'
        )
        assert_error(r, 400, "invalid JSON")
        r = raw(
            server,
            "POST",
            ENROLL,
            json.dumps({"token": token, "hostname": "h", "machine_id": "m"})[:-1]
            + f', "tickle_port": {literal}}}',
        )
        assert_error(r, 400, "invalid JSON")
        for path, body in [
            (
                "/api/v1/tokens",
                '{"kind": "admin", "name": "x", "role": "viewer", "expires_in": %s}',
            ),
            ("/api/v1/requests", '{"target": "group:web", "params": {"argv": ["true"]}, "at": %s}'),
            (
                "/api/v1/requests",
                '{"target": "group:web", "params": {"argv": ["true"]}, '
                '"approval": {"expires_in": %s}}',
            ),
            (
                "/api/v1/requests",
                '{"target": "group:web", "params": {"argv": ["true"]}, "rollout": {"share": %s}}',
            ),
            (
                "/api/v1/requests",
                '{"target": "group:web", "params": {"argv": ["true"]}, "timeout": %s}',
            ),
            ("/api/v1/tasks", '{"type": "purge-history", "not_before": %s}'),
            ("/api/v1/activities/cancel", '{"older_than": %s, "dry_run": true}'),
        ]:
            assert_error(raw(server, "POST", path, body % literal), 400, "invalid JSON")
    assert snapshot(server) == before


def test_non_finite_or_out_of_range_times_and_durations_are_refused_400(fleet):
    server, _ = fleet
    before = snapshot(server)
    ok: dict[str, Any] = {"target": "group:web", "params": {"argv": ["true"]}}
    admin = {"kind": "admin", "name": "x", "role": "viewer"}
    cases: list[tuple[str, dict[str, Any], str]] = [
        # Strings that float() would read as non-finite numbers.
        ("/tokens", {**admin, "expires_in": "Infinity"}, "expires_in"),
        ("/tokens", {**admin, "expires_in": "nan"}, "expires_in"),
        ("/requests", {**ok, "at": "-Infinity"}, "at"),
        ("/requests", {**ok, "timeout": "NaN"}, "timeout"),
        ("/requests", {**ok, "expires_in": "inf"}, "expires_in"),
        ("/tasks", {"type": "purge-history", "not_before": "Infinity"}, "not_before"),
        ("/activities/cancel", {"older_than": "NaN", "dry_run": True}, "older_than"),
        # Finite, but no time or duration anyone means.
        ("/tokens", {**admin, "expires_in": 1e300}, "expires_in"),
        ("/tokens", {**admin, "expires_in": DURATION_MAX + 1}, "expires_in"),
        ("/requests", {**ok, "at": 1e20}, "at"),
        ("/requests", {**ok, "at": -1}, "at"),
        ("/requests", {**ok, "at": -1e300}, "at"),
        ("/tasks", {"type": "purge-history", "not_before": 1e20}, "not_before"),
        ("/tasks", {"type": "purge-history", "not_before": -5}, "not_before"),
        ("/activities/cancel", {"older_than": 1e300, "dry_run": True}, "older_than"),
        ("/activities/cancel", {"older_than": -1, "dry_run": True}, "older_than"),
        ("/requests", {**ok, "approval": {"expires_in": 1e300}}, "approval.expires_in"),
        ("/requests", {**ok, "rollout": {"share": 1e300}}, "wave share"),
        ("/requests", {**ok, "after": {"request": 1, "percent": 1e300}}, "threshold"),
        ("/tasks/batch", {"tasks": [{"type": "purge-history", "not_before": 1e20}]}, "not_before"),
    ]
    with server.api() as api:
        for path, body, needle in cases:
            assert_error(api.post(path, json=body), 400, needle)
        r = api.post("/schedules", json={"cron": "0 3 * * *", "request": {**ok, "at": 1e20}})
        assert_error(r, 400, "at")
    assert snapshot(server) == before
    # The bounds are the documented ones, not "refuse everything": their edges pass.
    with server.api() as api:
        r = api.post("/tokens", json={**admin, "expires_in": DURATION_MAX})
        assert r.status_code == 201, r.text
        r = api.post("/tasks", json={"type": "noop", "not_before": TIME_MAX})
        assert r.status_code == 201, r.text
        assert r.json()["task"]["not_before"] == TIME_MAX


def test_cli_at_that_is_no_time_is_a_clear_error_and_sends_nothing(fleet):
    server, _ = fleet
    env = {"TASKFLEET_SERVER": server.url, "TASKFLEET_TOKEN": server.admin_token}
    for at in ("1e20", "-1e20", "nan", "inf", "+nan", "+1e400s"):
        out = subprocess.run(
            [*TF, "run", "--target", "group:web", "--at", at, "--", "true"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )
        assert out.returncode == 2, (at, out.stdout, out.stderr)
        assert out.stderr.startswith("error: --at "), (at, out.stderr)
        if not at.startswith("+"):  # "+D" is a duration, with its own message
            assert "--at must be a finite time between 1970 and 2100" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert len(get(server, "/requests")) == 1  # only the fixture's


# -- item 13: body size limits -----------------------------------------------------------


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A body sent chunked (no Content-Length)."""
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield b" " * n
        sent += n


def test_bodies_over_their_limit_are_413_unread_and_a_maximal_script_still_fits(fleet):
    server, _ = fleet
    token = enroll_token(server, max_uses=1)
    before = snapshot(server)
    good = json.dumps(
        {"token": token, "hostname": "big", "machine_id": "big", "policy": SCRIPTS_OK}
    ).encode()
    # A valid enrollment padded past the limit: refused unparsed, the token not used.
    padded = good + b" " * (ENROLL_BODY_MAX + 1 - len(good))
    h = {"Content-Type": "application/json"}
    r = httpx.post(server.url + ENROLL, content=padded, headers=h, timeout=60)
    assert_error(r, 413, f"over {ENROLL_BODY_MAX} bytes")
    # The same without Content-Length (chunked): counted as it arrives.
    body = iter([good[:-1], *_chunks(ENROLL_BODY_MAX), b"}"])
    r = httpx.post(server.url + ENROLL, content=body, headers=h, timeout=60)
    assert "content-length" not in r.request.headers
    assert_error(r, 413, f"over {ENROLL_BODY_MAX} bytes")
    # The 100 MB, declared: refused on its Content-Length, never parsed.
    r = httpx.post(
        server.url + ENROLL,
        content=_chunks(100 * 1024 * 1024, 1024 * 1024),
        headers={**h, "Content-Length": str(100 * 1024 * 1024)},
        timeout=120,
    )
    assert_error(r, 413, f"over {ENROLL_BODY_MAX} bytes")
    # The admin API has its own, larger limit.
    r = httpx.post(
        server.url + "/api/v1/groups",
        content=_chunks(API_BODY_MAX + 1, 1024 * 1024),
        headers={**h, "Authorization": f"Bearer {server.admin_token}"},
        timeout=120,
    )
    assert_error(r, 413, f"over {API_BODY_MAX} bytes")
    assert snapshot(server) == before
    # At the limit exactly, the body is read and the request goes on as usual.
    exact = good[:-1] + b" " * (ENROLL_BODY_MAX - len(good)) + b"}"
    assert len(exact) == ENROLL_BODY_MAX
    r = httpx.post(server.url + ENROLL, content=exact, headers=h, timeout=60)
    assert r.status_code == 201, r.text
    # The admin API's limit fits a request with a script at the documented limit:
    # 1 Mi characters (domain/scripts.py), each JSON-escaped as a surrogate pair (12 bytes).
    cid = r.json()["computer_id"]
    script = "\U0001f600" * (1024 * 1024 - 16) + "\necho ok\n"
    body = json.dumps({"target": f"computer:{cid}", "params": {"script": script}}).encode()
    assert len(body) > 12_000_000
    r = raw(server, "POST", "/api/v1/requests", body)
    assert r.status_code == 201, r.text[:500]


# -- item 14: one error shape, and an OpenAPI document that tells the truth -------------


def test_every_kind_of_error_is_shaped_error(server):
    r = raw(server, "POST", "/api/v1/groups", b'{"name": "\xff\xfe"}')
    assert_error(r, 400, "invalid JSON", "UTF-8")
    r = raw(server, "POST", ENROLL, b"\xc3\x28")
    assert_error(r, 400, "invalid JSON")
    assert_error(raw(server, "POST", "/api/v1/groups", b"not json"), 400, "invalid JSON")
    assert_error(raw(server, "POST", "/api/v1/groups", b""), 400, "request body")
    assert_error(raw(server, "POST", "/api/v1/groups", b'{"name": 5}'), 400, "name")
    r = raw(server, "POST", "/api/v1/requests", b'{"target": "all"}')
    assert_error(r, 400, "params: Field required")
    assert_error(raw(server, "GET", "/api/v1/activities?limit=many", b""), 400, "limit")
    assert_error(raw(server, "GET", "/api/v1/nothing-here", b""), 404, "/api/v1/nothing-here")
    assert_error(raw(server, "GET", "/nothing", b""), 404)
    r = raw(server, "PATCH", "/api/v1/groups", b"{}")
    assert_error(r, 405, "PATCH")
    assert set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    assert_error(raw(server, "GET", ENROLL, b""), 405)


async def test_an_unexpected_exception_is_a_500_shaped_error(tmp_path: Path):
    app = create_app(ServerConfig(database_url="sqlite://", data_dir=tmp_path))

    async def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/boom")
    assert_error(r, 500, "internal server error")


def test_openapi_documents_auth_the_exchange_metrics_and_only_answered_statuses(server):
    doc = httpx.get(server.url + "/openapi.json", timeout=30).json()
    schemes = doc["components"]["securitySchemes"]
    assert {s["scheme"] for s in schemes.values()} == {"bearer"}
    # Admin routes say they need the bearer token; the open ones do not.
    assert doc["paths"]["/api/v1/requests"]["post"]["security"]
    assert "security" not in doc["paths"][ENROLL]["post"]
    assert "security" not in doc["paths"]["/healthz"]["get"]
    ex = doc["paths"][EXCHANGE]["post"]
    assert ex["security"] and {"200", "400", "401", "413"} <= set(ex["responses"])
    assert ex["parameters"][0]["name"] == "X-Taskfleet-Computer"
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "200" in doc["paths"]["/api/v1/tasks"]["post"]["responses"]  # a duplicate
    for path, item in doc["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            assert "422" not in responses, (method, path)
            if "requestBody" in op:
                assert "413" in responses, (method, path)
            for status, resp in responses.items():
                if status.startswith("4"):
                    schema = resp["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ApiErrorBody"}, (method, path)
    get_activity = doc["paths"]["/api/v1/activities/{activity_id}"]["get"]
    assert get_activity["parameters"][0]["schema"]["maximum"] == MAX_ID  # exact, an int
    # ... and the live exchange is what the document says: 401 without a secret.
    r = raw(server, "POST", EXCHANGE, b'{"ack": 0}', **{"X-Taskfleet-Computer": "1"})
    assert_error(r, 401)


# -- item 15 (part): tag values and names are printable text -----------------------------


def test_tag_values_and_keys_with_newlines_or_control_characters_are_refused(fleet):
    server, cid = fleet
    with server.api() as api:
        r = api.put(f"/computers/{cid}/tags", json={"key": "env", "value": "prod east"})
        assert r.status_code == 200, r.text
    before = snapshot(server)
    with server.api() as api:
        bad = (
            "prod\nrole=db",
            "a\rb",
            "\x1b[31mred",
            "tab\there",
            "nul\x00",
            "\u202eevil",
            "x\u2028y",
        )
        for value in bad:
            r = api.put(f"/computers/{cid}/tags", json={"key": "env", "value": value})
            assert_error(r, 400, "tag value must be printable text")
        r = api.put(f"/computers/{cid}/tags", json={"key": "env", "value": "v" * 257})
        assert_error(r, 400, "longer than 256")
        for key in ("role\n", "ro\nle", "role\t"):
            r = api.put(f"/computers/{cid}/tags", json={"key": key, "value": "x"})
            assert_error(r, 400, "invalid tag key")
        r = api.post("/requests", json={"target": "tag:env=a\nb", "params": {"argv": ["true"]}})
        assert_error(r, 400, "invalid tag target")
        assert_error(api.post("/groups", json={"name": "db\n"}), 400, "invalid group name")
    assert snapshot(server) == before
    assert get(server, f"/computers/{cid}")["tags"] == {"env": "prod east"}
