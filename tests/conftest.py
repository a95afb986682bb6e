"""Shared fixtures: a fresh migrated database per test (SQLite, or PostgreSQL too), the app, and real servers.

A test module marked `pytestmark = pytest.mark.engines` runs each of its
tests on both stores: a SQLite file, and a PostgreSQL database of the
test's own on the server at CHANGEFEED_TEST_DATABASE_URL. A test there that
reads the SQLite file itself is marked `sqlite_only`, and so may one
parameter of a test: `pytest.param(..., marks=pytest.mark.sqlite_only)`.
"""

import http.client
import itertools
import json
import os
import pwd
import queue
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from app import create_app
from changefeed.stores.schema import migrate, migrate_postgres
from changefeed.stores.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent

# A user who may CREATE DATABASE: each test gets a database of its own, dropped afterwards.
TEST_DATABASE_URL = os.environ.get("CHANGEFEED_TEST_DATABASE_URL") or "postgresql://127.0.0.1:5432/test"
ENGINES = ("sqlite", "postgres")


def pytest_generate_tests(metafunc):
    """Run the tests of modules marked `engines` once per store, unless marked `sqlite_only`;
    those marked `postgres_only` on PostgreSQL alone."""
    node = metafunc.definition
    if "engine" not in metafunc.fixturenames:
        return
    if node.get_closest_marker("postgres_only"):
        metafunc.parametrize("engine", ["postgres"])
    elif node.get_closest_marker("engines") and not node.get_closest_marker("sqlite_only"):
        metafunc.parametrize("engine", ENGINES)


def pytest_collection_modifyitems(config, items):
    """Drop the PostgreSQL runs of parameters marked `sqlite_only` (the test's own mark is seen above)."""
    dropped = [item for item in items if item.get_closest_marker("sqlite_only")
               and getattr(item, "callspec", None) and item.callspec.params.get("engine") == "postgres"]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


def pytest_runtest_setup(item):
    """Check the PostgreSQL server here, not in a fixture: a missing one is then one line of the summary."""
    if item.get_closest_marker("postgres_only") or (
            getattr(item, "callspec", None) and item.callspec.params.get("engine") == "postgres"):
        require_postgres()


@pytest.fixture
def engine():
    """The store a test runs on: SQLite, unless its module asks for both."""
    return "sqlite"


_postgres_problem = []  # [None] once the server answered, [reason] once it did not


def require_postgres():
    """Return nothing when the test PostgreSQL answers; skip (or fail, in CI) with one line when not."""
    if not _postgres_problem:
        import psycopg

        try:
            psycopg.connect(TEST_DATABASE_URL, autocommit=True, connect_timeout=3).close()
            _postgres_problem.append(None)
        except psycopg.Error as exc:
            _postgres_problem.append(
                f"PostgreSQL tests need a server: start one on 127.0.0.1:5432, or set "
                f"CHANGEFEED_TEST_DATABASE_URL=postgresql://user@host/db (a user who may CREATE DATABASE) "
                f"({' '.join(str(exc).split())[:160]})")
    reason = _postgres_problem[0]
    if reason:
        if os.environ.get("CHANGEFEED_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}; CHANGEFEED_REQUIRE_POSTGRES=1 makes this a failure", pytrace=False)
        pytest.skip(reason)


