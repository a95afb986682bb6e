"""Where pages live: the shared store logic (PageStore) and its SQLite implementation.

Views talk to a store through its contract (stores/contract.py) and never
build SQL; the PostgreSQL store (stores/postgres.py) is a second
implementation over the same PageStore. What a save ends in is in
core/outcomes.py.
"""

import errno
import fcntl
import logging
import os
import sqlite3
import time
import weakref
from urllib.parse import quote

from changefeed.core.outcomes import (
    Busy,
    Change,
    Conflict,
    KeyReused,
    NoSuchPage,
    NotStored,
    OutcomeUnknown,
    Saved,
    SaveRequest,
    SchemaOutOfDate,
    StorageFull,
    Unavailable,
    utc_now,
)
from changefeed.core.presence import GONE, Beaten, Presence, PresenceFull, Sweep, TooSoon, user_id
from changefeed.stores import schema as migrate
from changefeed.stores import writers
from changefeed.stores.schema import SchemaTooNew

log = logging.getLogger(__name__)

try:  # the commit thread waits for its turn with a real sleep, even where gevent patched time
    from gevent.monkey import get_original

    _sleep = get_original("time", "sleep")
except ImportError:  # pragma: no cover - gevent is a dependency; the store does not need it
    _sleep = time.sleep

# Set by gunicorn.conf.py once its master found the database usable: a worker
# (re)started while the file is missing then waits for it instead of failing.
MASTER_CHECKED = "CHANGEFEED_DB_CHECKED_BY_MASTER"

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


