"""Tenants never see each other: tenant B's admin walks EVERY route of the running
server (its OpenAPI document, the dashboard's pages) with tenant A's ids and sees
nothing of A (docs/tenants.md).

Tenant A gets real objects: a computer enrolled by a real agent (tagged, in a
group), a request that ran with output, a request waiting for approval, a
schedule, a server task, content, a job using it, a relay enrolled with A's
relay token, a login account, audit rows. Then, as B's admin, every API route (every method of every
path of ``GET /openapi.json``) and every dashboard route (``app.routes``' ``/ui``
ones, from the server's own list: see ``_ui_routes``) is called with A's ids in
its path parameters: by-id routes answer 404 exactly like a missing id, lists
are B's only, and no body holds any of A's strings. A's objects are unchanged
afterwards.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from tests.conftest import Server, wait_until

SECRET_HOST = "acme-secret-host"
SECRET_GROUP = "acme-secret-group"
SECRET_OUTPUT = "ACME-SECRET-OUTPUT"
SECRET_CONTENT = "acme-secret-content.tar"
SECRET_RELAY = "acme-secret-relay"
SECRET_ACCOUNT = "acme-secret-account"
SECRET_TAG = "acmesecrettag"
SECRET_TOKEN = "acme-secret-token"
SECRET_JOB = "acme-secret-job"


def make_tenant(server: Server, name: str) -> str:
    """A new tenant's first admin token (the bootstrap token is the super-admin)."""
    with server.api() as api:
        r = api.post("/tenants", json={"name": name})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


def _ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json()


def populate_a(server: Server, token_a: str, start_agent: Any) -> dict[str, Any]:
    """Tenant A's objects, each kind the server has; the ids B will try."""
    ids: dict[str, Any] = {}
    with server.api(token_a) as api:
        ids["token_id"] = _ok(
            api.post("/tokens", json={"kind": "admin", "name": SECRET_TOKEN, "role": "viewer"}),
            201,
        )["id"]
        enroll = _ok(api.post("/tokens", json={"kind": "enroll", "name": "acme-enroll"}), 201)
        relay_token = _ok(api.post("/tokens", json={"kind": "relay", "name": "acme-relay"}), 201)
        ids["relay_token_id"] = relay_token["id"]
    agent = start_agent(server, enroll["token"], name=SECRET_HOST)
    cid = agent.computer_id
    ids["computer_id"] = cid
    with server.api(token_a) as api:
        _ok(api.post("/groups", json={"name": SECRET_GROUP}), 201)
        _ok(api.post(f"/groups/{SECRET_GROUP}/members", json={"computer_ids": [cid]}))
        _ok(api.put(f"/computers/{cid}/tags", json={"key": SECRET_TAG, "value": "yes"}))
        req = _ok(
            api.post(
                "/requests",
                json={
                    "type": "execute-script",
                    "target": f"group:{SECRET_GROUP}",
                    "params": {"argv": ["echo", SECRET_OUTPUT]},
                    "timeout": 30,
                },
            ),
            201,
        )
        ids["request_id"] = req["id"]

    def done() -> bool:
        with server.api(token_a) as api:
            return bool(_ok(api.get(f"/requests/{ids['request_id']}"))["progress"]["done"])

    wait_until(done, 30, "A's request to finish")
    with server.api(token_a) as api:
        acts = _ok(api.get("/activities", params={"request_id": ids["request_id"]}))
        ids["activity_id"] = acts[0]["id"]
        assert SECRET_OUTPUT in api.get(f"/activities/{ids['activity_id']}").text
        blocked = _ok(
            api.post(
                "/requests",
                json={
                    "type": "execute-script",
                    "target": f"computer:{cid}",
                    "params": {"argv": ["echo", "acme-needs-approval"]},
                    "approval": {},
                },
            ),
            201,
        )
        ids["blocked_id"] = blocked["id"]
        assert [a["request_id"] for a in _ok(api.get("/approvals"))] == [blocked["id"]]
        ids["schedule_id"] = _ok(
            api.post(
                "/schedules",
                json={
                    "cron": "0 3 * * *",
                    "request": {
                        "type": "execute-script",
                        "target": f"group:{SECRET_GROUP}",
                        "params": {"argv": ["echo", "acme-nightly"]},
                    },
                },
            ),
            201,
        )["id"]
        ids["task_id"] = _ok(api.post("/tasks", json={"type": "noop"}), 201)["task"]["id"]
        up = api.post(
            "/content", params={"name": SECRET_CONTENT}, content=b"acme secret bytes " * 100
        )
        ids["sha256"] = _ok(up, 201)["sha256"]
        job = {
            "name": SECRET_JOB,
            "target": f"computer:{cid}",
            "phases": ["download", "install"],
            "items": [
                {
                    "name": "acme-pkg",
                    "content": [{"sha256": ids["sha256"]}],
                    "install": {"argv": ["true"]},
                }
            ],
        }
        ids["job_id"] = _ok(api.post("/jobs", json=job), 201)["id"]
        _ok(
            api.post(
                "/accounts",
                json={
                    "name": SECRET_ACCOUNT,
                    "role": "viewer",
                    "password": "correct horse battery",
                },
            ),
            201,
        )
    r = httpx.post(
        server.url + "/relay/v1/enroll",
        json={"token": relay_token["token"], "name": SECRET_RELAY, "url": "http://acme.example"},
        timeout=30,
    )
    ids["relay_id"] = _ok(r, 201)["relay_id"]
    return ids


