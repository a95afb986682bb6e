"""Real headless Chromium, driven by Playwright, for the tests that try the demo the way a person does."""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import Browser, sync_playwright

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
