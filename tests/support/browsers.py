"""Real headless Chromium, driven by Playwright, for the tests that try the demo the way a person does."""

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, expect, sync_playwright

CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's own sandbox cannot start
    "--disable-gpu", "--no-first-run", "--disable-sync", "--disable-component-update",
    # The machines reach no network but the package registries: keep Chromium off it.
    "--disable-background-networking",
]


def find_chromium() -> str:
    """Return the path of a Chromium to drive; skip (or fail, in CI) when there is none.

    Called once at the top of a browser test module, so a machine without
    Chromium sees one line saying why and how to enable those tests.
    """
    candidates = [os.environ.get("CHANGEFEED_CHROMIUM"), shutil.which("chromium"),
                  shutil.which("chromium-browser"), shutil.which("google-chrome")]
    path = next((path for path in candidates if path), None)
    if path is None:
        reason = ("browser tests need Chromium: install it (apt-get install chromium) "
                  "or set CHANGEFEED_CHROMIUM=/path/to/chromium")
        if os.environ.get("CHANGEFEED_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}; CHANGEFEED_REQUIRE_BROWSER=1 makes this a failure", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    return path


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium for the length of the block (or a skip, as find_chromium says)."""
    path = find_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Tab:
    """One browser tab on the demo page, with the moves a person makes."""

    def __init__(self, context, url, slug, transport="poll", fragment="", state="live", name=None, path=None):
        self.page = context.new_page()
        self.console_errors, self.page_errors, self.requests, self.sockets = [], [], [], []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append((r.method, r.url)))
        self.page.on("websocket", lambda ws: self.sockets.append(ws.url))
        if name is not None:  # the name this tab shows others (the page keeps it in localStorage)
            self.page.add_init_script(  # in the page, not in its sandboxed iframe (no storage there)
                f"if (window === window.top) localStorage.setItem('changefeed-name', {json.dumps(name)})")
        self.page.goto(url + (path or f"/?slug={slug}&transport={transport}{fragment}"))
        self.expect_state(state)

    def edit(self, html, data=None):
        self.page.fill("#html", html)
        if data is not None:
            self.page.fill("#data", data)

    def save(self):
        self.page.click("#save")

    def expect_viewer(self, text, timeout_s):
        expect(self.page.frame_locator("#frame").locator("body")).to_contain_text(text, timeout=timeout_s * 1000)

    def expect_version(self, version, timeout_s=5):
        expect(self.page.locator("#version")).to_have_text(str(version), timeout=timeout_s * 1000)

    def expect_present(self, *names, timeout_s=5):
        """Expect the "Here now" bar to list exactly these other people, in any order, as text."""
        chips = self.page.locator("#presence li[data-id]")
        expect(chips).to_have_count(len(names), timeout=timeout_s * 1000)
        for name in names:
            expect(chips.filter(has_text=name)).to_have_count(1, timeout=timeout_s * 1000)

    def expect_state(self, *states, timeout_s=10):
        expect(self.page.locator("#badge")).to_have_attribute(
            "data-state", re.compile("|".join(states)), timeout=timeout_s * 1000)

    def wait(self, seconds):
        """Let time pass while Playwright keeps recording what the page does."""
        self.page.wait_for_timeout(seconds * 1000)

    def mark(self):
        """Return a bookmark in the page's request log, after what is already under way."""
        self.wait(0)
        return len(self.requests)

    def requests_to(self, path, method="GET", after=0):
        return [url for m, url in self.requests[after:] if m == method and urlsplit(url).path == path]

    def set_hidden(self, hidden):
        """Make the page believe it is hidden or shown, as a background tab does."""
        self.page.evaluate(
            """hidden => {
                const state = hidden ? "hidden" : "visible";
                Object.defineProperty(document, "visibilityState", {configurable: true, get: () => state});
                Object.defineProperty(document, "hidden", {configurable: true, get: () => hidden});
                document.dispatchEvent(new Event("visibilitychange"));
            }""",
            hidden,
        )