class Database:
    """One test's database: a SQLite file, or a PostgreSQL database made for the test.

    `query` runs SQL with `?` placeholders on either, for tests that look
    at what was stored without going through the service.
    """

    def __init__(self, engine, path=None, url=None):
        self.engine, self.path, self.url = engine, path, url

    @property
    def config(self):
        """The settings that point the service at this database (and only this one)."""
        if self.engine == "sqlite":
            return {"CHANGEFEED_DB": self.path, "CHANGEFEED_DATABASE_URL": ""}
        return {"CHANGEFEED_DATABASE_URL": self.url}

    def query(self, sql, params=()):
        if self.engine == "sqlite":
            conn = sqlite3.connect(self.path)
            try:
                with conn:
                    return conn.execute(sql, params).fetchall()
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(sql.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []

    def epoch(self):
        return self.query("SELECT value FROM epoch")[0][0]

    def hold_writes(self):
        """Hold every save back, as another writer's long transaction would (reads go on); return its release."""
        if self.engine == "sqlite":
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
        else:
            import psycopg

            conn = psycopg.connect(self.url, autocommit=True)
            conn.execute("BEGIN")
            conn.execute("LOCK TABLE page_versions IN EXCLUSIVE MODE")  # SELECT still reads it

        def release():
            conn.execute("ROLLBACK")
            conn.close()

        return release

    def open_store(self, **options):
        """A store of this database, opened as another process of the service would (the caller closes it)."""
        if self.engine == "sqlite":
            return SQLiteStore(self.path, **options)
        from changefeed.stores.postgres import PostgresStore

        return PostgresStore(self.url, **options)


_database_numbers = itertools.count()


@pytest.fixture
def database(engine, tmp_path):
    """A migrated database of the test's own, on the test's engine."""
    if engine == "sqlite":
        path = str(tmp_path / "changefeed.sqlite3")
        migrate(path)
        yield Database("sqlite", path=path)
        return
    require_postgres()
    import psycopg
    from psycopg.conninfo import make_conninfo

    name = f"changefeed_test_{os.getpid()}_{next(_database_numbers)}"
    with psycopg.connect(TEST_DATABASE_URL, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    url = make_conninfo(TEST_DATABASE_URL, dbname=name)
    migrate_postgres(url)
    yield Database("postgres", url=url)
    with psycopg.connect(TEST_DATABASE_URL, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def make_store(database):
    """Open stores of the test's database, beside any server's; closed after the test."""
    stores = []

    def make_store(**options):
        stores.append(database.open_store(**options))
        return stores[-1]

    yield make_store
    for store in stores:
        store.close()


@pytest.fixture
def db_path(database):
    """The SQLite file of a test that reads or changes the file itself."""
    if database.engine != "sqlite":
        raise RuntimeError("this test works on the SQLite file: mark it pytest.mark.sqlite_only")
    return database.path


def read_epoch(db_path):
    """The epoch migrate.py gave a database: the identity every answer carries."""
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("SELECT value FROM epoch").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def epoch(database):
    return database.epoch()


@pytest.fixture
def app(database):
    app = create_app({**database.config, "TESTING": True})
    yield app
    close_app(app)


def close_app(app):
    """Let go of what an app holds: its watcher or listener, and its database connections."""
    app.extensions["changefeed.notifier"].close()
    app.extensions["changefeed.store"].close()


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

    def __init__(self, database, log_path, workers=2, env=None, args=(), app="app:create_app()"):
        self.database, self.log_path, self.workers, self.args = database, log_path, workers, list(args)
        self.db_path = database.path
        self.app = app  # what gunicorn serves: the service, or a test's app built on it
        self.env = {**os.environ, **database.config, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self):
        """Start gunicorn and wait until it answers."""
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
             "--bind", f"127.0.0.1:{self.port}", "--workers", str(self.workers),
             *self.args, self.app],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so kill() reaches every worker
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log()[-2000:]}")
            try:
                requests.get(f"{self.url}/changes?slug=ready", timeout=1)
                return self
            except requests.RequestException:  # not listening yet, or still booting
                time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not answer in 20 s: {self.log()[-2000:]}")

    def log(self):
        """Return what gunicorn wrote so far."""
        return Path(self.log_path).read_text()

    def send_signal(self, sig):
        """Send `sig` to gunicorn and all its workers, as `kill` from a shell would."""
        os.killpg(self.process.pid, sig)

    def stop(self, sig=signal.SIGTERM):
        """Send `sig` to gunicorn and all its workers, and wait for them to end."""
        if self.process and self.process.poll() is None:
            self.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def kill(self):
        """End the server as a crash would: SIGKILL to master and workers, no clean-up."""
        self.stop(signal.SIGKILL)


@pytest.fixture
def make_server(database, tmp_path):
    """Start real gunicorn servers on the test's database; stop them afterwards."""
    servers = []

    def make_server(workers=2, env=None, args=(), app="app:create_app()"):
        server = Server(database, str(tmp_path / f"gunicorn-{len(servers)}.log"), workers, env, args, app)
        servers.append(server)
        return server.start()

    yield make_server
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server):
    """One running gunicorn server with two workers."""
    return make_server()