def _code(exc):
    """The primary SQLite result code of an error (0 when it carries none)."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF


def _reason(exc):
    """Say in words what a database error means for a save."""
    return f"{REASONS.get(_code(exc), 'the database failed')} ({exc})"


def _os_reason(exc):
    """Say in words what an OS error on a file next to the database means for a save."""
    words = {errno.EROFS: REASONS[SQLITE_READONLY], errno.ENOSPC: REASONS[SQLITE_FULL]}
    return f"{words.get(exc.errno, 'the database folder cannot be written')} ({exc})"


class _Connection(sqlite3.Connection):
    """A connection that remembers which opening of the database file it belongs to."""

    generation = 0


_per_process = weakref.WeakSet()  # objects holding resources of the process that made them
_inherited = []  # connections a forked child must neither use nor close


def after_fork_in_child(obj):
    """Have `obj._forget_parent()` called in every child forked from now on (gunicorn --preload)."""
    _per_process.add(obj)


def _forget_parents():
    for obj in list(_per_process):
        obj._forget_parent()


os.register_at_fork(after_in_child=_forget_parents)


class PageStore:
    """The steps of a save that both engines share, run inside the engine's own transaction.

    A subclass gives its SQL (these statements, with `?` placeholders, and
    its three upserts), its database error class, and `_fatal`: whether an
    error lost the whole transaction rather than one save's savepoint.
    Everything else a client can observe (versions, conflicts, keys,
    limits) is decided here once, so SQLite and PostgreSQL answer alike.
    """

    Error = Exception
    EPOCH = "SELECT value FROM epoch"
    FORGET_KEYS = "DELETE FROM idempotency_keys WHERE created_at <= ?"
    OLDEST_KEY = "SELECT min(created_at) FROM idempotency_keys"
    FIND_KEY = ("SELECT fingerprint, slug, version, updated_at FROM idempotency_keys"
                " WHERE key = ? AND created_at > ?")
    KEEP_KEY = ("INSERT INTO idempotency_keys (key, fingerprint, slug, version, updated_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint,"
                " slug = excluded.slug, version = excluded.version, updated_at = excluded.updated_at,"
                " created_at = excluded.created_at")
    VERSION = "SELECT version, deleted FROM page_versions WHERE slug = ?"
    STORAGE = "SELECT pages, bytes FROM storage"
    # (slug, html, data, updated_at) -> version: first save 1, then +1, whatever the last.
    UPSERT = None
    # (slug, html, data, updated_at) -> version 1, or no row when the page exists (base_version 0).
    INSERT_NEW = None
    # (html, data, updated_at, slug, base_version) -> base + 1, or no row when the stored version is another.
    UPDATE_FROM = None
    # (updated_at, slug, base_version, base_version) -> the tombstone's version (+1), or no row when the
    # page is missing, deleted already, or (a base_version given) at another version.
    DELETE = None

    # Presence (core/presence.py): entries by tab, a version per page from one clock.
    FIND_ENTRY = "SELECT state, name, seen_at FROM page_editors WHERE slug = ? AND user_key = ? AND client_id = ?"
    COUNT_ENTRIES = "SELECT count(*) FROM page_editors WHERE slug = ? AND state <> 'gone'"
    PUT_ENTRY = ("INSERT INTO page_editors (slug, user_key, client_id, name, state, seen_at) VALUES (?, ?, ?, ?, ?, ?)"
                 " ON CONFLICT (slug, user_key, client_id) DO UPDATE SET name = excluded.name,"
                 " state = excluded.state, seen_at = excluded.seen_at")
    EXPIRE_PAGE = "DELETE FROM page_editors WHERE slug = ? AND seen_at < ? RETURNING state"
    EXPIRE_ALL = "DELETE FROM page_editors WHERE seen_at < ? RETURNING slug, state"
    ANY_EXPIRED = "SELECT 1 FROM page_editors WHERE seen_at < ? LIMIT 1"
    FORGET_PRESENCE = ("DELETE FROM presence WHERE changed_at < ?"
                       " AND NOT EXISTS (SELECT 1 FROM page_editors e WHERE e.slug = presence.slug)")
    PRESENCE_VERSION = "SELECT version FROM presence WHERE slug = ?"
    SET_PRESENCE = ("INSERT INTO presence (slug, version, changed_at) VALUES (?, ?, ?) ON CONFLICT (slug)"
                    " DO UPDATE SET version = excluded.version, changed_at = excluded.changed_at")
    # One statement, so the version and the list always belong together: users (not tabs),
    # editing ones first, with how many there are in all.
    PRESENCE = ("SELECT p.version, g.user_key, g.name, g.editing, count(g.user_key) OVER (), sum(g.editing) OVER ()"
                " FROM (SELECT 1 AS one) o"
                " LEFT JOIN presence p ON p.slug = ?"
                " LEFT JOIN (SELECT user_key, max(name) AS name,"
                "            max(CASE WHEN state = 'editing' THEN 1 ELSE 0 END) AS editing"
                "            FROM page_editors WHERE slug = ? AND state <> 'gone' GROUP BY user_key) g ON 1 = 1"
                " ORDER BY g.editing DESC, g.name, g.user_key LIMIT ?")
    NEXT_PRESENCE_VERSION = None  # -> the clock's next value
    FORGET_PRESENCE_AFTER_S = 60  # an empty page's presence row is kept this long, then version 0 says "nobody"

    _max_pages = _max_bytes = None
    _key_ttl = 86_400
    _forget_keys_at = 0.0  # when the oldest Idempotency-Key expires, as far as this process knows: look then
    _busy_timeout = 10.0
    _writer = _presence_writer = None
    presence_ttl_s, presence_min_interval_s, presence_max_per_page, presence_list_max = 15.0, 1.0, 200, 50

    def save(self, slug, html, data, base_version=None, key=None):
        """Store a new version of `slug`, one more than the last, or raise what became of it."""
        writer = self._writer or self._choose_writer()
        deadline = time.monotonic() + self._busy_timeout
        return writer.save(SaveRequest(slug, html, data, base_version, key), deadline)

    def delete(self, slug, base_version=None):
        """Delete `slug`: a tombstone one version above the last, or raise NoSuchPage, Conflict or NotStored.

        The row stays (html "", data null, `deleted`): versions never go back
        within an epoch, a re-created page goes on from the tombstone's
        version, and every transport tells its subscribers the page is gone.
        """
        writer = self._writer or self._choose_writer()
        deadline = time.monotonic() + self._busy_timeout
        return writer.save(SaveRequest(slug, "", "null", base_version, delete=True), deadline)

    def configure_presence(self, ttl_s, min_interval_s, max_per_page, list_max):
        self.presence_ttl_s, self.presence_min_interval_s = ttl_s, min_interval_s
        self.presence_max_per_page, self.presence_list_max = max_per_page, list_max

    def beat(self, beat):
        """Record a heartbeat (presence.Beat); return a Beaten, or raise TooSoon, PresenceFull or NotStored."""
        return self._presence_write(beat)

    def sweep_presence(self):
        """Delete the entries whose beats stopped, if there are any; a cheap read when there are none."""
        if self._presence_expired():
            self._presence_write(Sweep())

    def _presence_write(self, item):
        writer = self._presence_writer or self._choose_presence_writer()
        return writer.save(item, time.monotonic() + self._busy_timeout)

    def _choose_presence_writer(self):
        """Beats go through a writer of their own: grouped, and never in a save's transaction."""

        self._presence_writer = writers.for_this_process(native_thread=self._native_commits)(self.presence_batch)
        return self._presence_writer

    def _apply_beats(self, conn, items):
        """Apply heartbeats and sweeps, each in a savepoint; then give each page that changed a new version."""
        now = time.time()
        changed, outcomes = set(), []
        for item in items:
            item_changed = set()  # the pages this item changed: none, should it be rolled back
            outcome = self._in_savepoint(conn, item, lambda: (
                self._sweep(conn, now, item_changed) if isinstance(item, Sweep)
                else self._apply_beat(conn, item, now, item_changed)))
            if not isinstance(outcome, NotStored):
                changed |= item_changed
            outcomes.append(outcome)
        versions = {}
        for slug in sorted(changed):  # in order: two hosts' transactions never wait on each other in a cycle
            (versions[slug],) = conn.execute(self.NEXT_PRESENCE_VERSION).fetchone()
            conn.execute(self.SET_PRESENCE, (slug, versions[slug], now))
        self._presence_changed(conn, sorted(changed))
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, Beaten) and outcome.slug not in versions:
                row = conn.execute(self.PRESENCE_VERSION, (outcome.slug,)).fetchone()
                versions[outcome.slug] = row[0] if row else 0
            if isinstance(outcome, Beaten):
                outcomes[i] = Beaten(outcome.slug, versions[outcome.slug], outcome.you)
        return outcomes

    def _apply_beat(self, conn, beat, now, changed):
        """One tab's beat: refresh, add or (state "gone") unlist its entry; a change marks the page.

        Every beat waits the minimum interval after the tab's last one, but
        a "gone" that unlists a listed tab, which is always taken (a tab
        closing right after it opened must not linger). The unlisted entry
        stays, state "gone", until the TTL: the tab's next beat still waits
        its turn, so alternating "viewing" and "gone" changes the list at
        most twice per interval.
        """
        key = (beat.slug, beat.user, beat.client_id)
        if any(state != GONE for (state,) in conn.execute(self.EXPIRE_PAGE, (beat.slug, now - self.presence_ttl_s))):
            changed.add(beat.slug)
        row = conn.execute(self.FIND_ENTRY, key).fetchone()
        listed = row is not None and row[0] != GONE
        leaving = beat.state == GONE and listed  # always taken
        if row is not None and not leaving and now - row[2] < self.presence_min_interval_s:
            return TooSoon(self.presence_min_interval_s - (now - row[2]))
        if beat.state == GONE and not listed:
            return Beaten(beat.slug, 0, user_id(beat.user))  # not listed: nothing changes
        if row is None and conn.execute(self.COUNT_ENTRIES, (beat.slug,)).fetchone()[0] >= self.presence_max_per_page:
            return PresenceFull(self.presence_max_per_page)
        conn.execute(self.PUT_ENTRY, (*key, beat.name, beat.state, now))
        if not listed or (row[0], row[1]) != (beat.state, beat.name):
            changed.add(beat.slug)
        return Beaten(beat.slug, 0, user_id(beat.user))

    def _sweep(self, conn, now, changed):
        changed.update(slug for slug, state in conn.execute(self.EXPIRE_ALL, (now - self.presence_ttl_s,)).fetchall()
                       if state != GONE)  # an unlisted entry's going changes no list
        conn.execute(self.FORGET_PRESENCE, (now - self.FORGET_PRESENCE_AFTER_S,))
        return None

    def _presence_changed(self, conn, slugs):
        """Tell the other processes which pages' presence changed (PostgreSQL NOTIFYs; SQLite's watcher reads)."""

    def _read(self, sql, params):  # pragma: no cover - each engine says
        """Run one read; return its rows, or raise Unavailable."""
        raise NotImplementedError

    def presence(self, slug):
        """Who is on the page now (presence.Presence), in one statement."""
        return self._presence_from_rows(self._read(self.PRESENCE, (slug, slug, self.presence_list_max)))

    def presence_version(self, slug):
        """The page's presence version alone: what an unchanged poll needs to say 304."""
        rows = self._read(self.PRESENCE_VERSION, (slug,))
        return rows[0][0] if rows else 0

    def _presence_expired(self):
        return bool(self._read(self.ANY_EXPIRED, (time.time() - self.presence_ttl_s,)))

    def _presence_from_rows(self, rows):
        """The Presence of the PRESENCE query's rows."""
        first = rows[0]
        if first[1] is None:  # nobody
            return Presence(first[0] or 0)
        return Presence(first[0] or 0, first[4], int(first[5] or 0),
                        tuple((user_id(user), name, "editing" if editing else "viewing")
                              for _v, user, name, editing, _c, _e in rows))

    def _fatal(self, conn, exc):  # pragma: no cover - each engine says
        raise NotImplementedError

    def _reason(self, exc):
        return f"the database failed ({exc})"

    def _apply_all(self, conn, items):
        """Apply each item in a savepoint of its own; raise when the whole transaction is lost."""
        now = time.time()
        # Read in the transaction, so each answer names the database that holds its save.
        (epoch,) = conn.execute(self.EPOCH).fetchone()
        self.epoch = epoch
        if now >= self._forget_keys_at:
            self._forget_keys(conn, now)
        return [self._in_savepoint(conn, item, lambda: self._apply(conn, item, now, epoch)) for item in items]

    def _in_savepoint(self, conn, item, apply):
        """Run `apply()` for one item in a savepoint of its own; return its outcome.

        Only a database error that lost the whole transaction fails the
        batch (it is raised). Any other failure is this item's alone: its
        savepoint is rolled back, it gets its own NotStored, and the others
        still commit. That includes exceptions that are not database errors
        (a string the driver cannot encode, a bug): left to escape, they
        would end every caller of the batch in OutcomeUnknown.
        """
        conn.execute("SAVEPOINT item")
        try:
            outcome = apply()
        except self.Error as exc:
            if self._fatal(conn, exc):
                raise
            conn.execute("ROLLBACK TO SAVEPOINT item")
            outcome = NotStored(self._reason(exc))
        except Exception as exc:  # noqa: BLE001 - see above: this item only, logged with its traceback
            log.exception("%s for %r not stored", type(item).__name__, getattr(item, "slug", None))
            conn.execute("ROLLBACK TO SAVEPOINT item")
            outcome = NotStored(f"it could not be written ({type(exc).__name__}); the error is logged")
        conn.execute("RELEASE SAVEPOINT item")
        return outcome

    def _apply(self, conn, item, now, epoch):
        """Write one save inside the caller's transaction; a stale base writes nothing.

        The base version is checked by the write itself (an UPDATE of that
        version, an INSERT of a page that must not exist), so two engines
        with different locking (SQLite's one writer, PostgreSQL's row locks)
        never let two saves from the same base both land.
        """
        if item.key is not None:
            fingerprint = item.fingerprint()
            row = conn.execute(self.FIND_KEY, (item.key, now - self._key_ttl)).fetchone()
            if row is not None:
                if row[0] != fingerprint:
                    return KeyReused(item.key)
                return Saved(row[1], row[2], row[3], epoch, replayed=True)
        updated_at = utc_now()
        if item.delete:
            return self._delete(conn, item, updated_at, epoch)
        limited = self._max_pages is not None or self._max_bytes is not None
        if limited:
            before = conn.execute(self.STORAGE).fetchone()
        if item.base_version is None:
            row = conn.execute(self.UPSERT, (item.slug, item.html, item.data, updated_at)).fetchone()
        elif item.base_version == 0:
            row = conn.execute(self.INSERT_NEW, (item.slug, item.html, item.data, updated_at)).fetchone()
        else:
            row = conn.execute(self.UPDATE_FROM,
                               (item.html, item.data, updated_at, item.slug, item.base_version)).fetchone()
        if row is None:
            current = conn.execute(self.VERSION, (item.slug,)).fetchone()
            return Conflict(current[0] if current else 0)
        (version,) = row
        if item.key is not None:
            conn.execute(self.KEEP_KEY, (item.key, fingerprint, item.slug, version, updated_at, now))
        if limited:  # after the key too: what keys keep counts against the byte limit
            refused = self._over_limit(conn, *before)
            if refused is not None:
                conn.execute("ROLLBACK TO SAVEPOINT item")  # undo this save only; the caller releases the savepoint
                return refused
        return Saved(item.slug, version, updated_at, epoch)

    def _delete(self, conn, item, updated_at, epoch):
        """Turn a page into a tombstone, one version up; a missing or deleted page, or another base, writes nothing."""
        row = conn.execute(self.DELETE, (updated_at, item.slug, item.base_version, item.base_version)).fetchone()
        if row is None:
            current = conn.execute(self.VERSION, (item.slug,)).fetchone()
            if current is None or current[1]:
                return NoSuchPage(current[0] if current else 0)
            return Conflict(current[0])
        return Saved(item.slug, row[0], updated_at, epoch, deleted=True)

    def _forget_keys(self, conn, now):
        """Delete the Idempotency-Keys past their window, and note when the oldest left expires.

        Their bytes count against the byte limit, so they must go when they
        expire, whether or not new keys come. Until the oldest key left
        expires (or, with none left, a window from now: any key kept later
        expires later) no batch looks again.
        """
        conn.execute(self.FORGET_KEYS, (now - self._key_ttl,))
        (oldest,) = conn.execute(self.OLDEST_KEY).fetchone()
        self._forget_keys_at = (now if oldest is None else oldest) + self._key_ttl

    def _over_limit(self, conn, pages_before, bytes_before):
        """After a save, inside its savepoint: a StorageFull if it took the database past a limit.

        Triggers have already counted it (and its Idempotency-Key), so this
        reads one row. Only saves that add a page (a new one, or one
        re-created over its tombstone) or grow the bytes stored are refused:
        a full database still takes new versions of its pages that are no bigger.
        """
        pages, stored = conn.execute(self.STORAGE).fetchone()
        if pages > pages_before and self._max_pages is not None and pages > self._max_pages:
            return StorageFull("pages", f"the service holds its most pages ({self._max_pages}, "
                                        "CHANGEFEED_MAX_PAGES), so a new page cannot be added")
        if self._max_bytes is not None and stored > self._max_bytes and stored > bytes_before:
            return StorageFull("stored_bytes", f"the pages, and the Idempotency-Keys kept for retries, would "
                                               f"hold more than {self._max_bytes} bytes "
                                               "(CHANGEFEED_MAX_STORED_BYTES), so a page cannot grow or be added")
        return None


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
    _native_commits = True  # SQLite blocks the thread that commits

    def __init__(self, path, synchronous="FULL", busy_timeout_ms=10_000, writer=None,
                 idempotency_ttl_s=86_400, max_pages=None, max_bytes=None):
        self.path = path
        self._max_pages, self._max_bytes = max_pages, max_bytes
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout_ms / 1000
        self._key_ttl = idempotency_ttl_s
        self._writer_class = writer  # None: the best one for the process that first saves
        self._writer = None
        self._idle = []  # connections not in use; list.pop/append are atomic
        self.generation = 0  # bumped when the file at `path` is another one: pooled connections go
        self._identity = self._file_identity()
        if self._identity is None and os.environ.get(MASTER_CHECKED) == "1":
            self.epoch = None  # read by check_file once the file is back; until then saves get 503
        else:
            self.epoch = self._open_check()
        after_fork_in_child(self)

    def _open_check(self):
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
            return conn.execute("SELECT value FROM epoch").fetchone()[0]

    def _file_identity(self):
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def _connect(self):
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

    def _forget_parent(self):
        """In a forked child: leave the parent's connections and files alone, open our own."""
        _inherited.extend(self._idle)
        self._idle = []
        self._writer = self._presence_writer = None

    def close(self):
        """Close the pooled connections (tests; a server's process simply ends)."""
        while self._idle:
            self._idle.pop().close()

    def check_file(self):
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

    def _borrow(self):
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

    def _give_back(self, conn, healthy=True):
        """Pool a connection again, or close it when it failed or belongs to a replaced file."""
        if healthy and conn.generation == self.generation:
            self._idle.append(conn)
        else:
            conn.close()

    def _connection(self):
        """Lend a pooled connection for one `with` block."""
        return _Lent(self)

    def _choose_writer(self):
        """Pick how saves reach save_batch in this process: after fork, after gevent patched it."""

        self._writer = (self._writer_class or writers.for_this_process())(self.save_batch)
        return self._writer

    def _take_turn(self, deadline):
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

    def presence_batch(self, items, deadline):
        """Apply heartbeats [presence.Beat, Sweep] in one transaction, without an fsync (not worth one)."""
        return self.save_batch(items, deadline, self._apply_beats, durable=False)

    def save_batch(self, items, deadline, apply=None, durable=True):
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

    def _transaction(self, conn, items, deadline, apply):
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
                failed = NotStored(_reason(exc))
            else:  # e.g. an fsync that failed: the commit may still be on disk
                failed = OutcomeUnknown(f"the commit failed: {exc}")
            return [unless_settled(outcome, failed) for outcome in outcomes], False
        except BaseException:
            self._roll_back(conn)
            raise
        return outcomes, True

    def _fatal(self, conn, exc):
        """SQLite gave up the whole transaction (disk full, I/O error), not just one statement."""
        return not conn.in_transaction

    def _reason(self, exc):
        return _reason(exc)

    @staticmethod
    def _roll_back(conn):
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the connection is closed, not pooled, by the caller

    def changes(self, slug, since, epoch=None):
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

    def _read(self, sql, params):
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

    def ping(self):
        """Read from the database once; raise Unavailable when it cannot be read."""
        try:
            with self._connection() as conn:
                conn.execute("SELECT count(*) FROM epoch").fetchone()
        except (sqlite3.Error, RuntimeError) as exc:
            raise Unavailable(str(exc)) from None

    def watch(self, seq=None):
        """Open a cursor over saves after `seq` (None: from now), for a process's one watcher."""
        return SaveCursor(self._connect(), seq)


