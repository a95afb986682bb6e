"""Shared fixtures: a fresh migrated SQLite file per test, the app, and real servers."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from app import create_app
from migrate import migrate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path):
    """A migrated SQLite database in a temporary folder."""
    path = str(tmp_path / "changefeed.sqlite3")
    migrate(path)
    return path


@pytest.fixture
def app(db_path):
    return create_app({"CHANGEFEED_DB": db_path, "TESTING": True})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def save(client):
    """Save through the test client and return the response."""

    def save(slug="home", html="<h1>Hi</h1>", data=None, **extra):
        return client.post("/save", json={"slug": slug, "html": html, "data": data, **extra})

    return save


def free_port():
    """Ask the OS for a loopback port nobody is using."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """The service under gunicorn, as production runs it, on a free loopback port."""

    def __init__(self, db_path, log_path, workers=2, env=None):
        self.db_path, self.log_path, self.workers = db_path, log_path, workers
        self.env = {**os.environ, "CHANGEFEED_DB": db_path, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self):
        """Start gunicorn and wait until it answers."""
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
             "--bind", f"127.0.0.1:{self.port}", "--workers", str(self.workers),
             "app:create_app()"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so kill() reaches every worker
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {Path(self.log_path).read_text()[-2000:]}")
            try:
                requests.get(f"{self.url}/changes?slug=ready", timeout=1)
                return self
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not answer in 20 s: {Path(self.log_path).read_text()[-2000:]}")

    def stop(self, sig=signal.SIGTERM):
        """Send `sig` to gunicorn and all its workers, and wait for them to end."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)
        self.process = None

    def kill(self):
        """End the server as a crash would: SIGKILL to master and workers, no clean-up."""
        self.stop(signal.SIGKILL)


@pytest.fixture
def make_server(db_path, tmp_path):
    """Start real gunicorn servers on the test's database; stop them afterwards."""
    servers = []

    def make_server(workers=2, env=None):
        server = Server(db_path, str(tmp_path / f"gunicorn-{len(servers)}.log"), workers, env)
        servers.append(server)
        return server.start()

    yield make_server
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server):
    """One running gunicorn server with two workers."""
    return make_server()


CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's own sandbox cannot start
    "--disable-gpu", "--no-first-run", "--disable-sync", "--disable-component-update",
    # The machines reach no network but the package registries: keep Chromium off it.
    "--disable-background-networking",
]


def find_chromium():
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


@pytest.fixture(scope="session")
def browser():
    """Real headless Chromium, driven by Playwright."""
    path = find_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def context(browser):
    """One browser profile, so pages opened in it are tabs of the same browser."""
    context = browser.new_context(viewport={"width": 760, "height": 900})
    yield context
    context.close()
