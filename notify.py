"""Wake-ups: tell the requests waiting on a page that a new version landed.

A notifier keeps, per process, the subscriptions of the long-polls and event
streams it serves, and delivers each new version of a page to the
subscriptions of that page only. How it learns of saves depends on the store:
`SQLiteNotifier` runs one watcher per process over the database file; a
PostgreSQL notifier would LISTEN instead. Either way a save costs one wake-up
per subscriber of that page, and nothing for the subscribers of other pages.
"""

import logging
import threading
import time
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Subscription:
    """One waiting request's view of one page: the newest version delivered to it."""

    def __init__(self):
        self.latest = None  # the newest Change delivered, or None
        self._woken = threading.Event()

    def deliver(self, change):
        if self.latest is None or change.version > self.latest.version:
            self.latest = change
            self._woken.set()

    def wait(self, timeout=None):
        """Wait until a delivery, a heartbeat tick or close; return False when `timeout` ran out first."""
        woken = self._woken.wait(timeout)
        self._woken.clear()
        return woken

    def wake(self):
        self._woken.set()


class Notifier:
    """The subscriptions of one process, by slug."""

    def __init__(self, heartbeat_s=15.0):
        self._subscriptions = {}  # slug -> set of Subscription
        self.heartbeat_s = heartbeat_s
        self.closed = False

    @contextmanager
    def subscribe(self, slug):
        """Hold a Subscription to `slug` for the duration of a `with` block.

        Subscribe first, then read the store: a save that lands in between is
        delivered, never lost.
        """
        self.start()
        subscription = Subscription()
        self._subscriptions.setdefault(slug, set()).add(subscription)
        try:
            yield subscription
        finally:
            subscribers = self._subscriptions.get(slug)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscriptions[slug]

    def watched(self, slug):
        """Whether anyone in this process waits on `slug`."""
        return slug in self._subscriptions

    def deliver(self, slug, change):
        for subscription in list(self._subscriptions.get(slug, ())):
            subscription.deliver(change)

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
    """

    def __init__(self, store, interval_s=0.01, heartbeat_s=15.0):
        super().__init__(heartbeat_s)
        self._store = store
        self._interval = interval_s
        self._lock = threading.Lock()
        self._watcher = None

    def start(self):
        with self._lock:
            if self._watcher is None and not self.closed:
                self._watcher = threading.Thread(target=self._watch, name="changefeed-watcher", daemon=True)
                self._watcher.start()

    def _watch(self):
        cursor = self._store.watch()
        next_beat = time.monotonic() + self.heartbeat_s
        try:
            while not self.closed:
                time.sleep(self._interval)
                if time.monotonic() >= next_beat:
                    next_beat += self.heartbeat_s
                    self.wake_all()
                try:
                    saved = cursor.saved()
                    for slug, _version in saved:
                        if self.watched(slug):
                            self.deliver(slug, self._store.changes(slug, 0))
                except Exception:
                    # A failed look is retried on the next tick; a dead watcher would silence every stream.
                    log.exception("watcher failed to read saves; retrying")
        finally:
            cursor.close()
