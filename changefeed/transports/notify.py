"""Wake-ups: tell the requests waiting on a page that a new version landed.

A notifier keeps, per process, the subscriptions of the long-polls and event
streams it serves, and delivers each new version of a page to the
subscriptions of that page only. How it learns of saves depends on the store:
`SQLiteNotifier` runs one watcher per process over the database file;
`pglisten.PostgresNotifier` LISTENs instead. Either way a save costs one wake-up
per subscriber of that page, and nothing for the subscribers of other pages.
"""

import logging
import sqlite3
import threading
import time
from contextlib import contextmanager

from changefeed.core.outcomes import Unavailable
from changefeed.ops import metrics
from changefeed.stores.sqlite import after_fork_in_child

log = logging.getLogger(__name__)

SWEEP_S = 1.0  # how often each process looks for presence entries past their TTL


class Subscription:
    """One waiting request's view of one page: the newest version (and presence) delivered to it.

    `woken` may be an event shared by several subscriptions: a WebSocket
    waits on one event for all the pages it follows.
    """

    def __init__(self, woken=None):
        self.latest = None  # the newest Change delivered, or None
        self.presence = None  # the newest Presence delivered, or None
        self.gone = False  # the client closed its connection: stop waiting for it
        self._woken = woken if woken is not None else threading.Event()

    def deliver(self, change):
        latest = self.latest
        if latest is None or change.version > latest.version or change.epoch != latest.epoch:
            self.latest = change
            self._woken.set()

    def deliver_presence(self, presence):
        """Take a presence list; versions are compared for sameness only (each is used once)."""
        if self.presence is None or presence.version != self.presence.version:
            self.presence = presence
            self._woken.set()

    def wait(self, timeout=None):
        """Wait until a delivery, a heartbeat tick or close; return False when `timeout` ran out first."""
        woken = self._woken.wait(timeout)
        self._woken.clear()
        return woken

    def wake(self):
        self._woken.set()

    def leave(self):
        """The client went away: end the wait now (called from the server's disconnect watcher)."""
        self.gone = True
        self._woken.set()


class Notifier:
    """The subscriptions of one process, by slug."""

    def __init__(self, heartbeat_s=15.0):
        self._subscriptions = {}  # slug -> set of Subscription
        self.heartbeat_s = heartbeat_s
        self.closed = False

    @contextmanager
    def subscribe(self, slug, subscription=None):
        """Hold a Subscription to `slug` (a new one, or the one given) for the duration of a `with` block.

        Subscribe first, then read the store: a save that lands in between is
        delivered, never lost.
        """
        self.start()
        subscription = subscription if subscription is not None else Subscription()
        subscribers = self._subscriptions.setdefault(slug, set())
        if not subscribers:
            metrics.WATCHED_SLUGS.inc()
        subscribers.add(subscription)
        metrics.SUBSCRIBERS.inc()
        try:
            yield subscription
        finally:
            metrics.SUBSCRIBERS.dec()
            subscribers = self._subscriptions.get(slug)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscriptions[slug]
                    metrics.WATCHED_SLUGS.dec()

    def watched(self, slug):
        """Whether anyone in this process waits on `slug`."""
        return slug in self._subscriptions

    def deliver(self, slug, change):
        subscriptions = list(self._subscriptions.get(slug, ()))
        for subscription in subscriptions:
            subscription.deliver(change)
        metrics.DELIVERIES.inc(len(subscriptions))

    def deliver_presence(self, slug, presence):
        subscriptions = list(self._subscriptions.get(slug, ()))
        for subscription in subscriptions:
            subscription.deliver_presence(presence)
        metrics.DELIVERIES.inc(len(subscriptions))

    # Kept by a subclass's background look-out (the watcher, the listener), for health().
    _running, problem, last_look = False, None, None

    def _health(self, name, stale_after):
        """Say what is wrong with this process's look-out `name`, or None when it looked within `stale_after` s."""
        if self.problem:
            return self.problem
        if not self._running:
            return f"the {name} is not running"
        if self.last_look is not None and time.monotonic() - self.last_look > stale_after:
            return f"the {name} has not looked for saves for over {stale_after:g} s"
        return None

    def refresh(self, store, slug):
        """Read the page once and hand it to every subscription of `slug` in this process."""
        change = store.changes(slug, 0)
        self.deliver(slug, change)
        metrics.watcher_delivered(change.updated_at)

    def refresh_presence(self, store, slug):
        """Read who is on the page once and hand it to every subscription of `slug` in this process."""
        self.deliver_presence(slug, store.presence(slug))

    _next_sweep = 0.0

    def sweep_if_due(self, store):
        """About once a second: have the entries of tabs whose beats stopped deleted (one cheap read when none).

        Every process with a look-out does it, so expiry never waits for a
        beat on that page; only one of them finds rows to delete.
        """
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_S
        try:
            store.sweep_presence()
        except Exception as exc:  # noqa: BLE001 - a database that takes no writes must not stop the deliveries
            if not self._sweep_failing:
                log.warning("presence sweep failed (%s); retrying every %g s", exc, SWEEP_S)
            self._sweep_failing = True
        else:
            self._sweep_failing = False

    _sweep_failing = False

    def watched_slugs(self):
        return list(self._subscriptions)

    def start(self):
        """Begin learning of saves (a no-op here; subclasses start their watcher)."""

    def wake_all(self):
        """Wake every subscription: for a heartbeat tick, or to end them all."""
        for subscribers in list(self._subscriptions.values()):
            for subscription in list(subscribers):
                subscription.wake()

    def close(self):
        """End every wait at once, as on SIGTERM, so clients reconnect elsewhere."""
        self.closed = True
        self.wake_all()


