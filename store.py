"""Where pages live: the store contract and its SQLite implementation.

Views talk to a store through two calls, `save` and `changes`, and never build
SQL; a PostgreSQL store is a second implementation of the same contract.
"""

import fcntl
import json
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import quote
from datetime import datetime, timezone

import migrate
from writers import DirectWriter


@dataclass(frozen=True)
class Saved:
    """What a save answers: the version it created and when."""

    slug: str
    version: int
    updated_at: str


@dataclass(frozen=True)
class Change:
    """The state of a page as seen by a client that knows version `since`.

    `html` and `data` are filled only when `version > since`, so an unchanged
    poll never reads the page body.
    """

    version: int
    updated_at: str | None = None
    html: str | None = None
    data: str | None = None  # JSON text, as saved

    @cached_property
    def answer(self):
        """The JSON text of a changed answer, built once however many clients it goes to.

        `data` is already compact JSON as stored, so it goes in as it is.
        """
        return (f'{{"changed":true,"version":{self.version},"html":{json.dumps(self.html)},'
                f'"data":{self.data},"updated_at":"{self.updated_at}"}}')

    @cached_property
    def event(self):
        """This version as one Server-Sent Event, encoded once for every stream it goes to."""
        return f"id: {self.version}\nevent: change\ndata: {self.answer}\n\n".encode()


class Conflict(Exception):
    """A save named a base version that is no longer the stored one."""

    def __init__(self, version):
        super().__init__(f"stored version is {version}")
        self.version = version


class Busy(Exception):
    """Another writer held the database longer than the busy timeout."""


class SchemaOutOfDate(RuntimeError):
    """The database file is missing or older than this code."""


def utc_now():
    """Return the current time as ISO 8601 UTC with milliseconds, e.g. 2026-11-23T21:24:37.444Z."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


class SQLiteStore:
    """Pages in one SQLite file, shared safely by many threads and processes.

    Every save runs inside a `BEGIN IMMEDIATE` transaction (under gevent
    several waiting saves share one: writers.py): SQLite lets one writer at a
    time take it, so concurrent saves queue for the write lock (up to the busy
    timeout) instead of reading the same version and losing an update. Reads
    run in autocommit mode on WAL, so they never wait for a writer.

    Before that, the processes of one server take turns with an flock on
    `<database>.write-turn`: SQLite's own busy wait sleeps 1, 2, 5 ms... and
    retries, while a process blocked in flock is woken the moment the lock is
    free (bench/README.md: 1.3x the saves/s and a 10x shorter p99). Correctness
    never depends on it: any writer that skips it still meets SQLite's lock.
    """

    def __init__(self, path, synchronous="FULL", busy_timeout_ms=10_000, writer=DirectWriter):
        self.path = path
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout_ms / 1000
        self._idle = []  # connections not in use; list.pop/append are atomic
        # How saves reach save_batch: one by one, or grouped (writers.py).
        self._writer = writer(self.save_batch)
        with self._connection() as conn:
            found = migrate.schema_version(conn)
        if found < migrate.LATEST:
            raise SchemaOutOfDate(
                f"database {path} is at schema version {found}, this code needs "
                f"{migrate.LATEST}: run `python migrate.py` (with the same CHANGEFEED_DB)"
            )
        self._turn_fd = os.open(f"{path}.write-turn", os.O_RDWR | os.O_CREAT, 0o600)

    def _connect(self):
        uri = f"file:{quote(self.path)}?mode=rw"  # never create a file migrate.py has not set up
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=self._busy_timeout,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.OperationalError as exc:
            raise SchemaOutOfDate(
                f"cannot open database {self.path} ({exc}): run `python migrate.py` "
                "(with the same CHANGEFEED_DB)"
            ) from None
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        return conn

    @contextmanager
    def _write_turn(self):
        """Wait for this process's turn to write, woken at once when the last writer is done."""
        fcntl.flock(self._turn_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._turn_fd, fcntl.LOCK_UN)

    def _borrow(self):
        """Take a pooled connection (or open one); give it back with self._idle.append."""
        try:
            return self._idle.pop()
        except IndexError:
            return self._connect()

    @contextmanager
    def _connection(self):
        """Lend a pooled connection for one `with` block."""
        conn = self._borrow()
        try:
            yield conn
        finally:
            self._idle.append(conn)

    def save(self, slug, html, data, base_version=None):
        """Store a new version of `slug`, one more than the last; raise Conflict on a stale base."""
        return self._writer.save((slug, html, data, base_version))

    def save_batch(self, items):
        """Apply saves [(slug, html, data, base_version)] in one transaction, one fsync for all.

        Returns, for each item, its Saved or the Conflict that refused it;
        raises (and writes nothing) when the transaction itself fails.
        """
        with self._connection() as conn, self._write_turn():
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise Busy(str(exc)) from None
            try:
                outcomes = [self._apply(conn, *item) for item in items]
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return outcomes

    @staticmethod
    def _apply(conn, slug, html, data, base_version):
        """Upsert one save inside the caller's transaction; a stale base writes nothing."""
        if base_version is not None:
            row = conn.execute("SELECT version FROM page_versions WHERE slug = ?", (slug,)).fetchone()
            current = row[0] if row else 0
            if current != base_version:
                return Conflict(current)
        updated_at = utc_now()
        (version,) = conn.execute(
            "INSERT INTO page_versions (slug, html, data, version, updated_at, seq)"
            " VALUES (?, ?, ?, 1, ?, (SELECT coalesce(max(seq), 0) + 1 FROM page_versions))"
            " ON CONFLICT (slug) DO UPDATE SET html = excluded.html,"
            " data = excluded.data, version = page_versions.version + 1,"
            " updated_at = excluded.updated_at, seq = excluded.seq"
            " RETURNING version",
            (slug, html, data, updated_at),
        ).fetchone()
        return Saved(slug, version, updated_at)

    def changes(self, slug, since):
        """Return the page's state for a client at version `since`."""
        conn = self._borrow()  # every poll comes here: no context manager, a third less overhead
        try:
            row = conn.execute(
                "SELECT version, updated_at,"
                " CASE WHEN version > ?1 THEN html END,"
                " CASE WHEN version > ?1 THEN data END"
                " FROM page_versions WHERE slug = ?2",
                (since, slug),
            ).fetchone()
        finally:
            self._idle.append(conn)
        if row is None:
            return Change(version=0)
        return Change(*row)

    def watch(self):
        """Open a cursor over saves, for the one watcher each server process runs."""
        return SaveCursor(self._connect())


class SaveCursor:
    """Which pages were saved since the last look, by any process.

    `PRAGMA data_version` changes only when another connection commits, and
    reading it touches no table: an idle tick costs one cheap statement
    whatever the number of pages or subscribers.
    """

    def __init__(self, conn):
        self._conn = conn
        self._data_version = self._read_data_version()
        (self._seq,) = conn.execute("SELECT coalesce(max(seq), 0) FROM page_versions").fetchone()

    def _read_data_version(self):
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def saved(self):
        """Return [(slug, version)] for the pages saved since the last call, oldest first."""
        data_version = self._read_data_version()
        if data_version == self._data_version:
            return []
        self._data_version = data_version
        rows = self._conn.execute(
            "SELECT slug, version, seq FROM page_versions WHERE seq > ? ORDER BY seq", (self._seq,)
        ).fetchall()
        if rows:
            self._seq = rows[-1][2]
        return [(slug, version) for slug, version, _ in rows]

    def close(self):
        self._conn.close()