@contextmanager
def development_server(app):
    """Serve `app` as `flask run` does (werkzeug's server: threads, no gevent) on a free port; yield its URL."""
    from werkzeug.serving import make_server as make_werkzeug_server

    port = free_port()
    httpd = make_werkzeug_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        httpd.shutdown()
        thread.join(timeout=10)


class EventStream:
    """A Server-Sent Events client: reads the stream in a thread, one parsed event at a time."""

    def __init__(self, url, headers=None):
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        self.connection.request("GET", f"{parts.path}?{parts.query}", headers=headers or {})
        self.response = self.connection.getresponse()
        self.events = queue.Queue()
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        """Parse the stream into dicts: {"id", "event", "data"}, {"retry"} or {"comment"}."""
        event = {}
        try:
            for raw in iter(self.response.readline, b""):
                line = raw.decode().rstrip("\n")
                if line.startswith(":"):
                    self.events.put({"comment": line[1:].strip()})
                elif line:
                    field, _, value = line.partition(":")
                    event[field] = value.removeprefix(" ")
                elif event:
                    if "data" in event:
                        event["data"] = json.loads(event["data"])
                    self.events.put(event)
                    event = {}
        except (OSError, ValueError, AttributeError):
            pass  # closed by us (http.client drops its file) or by the server
        finally:
            self.ended.set()

    def next(self, timeout=5, skip_comments=True):
        """Return the next event (or comment), or raise queue.Empty after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if not (skip_comments and "comment" in item):
                return item

    def close(self):
        if self.connection.sock is not None:
            self.connection.sock.shutdown(socket.SHUT_RDWR)
        self.connection.close()


@pytest.fixture
def open_stream():
    """Open event streams that are closed after the test."""
    streams = []

    def open_stream(url, headers=None):
        stream = EventStream(url, headers)
        streams.append(stream)
        return stream

    yield open_stream
    for stream in streams:
        stream.close()


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


def find_nginx():
    """Return the path of nginx; skip the caller (or fail, with CHANGEFEED_REQUIRE_NGINX=1) when there is none."""
    path = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if path is None:
        reason = "the nginx tests need nginx: apt-get install nginx"
        if os.environ.get("CHANGEFEED_REQUIRE_NGINX") == "1":
            pytest.fail(f"{reason}; CHANGEFEED_REQUIRE_NGINX=1 makes this a failure", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    return path


@contextmanager
def running_nginx(http_block, folder, ports):
    """Run nginx with `http_block` as its http {} content, its files in `folder`, until the block ends.

    Ready once each of `ports` accepts connections. Its workers run as this
    user (as root: root), so they can write the test's folders (a cache).
    """
    temp = Path(folder) / "nginx-temp"
    temp.mkdir()
    conf = Path(folder) / "nginx.conf"
    conf.write_text(f"""
daemon off;
worker_processes 1;
user {pwd.getpwuid(os.geteuid()).pw_name};
pid {folder}/nginx.pid;
error_log {folder}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi; uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
{http_block}
}}
""")
    process = subprocess.Popen([find_nginx(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        for port in ports:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    log = Path(folder) / "nginx-error.log"
                    assert process.poll() is None and time.monotonic() < deadline, log.exists() and log.read_text()
                    time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)