SECRETS = (
    SECRET_HOST,
    SECRET_GROUP,
    SECRET_OUTPUT,
    SECRET_CONTENT,
    SECRET_RELAY,
    SECRET_ACCOUNT,
    SECRET_TAG,
    SECRET_TOKEN,
    SECRET_JOB,
    "acme-needs-approval",
    "acme-nightly",
    "acme-enroll",
)


def leaks(text: str, sent: str) -> list[str]:
    """A's strings in ``text`` that B did not send itself (a 404 may echo the path)."""
    return [s for s in SECRETS if s in text and s not in sent]


def fill(path: str, ids: dict[str, Any]) -> str:
    """``path`` with A's ids in its parameters."""
    values = {
        "computer_id": ids["computer_id"],
        "request_id": ids["blocked_id"],
        "activity_id": ids["activity_id"],
        "schedule_id": ids["schedule_id"],
        "task_id": ids["task_id"],
        "token_id": ids["token_id"],
        "relay_id": ids["relay_id"],
        "job_id": ids["job_id"],
        "sha256": ids["sha256"],
        "key": SECRET_TAG,
    }

    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "name":
            return SECRET_ACCOUNT if path.startswith("/api/v1/accounts") else SECRET_GROUP
        return str(values[name])

    return re.sub(r"\{(\w+)\}", one, path)


