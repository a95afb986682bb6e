"""Pages in PostgreSQL: the PostgreSQL engine of the store contract (stores/contract.py), for several hosts.

The same answers as SQLiteStore, from the same save steps (stores/base.py, PageStore):
first save 1, then exactly +1, the same conflicts, keys and limits. What
differs is how the engine is reached and how failures read:

- Connections come from a pool (psycopg_pool), one per server process,
  opened on first use, so a process forked by gunicorn opens its own.
  psycopg waits cooperatively under gevent (it must be imported after
  gevent patched the process, which gunicorn's workers do before loading
  the app).
- A save's transaction is followed, once committed, by one NOTIFY naming
  the slugs and versions it wrote (never the page: a payload holds at most
  8000 bytes), which every host's listener (stores/postgres_notify.py)
  hears. Not inside the transaction: PostgreSQL commits every transaction
  that notified under one database-wide lock, held through the commit's
  WAL flush, so notifying saves would take turns again (measured in
  docs/performance.md). The NOTIFY goes in a transaction of its own that
  waits for no flush; one lost (the process died between the two) is
  found by the listeners' catch-up read of saved_since(), never lost for
  good. Group commit still applies: one transaction, one commit and one
  NOTIFY for all the saves a process has waiting.
- The database unreachable, or every pooled connection busy for too long,
  is `Unavailable` for a read and `NotStored` for a save (503 with
  Retry-After); a connection lost while COMMIT was under way is
  `OutcomeUnknown`. Broken connections are dropped and the pool reconnects
  by itself once the server is back.
"""

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import errors, pq, sql
from psycopg_pool import ConnectionPool, PoolTimeout

from changefeed.core.outcomes import Busy, Change, NotStored, OutcomeUnknown, Saved, SchemaOutOfDate, Unavailable
from changefeed.core.settings import MiB
from changefeed.ops import metrics
from changefeed.stores import schema as migrate
from changefeed.stores import writers
from changefeed.stores.base import Item, Outcome, PageStore, change_from_row, unless_settled
from changefeed.stores.forking import after_fork_in_child, master_checked
from changefeed.stores.memory import PageMemory
from changefeed.stores.schema import SchemaTooNew, describe


def cooperate() -> None:
    """Have psycopg wait for the server through gevent, if gevent patched this process.

    psycopg picks how it waits when first imported: imported before gevent
    patched the process (an app preloaded by gunicorn's master), it would
    wait in C, and one slow query would stall every request of the worker.
    gunicorn.conf.py calls this again in each worker once gevent is in.
    """
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return
    from psycopg import waiting

    if monkey.is_module_patched("select") and waiting.wait is getattr(waiting, "wait_c", None):
        waiting.wait = waiting.wait_poll  # select.poll, which gevent has patched


log = logging.getLogger(__name__)

cooperate()

CHANNEL = migrate.POSTGRES_CHANNEL
PRESENCE_CHANNEL = migrate.POSTGRES_PRESENCE_CHANNEL
MAX_PAYLOAD = 7_900  # bytes; PostgreSQL refuses a NOTIFY payload of 8000 or more
EVERYTHING = "*"  # a payload meaning "re-read every page you watch" (too many slugs, or a new epoch)
# Sent when a host connects: a dead peer is noticed in about 30 s, not 2 hours.
KEEPALIVES: dict[str, Any] = dict(keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)
_ALIVE = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)


def _pg(sql: str) -> str:
    """PageStore's statements use `?` placeholders; psycopg wants `%s`."""
    return sql.replace("?", "%s")


def notify_payload(saved: Sequence[Saved]) -> str:
    """The NOTIFY payload of a transaction's saves: [[slug, version], ...], or `*` when too long."""
    payload = json.dumps([[s.slug, s.version] for s in saved], separators=(",", ":"), allow_nan=False)
    return payload if len(payload) <= MAX_PAYLOAD else EVERYTHING


# A batch's steps inside the transaction, other than the saves' (the beats').
Apply = Callable[[Any, Sequence[Item]], list[Outcome]]


