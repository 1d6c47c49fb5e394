"""Agents and administrators spoken for over raw HTTP, against a real server.

For tests that must say what a real agent never would (a malformed exchange, a
result for another computer's operation) and compare what an administrator can
read back before and after (``snapshot``).
"""

from __future__ import annotations

import getpass
import json
from typing import Any

import httpx

from tests.conftest import Server

ENROLL = "/agent/v1/enroll"
EXCHANGE = "/agent/v1/exchange"
SCRIPTS_OK = {"scripts": True, "users": [getpass.getuser()], "types": ["execute-script"]}
MIB = 1024 * 1024


# -- helpers -------------------------------------------------------------------


def enroll_raw(server: Server, token: str, name: str, **extra: Any) -> httpx.Response:
    """Enroll as a raw agent would, with a policy that allows scripts."""
    body = {"token": token, "hostname": name, "machine_id": f"machine-{name}", "policy": SCRIPTS_OK}
    body.update(extra)
    return httpx.post(server.url + ENROLL, json=body, timeout=30)


def enrolled(server: Server, token: str, name: str) -> tuple[int, str]:
    r = enroll_raw(server, token, name)
    assert r.status_code == 201, r.text
    return int(r.json()["computer_id"]), str(r.json()["secret"])


def exchange(
    server: Server,
    cid: int | str | None,
    secret: str | None,
    body: Any = None,
    *,
    content: Any = None,
) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if cid is not None:
        headers["X-Taskfleet-Computer"] = str(cid)
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    if content is None:
        content = json.dumps({"ack": 0} if body is None else body).encode()
    return httpx.post(server.url + EXCHANGE, content=content, headers=headers, timeout=60)


def result_msg(seq: int, op: int, line: str = "x") -> dict[str, Any]:
    return {
        "seq": seq,
        "type": "operation-result",
        "op": op,
        "status": "succeeded",
        "exit_code": 0,
        "stdout": "",
        "stderr": "",
        "result_line": line,
    }


def get(server: Server, path: str, token: str | None = None, **params: Any) -> Any:
    with server.api(token) as api:
        r = api.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def activity(server: Server, activity_id: int) -> dict[str, Any]:
    return get(server, f"/activities/{activity_id}")


def computer_ids(server: Server) -> list[int]:
    return [c["id"] for c in get(server, "/computers")]


def snapshot(server: Server) -> dict[str, Any]:
    """Everything an administrator can read back; compared before and after bad input."""
    return {
        "requests": get(server, "/requests"),
        "activities": get(server, "/activities", limit=10000),
        "groups": get(server, "/groups"),
        "tokens": get(server, "/tokens"),
        "audit": get(server, "/audit", limit=10000, outcome="ok"),  # refusals are audited
        "computers": [
            {k: v for k, v in c.items() if k not in ("last_seen_at", "address")}
            for c in get(server, "/computers")
        ],
    }


def queued_request_for(server: Server, cid: int, **params: Any) -> tuple[int, int]:
    """A request for one computer; returns (request id, activity id)."""
    with server.api() as api:
        r = api.post(
            "/requests",
            json={"target": f"computer:{cid}", "params": params or {"argv": ["true"]}},
        )
    assert r.status_code == 201, r.text
    (a,) = get(server, "/activities", request_id=r.json()["id"])
    return int(r.json()["id"]), int(a["id"])


def admin_token(server: Server, role: str, **kw: Any) -> dict[str, Any]:
    with server.api() as api:
        r = api.post("/tokens", json={"kind": "admin", "name": f"{role}-token", "role": role, **kw})
    assert r.status_code == 201, r.text
    return r.json()


def error_of(r: httpx.Response) -> str:
    return str(r.json()["error"])
