"""Pages in one SQLite file: the SQLite engine of the store contract (stores/contract.py).

The save steps both engines share are in stores/base.py (PageStore); this
module holds what only SQLite has: the connection pool over one file
(and noticing that file vanish or be replaced), the processes' write turn
(an flock beside the file), the transaction and its result codes, and
SaveCursor, which the SQLite notifier (stores/sqlite_notify.py) watches.
Nothing above changefeed.stores reaches any of it: `problem()` says what
is wrong with the file in the contract's words.
"""

import errno
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

from changefeed.core.outcomes import Busy, Change, NotStored, OutcomeUnknown, SchemaOutOfDate, Unavailable
from changefeed.stores import schema as migrate
from changefeed.stores import writers
from changefeed.stores.base import Item, Outcome, PageStore, change_from_row, unless_settled
from changefeed.stores.forking import after_fork_in_child, master_checked
from changefeed.stores.schema import SchemaTooNew

log = logging.getLogger(__name__)

_sleep: Callable[[float], None]
try:  # the commit thread waits for its turn with a real sleep, even where gevent patched time
    from gevent.monkey import get_original

    _sleep = get_original("time", "sleep")
except ImportError:  # pragma: no cover - gevent is a dependency; the store does not need it
    _sleep = time.sleep

TURN_POLL_S = 0.0005  # how often a writer waiting for its turn looks again

# SQLite result codes (https://sqlite.org/rescode.html) that say a failed
# statement wrote nothing: a COMMIT failing with one of them did not land.
# Any other failure of a COMMIT (an fsync error, say) may still land.
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_FULL, SQLITE_CANTOPEN = 5, 6, 8, 13, 14
SQLITE_IOERR_WRITE = 778
NOT_WRITTEN = {SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_FULL, SQLITE_CANTOPEN}
REASONS = {
    SQLITE_FULL: "the disk holding the database is full",
    SQLITE_READONLY: "the database is read-only",
    SQLITE_CANTOPEN: "the database file cannot be opened",
}


def _code(exc: BaseException) -> int:
    """The primary SQLite result code of an error (0 when it carries none)."""
    return int(getattr(exc, "sqlite_errorcode", 0)) & 0xFF


def _reason(exc: BaseException) -> str:
    """Say in words what a database error means for a save."""
    return f"{REASONS.get(_code(exc), 'the database failed')} ({exc})"


def _os_reason(exc: OSError) -> str:
    """Say in words what an OS error on a file next to the database means for a save."""
    words = {errno.EROFS: REASONS[SQLITE_READONLY], errno.ENOSPC: REASONS[SQLITE_FULL]}
    return f"{words.get(exc.errno or 0, 'the database folder cannot be written')} ({exc})"


class _Connection(sqlite3.Connection):
    """A connection that remembers which opening of the database file it belongs to."""

    generation = 0


_inherited: list[_Connection] = []  # connections a forked child must neither use nor close


# A batch's steps inside the transaction: the saves' (PageStore._apply_all) or the beats'.
Apply = Callable[[Any, Sequence[Item]], list[Outcome]]