class PostgresStore(PageStore):
    """Pages in a PostgreSQL database shared by every process of every host.

    Its feed lists a save once every older transaction has ended (the
    horizon: FEED below), so it may lag the save's commit (`feed_lags_commits`).

    Row locks keep concurrent saves of one page in order: the upsert of a
    page waits for the transaction holding its row, then adds one to what
    that one wrote, so no version is lost or given twice. The save steps
    check a base version inside the write itself (base.PageStore._apply).
    """

    feed_lags_commits = True

    Error = psycopg.Error
    (EPOCH, FORGET_KEYS, OLDEST_KEY, FIND_KEY, KEEP_KEY, VERSION, STORAGE, FIND_ENTRY, COUNT_ENTRIES, PUT_ENTRY,
     EXPIRE_PAGE, EXPIRE_ALL, ANY_EXPIRED, FORGET_PRESENCE, PRESENCE_VERSION, SET_PRESENCE, PRESENCE) = map(_pg, (
        PageStore.EPOCH, PageStore.FORGET_KEYS, PageStore.OLDEST_KEY, PageStore.FIND_KEY, PageStore.KEEP_KEY, PageStore.VERSION,
        PageStore.STORAGE, PageStore.FIND_ENTRY, PageStore.COUNT_ENTRIES, PageStore.PUT_ENTRY,
        PageStore.EXPIRE_PAGE, PageStore.EXPIRE_ALL, PageStore.ANY_EXPIRED, PageStore.FORGET_PRESENCE,
        PageStore.PRESENCE_VERSION, PageStore.SET_PRESENCE, PageStore.PRESENCE))
    NEXT_PRESENCE_VERSION = "SELECT nextval('presence_clock')"
    _native_commits = False  # psycopg waits cooperatively: commits run in a greenlet
    UPSERT = ("INSERT INTO page_versions AS p (slug, html, data, version, updated_at) VALUES (%s, %s, %s, 1, %s)"
              " ON CONFLICT (slug) DO UPDATE SET html = excluded.html, data = excluded.data,"
              " version = p.version + 1, updated_at = excluded.updated_at, deleted = false RETURNING version")
    INSERT_NEW = ("INSERT INTO page_versions AS p (slug, html, data, version, updated_at) VALUES (%s, %s, %s, 1, %s)"
                  " ON CONFLICT (slug) DO UPDATE SET html = excluded.html, data = excluded.data,"
                  " version = p.version + 1, updated_at = excluded.updated_at, deleted = false"
                  " WHERE p.deleted RETURNING version")
    UPDATE_FROM = ("UPDATE page_versions SET html = %s, data = %s, version = version + 1, updated_at = %s,"
                   " deleted = false WHERE slug = %s AND version = %s RETURNING version")
    DELETE = ("UPDATE page_versions SET html = '', data = 'null', version = version + 1, updated_at = %s,"
              " deleted = true WHERE slug = %s AND NOT deleted AND (%s::bigint IS NULL OR version = %s) RETURNING version")
    # A storage shard no other transaction holds, named for the counting triggers (schema_postgres.sql);
    # with every shard taken (16 transactions at once) the triggers count in shard 0 and wait for it.
    TAKE_SHARD = ("WITH s AS MATERIALIZED (SELECT shard FROM storage_shards FOR UPDATE SKIP LOCKED LIMIT 1)"
                  " SELECT set_config('changefeed.shard', shard::text, true) FROM s")
    # What was saved at or after a cursor and below the oldest transaction still running: every row
    # below that horizon is settled (committed, or rolled back and invisible), so none committing
    # late is ever skipped. The horizon is the next cursor.
    HORIZON = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text"  # the cursor of "from now on"
    SAVED_SINCE = ("SELECT h.horizon::text, p.slug, p.version, p.deleted"
                   " FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon) h"
                   " LEFT JOIN page_versions p ON p.xact >= %s::text::xid8 AND p.xact < h.horizon"
                   " ORDER BY p.xact, p.slug")
    # The feed (PageStore.feed): the pages after a position (xact, slug) and below the horizon, in that
    # order; the horizon is where a reader goes on, and a position past the snapshot's xmax was never given.
    FEED = ("SELECT e.value, h.horizon::text, pg_snapshot_xmax(h.snap)::text, p.slug, p.version, p.updated_at,"
            " p.deleted, p.xact::text, p.html, p.data"
            " FROM (SELECT s AS snap, pg_snapshot_xmin(s) AS horizon FROM pg_current_snapshot() s) h CROSS JOIN epoch e"
            " LEFT JOIN LATERAL (SELECT slug, version, updated_at, deleted, xact,"
            " CASE WHEN %(content)s THEN html END AS html, CASE WHEN %(content)s THEN data END AS data"
            " FROM page_versions WHERE xact >= %(number)s::text::xid8"
            " AND (xact > %(number)s::text::xid8 OR slug > %(slug)s) AND xact < h.horizon"
            " AND starts_with(slug, %(prefix)s) AND (%(slugs)s::text[] IS NULL OR slug = ANY(%(slugs)s::text[]))"
            " ORDER BY xact, slug LIMIT %(limit)s) p ON true"
            " ORDER BY p.xact, p.slug")
    FEED_POSITIONS_NAME_SLUGS = True  # one transaction writes many pages: the slug orders them
    CHANGES = ("SELECT e.value, p.version, p.updated_at,"
               " CASE WHEN p.version > %(since)s OR e.value <> %(epoch)s THEN p.html END,"
               " CASE WHEN p.version > %(since)s OR e.value <> %(epoch)s THEN p.data END, p.deleted"
               " FROM epoch e LEFT JOIN page_versions p ON p.slug = %(slug)s")

    generation = 0  # no file to be replaced: the watcher's "new file" check never fires

    def __init__(self, url: str, busy_timeout_ms: int = 10_000, writer: writers.WriterFactory | None = None,
                 idempotency_ttl_s: float = 86_400, max_pages: int | None = None, max_bytes: int | None = None,
                 pool_size: int = 10, pool_timeout_ms: int = 2_000, poll_memory_bytes: int = 16 * MiB) -> None:
        self.url = url
        self.name = describe(url)
        self._max_pages, self._max_bytes = max_pages, max_bytes
        self._busy_timeout = busy_timeout_ms / 1000
        self._key_ttl = idempotency_ttl_s
        self._pool_size, self._pool_timeout = pool_size, pool_timeout_ms / 1000
        self._writer_class = writer
        self._writer = None
        self._pool: ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        self._checking = False  # a sweep of the pool's idle connections is under way
        # The pages polled here, answered without a read while the listener (postgres_notify.py) trusts it;
        # `listen` is that listener's start(), given by it: a poll starts it, or the memory never answers.
        self.memory = PageMemory(poll_memory_bytes)
        self.listen: Callable[[], None] | None = None
        self.epoch = None
        try:
            self.epoch = self._open_check()
        except Unavailable:
            # Unreachable now: gunicorn's master saw it usable, so serve 503 until it is back.
            if not master_checked():
                raise
        after_fork_in_child(self)

    def _open_check(self) -> str:
        """Refuse a database this code cannot use; return its epoch."""
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self._pool_timeout))) as conn:
                found = migrate.postgres_schema_version(conn)
                if found > migrate.LATEST:
                    raise SchemaTooNew(migrate.too_new_message(self.name, found))
                if found < migrate.LATEST:
                    raise SchemaOutOfDate(
                        f"database {self.name} is at schema version {found}, this code needs "
                        f"{migrate.LATEST}: run `python migrate.py` (with the same CHANGEFEED_DATABASE_URL)")
                row = conn.execute(self.EPOCH).fetchone()
                assert row is not None, "the epoch table holds one row"
                epoch: str = row[0]
                return epoch
        except psycopg.OperationalError as exc:
            raise Unavailable(f"cannot reach {self.name}: {_one_line(exc)}") from None

    def _forget_parent(self) -> None:
        """In a forked child: the parent's pool and its connections are not ours to use or close."""
        self._pool, self._writer, self._presence_writer, self._pool_lock = None, None, None, threading.Lock()
        self.memory = PageMemory(self.memory.budget, self.memory.max_age_s)  # the parent's listener vouched for it

    def _connections(self) -> ConnectionPool:
        """This process's pool, opened on first use (after fork, after gevent patched)."""
        pool = self._pool
        if pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = ConnectionPool(
                        self.url, min_size=1, max_size=self._pool_size, timeout=self._pool_timeout,
                        open=False, name="changefeed",
                        kwargs={"autocommit": True, "application_name": "changefeed", **KEEPALIVES})
                    self._pool.open(wait=False)
                pool = self._pool
        return pool

    def _lost(self) -> None:
        """A pooled connection failed: have the pool test its idle ones now, not one failed request each."""
        pool = self._pool
        if self._checking or pool is None:
            return
        self._checking = True

        def sweep() -> None:
            try:
                pool.check()
            except Exception:  # noqa: BLE001 - a sweep is a courtesy; the pool discards bad ones anyway
                pass
            finally:
                self._checking = False

        threading.Thread(target=sweep, name="changefeed-pool-check", daemon=True).start()

    def problem(self) -> str | None:
        """There is no file to lose: whether the database answers is ping()'s to say (contract.Store)."""
        return None

    def close(self) -> None:
        """Close this process's pool (tests; a server's process simply ends)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _fatal(self, conn: Any, exc: Exception) -> bool:
        """Whether an error lost the transaction (or the connection), not just one save's savepoint."""
        return (isinstance(exc, (psycopg.OperationalError, errors.LockNotAvailable))
                or conn.info.transaction_status not in _ALIVE)

    def _reason(self, exc: Exception) -> str:
        return f"the database refused it ({_one_line(exc)})"

    # -- saves ---------------------------------------------------------------------------------

    def _choose_writer(self) -> writers.Writer:

        # psycopg waits cooperatively: the commit runs in a greenlet, not a native thread.
        self._writer = (self._writer_class or writers.for_this_process(native_thread=False))(self.save_batch)
        return self._writer

    def presence_batch(self, items: Sequence[Item], deadline: float) -> list[Outcome]:
        """Apply heartbeats [presence.Beat, Sweep] in one transaction with one NOTIFY (presence channel)."""
        return self.save_batch(items, deadline, self._apply_beats)

    def _presence_changed(self, conn: Any, slugs: list[str]) -> None:
        if slugs:
            payload = json.dumps(slugs, separators=(",", ":"), allow_nan=False)
            conn.execute("SELECT pg_notify(%s, %s)",
                         (PRESENCE_CHANNEL, payload if len(payload) <= MAX_PAYLOAD else EVERYTHING))

    def save_batch(self, items: Sequence[Item], deadline: float, apply: Apply | None = None) -> list[Outcome]:
        """Apply saves [SaveRequest] in one transaction, then one NOTIFY, before `deadline`.

        Returns each item's outcome (a Saved, or the exception saying what
        became of it); never raises for a database error. `apply`: other
        items than saves (heartbeats), which take no storage shard and
        notify inside their transaction (presence changes are few).
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return [Busy("it waited its whole busy timeout") for _ in items]
        pool = self._connections()
        try:
            conn = pool.getconn(timeout=min(remaining, self._pool_timeout))
        except PoolTimeout as exc:  # the database is down, or every connection is busy: say so soon
            return [NotStored(f"no connection to {self.name} ({_one_line(exc)})") for _ in items]
        try:
            outcomes = self._transaction(conn, items, deadline, apply)
        finally:
            pool.putconn(conn)  # the pool closes a broken connection, and rolls back an open transaction
        for outcome in outcomes:  # committed: a poll here after the answer never gets an older version
            if isinstance(outcome, Saved):
                self.memory.heard(outcome.slug, outcome.version)
        return outcomes

    def _transaction(self, conn: psycopg.Connection[Any], items: Sequence[Item], deadline: float,
                     apply: Apply | None = None) -> list[Outcome]:
        remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            # Waiting for another host's row lock counts against the save's deadline, as SQLite's busy
            # timeout. Saves of different pages never wait for each other: each transaction counts what it
            # stores in a shard of its own, and waits only for the rows of the pages it writes. One round trip.
            begin = f"BEGIN; SET LOCAL lock_timeout = {remaining_ms}"
            conn.execute(begin if apply is not None else f"{begin}; {self.TAKE_SHARD}")
            outcomes = (apply or self._apply_all)(conn, items)
        except errors.LockNotAvailable as exc:
            _roll_back(conn)
            return [Busy(f"another save held the page past the busy timeout ({_one_line(exc)})") for _ in items]
        except psycopg.Error as exc:
            _roll_back(conn)
            if isinstance(exc, psycopg.OperationalError):
                self._lost()
            return [NotStored(f"{self.name} failed before the commit ({_one_line(exc)})") for _ in items]
        except BaseException:
            _roll_back(conn)
            raise
        try:
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError) or conn.closed:
                self._lost()  # the connection went while COMMIT was on its way: it may have landed
                failed: Exception = OutcomeUnknown(f"the connection to {self.name} was lost during the commit "
                                        f"({_one_line(exc)})")
            else:  # the server refused the commit: it rolled back
                failed = NotStored(f"{self.name} refused the commit ({_one_line(exc)})")
            return [unless_settled(outcome, failed) for outcome in outcomes]
        if apply is None:
            self._notify(conn, [outcome for outcome in outcomes if isinstance(outcome, Saved) and not outcome.replayed])
        return outcomes

    def _notify(self, conn: psycopg.Connection[Any], saved: list[Saved]) -> None:
        """Tell every host's listener what a committed transaction saved: one NOTIFY, after the commit.

        In a transaction of its own that does not wait for the WAL flush (a
        notification is not durable anyway), so the database-wide lock it
        takes is held for microseconds. Should it fail, the save stands: the
        listeners' catch-up read finds it within a second (postgres_notify.py).
        """
        if not saved:
            return
        try:
            conn.execute(sql.SQL("BEGIN; SET LOCAL synchronous_commit = off; SELECT pg_notify({}, {}); COMMIT").format(
                sql.Literal(CHANNEL), sql.Literal(notify_payload(saved))))
        except psycopg.Error as exc:
            _roll_back(conn)
            log.warning("saved, but the NOTIFY failed (%s); listeners find the save by their catch-up read",
                        _one_line(exc))

    # -- reads ---------------------------------------------------------------------------------

    def changes(self, slug: str, since: int, epoch: str | None = None) -> Change:
        """Return the page's state for a client at version `since` of database `epoch`: remembered, or one statement.

        The memory answers when it holds the newest version heard of the
        page (stores/memory.py). A pooled connection that turns out dead
        (the server restarted) is dropped and the read tried once more on
        another, so a restart of PostgreSQL costs its clients nothing once
        it is back.
        """
        memory = self.memory
        if memory.enabled:
            remembered = memory.answer(slug, since, epoch)
            if remembered is not None:
                metrics.PAGE_READS_MEMORY.inc()
                return remembered
            if self.listen is not None and not memory.trusted:
                try:
                    self.listen()  # a no-op once it runs
                except Unavailable:
                    pass  # the read below says what is wrong
        entry = memory.begin(slug)  # before the read: a save heard meanwhile is not lost
        row = self._read(self.CHANGES, {"since": since, "slug": slug, "epoch": epoch})[0]
        self.epoch = row[0]
        change = change_from_row(row)
        memory.store(slug, entry, change)
        metrics.PAGE_READS_DATABASE.inc()
        return change

    def saved_since(self, cursor: int) -> tuple[list[tuple[str, int, bool]], int]:
        """Return the pages saved since `cursor` [(slug, version, deleted)], oldest first, and the cursor to ask next.

        Cursors are transaction ids (0: from the start). Transactions commit
        out of the order of their ids, so a reader that took "everything above
        the newest id seen" would skip one committing late; this one stops
        below the oldest transaction still running and asks from there next
        time. A page saved again since is listed once, at its newest version.
        """
        rows = self._read(self.SAVED_SINCE, (cursor,))
        horizon = int(rows[0][0])
        return [(slug, version, deleted) for _h, slug, version, deleted in rows if slug is not None], horizon

    def _read(self, sql: str, params: Any) -> list[Any]:
        """Run one read; return its rows, or raise Unavailable. Tried twice: a pooled connection may be dead."""
        for attempt in (1, 2):
            try:
                with self._connections().connection() as conn:
                    return conn.execute(sql, params).fetchall()
            except PoolTimeout as exc:
                raise Unavailable(f"no connection to {self.name} ({_one_line(exc)})") from None
            except psycopg.Error as exc:
                self._lost()
                if attempt == 2 or not isinstance(exc, psycopg.OperationalError):
                    raise Unavailable(f"{self.name} failed: {_one_line(exc)}") from None
        raise AssertionError("unreachable: the second attempt returns or raises")

    def ping(self) -> None:
        """Read from the database once; raise Unavailable when it cannot be read."""
        try:
            with self._connections().connection() as conn:
                row = conn.execute(self.EPOCH).fetchone()
                assert row is not None, "the epoch table holds one row"
                self.epoch = row[0]
        except (psycopg.Error, PoolTimeout) as exc:
            self._lost()
            raise Unavailable(f"{self.name}: {_one_line(exc)}") from None


def _roll_back(conn: psycopg.Connection[Any]) -> None:
    if not conn.closed and conn.info.transaction_status in _ALIVE:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            pass  # the pool discards the connection when it comes back broken


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (libpq's span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__