# A body that passes validation for each route that takes one, naming A's objects
# where it can, so that the route reaches its tenant check (not only a 400).
def body_for(method: str, path: str, ids: dict[str, Any]) -> dict[str, Any] | None:
    cid = ids["computer_id"]
    script = {"type": "execute-script", "params": {"argv": ["true"]}}
    bodies: dict[tuple[str, str], Any] = {
        ("POST", "/api/v1/requests"): {**script, "target": f"computer:{cid}"},
        ("POST", "/api/v1/schedules"): {
            "cron": "0 3 * * *",
            "request": {**script, "target": f"group:{SECRET_GROUP}"},
        },
        ("POST", "/api/v1/groups/{name}/members"): {"computer_ids": [cid]},
        ("POST", "/api/v1/groups/{name}/members/remove"): {"computer_ids": [cid]},
        ("PUT", "/api/v1/groups/{name}/window"): {"window": "01:00-02:00"},
        ("PUT", "/api/v1/computers/{computer_id}/tags"): {"key": "k", "value": "v"},
        ("POST", "/api/v1/computers/{computer_id}/identity"): {"decision": "reset"},
        ("PUT", "/api/v1/requests/{request_id}/after"): {"after": {"request": ids["request_id"]}},
        ("POST", "/api/v1/relays/{relay_id}/assign"): {"group": SECRET_GROUP},
        ("POST", "/api/v1/activities/cancel"): {"request_id": ids["blocked_id"], "dry_run": True},
        ("PUT", "/api/v1/accounts/{name}/password"): {"password": "another long password"},
        ("POST", "/api/v1/jobs"): {
            "name": "x",
            "target": f"computer:{cid}",
            "items": [{"kind": "script", "script": "true"}],
        },
        ("POST", "/api/v1/tasks"): {"type": "noop"},
        ("POST", "/api/v1/tasks/batch"): {"tasks": [{"type": "noop"}]},
        ("POST", "/api/v1/tokens"): {"kind": "enroll", "name": "b", "group": SECRET_GROUP},
        ("POST", "/api/v1/groups"): {"name": "b-group"},
        ("POST", "/api/v1/tenants"): {"name": "b-made"},
        ("POST", "/api/v1/accounts"): {
            "name": SECRET_ACCOUNT,
            "role": "viewer",
            "password": "correct horse battery",
        },
    }
    return bodies.get((method, path), {} if method in ("POST", "PUT") else None)


# What B's admin gets for routes that are not about one of A's objects.
SUPER_ADMIN_ONLY = {"/api/v1/tenants", "/api/v1/tenants/{name}/disable"}
# Routes whose answer is the same whoever asks and holds no tenant's data.
GLOBAL = {"/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect", "/healthz", "/metrics"}


def snapshot(server: Server, token_a: str, ids: dict[str, Any]) -> dict[str, Any]:
    """What A's admin sees of its objects: unchanged by anything B did."""
    with server.api(token_a) as api:
        return {
            "computers": [(c["id"], c["hostname"]) for c in _ok(api.get("/computers"))],
            "tags": _ok(api.get(f"/computers/{ids['computer_id']}"))["tags"],
            "groups": [(g["name"], g.get("window")) for g in _ok(api.get("/groups"))],
            "blocked": _ok(api.get(f"/requests/{ids['blocked_id']}"))["progress"],
            "approvals": [a["request_id"] for a in _ok(api.get("/approvals"))],
            "schedules": [(s["id"], s["canceled_at"]) for s in _ok(api.get("/schedules"))],
            "tokens": [(t["id"], t["revoked"]) for t in _ok(api.get("/tokens"))],
            "content": [c["sha256"] for c in _ok(api.get("/content"))],
            "relays": [(r["id"], r["revoked_at"]) for r in _ok(api.get("/relays"))],
            "jobs": [(j["id"], j["terminate"]) for j in _ok(api.get("/jobs"))],
            "accounts": [(a["name"], a["disabled"]) for a in _ok(api.get("/accounts"))],
            "audit": len(_ok(api.get("/audit", params={"limit": 1000}))),
        }


def _ui_routes(server: Server) -> list[tuple[str, str]]:
    """The dashboard's routes as the server itself lists them (not in the OpenAPI
    document): the app is built from the same code, so a new page is walked too."""
    from pathlib import Path

    from taskfleet.server.app import create_app
    from taskfleet.server.runtime import ServerConfig

    app = create_app(ServerConfig("sqlite+aiosqlite:///:memory:", Path("/nonexistent")))
    out = []
    for route in app.routes:
        path = getattr(route, "path", "")
        for method in sorted(getattr(route, "methods", None) or ()):
            if path.startswith("/ui/") and method != "HEAD":
                out.append((method, path))
    return out