class SQLiteStore(PageStore):
    """Pages in one SQLite file, shared safely by many threads and processes.

    Every save runs inside a `BEGIN IMMEDIATE` transaction (under gevent
    several waiting saves share one: stores/writers.py), each in a savepoint of its
    own so that one failing save does not fail the others. SQLite lets one
    writer at a time take it, so concurrent saves queue for the write lock
    (up to the busy timeout) instead of reading the same version and losing
    an update. Reads run in autocommit mode on WAL, so they never wait for a
    writer.

    Before that, the processes of one server take turns with an flock on
    `<database>.write-turn`, looked at every half millisecond: SQLite's own
    busy wait sleeps 1, 2, 5 ms... and retries (bench/README.md: 1.3x the
    saves/s and a 10x shorter p99). Correctness never depends on it: any
    writer that skips it still meets SQLite's lock.

    Connections, the turn's file and the writer belong to one process: a
    child forked after the store was made (gunicorn --preload) opens its own.
    When the file vanishes or is replaced, saves are refused until it is
    back, and the pool then starts over on whatever file is at the path.
    """

    Error = sqlite3.Error
    _NEXT_SEQ = "(SELECT coalesce(max(seq), 0) + 1 FROM page_versions)"
    UPSERT = ("INSERT INTO page_versions (slug, html, data, version, updated_at, seq)"
              f" VALUES (?, ?, ?, 1, ?, {_NEXT_SEQ})"
              " ON CONFLICT (slug) DO UPDATE SET html = excluded.html,"
              " data = excluded.data, version = page_versions.version + 1,"
              " updated_at = excluded.updated_at, seq = excluded.seq, deleted = 0"
              " RETURNING version")
    # A tombstone is no page: base_version 0 (create) re-creates it, one version above it.
    INSERT_NEW = ("INSERT INTO page_versions (slug, html, data, version, updated_at, seq)"
                  f" VALUES (?, ?, ?, 1, ?, {_NEXT_SEQ}) ON CONFLICT (slug) DO UPDATE SET html = excluded.html,"
                  " data = excluded.data, version = page_versions.version + 1, updated_at = excluded.updated_at,"
                  " seq = excluded.seq, deleted = 0 WHERE page_versions.deleted RETURNING version")
    UPDATE_FROM = (f"UPDATE page_versions SET html = ?, data = ?, version = version + 1, updated_at = ?,"
                   f" seq = {_NEXT_SEQ}, deleted = 0 WHERE slug = ? AND version = ? RETURNING version")
    DELETE = (f"UPDATE page_versions SET html = '', data = 'null', version = version + 1, updated_at = ?,"
              f" seq = {_NEXT_SEQ}, deleted = 1 WHERE slug = ? AND NOT deleted AND (? IS NULL OR version = ?)"
              " RETURNING version")
    NEXT_PRESENCE_VERSION = "UPDATE presence_clock SET value = value + 1 RETURNING value"
    # The feed (PageStore.feed): every `seq` is taken under the one write lock, so the pages after a
    # seq, in seq order, are exactly what was saved since; the newest seq is where a reader goes on.
    FEED = ("SELECT e.value, m.top, m.top, p.slug, p.version, p.updated_at, p.deleted, p.seq, p.html, p.data"
            " FROM epoch e CROSS JOIN (SELECT coalesce(max(seq), 0) AS top FROM page_versions) m"
            " LEFT JOIN (SELECT slug, version, updated_at, deleted, seq, CASE WHEN :content THEN html END AS html,"
            " CASE WHEN :content THEN data END AS data FROM page_versions"
            " WHERE seq > :number AND substr(slug, 1, length(:prefix)) = :prefix"
            " AND (:slugs IS NULL OR slug IN (SELECT value FROM json_each(:slugs))) ORDER BY seq LIMIT :limit) p ON 1"
            " ORDER BY p.seq")
    FEED_POSITIONS_NAME_SLUGS = False  # a seq alone orders every save

    @staticmethod
    def _slugs_param(slugs: Sequence[str] | None) -> str | None:
        return None if slugs is None else json.dumps(list(slugs))
    _native_commits = True  # SQLite blocks the thread that commits

    def __init__(self, path: str, synchronous: str = "FULL", busy_timeout_ms: int = 10_000,
                 writer: writers.WriterFactory | None = None, idempotency_ttl_s: float = 86_400,
                 max_pages: int | None = None, max_bytes: int | None = None) -> None:
        self.path = path
        self._max_pages, self._max_bytes = max_pages, max_bytes
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout_ms / 1000
        self._key_ttl = idempotency_ttl_s
        self._writer_class = writer  # None: the best one for the process that first saves
        self._writer = None
        self._idle: list[_Connection] = []  # connections not in use; list.pop/append are atomic
        self.generation = 0  # bumped when the file at `path` is another one: pooled connections go
        self._identity = self._file_identity()
        if self._identity is None and master_checked():
            self.epoch = None  # read by check_file once the file is back; until then saves get 503
        else:
            self.epoch = self._open_check()
        after_fork_in_child(self)

    def _open_check(self) -> str:
        """Refuse a database this code cannot use; return its epoch."""
        with self._connection() as conn:
            found = migrate.schema_version(conn)
            if found > migrate.LATEST:
                raise SchemaTooNew(migrate.too_new_message(self.path, found))
            if found < migrate.LATEST:
                raise SchemaOutOfDate(
                    f"database {self.path} is at schema version {found}, this code needs "
                    f"{migrate.LATEST}: run `python migrate.py` (with the same CHANGEFEED_DB)"
                )
            epoch: str = conn.execute("SELECT value FROM epoch").fetchone()[0]
            return epoch

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def _connect(self) -> _Connection:
        uri = f"file:{quote(self.path)}?mode=rw"  # never create a file migrate.py has not set up
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=self._busy_timeout, factory=_Connection,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.OperationalError as exc:
            raise SchemaOutOfDate(
                f"cannot open database {self.path} ({exc}): run `python migrate.py` "
                "(with the same CHANGEFEED_DB)"
            ) from None
        conn.generation = self.generation
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        return conn

    def _forget_parent(self) -> None:
        """In a forked child: leave the parent's connections and files alone, open our own."""
        _inherited.extend(self._idle)
        self._idle = []
        self._writer = self._presence_writer = None

    def close(self) -> None:
        """Close the pooled connections (tests; a server's process simply ends)."""
        while self._idle:
            self._idle.pop().close()

    def problem(self) -> str | None:
        """What an operator must fix before this store can serve (contract.Store): the file's own state."""
        return self.check_file()

    def check_file(self) -> str | None:
        """Notice a database file that vanished or was replaced; return what is wrong, or None.

        Called by each save and by the watcher's every tick: one stat().
        """
        identity = self._file_identity()
        if identity is None:
            return (f"the database file {self.path} is missing; restore it "
                    "(or run `python migrate.py` for a new one) and the service resumes by itself")
        if identity != self._identity:
            self.generation += 1  # pooled connections of the old file are closed as they come back
            self._identity = identity
            try:
                self.epoch = self._open_check()
            except (RuntimeError, sqlite3.Error) as exc:
                self._identity = None  # look again next time
                return f"the database file {self.path} was replaced by one that cannot be used: {exc}"
        return None

    def _borrow(self) -> _Connection:
        """Take a pooled connection (or open one); give it back with _give_back.

        Pooled connections of a file since replaced are closed, never lent
        (check_file's own epoch check, the first to borrow, closes them all):
        a read would answer from the old file, and a save be acknowledged in
        a database that is no longer at the path.
        """
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                return self._connect()
            if conn.generation == self.generation:
                return conn
            conn.close()

    def _give_back(self, conn: _Connection, healthy: bool = True) -> None:
        """Pool a connection again, or close it when it failed or belongs to a replaced file."""
        if healthy and conn.generation == self.generation:
            self._idle.append(conn)
        else:
            conn.close()

    def _connection(self) -> "_Lent":
        """Lend a pooled connection for one `with` block."""
        return _Lent(self)

    def _choose_writer(self) -> writers.Writer:
        """Pick how saves reach save_batch in this process: after fork, after gevent patched it."""

        self._writer = (self._writer_class or writers.for_this_process())(self.save_batch)
        return self._writer

    def _take_turn(self, deadline: float) -> int | None:
        """Wait for this process's turn to write, until `deadline`; return the turn's fd, or None.

        The turn's file is opened for each transaction (microseconds, next to
        its fsync) beside whatever database is at the path: one kept open
        would stay beside a replaced file, holding a failed filesystem open
        and splitting the turn between processes that opened it before and after.
        Read-only, as flock needs no more: on a disk gone read-only the turn
        still works, and SQLite itself says what became of the save.
        """
        fd = os.open(f"{self.path}.write-turn", os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        return None
                    _sleep(TURN_POLL_S)
        except BaseException:
            os.close(fd)
            raise

    def presence_batch(self, items: Sequence[Item], deadline: float) -> list[Outcome]:
        """Apply heartbeats [presence.Beat, Sweep] in one transaction, without an fsync (not worth one)."""
        return self.save_batch(items, deadline, self._apply_beats, durable=False)

    def save_batch(self, items: Sequence[Item], deadline: float, apply: Apply | None = None,
                   durable: bool = True) -> list[Outcome]:
        """Apply saves [SaveRequest] in one transaction, one fsync for all, before `deadline`.

        Returns each item's outcome: a Saved, or the exception saying what
        became of it (Conflict, KeyReused, NotStored, Busy, OutcomeUnknown).
        Never raises for a database error: each caller gets its own answer.
        Nor for the turn's file: on a disk gone read-only (or full) opening
        `<database>.write-turn` fails before anything is written, which is
        NotStored, not the "outcome unknown" (and traceback) that stores/writers.py
        makes of an exception it did not expect.
        """
        problem = self.check_file()
        if problem:
            return [NotStored(problem) for _ in items]
        try:
            conn = self._borrow()
        except (sqlite3.Error, RuntimeError) as exc:
            return [NotStored(f"the database cannot be opened ({exc})") for _ in items]
        healthy = False
        try:
            try:
                turn = self._take_turn(deadline)
            except OSError as exc:
                return [NotStored(_os_reason(exc)) for _ in items]
            if turn is None:
                return [Busy("other saves held the write turn past the busy timeout") for _ in items]
            try:
                if not durable:
                    conn.execute("PRAGMA synchronous = NORMAL")  # in WAL: no fsync at commit, still never corrupt
                try:
                    outcomes, healthy = self._transaction(conn, items, deadline, apply or self._apply_all)
                finally:
                    if not durable:
                        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            finally:
                os.close(turn)  # and with it the flock
        finally:
            self._give_back(conn, healthy)
        return outcomes

    def _transaction(self, conn: _Connection, items: Sequence[Item], deadline: float,
                     apply: Apply) -> tuple[list[Outcome], bool]:
        """Run the batch's transaction; return (outcomes, whether the connection is still sound)."""
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            return [Busy("it waited its whole busy timeout for its turn") for _ in items], True
        try:
            conn.execute(f"PRAGMA busy_timeout = {remaining_ms}")
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if _code(exc) in (SQLITE_BUSY, SQLITE_LOCKED):
                return [Busy(f"another writer held the database ({exc})") for _ in items], True
            return [NotStored(_reason(exc)) for _ in items], False
        try:
            try:
                outcomes = apply(conn, items)
            except sqlite3.Error as exc:  # SQLite gave up the whole transaction (disk full, I/O error)
                self._roll_back(conn)
                return [NotStored(_reason(exc)) for _ in items], False
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._roll_back(conn)
            if _code(exc) in NOT_WRITTEN or getattr(exc, "sqlite_errorcode", 0) == SQLITE_IOERR_WRITE:
                failed: Exception = NotStored(_reason(exc))
            else:  # e.g. an fsync that failed: the commit may still be on disk
                failed = OutcomeUnknown(f"the commit failed: {exc}")
            return [unless_settled(outcome, failed) for outcome in outcomes], False
        except BaseException:
            self._roll_back(conn)
            raise
        return outcomes, True

    def _fatal(self, conn: Any, exc: Exception) -> bool:
        """SQLite gave up the whole transaction (disk full, I/O error), not just one statement."""
        return not conn.in_transaction

    def _reason(self, exc: Exception) -> str:
        return _reason(exc)

    @staticmethod
    def _roll_back(conn: _Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the connection is closed, not pooled, by the caller

    def changes(self, slug: str, since: int, epoch: str | None = None) -> Change:
        """Return the page's state for a client at version `since` of database `epoch`.

        The epoch is read with the page, in one statement, so an answer never
        pairs a version with the identity of another database (one restored
        in place, say). The file is looked at first (one stat(), about 1.5 µs):
        a worker that serves only reads has no watcher and makes no save to
        notice a replaced file, and would answer from its pooled connection
        to the old one for as long as it lives.
        """
        problem = self.check_file()  # a missing file: reads go on from a connection still open to it
        try:
            conn = self._borrow()  # every poll comes here: no context manager, a third less overhead
        except (sqlite3.Error, RuntimeError) as exc:  # none open, and the file cannot be opened: 503, not 500
            raise Unavailable(problem or str(exc)) from None
        try:
            row = conn.execute(
                "SELECT e.value, p.version, p.updated_at,"
                " CASE WHEN p.version > ?1 OR e.value != ?3 THEN p.html END,"
                " CASE WHEN p.version > ?1 OR e.value != ?3 THEN p.data END, p.deleted"
                " FROM epoch e LEFT JOIN page_versions p ON p.slug = ?2",
                (since, slug, epoch),  # a NULL epoch compares as not different
            ).fetchone()
        except sqlite3.Error as exc:
            conn.close()
            raise Unavailable(str(exc)) from None
        self._give_back(conn)
        self.epoch = row[0]
        return change_from_row(row)

    def _read(self, sql: str, params: Any) -> list[Any]:
        """Run one read on a pooled connection; return its rows, or raise Unavailable."""
        problem = self.check_file()
        try:
            conn = self._borrow()
        except (sqlite3.Error, RuntimeError) as exc:
            raise Unavailable(problem or str(exc)) from None
        try:
            rows = conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            conn.close()
            raise Unavailable(str(exc)) from None
        self._give_back(conn)
        return rows

    def ping(self) -> None:
        """Read from the database once; raise Unavailable when it cannot be read."""
        try:
            with self._connection() as conn:
                conn.execute("SELECT count(*) FROM epoch").fetchone()
        except (sqlite3.Error, RuntimeError) as exc:
            raise Unavailable(str(exc)) from None

    def watch(self, seq: int | None = None) -> "SaveCursor":
        """Open a cursor over saves after `seq` (None: from now), for a process's one watcher."""
        return SaveCursor(self._connect(), seq)


def check_database(path: str) -> None:
    """Raise SchemaOutOfDate or SchemaTooNew, saying what to do, unless this code can use `path`."""
    SQLiteStore(path).close()


class _Lent:
    """A pooled connection lent for one `with` block; closed instead of pooled if it failed."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    def __enter__(self) -> _Connection:
        self._conn = self._store._borrow()
        return self._conn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._store._give_back(self._conn, healthy=exc_type is None)


class SaveCursor:
    """Which pages were saved after a point in the save order, by any process.

    `PRAGMA data_version` changes only when another connection commits, and
    reading it touches no table: an idle tick costs one cheap statement
    whatever the number of pages or subscribers.
    """

    def __init__(self, conn: sqlite3.Connection, seq: int | None = None) -> None:
        self._conn = conn
        self._data_version: int | None = None  # unknown: the first look reads what is there
        (self.epoch,) = conn.execute("SELECT value FROM epoch").fetchone()
        if seq is None:
            (seq,) = conn.execute("SELECT coalesce(max(seq), 0) FROM page_versions").fetchone()
        self.seq: int = seq  # the starting point
        (self.presence_seq,) = conn.execute("SELECT value FROM presence_clock").fetchone()
        self._presence_data_version: int | None = None

    def saved_since(self, seq: int | None) -> list[tuple[str, int, int]] | None:
        """Return [(slug, version, seq)] saved after `seq`, oldest first; [] when nothing was committed.

        None when the database now has another epoch (restored in place):
        its save order is another one, so the caller starts over.
        """
        (data_version,) = self._conn.execute("PRAGMA data_version").fetchone()
        if data_version == self._data_version:
            return []
        (epoch,) = self._conn.execute("SELECT value FROM epoch").fetchone()
        if epoch != self.epoch:
            return None
        rows = self._conn.execute(
            "SELECT slug, version, seq FROM page_versions WHERE seq > ? ORDER BY seq", (seq,)
        ).fetchall()
        self._data_version = data_version  # only once read: a failed look is repeated
        return rows

    def presence_since(self) -> list[str]:
        """Return the pages whose presence changed since the last call (or the cursor's start), oldest first.

        Presence versions come from one clock in SQLite's one-writer order,
        so "above the last one seen" misses none.
        """
        (data_version,) = self._conn.execute("PRAGMA data_version").fetchone()
        if data_version == self._presence_data_version:
            return []
        rows = self._conn.execute("SELECT slug, version FROM presence WHERE version > ? ORDER BY version",
                                  (self.presence_seq,)).fetchall()
        self._presence_data_version = data_version
        if rows:
            self.presence_seq = rows[-1][1]
        return [slug for slug, _version in rows]

    def close(self) -> None:
        self._conn.close()
