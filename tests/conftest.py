"""The shared fixtures: a fresh migrated database per test (SQLite, or PostgreSQL too), the app, and real servers.

Each fixture is declared here and built by the support package (support/),
which any test may import too. A module marked `pytestmark = pytest.mark.engines`
runs each of its tests on SQLite and on PostgreSQL (support/databases.py says how).
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from playwright.sync_api import Browser, BrowserContext
from werkzeug.test import TestResponse

from app import create_app
from changefeed.stores.notify import Fanout
from changefeed.stores.postgres import PostgresStore
from changefeed.stores.sqlite import SQLiteStore
from support.browsers import chromium
from support.clients import Client, EventStream, Served, socket_url
from support.databases import (
    Database,
    deselect_postgres_runs_of_sqlite_only,
    needs_postgres,
    parametrize_engines,
    postgres_database,
    require_postgres,
    sqlite_database,
)
from support.servers import Server, close_app


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_engines(metafunc)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    deselect_postgres_runs_of_sqlite_only(config, items)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Check the PostgreSQL server here, not in a fixture: a missing one is then one line of the summary."""
    if needs_postgres(item):
        require_postgres()


@pytest.fixture
def engine() -> str:
    """The store a test runs on: SQLite, unless its module asks for both."""
    return "sqlite"


@pytest.fixture
def database(engine: str, tmp_path: Path) -> Iterator[Database]:
    """A migrated database of the test's own, on the test's engine."""
    if engine == "sqlite":
        yield sqlite_database(tmp_path)
        return
    with postgres_database() as database:
        yield database


@pytest.fixture
def make_store(database: Database) -> Iterator[Callable[..., SQLiteStore | PostgresStore]]:
    """Open stores of the test's database, beside any server's; closed after the test."""
    stores: list[SQLiteStore | PostgresStore] = []

    def make_store(**options: Any) -> SQLiteStore | PostgresStore:
        stores.append(database.open_store(**options))
        return stores[-1]

    yield make_store
    for store in stores:
        store.close()


@pytest.fixture
def notifier() -> Iterator[Fanout]:
    """The engine-independent half of every notifier, told of saves by the test (refresh), as a look-out does."""
    notifier = Fanout()
    yield notifier
    notifier.close()


@pytest.fixture
def db_path(database: Database) -> str:
    """The SQLite file of a test that reads or changes the file itself."""
    return database.sqlite_path


@pytest.fixture
def epoch(database: Database) -> str:
    return database.epoch()


@pytest.fixture
def app(database: Database) -> Iterator[Flask]:
    app = create_app({**database.config, "TESTING": True})
    yield app
    close_app(app)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def save(client: FlaskClient) -> Callable[..., TestResponse]:
    """Save through the test client and return the response."""

    def save(slug: str = "home", html: str = "<h1>Hi</h1>", data: Any = None, **extra: Any) -> TestResponse:
        return client.post("/save", json={"slug": slug, "html": html, "data": data, **extra})

    return save


@pytest.fixture
def make_server(database: Database, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start real gunicorn servers on the test's database; stop them afterwards."""
    servers: list[Server] = []

    def make_server(workers: int = 2, env: Mapping[str, str] | None = None, args: Sequence[str] = (),
                    app: str = "app:create_app()") -> Server:
        server = Server(database, str(tmp_path / f"gunicorn-{len(servers)}.log"), workers, env, args, app)
        servers.append(server)
        return server.start()

    yield make_server
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    """One running gunicorn server with two workers."""
    return make_server()


@pytest.fixture
def open_stream() -> Iterator[Callable[..., EventStream]]:
    """Open event streams that are closed after the test."""
    streams: list[EventStream] = []

    def open_stream(url: str, headers: dict[str, str] | None = None) -> EventStream:
        streams.append(EventStream(url, headers))
        return streams[-1]

    yield open_stream
    for stream in streams:
        stream.close()


@pytest.fixture
def connect() -> Iterator[Callable[..., Client]]:
    """Open WebSockets (ws://host/ws from a server's URL) that are closed after the test."""
    clients: list[Client] = []

    def connect(server_or_url: Served | str, **options: Any) -> Client:
        clients.append(Client(socket_url(server_or_url), **options))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Real headless Chromium, driven by Playwright."""
    with chromium() as browser:
        yield browser


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """One browser profile, so pages opened in it are tabs of the same browser."""
    context = browser.new_context(viewport={"width": 760, "height": 900})
    yield context
    context.close()