def change_from_row(row):
    """The Change of a row (epoch, version, updated_at, html, data, deleted) of the changes() query.

    No page is version 0.
    """
    if row[1] is None:
        return Change(row[0], 0)
    return Change(row[0], row[1], row[2], row[3], row[4], bool(row[5]))


def check_database(path):
    """Raise SchemaOutOfDate or SchemaTooNew, saying what to do, unless this code can use `path`."""
    SQLiteStore(path).close()


class _Lent:
    """A pooled connection lent for one `with` block; closed instead of pooled if it failed."""

    def __init__(self, store):
        self._store = store

    def __enter__(self):
        self._conn = self._store._borrow()
        return self._conn

    def __exit__(self, exc_type, exc, tb):
        self._store._give_back(self._conn, healthy=exc_type is None)


def unless_settled(outcome, failed):
    """What a failed commit means for one item: only a new version is affected."""
    if isinstance(outcome, Saved) and not outcome.replayed:
        return type(failed)(*failed.args)  # each caller gets its own exception object
    return outcome


class SaveCursor:
    """Which pages were saved after a point in the save order, by any process.

    `PRAGMA data_version` changes only when another connection commits, and
    reading it touches no table: an idle tick costs one cheap statement
    whatever the number of pages or subscribers.
    """

    def __init__(self, conn, seq=None):
        self._conn = conn
        self._data_version = None  # unknown: the first look reads what is there
        (self.epoch,) = conn.execute("SELECT value FROM epoch").fetchone()
        if seq is None:
            (seq,) = conn.execute("SELECT coalesce(max(seq), 0) FROM page_versions").fetchone()
        self.seq = seq  # the starting point
        (self.presence_seq,) = conn.execute("SELECT value FROM presence_clock").fetchone()
        self._presence_data_version = None

    def saved_since(self, seq):
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

    def presence_since(self):
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

    def close(self):
        self._conn.close()
