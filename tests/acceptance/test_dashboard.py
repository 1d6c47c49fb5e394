"""The web dashboard (docs/dashboard.md) in a real headless Chromium against a real
server and real agents: log in, run a script from the form and watch it finish live,
approve, cancel, what a viewer sees and may do, CSRF, escaping, login answers and
limits, and the event stream's resume from Last-Event-ID.

Playwright drives Debian's ``chromium`` (``TASKFLEET_CHROMIUM``, default
/usr/bin/chromium; ``scripts/bootstrap`` installs it), never a browser of its own.
Without it the browser tests skip (fail under TASKFLEET_REQUIRE_SERVICES=1).
``TASKFLEET_SCREENSHOTS=1`` saves the main pages to docs/img/ (the README shows them).
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
from playwright.sync_api import Page, expect

from taskfleet.settings import DASHBOARD_LOGIN_LIMIT
from tests.browser import browser, csrf_of, login, page, shot
from tests.conftest import Server, enroll_token, request_done

__all__ = ["browser", "page"]  # the fixtures, used by name


def make_group(server: Server, name: str, ids: list[int]) -> None:
    with server.api() as api:
        assert api.post("/groups", json={"name": name}).status_code == 201
        assert api.post(f"/groups/{name}/members", json={"computer_ids": ids}).status_code == 200


def create(server: Server, target: str, argv: list[str], **extra: Any) -> dict[str, Any]:
    with server.api() as api:
        r = api.post(
            "/requests",
            json={"target": target, "params": {"argv": argv}, "timeout": 60, **extra},
        )
        assert r.status_code == 201, r.text
        return dict(r.json())


def get_request(server: Server, rid: int) -> dict[str, Any]:
    with server.api() as api:
        return dict(api.get(f"/requests/{rid}").json())


def request_id_of(page: Page) -> int:
    m = re.search(r"/ui/requests/(\d+)$", page.url)
    assert m, page.url
    return int(m.group(1))


# -- in the browser ---------------------------------------------------------------------


def test_admin_runs_a_script_on_a_group_from_the_form_and_watches_it_finish_live(
    server, start_agent, page
):
    token = enroll_token(server)
    agents = [start_agent(server, token, name=f"web-{i}") for i in (1, 2, 3)]
    make_group(server, "web", [a.computer_id for a in agents])
    login(page, server, server.admin_token)
    expect(page.locator("#computers tbody tr")).to_have_count(3)
    expect(page.locator("#computers")).to_contain_text("web-2")
    shot(page, "fleet")
    page.fill("#target", "group:web")
    page.check("input[name=mode][value=script]")
    page.fill("#script", 'echo "started"; sleep 1.5; echo "finished on $TASKFLEET_COMPUTER_ID"')
    page.click("#run")
    expect(page).to_have_url(re.compile(r"/ui/requests/\d+$"))
    rid = request_id_of(page)
    page.evaluate("window.__sameDocument = true")  # gone if the page were reloaded
    # The rows move to succeeded with no reload: the event stream drives the refresh.
    expect(page.locator("#activities tr[data-state=succeeded]")).to_have_count(3)
    expect(page.locator("#counts")).to_contain_text("3/3 finished, done")
    expect(page.locator("#activities")).to_contain_text("finished on")
    expect(page.locator("#stream-state")).to_have_text("done")
    expect(page.locator("#cancel")).to_have_count(0)  # the buttons follow the state too
    assert page.evaluate("window.__sameDocument") is True
    ids = [int(x) for x in page.locator("#events li").evaluate_all("e => e.map(x => x.dataset.id)")]
    assert ids, "no event came over the stream"
    assert ids == sorted(set(ids)), f"the stream repeated or reordered events: {ids}"
    assert get_request(server, rid)["progress"]["succeeded"] == 3
    page.locator("#activities details").first.evaluate("d => d.open = true")
    shot(page, "request")
    page.click("header a[href='/ui/requests']")
    expect(page.locator("#requests")).to_contain_text("succeeded 3")
    shot(page, "requests")
    page.goto(f"{server.url}/ui/computers/{agents[0].computer_id}")
    expect(page.locator("#hostname")).to_have_text("web-1")
    expect(page.locator("main")).to_contain_text(f"{rid}")
    shot(page, "computer")


def test_where_the_event_stream_is_blocked_the_request_page_polls(server, start_agent, page):
    agent = start_agent(server, enroll_token(server))
    req = create(server, f"computer:{agent.computer_id}", ["true"], approval={})
    page.route("**/events*", lambda route: route.abort())  # a proxy that refuses streams
    login(page, server, server.admin_token)
    page.goto(f"{server.url}/ui/requests/{req['id']}")
    expect(page.locator("#activities tr[data-state=blocked]")).to_have_count(1)
    page.evaluate("window.__sameDocument = true")
    with server.api() as api:
        assert api.post(f"/requests/{req['id']}/approve").status_code == 200
    expect(page.locator("#activities tr[data-state=succeeded]")).to_have_count(1)
    expect(page.locator("#stream-state")).to_have_text("done")
    assert page.evaluate("window.__sameDocument") is True
    expect(page.locator("#events li")).to_have_count(0)  # it was polling, not streaming


def test_admin_approves_a_blocked_request_from_the_approvals_queue(server, start_agent, page):
    agent = start_agent(server, enroll_token(server))
    login(page, server, server.admin_token)
    page.fill("#target", f"computer:{agent.computer_id}")
    page.fill("#command", "echo approved-and-ran")
    page.check("#approval")
    page.click("#run")
    rid = request_id_of(page)
    expect(page.locator("#activities tr[data-state=blocked]")).to_have_count(1)
    expect(page.locator("#approvals-count")).to_have_text("1")
    page.click("header a[href='/ui/approvals']")
    expect(page.locator("#approvals")).to_contain_text(f"request {rid}")
    shot(page, "approvals")
    page.click("#approvals button.approve")
    expect(page).to_have_url(re.compile(rf"/ui/requests/{rid}$"))
    expect(page.locator("#activities tr[data-state=succeeded]")).to_have_count(1)
    expect(page.locator("#approvals-count")).to_have_text("0")
    req = get_request(server, rid)
    assert req["approval"]["decision"] == "approved"
    assert req["progress"]["succeeded"] == 1


def test_the_requests_list_refreshes_its_counts_by_itself(server, start_agent, page):
    agent = start_agent(server, enroll_token(server))
    req = create(server, f"computer:{agent.computer_id}", ["true"], approval={})
    login(page, server, server.admin_token)
    page.click("header a[href='/ui/requests']")
    expect(page.locator("#requests")).to_contain_text("blocked 1")
    page.evaluate("window.__sameDocument = true")
    with server.api() as api:
        assert api.post(f"/requests/{req['id']}/approve").status_code == 200
    expect(page.locator("#requests")).to_contain_text("succeeded 1")  # polled every 5 s
    assert page.evaluate("window.__sameDocument") is True


def test_admin_cancels_a_running_request(server, start_agent, page):
    agent = start_agent(server, enroll_token(server))
    req = create(server, f"computer:{agent.computer_id}", ["sleep", "60"])
    login(page, server, server.admin_token)
    page.goto(f"{server.url}/ui/requests/{req['id']}")
    expect(page.locator("#activities tr[data-state=in_progress]")).to_have_count(1)
    page.click("#cancel")
    expect(page.locator("#activities tr[data-state=canceled]")).to_have_count(1)
    expect(page.locator("#cancel")).to_have_count(0)
    assert get_request(server, req["id"])["progress"]["counts"] == {"canceled": 1}


def test_admin_reruns_only_the_failed_computers(server, start_agent, page):
    token = enroll_token(server)
    agents = [start_agent(server, token) for _ in range(2)]
    ids = sorted(a.computer_id for a in agents)
    with server.api() as api:
        r = api.post(
            "/requests",
            json={"target": "all", "params": {"script": "exit $((TASKFLEET_COMPUTER_ID % 2))"}},
        )
        first = r.json()
    request_done(server, first["id"])
    login(page, server, server.admin_token)
    page.goto(f"{server.url}/ui/requests/{first['id']}")
    expect(page.locator("#activities tr[data-state=failed]")).to_have_count(1)
    page.click("#rerun")
    expect(page).to_have_url(re.compile(r"/ui/requests/\d+$"))
    again = request_id_of(page)
    assert again != first["id"]
    expect(page.locator("h1")).to_contain_text(f"failed of request {first['id']}")
    expect(page.locator("#activities tr[data-state=failed]")).to_have_count(1)
    expect(page.locator("#activities tbody tr")).to_have_count(1)
    with server.api() as api:
        acts = api.get("/activities", params={"request_id": again}).json()
    assert [a["computer_id"] for a in acts] == [i for i in ids if i % 2]


def test_a_viewer_sees_no_buttons_and_its_forged_posts_are_refused(server, start_agent, page):
    agent = start_agent(server, enroll_token(server))
    with server.api() as api:
        r = api.post("/tokens", json={"kind": "admin", "name": "auditor", "role": "viewer"})
        assert r.status_code == 201, r.text
        viewer = r.json()["token"]
    blocked = create(server, f"computer:{agent.computer_id}", ["true"], approval={})
    login(page, server, viewer)
    expect(page.locator("#computers tbody tr")).to_have_count(1)
    expect(page.locator("#run-form")).to_have_count(0)
    page.goto(f"{server.url}/ui/requests/{blocked['id']}")
    expect(page.locator("#activities tr[data-state=blocked]")).to_have_count(1)
    for button in ("#approve", "#reject", "#cancel", "#rerun"):
        expect(page.locator(button)).to_have_count(0)
    page.goto(f"{server.url}/ui/approvals")
    expect(page.locator("#approvals")).to_contain_text(f"request {blocked['id']}")
    expect(page.locator("#approvals button")).to_have_count(0)
    # The server refuses what the page does not offer, with a valid session and CSRF token.
    csrf = csrf_of(page)
    with server.api() as api:
        before = len(api.get("/requests").json())
    for path, form in (
        (f"/ui/requests/{blocked['id']}/approve", {"csrf": csrf}),
        (f"/ui/requests/{blocked['id']}/reject", {"csrf": csrf}),
        (f"/ui/requests/{blocked['id']}/cancel", {"csrf": csrf}),
        ("/ui/run", {"csrf": csrf, "target": "all", "mode": "argv", "command": "true"}),
    ):
        r = page.request.post(server.url + path, form=form, max_redirects=0)
        assert r.status == 403, (path, r.status, r.text()[:300])
        assert "role" in r.text()
    after = get_request(server, blocked["id"])
    assert after["progress"]["counts"] == {"blocked": 1}
    assert after["approval"].get("decision") is None
    with server.api() as api:
        assert len(api.get("/requests").json()) == before


def test_a_post_without_or_with_a_stale_csrf_token_is_refused(server, start_agent, page):
    agent = start_agent(server, enroll_token(server))
    blocked = create(server, f"computer:{agent.computer_id}", ["true"], approval={})
    cancel = f"{server.url}/ui/requests/{blocked['id']}/cancel"
    login(page, server, server.admin_token)
    stale = csrf_of(page)
    page.click("header button[type=submit]")  # log out: that session's token dies with it
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    login(page, server, server.admin_token)
    for form in ({}, {"csrf": ""}, {"csrf": stale}, {"csrf": csrf_of(page) + "x"}):
        r = page.request.post(cancel, form=form, max_redirects=0)
        assert r.status == 403, (form, r.status)
        assert "CSRF" in r.text()
    assert get_request(server, blocked["id"])["progress"]["counts"] == {"blocked": 1}
    # The same POST with this session's token is done: the refusals were the token's.
    r = page.request.post(cancel, form={"csrf": csrf_of(page)}, max_redirects=0)
    assert r.status == 303
    assert get_request(server, blocked["id"])["progress"]["counts"] == {"canceled": 1}


def test_html_in_a_hostname_or_in_output_is_shown_as_text(server, start_agent, page, tmp_path):
    evil_host = "<b id=evil-host>x<img src=x onerror=window.__pwned=1>"
    agent = start_agent(server, enroll_token(server), name=evil_host, state_dir=tmp_path / "evil")
    evil_out = "<i id=evil-out>y</i><img src=x onerror=window.__pwned=2>"
    req = create(server, f"computer:{agent.computer_id}", ["printf", "%s\\n", evil_out])
    request_done(server, req["id"])
    login(page, server, server.admin_token)
    expect(page.locator("#computers")).to_contain_text(evil_host)
    for where in ("/ui/fleet", f"/ui/requests/{req['id']}", f"/ui/computers/{agent.computer_id}"):
        page.goto(server.url + where)
        expect(page.locator("main")).to_contain_text(evil_host)
        expect(page.locator("#evil-host")).to_have_count(0)
        expect(page.locator("#evil-out")).to_have_count(0)
        assert page.evaluate("window.__pwned") is None
    page.goto(f"{server.url}/ui/requests/{req['id']}")
    expect(page.locator("#activities")).to_contain_text(evil_out)


# -- over HTTP ----------------------------------------------------------------------------


def _login_form(client: httpx.Client) -> str:
    r = client.get("/ui/login")
    assert r.status_code == 200
    m = re.search(r'name="csrf" value="([^"]+)"', r.text)
    assert m
    return m.group(1)


def _post_login(client: httpx.Client, token: str) -> httpx.Response:
    return client.post("/ui/login", data={"csrf": _login_form(client), "token": token})


def _without_nonces(html: str) -> str:
    return re.sub(r'name="csrf" value="[^"]+"', "", html)


def test_a_wrong_token_gets_the_same_answer_as_an_unknown_one_and_logins_are_limited(server):
    right = server.admin_token
    wrong = right[:-4] + ("aaaa" if not right.endswith("aaaa") else "bbbb")
    with server.api() as api:
        r = api.post("/tokens", json={"kind": "admin", "name": "gone", "role": "admin"})
        revoked = r.json()
        assert api.delete(f"/tokens/{revoked['id']}").status_code in (200, 204)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answers = [
            _post_login(client, t) for t in (wrong, "tfa_" + "z" * 43, revoked["token"], "x")
        ]
        assert {a.status_code for a in answers} == {401}
        assert len({_without_nonces(a.text) for a in answers}) == 1
        assert "wrong user name, password or token" in answers[0].text
        assert "tf_session" not in client.cookies
        for _ in range(DASHBOARD_LOGIN_LIMIT - len(answers)):
            assert _post_login(client, wrong).status_code == 401
        # Over the limit: refused without looking at the token, the right one too.
        limited = _post_login(client, right)
        assert limited.status_code == 429
        assert "too many failed logins" in limited.text
        assert "tf_session" not in client.cookies


def test_the_session_cookie_is_http_only_strict_and_holds_no_token(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = _post_login(client, server.admin_token)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
        assert server.admin_token not in cookie
        assert client.get("/ui/fleet").status_code == 200
        with server.api() as api:
            logins = [e for e in api.get("/audit").json() if e["action"] == "dashboard.login"]
        assert len(logins) == 1 and logins[0]["address"] == "127.0.0.1"
        # Logged out, the same cookie opens nothing.
        sid = client.cookies["tf_session"]
        fleet = client.get("/ui/fleet").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', fleet)
        assert csrf
        assert client.post("/ui/logout", data={"csrf": csrf.group(1)}).status_code == 303
        client.cookies.set("tf_session", sid, path="/ui")
        assert client.get("/ui/fleet").headers["location"] == "/ui/login"


def _events(client: httpx.Client, url: str, headers: dict[str, str] | None = None, stop: int = 0):
    """(id, data) of each ``change`` event until ``done`` (or after ``stop`` events)."""
    out: list[tuple[int, dict[str, Any]]] = []
    fields: dict[str, str] = {}
    with client.stream("GET", url, headers=headers or {}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                key, _, value = line.partition(":")
                fields[key] = value.removeprefix(" ")
                continue
            if fields.get("event") == "done":
                return out, True
            if fields.get("event") == "change":
                out.append((int(fields["id"]), json.loads(fields["data"])))
                if stop and len(out) >= stop:
                    return out, False
            fields = {}
    return out, False


def test_the_event_stream_resumes_from_last_event_id_with_no_gap_and_no_duplicate(
    server, start_agent
):
    token = enroll_token(server)
    agents = [start_agent(server, token) for _ in range(2)]
    target = ",".join(str(a.computer_id) for a in agents)
    req = create(server, f"computer:{target}", ["sleep", "1"])
    url = f"/ui/requests/{req['id']}/events"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert _post_login(client, server.admin_token).status_code == 303
        # Live: two events, the connection drops, the browser comes back with their id.
        first, done = _events(client, url + "?after=0", stop=2)
        assert not done
        rest, done = _events(client, url + "?after=0", {"Last-Event-ID": str(first[-1][0])})
        assert done
        request_done(server, req["id"])
        whole, done = _events(client, url + "?after=0")
        assert done
    ids = [i for i, _ in whole]
    assert ids == sorted(set(ids))
    assert first + rest == whole
    # Every recorded transition of the request is in the stream, each once.
    with server.api() as api:
        acts = api.get("/activities", params={"request_id": req["id"]}).json()
        history = [
            (a["id"], h["to_state"])
            for a in acts
            for h in api.get(f"/activities/{a['id']}").json()["history"]
        ]
    assert sorted((e["activity_id"], e["to_state"]) for _, e in whole) == sorted(history)


def test_pages_need_a_session_and_a_post_without_one_is_refused(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path in ("/ui/fleet", "/ui/requests", "/ui/approvals", "/ui/requests/1"):
            r = client.get(path)
            assert r.status_code == 303 and r.headers["location"] == "/ui/login", path
        r = client.post("/ui/run", data={"target": "all", "mode": "argv", "command": "true"})
        assert r.status_code == 403
    with server.api() as api:
        assert api.get("/requests").json() == []


def test_an_event_stream_ends_with_its_session(server, start_agent):
    agent = start_agent(server, enroll_token(server))
    req = create(server, f"computer:{agent.computer_id}", ["sleep", "60"])
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert _post_login(client, server.admin_token).status_code == 303
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/ui/fleet").text)
        assert csrf
        with client.stream("GET", f"/ui/requests/{req['id']}/events") as stream:
            lines = stream.iter_lines()
            assert next(lines) == "retry: 2000"
            with httpx.Client(base_url=server.url, cookies=client.cookies, timeout=30) as other:
                r = other.post("/ui/logout", data={"csrf": csrf.group(1)})
                assert r.status_code == 303
            rest = list(lines)  # the server closes the stream: the iteration ends
        assert not any(line.startswith("event: done") for line in rest)
        r = client.get(f"/ui/requests/{req['id']}/events")
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"
