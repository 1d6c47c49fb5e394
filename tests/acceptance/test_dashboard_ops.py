"""The dashboard's operations pages (docs/dashboard.md) in a real headless Chromium
against real servers, agents and relays: server tasks and workers, jobs with
Terminate, schedules and maintenance windows, relays; what a viewer sees and may do;
names with HTML in them shown as text; bad ids.

Playwright drives Debian's ``chromium`` (tests/browser.py), never a browser of its own.
``TASKFLEET_SCREENSHOTS=1`` saves the pages to docs/img/dashboard-{tasks,jobs,...}.png.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, expect

from tests.browser import browser, csrf_of, login, page, shot
from tests.conftest import Server, enroll_token, wait_until
from tests.relay_proc import start_relay
from tests.server_tasks import TYPES, submit

__all__ = ["browser", "page", "start_relay"]  # the fixtures, used by name

EVIL = '<img src=x onerror="window.__pwned=1">'


def api_get(server: Server, path: str) -> Any:
    with server.api() as api:
        r = api.get(path)
        assert r.status_code == 200, r.text
        return r.json()


def api_post(server: Server, path: str, body: dict[str, Any], status: int = 201) -> Any:
    with server.api() as api:
        r = api.post(path, json=body)
        assert r.status_code == status, r.text
        return r.json()


def viewer_token(server: Server) -> str:
    body = {"kind": "admin", "name": "auditor", "role": "viewer"}
    return str(api_post(server, "/tokens", body)["token"])


def gated_job(server: Server, target: str, gate: Path, name: str = "May patches") -> int:
    """A job whose first item runs until ``gate`` exists (then two quick items)."""
    block = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    items = [{"name": f"item-{k}", "install": {"script": block if k == 0 else "true"}}
             for k in range(3)]  # fmt: skip
    body = {"name": name, "target": target, "phases": ["install"], "items": items}
    return int(api_post(server, "/jobs", body)["id"])


def job_state(server: Server, job_id: int) -> str:
    return str(api_get(server, f"/jobs/{job_id}")["state"])


def make_group(server: Server, name: str, ids: list[int]) -> None:
    api_post(server, "/groups", {"name": name})
    api_post(server, f"/groups/{name}/members", {"computer_ids": ids}, 200)


def post(page: Page, server: Server, path: str, **form: str) -> Any:
    return page.request.post(
        server.url + path, form={"csrf": csrf_of(page), **form}, max_redirects=0
    )


# -- server tasks and workers -----------------------------------------------------------


def test_the_tasks_page_shows_a_live_worker_a_task_finishing_and_cancels_one(
    start_server, page, tmp_path
):
    types = tmp_path / "types.toml"
    types.write_text(TYPES)
    server = start_server("--task-types", str(types))
    gate = tmp_path / "gate"
    running = submit(server, "gate", params={"path": str(gate)})["task"]["id"]
    # gate runs one at a time: the second one waits, and is the one canceled.
    waiting = submit(server, "gate", params={"path": str(tmp_path / "never")})["task"]["id"]
    wait_until(lambda: api_get(server, f"/tasks/{running}")["state"] == "in_progress", 30)
    login(page, server, server.admin_token)
    page.click("header a[href='/ui/tasks']")
    expect(page.locator(f"#task-{running}")).to_have_attribute("data-state", "in_progress")
    expect(page.locator(f"#task-{waiting}")).to_have_attribute("data-state", "queued")
    expect(page.locator("#task-counts [data-state=in_progress]")).to_have_text("in_progress 1")
    # The server's embedded worker, with its heartbeat.
    worker = page.locator("#workers tbody tr[data-alive=yes]")
    expect(worker).to_have_count(1)
    expect(worker).to_contain_text("alive")
    expect(worker).to_contain_text("ago")
    # The server process itself, leading (one process: SQLite, or PostgreSQL alone).
    me = page.locator("#servers tbody tr[data-leader=yes]")
    expect(me).to_have_count(1)
    expect(me).to_have_attribute("data-state", "running")
    expect(me).to_contain_text("(this one)")
    expect(me).to_contain_text("leader since")
    gate.touch()
    wait_until(lambda: api_get(server, f"/tasks/{running}")["state"] == "succeeded", 30)
    page.reload()
    expect(page.locator(f"#task-{running}")).to_have_attribute("data-state", "succeeded")
    expect(page.locator(f"#task-{running}")).to_contain_text("gate")
    # Filters: by state, by type.
    page.select_option("#state-filter", "succeeded")
    page.click("#filter")
    expect(page).to_have_url(re.compile(r"/ui/tasks\?state=succeeded"))
    expect(page.locator("#tasks tbody tr[data-state]")).to_have_count(1)
    expect(page.locator(f"#task-{waiting}")).to_have_count(0)
    page.goto(f"{server.url}/ui/tasks?type=echo")
    expect(page.locator("#tasks tbody tr[data-state]")).to_have_count(0)
    page.goto(f"{server.url}/ui/tasks")
    shot(page, "tasks")
    # One task: its detail, its output, and Cancel for the one still waiting.
    page.click(f"#task-{running} a")
    expect(page.locator("#task-state")).to_have_text("succeeded")
    expect(page.locator("#task-output")).to_contain_text("passed")
    expect(page.locator("#cancel-task")).to_have_count(0)
    page.goto(f"{server.url}/ui/tasks/{waiting}")
    page.fill("input[name=reason]", "not needed")
    page.click("#cancel-task")
    expect(page.locator("#task-state")).to_have_text("canceled")
    assert api_get(server, f"/tasks/{waiting}")["state"] == "canceled"
    # An unknown state is the API's own 400, shown as a page.
    r = page.request.get(f"{server.url}/ui/tasks?state=bogus")
    assert r.status == 400 and "unknown state" in r.text()


# -- jobs -------------------------------------------------------------------------------


def test_the_jobs_page_follows_a_running_job_and_terminate_stops_it(
    server, start_agent, page, tmp_path
):
    token = enroll_token(server)
    agents = [start_agent(server, token, name=f"web-{i}") for i in (1, 2)]
    make_group(server, "web", [a.computer_id for a in agents])
    gate = tmp_path / "gate"
    job_id = gated_job(server, "group:web", gate, name=EVIL)
    login(page, server, server.admin_token)
    page.click("header a[href='/ui/jobs']")
    row = page.locator(f"#job-{job_id}")
    # The list refreshes itself (htmx polling): the job goes from pending to running.
    page.evaluate("window.__sameDocument = true")
    expect(row).to_have_attribute("data-state", "running")
    expect(row).to_contain_text(EVIL)  # the name is text, never markup
    expect(row).to_contain_text("0/2")
    assert page.evaluate("window.__sameDocument") is True
    shot(page, "jobs")
    row.locator("a").click()
    expect(page.locator("#job-name")).to_have_text(EVIL)
    expect(page.locator("#job-computers tbody tr")).to_have_count(2)
    expect(page.locator("#job-computers")).to_contain_text("item-0: started")
    page.fill("#terminate-reason", "window over")
    page.click("#terminate")
    expect(page).to_have_url(re.compile(rf"/ui/jobs/{job_id}$"))
    expect(page.locator("#job-state")).to_have_text("terminating")
    expect(page.locator("#job-terminate")).to_contain_text("window over")
    expect(page.locator("#terminate")).to_have_count(0)  # asked once: no second button
    assert job_state(server, job_id) == "terminating"
    page.evaluate("window.__sameDocument = true")
    for agent in agents:  # the order reached each agent while item 0 still runs ...
        wait_until(
            lambda agent=agent: any(r["terminate_requested"] for r in agent.status()["records"]),
            30,
            "the terminate order at the agent",
        )
    gate.touch()  # ... and now the item in hand finishes; the rest are skipped
    expect(page.locator("#job-state")).to_have_text("terminated")  # refreshed in place
    assert page.evaluate("window.__sameDocument") is True
    expect(page.locator("#job-terminate")).to_contain_text("terminated at")
    job = api_get(server, f"/jobs/{job_id}")
    assert job["state"] == "terminated" and job["terminate"]["reason"] == "window over"
    assert [c["state"] for c in job["computers"]] == ["canceled", "canceled"]
    assert page.evaluate("window.__pwned === undefined")
    shot(page, "job")
    # The job's request page and its computers' pages lead to the job's page.
    page.goto(f"{server.url}/ui/requests/{job_id}")
    page.click("#as-job")
    expect(page.locator("#job-name")).to_have_text(EVIL)
    page.goto(f"{server.url}/ui/computers/{agents[0].computer_id}")
    page.click(f"a[href='/ui/jobs/{job_id}']")
    expect(page).to_have_url(re.compile(rf"/ui/jobs/{job_id}$"))
    # Terminate again: the API's answer (the same job, nothing more sent).
    r = post(page, server, f"/ui/jobs/{job_id}/terminate")
    assert r.status == 303
    assert api_get(server, f"/jobs/{job_id}")["terminate"] == job["terminate"]


def test_bad_ids_answer_404_pages(server, page):
    login(page, server, server.admin_token)
    for path in ("/ui/jobs/abc", "/ui/jobs/999999", "/ui/jobs/0", "/ui/jobs/99999999999999999999",
                 "/ui/tasks/abc", "/ui/tasks/999999", "/ui/tasks/-1"):  # fmt: skip
        r = page.request.get(server.url + path)
        assert r.status == 404, (path, r.status)
        assert "<h1>Not done</h1>" in r.text()
    for path in ("/ui/jobs/abc/terminate", "/ui/jobs/999999/terminate",
                 "/ui/tasks/x/cancel", "/ui/tasks/999999/cancel",
                 "/ui/schedules/1e3/cancel", "/ui/schedules/999999/cancel",
                 "/ui/groups/nosuch/window/clear"):  # fmt: skip
        r = post(page, server, path)
        assert r.status == 404, (path, r.status, r.text()[:300])


# -- what a viewer sees -----------------------------------------------------------------


def test_a_viewer_sees_no_ops_buttons_and_its_forged_posts_are_refused(
    start_server, start_agent, page, tmp_path
):
    types = tmp_path / "types.toml"
    types.write_text(TYPES)
    server = start_server("--task-types", str(types))
    agent = start_agent(server, enroll_token(server))
    make_group(server, "web", [agent.computer_id])
    gate = tmp_path / "gate"
    job_id = gated_job(server, f"computer:{agent.computer_id}", gate)
    task_id = submit(server, "gate", params={"path": str(gate)})["task"]["id"]
    sched = api_post(server, "/schedules", {"cron": "0 3 * * *",
                     "request": {"target": "all", "params": {"argv": ["true"]}}})  # fmt: skip
    with server.api() as api:
        assert api.put("/groups/web/window", json={"window": "01:00-02:00"}).status_code == 200
    wait_until(lambda: job_state(server, job_id) == "running", 30, "the job running")
    login(page, server, viewer_token(server))
    page.goto(f"{server.url}/ui/jobs/{job_id}")
    expect(page.locator("#job-state")).to_have_text("running")
    expect(page.locator("#terminate")).to_have_count(0)
    page.goto(f"{server.url}/ui/tasks")  # workers serve every tenant: super-admin only
    expect(page.locator("#workers-hidden")).to_be_visible()
    expect(page.locator("#workers")).to_have_count(0)
    expect(page.locator("#servers")).to_have_count(0)
    page.goto(f"{server.url}/ui/tasks/{task_id}")
    expect(page.locator("#task-state")).not_to_have_text("canceled")
    expect(page.locator("#cancel-task")).to_have_count(0)
    page.goto(f"{server.url}/ui/schedules")
    expect(page.locator(f"#schedule-{sched['id']}")).to_contain_text("0 3 * * *")
    expect(page.locator("#windows")).to_contain_text("01:00-02:00")
    expect(page.locator("main button")).to_have_count(0)
    # The server refuses what the page does not offer, with a valid session and CSRF token.
    for path, form in (
        (f"/ui/jobs/{job_id}/terminate", {}),
        (f"/ui/tasks/{task_id}/cancel", {}),
        (f"/ui/schedules/{sched['id']}/cancel", {}),
        ("/ui/groups/web/window", {"window": "03:00-04:00"}),
        ("/ui/groups/web/window/clear", {}),
    ):
        r = post(page, server, path, **form)
        assert r.status == 403, (path, r.status, r.text()[:300])
        assert "role" in r.text()
    assert job_state(server, job_id) == "running"
    assert api_get(server, f"/jobs/{job_id}")["terminate"] is None
    assert api_get(server, f"/tasks/{task_id}")["state"] != "canceled"
    assert api_get(server, f"/schedules/{sched['id']}")["canceled_at"] is None
    page.goto(f"{server.url}/ui/schedules")
    expect(page.locator("#windows tr[data-group=web]")).to_contain_text("01:00-02:00")
    gate.touch()


# -- schedules and maintenance windows --------------------------------------------------


def test_the_schedules_page_shows_a_schedule_cancels_it_and_sets_a_window(
    server, start_agent, page
):
    agent = start_agent(server, enroll_token(server))
    make_group(server, "web", [agent.computer_id])
    job = {"type": "job", "target": "group:web",
           "params": {"name": EVIL, "phases": ["install"],
                      "items": [{"name": "a", "install": {"argv": ["true"]}}]}}  # fmt: skip
    sched = api_post(server, "/schedules", {"cron": "30 2 * * 1", "request": job})
    echo = {"target": "all", "params": {"argv": ["echo", "<b>x</b>"]}}
    other = api_post(server, "/schedules", {"cron": "0 4 * * *", "request": echo})
    login(page, server, server.admin_token)
    page.click("header a[href='/ui/schedules']")
    row = page.locator(f"#schedule-{sched['id']}")
    expect(row).to_contain_text("30 2 * * 1")
    expect(row).to_contain_text("group:web")
    expect(row).to_contain_text(EVIL)  # text, not markup
    expect(page.locator(f"#schedule-{other['id']}")).to_contain_text("echo <b>x</b>")
    expect(page.locator("#windows tr[data-group=web]")).to_contain_text("none")
    # A window for the group, set from the page (admin), then a bad one refused.
    win = page.locator("#windows tr[data-group=web]")
    win.locator("input[name=window]").fill("22:00-23:30")
    win.locator("input[name=utc_offset]").fill("+02:00")
    win.locator("button.set-window").click()
    expect(page).to_have_url(re.compile(r"/ui/schedules$"))
    expect(win).to_contain_text("+02:00")
    expect(win.locator("input[name=window]")).to_have_value("22:00-23:30")
    expect(win.locator("button.clear-window")).to_have_count(1)
    r = post(page, server, "/ui/groups/web/window", window="25:00-26:00")
    assert r.status == 400 and "maintenance window" in r.text()
    page.reload()
    expect(win.locator("input[name=window]")).to_have_value("22:00-23:30")  # unchanged
    shot(page, "schedules")
    row.locator("button.cancel-schedule").click()
    expect(row).to_have_attribute("data-canceled", "yes")
    expect(row.locator("button")).to_have_count(0)
    assert api_get(server, f"/schedules/{sched['id']}")["canceled_at"] is not None
    assert api_get(server, f"/schedules/{other['id']}")["canceled_at"] is None
    r = post(page, server, f"/ui/schedules/{sched['id']}/cancel")
    assert r.status == 409  # the API's answer: already canceled
    win.locator("button.clear-window").click()
    expect(win).to_contain_text("none")
    expect(win.locator("button.clear-window")).to_have_count(0)
    assert page.evaluate("window.__pwned === undefined")


# -- relays -----------------------------------------------------------------------------


def test_the_relays_page_shows_a_real_relay_with_its_computers(
    server, start_relay, start_agent, page
):
    relay = start_relay(server, "--name", EVIL)
    agents = [start_agent(server, enroll_token(server), name=f"branch-{i}") for i in (1, 2)]
    make_group(server, "branch", [a.computer_id for a in agents])
    api_post(server, f"/relays/{relay.relay_id}/assign", {"group": "branch"}, 200)
    wait_until(lambda: api_get(server, f"/relays/{relay.relay_id}")["last_seen_at"], 30)
    login(page, server, server.admin_token)
    page.click("header a[href='/ui/relays']")
    row = page.locator(f"#relay-{relay.relay_id}")
    expect(row.locator(".name")).to_have_text(EVIL)  # text, not markup
    expect(row.locator(".computers")).to_have_text("2")
    expect(row).to_have_attribute("data-revoked", "no")
    expect(row).to_contain_text("active")
    assert page.evaluate("window.__pwned === undefined")
    shot(page, "relays")
