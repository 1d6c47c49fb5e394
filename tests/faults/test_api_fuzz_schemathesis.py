"""The whole API against its own OpenAPI document: a bounded, fixed-seed schemathesis run.

Contract: a real server process holds a little of everything (a computer, a group, a
tag, a request, a task, a schedule), so the small ids schemathesis tries first name
real things; then ``st run`` goes over every documented operation with the checks
``not_a_server_error``, ``status_code_conformance`` and ``response_schema_conformance``,
and its JSON report must list no failure and no error. Revoking tokens runs last, on
its own: run with the rest, it revokes the run's own admin token early and leaves
every later case testing only 401s (the test checks the token still works).

Every operation is in the run, the agent exchange too (without a computer's secret
it answers its documented 401). Checks not run, and why: positive_data_acceptance
(the document is looser than the rules, e.g. which characters a group name may
have: a 400 for schema-valid data is a rule speaking, not a bug), and
unsupported_method / allow_header_conformance (a path like /tasks/batch also fits
/tasks/{task_id}, whose GET rightly answers 404 "no task 'batch'", not 405).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, enroll_token


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    # The fuzzer sends hundreds of wrong tokens from one address: above the brute-force
    # limit (server/abuse.py), or it would test the 429 instead of the routes' logic.
    return start_server(
        "--lost-grace", "2", "--reaper-interval", "0.2", "--auth-failure-limit", "1000000"
    )


SEED = 20_261_130
MAX_EXAMPLES = 20  # per operation and phase: 25-45 s per database on a busy 2-core machine
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance"
REVOKE = "revoke_token_api_v1_tokens__token_id__delete"


def _populate(server: Server) -> None:
    """One of each thing the API names by id, so generated ids 1, 2... hit real rows."""
    token = enroll_token(server)
    r = httpx.post(
        server.url + "/agent/v1/enroll",
        json={
            "token": token,
            "hostname": "fuzz-1",
            "machine_id": "fuzz-1",
            "policy": {"scripts": True},
        },
        timeout=30,
    )
    assert r.status_code == 201, r.text
    cid = r.json()["computer_id"]
    with server.api() as api:
        for method, path, body in [
            ("POST", "/groups", {"name": "web"}),
            ("POST", "/groups/web/members", {"computer_ids": [cid]}),
            ("PUT", f"/computers/{cid}/tags", {"key": "role", "value": "db"}),
            ("POST", "/requests", {"target": "group:web", "params": {"argv": ["true"]}}),
            (
                "POST",
                "/requests",
                {"target": f"computer:{cid}", "params": {"argv": ["true"]}, "approval": {}},
            ),
            ("POST", "/tasks", {"type": "purge-history", "params": {"older_than_days": 3650}}),
            (
                "POST",
                "/schedules",
                {"cron": "0 3 * * *", "request": {"target": "all", "params": {"argv": ["true"]}}},
            ),
        ]:
            r = api.request(method, path, json=body)
            assert r.status_code < 300, (path, r.text)


def _st_run(server: Server, tmp_path: Path, name: str, *selection: str) -> dict[str, Any]:
    report = tmp_path / f"schemathesis-{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{server.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {server.admin_token}",
        "--checks",
        CHECKS,
        "--seed",
        str(SEED),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--workers",
        "1",
        "--generation-database",
        "none",  # no examples carried over between runs: the same seed, the same run
        "--request-timeout",
        "30",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        *selection,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert report.exists(), done.stdout[-5000:] + done.stderr[-3000:]
    out: dict[str, Any] = json.loads(report.read_text())
    # The failures, with schemathesis' own description, on a failing run.
    assert out["failures"] == [] and out["errors"] == [], done.stdout[-20000:]
    assert done.returncode == 0 and out["complete"], done.stdout[-5000:] + done.stderr[-3000:]
    return out


def test_every_operation_answers_as_documented_under_a_fixed_seed_fuzz(server, tmp_path):
    _populate(server)
    schema = httpx.get(server.url + "/openapi.json", timeout=30).json()
    operations = sum(len(item) for item in schema["paths"].values())
    assert "/agent/v1/exchange" in schema["paths"] and "/metrics" in schema["paths"]

    out = _st_run(server, tmp_path, "main", "--exclude-operation-id", REVOKE)
    assert out["operations"]["tested"] == operations - 1, out["operations"]
    assert out["test_cases"]["generated"] > 20 * operations, out["test_cases"]
    # The run kept its token: the cases above reached the routes, not just the 401 check.
    with server.api() as api:
        assert api.get("/whoami").status_code == 200

    out = _st_run(server, tmp_path, "revoke", "--include-operation-id", REVOKE)
    assert out["operations"]["tested"] == 1, out["operations"]
