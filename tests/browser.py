"""Browser helpers for the dashboard tests: Playwright on Debian's chromium.

Playwright drives ``TASKFLEET_CHROMIUM`` (default /usr/bin/chromium; ``scripts/bootstrap``
installs it), never a browser of its own; without it the browser tests skip (fail under
TASKFLEET_REQUIRE_SERVICES=1). ``TASKFLEET_SCREENSHOTS=1`` makes ``shot`` save pages to
docs/img/ (the README shows them). A test module imports the ``browser`` and ``page``
fixtures by name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import Server, _service_missing

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")  # never fetch a browser

CHROMIUM = os.environ.get("TASKFLEET_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("TASKFLEET_SCREENSHOTS") == "1"
IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
expect.set_options(timeout=30_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        _service_missing(f"no chromium at {CHROMIUM} (scripts/bootstrap installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 760})
    context.set_default_timeout(30_000)
    pg = context.new_page()
    yield pg
    context.close()


def shot(page: Page, name: str) -> None:
    if SHOTS:
        IMG.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(IMG / f"dashboard-{name}.png"), full_page=True)


def login(page: Page, server: Server, token: str) -> None:
    page.goto(server.url + "/ui/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/fleet$"))


def csrf_of(page: Page) -> str:
    value = page.locator("header input[name=csrf]").get_attribute("value")
    assert value
    return value