def test_tenant_b_walks_every_route_with_tenant_a_ids_and_sees_nothing(server, start_agent):
    token_a = make_tenant(server, "acme")
    token_b = make_tenant(server, "globex")
    ids = populate_a(server, token_a, start_agent)
    before = snapshot(server, token_a, ids)
    doc = httpx.get(server.url + "/openapi.json", timeout=30).json()
    walked = []
    problems = []
    walked_ui = False
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token_b}"}, timeout=60
    ) as b:
        # Every read first, API and dashboard (before B changed anything of its own
        # that could echo an A name back: a group B names like A's is B's), then every
        # write.
        routes = sorted(
            ((m.upper(), path) for path, item in doc["paths"].items() for m in item),
            key=lambda mp: mp[0] != "GET",
        )
        ui = _ui_routes(server)
        assert ("GET", "/ui/computers/{computer_id}") in ui
        for verb, path in routes:
            if verb != "GET" and not walked_ui:
                problems += walk_dashboard(server, token_b, ids, ui)
                walked_ui = True
            if verb in ("GET", "POST", "PUT", "DELETE"):
                url = fill(path, ids)
                body = body_for(verb, path, ids)
                r = b.request(verb, url, json=body) if body is not None else b.request(verb, url)
                walked.append((verb, path))
                sent = url + str(body)
                if leaks(r.text, sent):
                    problems.append(f"{verb} {path}: {r.status_code} leaks {leaks(r.text, sent)}")
                elif "{" in path and not path.startswith(("/agent/", "/relay/")):
                    # A by-id route: 404 exactly like a missing id (a super-admin-only
                    # route is 403 for everyone else, whatever the id).
                    want = 403 if path.startswith("/api/v1/tenants") else 404
                    if r.status_code != want:
                        problems.append(f"{verb} {path}: {r.status_code} {r.text[:200]}")
                elif path.startswith(("/agent/", "/relay/")):
                    # An admin token is no agent's or relay's credential.
                    if r.status_code < 400:
                        problems.append(f"{verb} {path}: {r.status_code} {r.text[:200]}")
                elif path in SUPER_ADMIN_ONLY or path in ("/api/v1/workers", "/api/v1/servers"):
                    if r.status_code != 403:
                        problems.append(f"{verb} {path}: {r.status_code}, not 403")
                elif verb == "GET" and path not in GLOBAL and r.status_code != 200:
                    problems.append(f"{verb} {path}: {r.status_code} {r.text[:200]}")
        # Lists are B's only (B made nothing but what the walk made: no computer of A).
        assert b.get("/api/v1/computers").json() == []
        assert b.get("/api/v1/approvals").json() == []
        # Naming A's tenant is refused like any other name: no way to act in it.
        r = b.get("/api/v1/computers", headers={"X-Taskfleet-Tenant": "acme"})
        assert r.status_code == 403 and SECRET_HOST not in r.text
    # Every route of the document was walked (the agent and relay exchanges too).
    assert ("GET", "/api/v1/computers/{computer_id}") in walked
    assert len(walked) >= 70, walked
    assert walked_ui
    assert problems == [], "\n".join(problems)
    assert snapshot(server, token_a, ids) == before