class SQLiteNotifier(Notifier):
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

    def __init__(self, store, interval_s=0.01, heartbeat_s=15.0):
        super().__init__(heartbeat_s)
        self._store = store
        self._interval = interval_s
        self._lock = threading.Lock()
        self._running = False
        self._cursor = None  # handed from start() to the watcher
        self._seq = None  # the last save delivered (database-wide seq)
        self.last_look = None  # monotonic time of the watcher's last successful look
        self.problem = None  # what the watcher last failed on, while it fails
        after_fork_in_child(self)

    def _forget_parent(self):
        self._running, self._cursor, self._seq, self.last_look = False, None, None, None

    def start(self):
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

    def health(self):
        """Say what is wrong with this process's watcher, or None when it looked recently."""
        return self._health("watcher", max(2.0, 50 * self._interval))

    def _watch(self):
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
                        cursor = self._start_over(cursor)
                    if cursor is None:
                        cursor = self._store.watch(self._seq)  # where the last one stopped
                        self._seq = cursor.seq
                        for slug in self.watched_slugs():  # presence has no position to resume from
                            self.refresh_presence(self._store, slug)
                    if not self._deliver_saves(cursor):  # a new epoch: restored in place
                        cursor = self._start_over(cursor)
                    else:
                        self._deliver_presence(cursor)
                    self.sweep_if_due(self._store)
                except Exception as exc:
                    if not failures:
                        log.exception("watcher failed; retrying with backoff")
                    failures += 1
                    self.problem = f"the watcher failed {failures} time(s) in a row: {exc}"
                    cursor = _close(cursor)  # the next look starts from self._seq on a fresh cursor
                else:
                    if failures:
                        log.warning("watcher recovered after %d failure(s)", failures)
                    failures, self.problem, self.last_look = 0, None, time.monotonic()
        finally:
            _close(cursor)
            self._running = False

    def _deliver_presence(self, cursor):
        """Deliver the presence lists that changed, each page read once for all its subscribers here."""
        for slug in dict.fromkeys(cursor.presence_since()):
            if self.watched(slug):
                self.refresh_presence(self._store, slug)

    def _start_over(self, cursor):
        """The database is another one: watch it from now, and have every waiting request look again.

        Its save order is not the old one's, so no position in it carries
        over; each stream and long-poll reads the page itself and finds the
        new epoch.
        """
        self._seq = None
        self.wake_all()
        return _close(cursor)

    def _deliver_saves(self, cursor):
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


def _close(cursor):
    """Close a cursor, whatever state it is in; return None."""
    if cursor is not None:
        try:
            cursor.close()
        except Exception:
            pass
    return None
