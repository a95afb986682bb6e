"""A test's own database, a SQLite file or a PostgreSQL database made for it, and which tests run on which engine.

A test module marked `pytestmark = pytest.mark.engines` runs each of its
tests on both stores: a SQLite file, and a PostgreSQL database of the
test's own on the server at CHANGEFEED_TEST_DATABASE_URL. A test there that
reads the SQLite file itself is marked `sqlite_only`, and so may one
parameter of a test: `pytest.param(..., marks=pytest.mark.sqlite_only)`.
"""

import itertools
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from changefeed.stores.postgres import PostgresStore
from changefeed.stores.schema import migrate, migrate_postgres
from changefeed.stores.sqlite import SQLiteStore

# A user who may CREATE DATABASE: each test gets a database of its own, dropped afterwards.
TEST_DATABASE_URL = os.environ.get("CHANGEFEED_TEST_DATABASE_URL") or "postgresql://127.0.0.1:5432/test"
ENGINES = ("sqlite", "postgres")


def parametrize_engines(metafunc: pytest.Metafunc) -> None:
    """Run the tests of modules marked `engines` once per store, unless marked `sqlite_only`;
    those marked `postgres_only` on PostgreSQL alone."""
    node = metafunc.definition
    if "engine" not in metafunc.fixturenames:
        return
    if node.get_closest_marker("postgres_only"):
        metafunc.parametrize("engine", ["postgres"])
    elif node.get_closest_marker("engines") and not node.get_closest_marker("sqlite_only"):
        metafunc.parametrize("engine", ENGINES)


def deselect_postgres_runs_of_sqlite_only(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the PostgreSQL runs of parameters marked `sqlite_only` (a test's own mark is seen when parametrizing)."""
    dropped = [item for item in items if item.get_closest_marker("sqlite_only") and engine_of(item) == "postgres"]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


def engine_of(item: pytest.Item) -> str | None:
    """The engine a collected test was parametrized with, if any."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("engine") if callspec else None


def needs_postgres(item: pytest.Item) -> bool:
    """Whether a collected test runs on PostgreSQL."""
    return bool(item.get_closest_marker("postgres_only")) or engine_of(item) == "postgres"


_postgres_problem: list[str | None] = []  # [None] once the server answered, [reason] once it did not


def require_postgres() -> None:
    """Return nothing when the test PostgreSQL answers; skip (or fail, in CI) with one line when not."""
    if not _postgres_problem:
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

    def __init__(self, engine: str, path: str | None = None, url: str | None = None) -> None:
        self.engine, self.path, self.url = engine, path, url

    @property
    def config(self) -> dict[str, Any]:
        """The settings that point the service at this database (and only this one)."""
        if self.engine == "sqlite":
            return {"CHANGEFEED_DB": self.path, "CHANGEFEED_DATABASE_URL": ""}
        return {"CHANGEFEED_DATABASE_URL": self.url}

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows `sql` returns (none for a statement that returns none)."""
        if self.engine == "sqlite":
            conn = sqlite3.connect(self.sqlite_path)
            try:
                with conn:
                    return conn.execute(sql, params).fetchall()
            finally:
                conn.close()
        with psycopg.connect(self.postgres_url, autocommit=True) as pg:
            cursor = pg.execute(sql.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []

    def epoch(self) -> str:
        """The epoch migrate.py gave this database: the identity every answer carries."""
        return str(self.query("SELECT value FROM epoch")[0][0])

    def hold_writes(self) -> Callable[[], None]:
        """Hold every save back, as another writer's long transaction would (reads go on); return its release."""
        conn: sqlite3.Connection | psycopg.Connection[Any]
        if self.engine == "sqlite":
            conn = sqlite3.connect(self.sqlite_path, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
        else:
            conn = psycopg.connect(self.postgres_url, autocommit=True)
            conn.execute("BEGIN")
            conn.execute("LOCK TABLE page_versions IN EXCLUSIVE MODE")  # SELECT still reads it

        def release() -> None:
            conn.execute("ROLLBACK")
            conn.close()

        return release

    def open_store(self, **options: Any) -> SQLiteStore | PostgresStore:
        """A store of this database, opened as another process of the service would (the caller closes it)."""
        if self.engine == "sqlite":
            return SQLiteStore(self.sqlite_path, **options)
        return PostgresStore(self.postgres_url, **options)

    @property
    def sqlite_path(self) -> str:
        """The SQLite file; asking a PostgreSQL database for one is a mistake in the test."""
        if self.path is None:
            raise RuntimeError("this test works on the SQLite file: mark it pytest.mark.sqlite_only")
        return self.path

    @property
    def postgres_url(self) -> str:
        if self.url is None:
            raise RuntimeError("a SQLite database has no PostgreSQL URL")
        return self.url


def sqlite_database(folder: Path) -> Database:
    """A migrated SQLite file in `folder`."""
    path = str(folder / "changefeed.sqlite3")
    migrate(path)
    return Database("sqlite", path=path)


_database_numbers = itertools.count()


@contextmanager
def postgres_database() -> Iterator[Database]:
    """A migrated PostgreSQL database of the caller's own, dropped when the block ends."""
    require_postgres()
    name = f"changefeed_test_{os.getpid()}_{next(_database_numbers)}"
    with psycopg.connect(TEST_DATABASE_URL, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    url = make_conninfo(TEST_DATABASE_URL, dbname=name)
    migrate_postgres(url)
    yield Database("postgres", url=url)
    with psycopg.connect(TEST_DATABASE_URL, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def read_epoch(db_path: str) -> str:
    """The epoch migrate.py gave a SQLite file: the identity every answer carries."""
    conn = sqlite3.connect(db_path)
    try:
        return str(conn.execute("SELECT value FROM epoch").fetchone()[0])
    finally:
        conn.close()
