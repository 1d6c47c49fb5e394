"""The dashboard with tenants, in a real headless Chromium: password login, a second
tenant's admin sees nothing of the first tenant's fleet and requests, and its session
cannot reach the first tenant's pages by id (docs/tenants.md, docs/dashboard.md)."""

from __future__ import annotations

import re

import httpx
from playwright.sync_api import Browser, Page, expect

from tests.browser import browser, page, shot
from tests.conftest import Server, wait_until

__all__ = ["browser", "page"]

PASSWORD = "correct horse battery staple"


def _tenant_with_account(server: Server, tenant: str, account: str, role: str) -> str:
    with server.api() as root:
        r = root.post("/tenants", json={"name": tenant})
        assert r.status_code == 201, r.text
        token = str(r.json()["token"])
    with server.api(token) as api:
        r = api.post("/accounts", json={"name": account, "role": role, "password": PASSWORD})
        assert r.status_code == 201, r.text
    return token


def password_login(page: Page, server: Server, name: str, password: str) -> None:
    page.goto(server.url + "/ui/login")
    page.fill("#name", name)
    page.fill("#password", password)
    page.click("form[action$='/login'] button[type=submit]")


def test_password_login_and_another_tenant_sees_nothing(
    server: Server, start_agent, browser: Browser, page: Page
) -> None:
    acme = _tenant_with_account(server, "acme", "alice", "operator")
    _tenant_with_account(server, "globex", "gina", "admin")
    with server.api(acme) as api:
        enroll = api.post("/tokens", json={"kind": "enroll", "name": "e"}).json()["token"]
    agent = start_agent(server, enroll, name="acme-web-1")
    cid = agent.computer_id
    with server.api(acme) as api:
        body = {
            "type": "execute-script",
            "target": f"computer:{cid}",
            "params": {"argv": ["echo", "acme-private-output"]},
        }
        rid = api.post("/requests", json=body).json()["id"]
        wait_until(
            lambda: api.get(f"/requests/{rid}").json()["progress"]["done"], 30, "the request"
        )
    # A wrong password: the same answer as an unknown user.
    password_login(page, server, "alice", "not the password at all")
    expect(page.locator("p.error")).to_have_text("wrong user name, password or token")
    password_login(page, server, "nobody", PASSWORD)
    expect(page.locator("p.error")).to_have_text("wrong user name, password or token")
    shot(page, "login")
    password_login(page, server, "alice", PASSWORD)
    expect(page).to_have_url(re.compile(r"/ui/fleet$"))
    expect(page.locator("main")).to_contain_text("acme-web-1")
    page.goto(f"{server.url}/ui/requests/{rid}")
    expect(page.locator("main")).to_contain_text("acme-private-output")
    # Tenant globex's admin, in its own browser context (its own session cookie).
    other = browser.new_context()
    gina = other.new_page()
    try:
        password_login(gina, server, "gina", PASSWORD)
        expect(gina).to_have_url(re.compile(r"/ui/fleet$"))
        expect(gina.locator("main")).not_to_contain_text("acme-web-1")
        gina.goto(server.url + "/ui/requests")
        expect(gina.locator("main")).not_to_contain_text("acme-private-output")
        expect(gina.locator("main")).not_to_contain_text(f"computer:{cid}")
        # Acme's pages by id: 404, exactly like an id that does not exist.
        for path in (f"/ui/computers/{cid}", f"/ui/requests/{rid}", f"/ui/requests/{rid}/live"):
            answer = gina.goto(server.url + path)
            assert answer is not None and answer.status == 404, path
            expect(gina.locator("body")).not_to_contain_text("acme")
        # Its session cookie, sent by hand, gets no more.
        [cookie] = [c for c in other.cookies() if c["name"] == "tf_session"]
        r = httpx.get(
            f"{server.url}/ui/computers/{cid}", cookies={"tf_session": cookie["value"]}, timeout=30
        )
        assert r.status_code == 404 and "acme-web-1" not in r.text
    finally:
        other.close()
    # Alice's session ends at once when her account is disabled.
    with server.api(acme) as api:
        assert api.post("/accounts/alice/disable").status_code == 200
    page.goto(server.url + "/ui/fleet")
    expect(page).to_have_url(re.compile(r"/ui/login$"))


def test_a_one_time_login_link_works_once_in_the_browser(server: Server, page: Page) -> None:
    with server.api() as root:
        link = root.post("/login-links").json()
    page.goto(server.url + link["path"])
    page.get_by_role("button", name="Log in with this link").click()
    expect(page).to_have_url(re.compile(r"/ui/fleet$"))
    page.context.clear_cookies()
    page.goto(server.url + link["path"])
    page.get_by_role("button", name="Log in with this link").click()
    expect(page.locator("p.error")).to_contain_text("this login link is not valid")
