"""The dashboard's audit page (docs/audit.md, docs/dashboard.md) in a real headless
Chromium: logins, logouts and refused dashboard actions are audited with the address
and outcome; the page filters and pages; its CSV export holds exactly the filtered
entries; a viewer sees no link and is refused the page."""

from __future__ import annotations

import csv
import io
import json
import re

from playwright.sync_api import Page, expect

from tests.browser import browser, csrf_of, login, page, shot
from tests.conftest import Server

__all__ = ["browser", "page"]  # the fixtures, used by name


def entries(server: Server, **params: object) -> list[dict]:
    with server.api() as api:
        r = api.get("/audit", params={"limit": 10000, **params})
    assert r.status_code == 200, r.text
    return list(r.json())


def viewer_token(server: Server) -> str:
    with server.api() as api:
        r = api.post("/tokens", json={"kind": "admin", "name": "auditor", "role": "viewer"})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def test_the_audit_page_filters_and_exports_what_the_dashboard_did(server, page: Page, tmp_path):
    # A failed login: refused, by nobody known, from the browser's address, no token kept.
    page.goto(server.url + "/ui/login")
    page.fill("#token", "tfa_wrong-secret")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_be_visible()
    login(page, server, server.admin_token)
    # A refused dashboard action (an unknown request), with the session's CSRF token.
    r = page.request.post(server.url + "/ui/requests/999999/cancel", form={"csrf": csrf_of(page)})
    assert r.status == 404
    with server.api() as api:  # an API action to tell apart, and markup in a refusal
        assert api.post("/groups", json={"name": "web"}).status_code == 201
        assert api.delete("/groups/<img src=x onerror=alert(1)>").status_code == 404

    [failed] = entries(server, action="dashboard.login", outcome="refused")
    assert failed["actor"] == "unknown" and failed["address"] == "127.0.0.1"
    assert failed["detail"]["status"] == 401
    assert "wrong-secret" not in json.dumps(failed)
    [ok] = entries(server, action="dashboard.login", outcome="ok")
    assert ok["actor"] == "token:1" and ok["address"] == "127.0.0.1"
    assert ok["object"] == "token:1"
    [cancel] = entries(server, action="ui_cancel")
    assert cancel["outcome"] == "refused" and cancel["object"] == "request:999999"
    assert cancel["address"] == "127.0.0.1" and cancel["actor"] == "token:1"

    # The page: newest first, filtered by the form, export links with the same filters.
    page.click("#nav-audit")
    expect(page).to_have_url(re.compile(r"/ui/audit$"))
    expect(page.locator("#audit tbody tr").first).to_contain_text(
        "group:<img src=x onerror=alert(1)>"
    )
    expect(page.locator("#audit img")).to_have_count(0)  # shown as text, escaped
    expect(page.locator("#audit")).to_contain_text("group.create")
    page.select_option("select[name=outcome]", "refused")
    page.click("#audit-filter button[type=submit]")
    expect(page).to_have_url(re.compile(r"outcome=refused"))
    expect(page.locator("#audit tbody tr")).to_have_count(3)
    expect(page.locator("#audit")).to_contain_text("request:999999")
    shot(page, "audit")
    expect(page.locator("#audit")).not_to_contain_text("group.create")
    page.fill("input[name=actor]", "unknown")
    page.click("#audit-filter button[type=submit]")
    expect(page.locator("#audit tbody tr")).to_have_count(1)
    expect(page.locator("#audit")).to_contain_text("dashboard.login")
    page.fill("input[name=actor]", "")
    page.fill("input[name=object]", "request:*")
    page.click("#audit-filter button[type=submit]")
    expect(page.locator("#audit tbody tr")).to_have_count(1)

    with page.expect_download() as info:
        page.click("#export-csv")
    path = tmp_path / "audit.csv"
    info.value.save_as(path)
    rows = list(csv.DictReader(io.StringIO(path.read_text(), newline="")))
    want = entries(server, outcome="refused", object="request:*")
    assert [int(r["id"]) for r in rows] == [e["id"] for e in want] == [cancel["id"]]
    assert rows[0]["outcome"] == "refused" and rows[0]["object"] == "request:999999"
    href = page.locator("#export-jsonl").get_attribute("href")
    assert href and "outcome=refused" in href and "format=jsonl" in href

    # A bad filter: a clear 400 page.
    page.goto(server.url + "/ui/audit?since=yesterday-ish")
    expect(page.locator("main")).to_contain_text("since:")

    # Logging out is audited too.
    page.goto(server.url + "/ui/audit")
    page.click("header button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    [out] = entries(server, action="dashboard.logout")
    assert out["outcome"] == "ok" and out["address"] == "127.0.0.1"


def test_a_viewer_sees_no_audit_link_and_is_refused_the_page(server, page: Page):
    login(page, server, viewer_token(server))
    expect(page.locator("header nav")).to_contain_text("Fleet")
    expect(page.locator("#nav-audit")).to_have_count(0)
    r = page.goto(server.url + "/ui/audit")
    assert r is not None and r.status == 403
    expect(page.locator("main")).to_contain_text("admin role")
    r = page.goto(server.url + "/ui/audit/export?format=csv")
    assert r is not None and r.status == 403


def test_the_audit_page_pages_back_by_id(server, page: Page):
    from taskfleet.settings import DASHBOARD_AUDIT_ROWS

    with server.api() as api:
        for i in range(DASHBOARD_AUDIT_ROWS + 5):
            assert api.post("/groups", json={"name": f"g{i}"}).status_code == 201
    login(page, server, server.admin_token)
    page.goto(server.url + "/ui/audit?action=group.create")
    expect(page.locator("#audit tbody tr")).to_have_count(DASHBOARD_AUDIT_ROWS)
    expect(page.locator("#audit tbody tr").first).to_contain_text(
        f"group:g{DASHBOARD_AUDIT_ROWS + 4}"
    )
    page.click("#older")
    expect(page).to_have_url(re.compile(r"action=group.create.*before_id=\d+"))
    expect(page.locator("#audit tbody tr")).to_have_count(5)
    expect(page.locator("#audit tbody tr").last).to_contain_text("group:g0")
    expect(page.locator("#older")).to_have_count(0)
    page.click("#newest")
    expect(page.locator("#audit tbody tr")).to_have_count(DASHBOARD_AUDIT_ROWS)