def ui_session(server: Server, token: str) -> httpx.Client:
    """An httpx client with a dashboard session opened with ``token``."""
    c = httpx.Client(base_url=server.url, timeout=60, follow_redirects=False)
    page = c.get("/ui/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf, page.text
    r = c.post("/ui/login", data={"csrf": csrf.group(1), "token": token})
    assert r.status_code == 303 and r.headers["location"].endswith("/ui/fleet"), r.text
    return c


def walk_dashboard(
    server: Server, token_b: str, ids: dict[str, Any], ui: list[tuple[str, str]]
) -> list[str]:
    problems = []
    c = ui_session(server, token_b)
    try:
        fleet = c.get("/ui/fleet")
        csrf = re.search(r'name="csrf" value="([^"]+)"', fleet.text)
        assert csrf
        for method, path in ui:
            if path in ("/ui/logout", "/ui/login", "/ui/login/link"):
                continue
            url = fill(path, ids)
            if method == "GET":
                r = c.get(url, params={"after": "0"} if url.endswith("/events") else None)
            else:
                r = c.post(
                    url,
                    data={
                        "csrf": csrf.group(1),
                        "target": f"computer:{ids['computer_id']}",
                        "command": "true",
                    },
                )
            if leaks(r.text, url):
                problems.append(f"UI {method} {path}: {r.status_code} leaks {leaks(r.text, url)}")
            elif "{" in path and r.status_code != 404:
                problems.append(f"UI {method} {path}: {r.status_code}, not 404")
            elif "{" not in path and method == "GET" and r.status_code not in (200, 303):
                problems.append(f"UI {method} {path}: {r.status_code}")
    finally:
        c.close()
    return problems


def test_the_super_admin_sees_a_tenant_only_when_it_acts_in_it(server, start_agent):
    token_a = make_tenant(server, "acme")
    with server.api(token_a) as api:
        enroll = _ok(api.post("/tokens", json={"kind": "enroll", "name": "e"}), 201)["token"]
    start_agent(server, enroll, name=SECRET_HOST)
    with server.api() as root:
        assert root.get("/computers").json() == []  # its own (default) tenant's only
        assert root.get("/audit").json()[0]["action"] == "tenant.create"
        acting = {"X-Taskfleet-Tenant": "acme"}
        me = _ok(root.get("/whoami"))
        assert me["super_admin"] is True and me["acting_as"] is None
        me_there = _ok(root.get("/whoami", headers=acting))
        assert me_there["tenant_id"] != me["tenant_id"]
        assert me_there["acting_as"] == f"superadmin:{me['token_id']}"
        [c] = _ok(root.get("/computers", headers=acting))
        assert c["hostname"] == SECRET_HOST
        # What it does there is that tenant's, recorded as the super-admin's.
        _ok(root.post("/groups", json={"name": "by-root"}, headers=acting), 201)
        assert root.get("/groups").json() == []
        r = root.get("/audit", headers=acting)
        [entry] = [e for e in r.json() if e["action"] == "group.create"]
        assert entry["actor"].startswith("superadmin:")
        r = root.get("/computers", headers={"X-Taskfleet-Tenant": "nope"})
        assert r.status_code == 404 and "no tenant 'nope'" in r.json()["error"]
        # Workers serve every tenant: the super-admin sees them, a tenant's admin not.
        assert root.get("/workers").status_code == 200
    with server.api(token_a) as api:
        assert api.get("/workers").status_code == 403
        assert api.get("/tenants").status_code == 403
        assert api.post("/tenants", json={"name": "x"}).status_code == 403
        # A tenant admin naming its own tenant is fine (the CLI's --tenant), another not.
        assert api.get("/groups", headers={"X-Taskfleet-Tenant": "acme"}).status_code == 200
        assert api.get("/groups", headers={"X-Taskfleet-Tenant": "default"}).status_code == 403
    with server.api() as root:
        assert [t["name"] for t in root.get("/tenants").json()] == ["default", "acme"]


def test_a_disabled_tenant_is_refused_and_enabled_again(server, start_agent, tmp_path):
    token_a = make_tenant(server, "acme")
    with server.api(token_a) as api:
        enroll = _ok(api.post("/tokens", json={"kind": "enroll", "name": "e"}), 201)["token"]
        relay_token = _ok(api.post("/tokens", json={"kind": "relay", "name": "r"}), 201)["token"]
    agent = start_agent(server, enroll, name="acme-1")
    # Work handed out before the tenant is disabled ends while it is, and is recorded.
    gate = tmp_path / "gate"
    script = f"while [ ! -e {gate} ]; do sleep 0.05; done; echo finished-while-disabled"
    with server.api(token_a) as api:
        body = {"type": "execute-script", "target": "all", "params": {"script": script}}
        rid = _ok(api.post("/requests", json=body), 201)["id"]
    results = server.metric("taskfleet_results_recorded_total")
    with server.api() as root:
        d = _ok(root.post("/tenants/acme/disable"))
        assert d["disabled"] is True
    gate.touch()
    wait_until(
        lambda: server.metric("taskfleet_results_recorded_total") > results, 30, "the result"
    )
    with server.api() as root:
        assert root.post("/tenants/default/disable").status_code == 409
    with server.api(token_a) as api:
        r = api.get("/computers")
        assert r.status_code == 403 and "disabled" in r.json()["error"]
    r = httpx.post(
        server.url + "/agent/v1/enroll",
        json={"token": enroll, "hostname": "late", "machine_id": "late-1", "policy": {}},
        timeout=30,
    )
    assert r.status_code == 403 and "disabled" in r.text
    r = httpx.post(
        server.url + "/relay/v1/enroll",
        json={"token": relay_token, "name": "late", "url": "http://x.example"},
        timeout=30,
    )
    assert r.status_code == 403 and "disabled" in r.text
    with server.api() as root:
        r = root.get("/computers", headers={"X-Taskfleet-Tenant": "acme"})
        assert r.status_code == 403 and "disabled" in r.json()["error"]
        _ok(root.post("/tenants/acme/enable"))
    with server.api(token_a) as api:
        [c] = _ok(api.get("/computers"))
        assert c["id"] == agent.computer_id
        [act] = _ok(api.get("/activities", params={"request_id": rid}))
        assert act["state"] == "succeeded"
        assert "finished-while-disabled" in api.get(f"/activities/{act['id']}").text


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"name": ""}, 400, "required"),
        ({"name": "x" * 65}, 400, "at most 64"),
        ({"name": "bad\x00name"}, 400, "letters, digits"),
        ({"name": "has space"}, 400, "letters, digits"),
        ({"name": "-dash"}, 400, "starting with"),
        ({"name": "default"}, 409, "exists"),
    ],
)
def test_bad_tenant_names_are_refused_and_nothing_changes(server, body, status, words):
    with server.api() as root:
        before = root.get("/tenants").json()
        r = root.post("/tenants", json=body)
        assert r.status_code == status, r.text
        assert words in r.json()["error"]
        assert root.get("/tenants").json() == before
        assert root.post("/tenants/nope/disable").status_code == 404


