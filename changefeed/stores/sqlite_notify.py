"""Wake-ups for SQLite: one watcher per process over the database file, beside the engine it watches.

It needs what only SQLiteStore has (a SaveCursor over the file, the file's
generation, check_file()), so it lives here in the stores, not in the
transports: they see only the contract.Notifier it satisfies. The fan-out
to subscriptions it inherits from stores/notify.py (Fanout).
"""

import logging
import sqlite3
import threading
import time

from changefeed.core.outcomes import Unavailable
from changefeed.stores.forking import after_fork_in_child
from changefeed.stores.notify import Fanout
from changefeed.stores.sqlite import SaveCursor, SQLiteStore

log = logging.getLogger(__name__)


class SQLiteNotifier(Fanout):
    """Learns of saves from any process by watching the SQLite file.

    One watcher per process (a thread, or a greenlet under gevent) asks the
    database every `interval` whether anything was committed; only when it was
    does it read which pages, and only for pages someone here waits on does it
    read the page itself, once, for all of their subscribers. It also wakes
    every subscription once per heartbeat interval: one timer for the
    process instead of one per open stream.

    Its starting point is taken in start(), by the first request that needs
    it, before that request reads the store: a save landing in between is
    after the starting point, so it is delivered. The watcher survives any
    error: it backs off, reopens its cursor where the last one stopped (so no
    save in between is skipped), and says what is wrong in `health()` until
    a look succeeds again.
    """

    def __init__(self, store: SQLiteStore, interval_s: float = 0.01, heartbeat_s: float = 15.0) -> None:
        super().__init__(heartbeat_s)
        self._store = store
        self._interval = interval_s
        self._lock = threading.Lock()
        self._running = False
        self._cursor: SaveCursor | None = None  # handed from start() to the watcher
        self._seq: int | None = None  # the last save delivered (database-wide seq)
        self.last_look = None  # monotonic time of the watcher's last successful look
        self.problem = None  # what the watcher last failed on, while it fails
        after_fork_in_child(self)

    def _forget_parent(self) -> None:
        self._running, self._cursor, self._seq, self.last_look = False, None, None, None

    def start(self) -> None:
        """Take the starting point now, in the caller, then watch in the background."""
        if self._running:
            return
        with self._lock:
            if self._running or self.closed:
                return
            try:
                self._cursor = self._store.watch(self._seq)
            except (RuntimeError, sqlite3.Error) as exc:
                self.problem = f"cannot open the database to watch it: {exc}"
                raise Unavailable(self.problem) from None
            self._seq = self._cursor.seq
            self._running = True
            threading.Thread(target=self._watch, name="changefeed-watcher", daemon=True).start()

    def health(self) -> str | None:
        """Say what is wrong with this process's watcher, or None when it looked recently."""
        return self._health("watcher", max(2.0, 50 * self._interval))

    def _watch(self) -> None:
        cursor, self._cursor = self._cursor, None
        generation = self._store.generation
        next_beat = time.monotonic() + self.heartbeat_s
        failures = 0
        try:
            while not self.closed:
                time.sleep(min(1.0, self._interval * 2 ** failures))
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_s
                    self.wake_all()
                try:
                    problem = self._store.check_file()
                    if problem:
                        raise Unavailable(problem)
                    if generation != self._store.generation:  # a new file at the path
                        generation = self._store.generation
                        self._start_over(cursor)
                        cursor = None
                    if cursor is None:
                        cursor = self._store.watch(self._seq)  # where the last one stopped
                        self._seq = cursor.seq
                        for slug in self.watched_slugs():  # presence has no position to resume from
                            self.refresh_presence(self._store, slug)
                    if not self._deliver_saves(cursor):  # a new epoch: restored in place
                        self._start_over(cursor)
                        cursor = None
                    else:
                        self._deliver_presence(cursor)
                    self.sweep_if_due(self._store)
                except Exception as exc:
                    if not failures:
                        log.exception("watcher failed; retrying with backoff")
                    failures += 1
                    self.problem = f"the watcher failed {failures} time(s) in a row: {exc}"
                    _close(cursor)  # the next look starts from self._seq on a fresh cursor
                    cursor = None
                else:
                    if failures:
                        log.warning("watcher recovered after %d failure(s)", failures)
                    failures, self.problem, self.last_look = 0, None, time.monotonic()
        finally:
            _close(cursor)
            self._running = False

    def _deliver_presence(self, cursor: SaveCursor) -> None:
        """Deliver the presence lists that changed, each page read once for all its subscribers here."""
        for slug in dict.fromkeys(cursor.presence_since()):
            if self.watched(slug):
                self.refresh_presence(self._store, slug)

    def _start_over(self, cursor: SaveCursor | None) -> None:
        """The database is another one: watch it from now, and have every waiting request look again.

        Its save order is not the old one's, so no position in it carries
        over; each stream and long-poll reads the page itself and finds the
        new epoch.
        """
        self._seq = None
        self.wake_all()
        _close(cursor)

    def _deliver_saves(self, cursor: SaveCursor) -> bool:
        """Deliver the pages saved since self._seq; move self._seq only past what was delivered.

        Return False when the database has a new epoch: the cursor must start over.
        """
        saves = cursor.saved_since(self._seq)
        if saves is None:
            return False
        for slug, _version, seq in saves:
            if self.watched(slug):
                self.refresh(self._store, slug)
            self._seq = seq
        return True


def _close(cursor: SaveCursor | None) -> None:
    """Close a cursor, whatever state it is in."""
    if cursor is not None:
        try:
            cursor.close()
        except Exception:  # noqa: BLE001 - a cursor of a failed file may fail to close too
            pass