def test_bad_accounts_are_refused_and_nothing_changes(server):
    good = {"name": "ann", "role": "operator", "password": "a long enough password"}
    cases = [
        ({**good, "password": "short"}, 400, "too short: at least 12"),
        ({**good, "role": "root"}, 400, "role must be one of viewer, operator, admin"),
        ({**good, "name": ""}, 400, "required"),
        ({**good, "name": "a b"}, 400, "letters, digits"),
        ({**good, "name": "n" * 65}, 400, "at most 64"),
        ({**good, "password": "x" * 2000}, 400, "too long"),
    ]
    with server.api() as root:
        for body, status, words in cases:
            r = root.post("/accounts", json=body)
            assert r.status_code == status, r.text
            assert words in r.json()["error"], r.text
        assert root.get("/accounts").json() == []
        _ok(root.post("/accounts", json=good), 201)
        r = root.post("/accounts", json=good)
        assert r.status_code == 409 and "taken" in r.json()["error"]
        r = root.post("/accounts", json=good, headers={"X-Taskfleet-Tenant": "nope"})
        assert r.status_code == 404 and "no tenant 'nope'" in r.json()["error"]
        r = root.put("/accounts/ann/password", json={"password": "short"})
        assert r.status_code == 400
        assert root.post("/accounts/nobody/disable").status_code == 404
        [a] = root.get("/accounts").json()
        assert (a["name"], a["role"], a["disabled"]) == ("ann", "operator", False)
        # A viewer token may not manage accounts.
        viewer = _ok(root.post("/tokens", json={"name": "v", "role": "viewer"}), 201)["token"]
    with server.api(viewer) as api:
        assert api.post("/accounts", json={**good, "name": "bob"}).status_code == 403
        assert api.get("/accounts").status_code == 403


def _use_link(c: httpx.Client, path: str) -> httpx.Response:
    """Open the link's page (which spends nothing), then press its button."""
    page = c.get(path)
    assert page.status_code == 200, page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    code = re.search(r'name="code" value="([^"]+)"', page.text)
    assert csrf and code
    return c.post("/ui/login/link", data={"csrf": csrf.group(1), "code": code.group(1)})


def test_a_one_time_login_link_opens_one_session_once(server):
    with server.api() as root:
        link = _ok(root.post("/login-links"), 201)
    assert link["expires_at"] - time.time() <= 600 + 5
    with httpx.Client(base_url=server.url, timeout=30) as c:
        # A link preview or a mail scanner fetching it spends nothing.
        for _ in range(3):
            r = c.get(link["path"])
            assert r.status_code == 200 and "tf_session" not in r.cookies
        r = _use_link(c, link["path"])
        assert r.status_code == 303 and r.headers["location"].endswith("/ui/fleet")
        assert "tf_session" in r.cookies
        assert c.get("/ui/fleet").status_code == 200
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = _use_link(c, link["path"])
        assert r.status_code == 401 and "used, has expired or is unknown" in r.text
        assert "tf_session" not in r.cookies
        r = _use_link(c, "/ui/login/link?code=made-up")
        assert r.status_code == 401
        # No CSRF token from the link's page: refused, the code not looked at.
        r = c.post("/ui/login/link", data={"code": "made-up"})
        assert r.status_code == 403
        assert c.get("/ui/login/link").status_code == 400  # no code at all
        assert c.get("/ui/fleet", follow_redirects=False).status_code == 303


def test_password_sessions_end_when_the_account_or_tenant_is_disabled(server):
    token_a = make_tenant(server, "acme")
    with server.api(token_a) as api:
        body = {"name": "ann", "role": "viewer", "password": "a long enough password"}
        _ok(api.post("/accounts", json=body), 201)
    with httpx.Client(base_url=server.url, timeout=30) as c:

        def login(password: str) -> httpx.Response:
            page = c.get("/ui/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert csrf
            return c.post(
                "/ui/login", data={"csrf": csrf.group(1), "name": "ann", "password": password}
            )

        wrong = login("not the password at all")
        unknown_page = c.get("/ui/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', unknown_page.text)
        assert csrf
        unknown = c.post(
            "/ui/login", data={"csrf": csrf.group(1), "name": "nobody", "password": "whatever1234"}
        )
        assert wrong.status_code == unknown.status_code == 401
        assert "wrong user name, password or token" in wrong.text
        assert "wrong user name, password or token" in unknown.text
        r = login("a long enough password")
        assert r.status_code == 303, r.text
        assert c.get("/ui/fleet").status_code == 200
        with server.api(token_a) as api:
            assert api.get("/accounts").json()[0]["last_login_at"] is not None
            _ok(api.post("/accounts/ann/disable"))
        assert c.get("/ui/fleet").status_code == 303  # the session ended at once
        assert login("a long enough password").status_code == 401
        with server.api(token_a) as api:
            _ok(api.post("/accounts/ann/enable"))
        assert login("a long enough password").status_code == 303
        with server.api() as root:
            _ok(root.post("/tenants/acme/disable"))
        assert c.get("/ui/fleet").status_code == 303
        assert login("a long enough password").status_code == 401


def test_password_logins_are_rate_limited_like_tokens(server):
    with server.api() as root:
        body = {"name": "ann", "role": "viewer", "password": "a long enough password"}
        _ok(root.post("/accounts", json=body), 201)
    with httpx.Client(base_url=server.url, timeout=30) as c:

        def login(name: str, password: str) -> httpx.Response:
            page = c.get("/ui/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert csrf
            return c.post(
                "/ui/login", data={"csrf": csrf.group(1), "name": name, "password": password}
            )

        answers = [login("ann" if i % 2 else "nobody", f"wrong password {i}") for i in range(10)]
        assert {a.status_code for a in answers} == {401}
        limited = login("ann", "a long enough password")
        assert limited.status_code == 429 and "too many failed logins" in limited.text
        assert "tf_session" not in c.cookies
