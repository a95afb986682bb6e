"""Wake-ups: tell the requests waiting on a page that a new version landed, whatever the engine.

A notifier keeps, per process, the subscriptions of the long-polls, event
streams and sockets it serves, and delivers each new version of a page to the
subscriptions of that page only. That fan-out (`Subscription`, `Fanout`) is
the same for every engine and lives here; how a process learns of saves is
the engine's own and lives beside it: `sqlite_notify.SQLiteNotifier` runs one
watcher per process over the database file, `postgres_notify.PostgresNotifier`
LISTENs. Either way a save costs one wake-up per subscriber of that page, and
nothing for the subscribers of other pages; a reader of the database feed
subscribes to a prefix instead, and each save looks through the prefixes
followed in the process (a few, for a few dashboards) to wake those it falls under. The transports see only the
`contract.Notifier` protocol and this module's `Subscription`.
"""

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from prometheus_client import Gauge

from changefeed.core.outcomes import Change
from changefeed.core.parked import Parked
from changefeed.core.presence import Presence
from changefeed.ops import metrics
from changefeed.stores.base import PageStore

log = logging.getLogger(__name__)

SWEEP_S = 1.0  # how often each process looks for presence entries past their TTL


class Subscription:
    """One waiting request's view of one page: the newest version (and presence) delivered to it.

    `woken` may be an event shared by several subscriptions: a WebSocket
    waits on one event for all the pages it follows.
    """

    def __init__(self, woken: threading.Event | None = None) -> None:
        self.latest: Change | None = None  # the newest Change delivered, or None
        self.presence: Presence | None = None  # the newest Presence delivered, or None
        self.gone = False  # the client closed its connection: stop waiting for it
        self.saved = False  # (a feed's) a page it follows was saved since the waiter last looked
        self._woken = woken if woken is not None else threading.Event()

    def deliver(self, change: Change) -> None:
        """Take a new version (or a new epoch's) and wake the waiter; an older one is dropped."""
        latest = self.latest
        if latest is None or change.version > latest.version or change.epoch != latest.epoch:
            self.latest = change
            self._woken.set()

    def saw_save(self) -> None:
        """(A feed's subscription) a page under its prefix was saved: the waiter reads the feed again."""
        self.saved = True
        self._woken.set()

    def deliver_presence(self, presence: Presence) -> None:
        """Take a presence list; versions are compared for sameness only (each is used once)."""
        if self.presence is None or presence.version != self.presence.version:
            self.presence = presence
            self._woken.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until a delivery, a heartbeat tick or close; return False when `timeout` ran out first."""
        woken = self._woken.wait(timeout)
        self._woken.clear()
        return woken

    def park(self, timeout: float | None = None) -> Parked:
        """What a stream yields for wait(timeout) to a server that holds it meanwhile (see Parked)."""
        return Parked(self._woken, timeout)

    def resumed(self) -> None:
        """The server went on with the stream after a Parked: as wait() does when it returns."""
        self._woken.clear()

    def wake(self) -> None:
        """End the current wait without a delivery (a heartbeat tick, or close)."""
        self._woken.set()

    def leave(self) -> None:
        """The client went away: end the wait now (called from the server's disconnect watcher)."""
        self.gone = True
        self._woken.set()


class Fanout:
    """The subscriptions of one process, by slug: the engine-independent half of every notifier.

    An engine's notifier subclasses it and adds its look-out (start(),
    health()); the result is what contract.Notifier describes.
    """

    def __init__(self, heartbeat_s: float = 15.0) -> None:
        self._subscriptions: dict[str, set[Subscription]] = {}  # slug -> set of Subscription
        self._prefixes: dict[str, set[Subscription]] = {}  # the feeds': prefix ("" all) -> set of Subscription
        self.heartbeat_s = heartbeat_s
        self.closed = False
        self.saves_seen = 0  # wake-ups of the feeds' subscriptions so far: a feed read is current while it holds

    def subscribe(self, slug: str, subscription: Subscription | None = None) -> AbstractContextManager[Subscription]:
        """Hold a Subscription to `slug` (a new one, or the one given) for the duration of a `with` block.

        Subscribe first, then read the store: a save that lands in between is
        delivered, never lost.
        """
        return self._hold(self._subscriptions, slug, subscription, metrics.WATCHED_SLUGS)

    def subscribe_prefix(self, prefix: str,
                         subscription: Subscription | None = None) -> AbstractContextManager[Subscription]:
        """Hold a Subscription to every page whose slug starts with `prefix` ("": every page) for a `with` block.

        For a reader of the database feed: each save of such a page marks it
        `saved` and wakes it, and the reader reads the feed itself (which
        pages, which versions), so no page is read here for it. Subscribe
        first, then read, as for a page.
        """
        return self._hold(self._prefixes, prefix, subscription)

    @contextmanager
    def _hold(self, table: dict[str, set[Subscription]], key: str, subscription: Subscription | None,
              keys: Gauge | None = None) -> Iterator[Subscription]:
        """Hold `subscription` (or a new one) under `key` of `table` for a `with` block; `keys` counts the keys."""
        self.start()
        subscription = subscription if subscription is not None else Subscription()
        subscribers = table.setdefault(key, set())
        if not subscribers and keys is not None:
            keys.inc()
        subscribers.add(subscription)
        metrics.SUBSCRIBERS.inc()
        try:
            yield subscription
        finally:
            metrics.SUBSCRIBERS.dec()
            still = table.get(key)
            if still is not None:
                still.discard(subscription)
                if not still:
                    del table[key]
                    if keys is not None:
                        keys.dec()

    def watched(self, slug: str) -> bool:
        """Whether anyone in this process waits on `slug`, or on a prefix of it."""
        return slug in self._subscriptions or (bool(self._prefixes) and any(map(slug.startswith, self._prefixes)))

    def _saw_save(self, slug: str) -> None:
        """Wake the feeds' subscriptions whose prefix `slug` starts with."""
        self.saves_seen += 1  # before any wakes: its read must not take an answer read before this save
        for prefix, subscriptions in list(self._prefixes.items()):
            if slug.startswith(prefix):
                for subscription in list(subscriptions):
                    subscription.saw_save()

    def deliver(self, slug: str, change: Change) -> None:
        """Hand a page's new state to every subscription of `slug` in this process."""
        subscriptions = list(self._subscriptions.get(slug, ()))
        for subscription in subscriptions:
            subscription.deliver(change)
        metrics.DELIVERIES.inc(len(subscriptions))

    def deliver_presence(self, slug: str, presence: Presence) -> None:
        """Hand a page's new presence list to every subscription of `slug` in this process."""
        subscriptions = list(self._subscriptions.get(slug, ()))
        for subscription in subscriptions:
            subscription.deliver_presence(presence)
        metrics.DELIVERIES.inc(len(subscriptions))

    # Kept by a subclass's background look-out (the watcher, the listener), for health().
    _running = False
    problem: str | None = None
    last_look: float | None = None

    def _health(self, name: str, stale_after: float) -> str | None:
        """Say what is wrong with this process's look-out `name`, or None when it looked within `stale_after` s."""
        if self.problem:
            return self.problem
        if not self._running:
            return f"the {name} is not running"
        if self.last_look is not None and time.monotonic() - self.last_look > stale_after:
            return f"the {name} has not looked for saves for over {stale_after:g} s"
        return None

    def refresh(self, store: PageStore, slug: str) -> None:
        """Read the page once and hand it to every subscription of `slug` in this process; wake the feeds'."""
        if slug in self._subscriptions:
            change = store.changes(slug, 0)
            self.deliver(slug, change)
            metrics.watcher_delivered(change.updated_at)
        self._saw_save(slug)

    def refresh_presence(self, store: PageStore, slug: str) -> None:
        """Read who is on the page once and hand it to every subscription of `slug` in this process."""
        if slug in self._subscriptions:  # a feed's subscription follows no one's presence
            self.deliver_presence(slug, store.presence(slug))

    _next_sweep = 0.0

    def sweep_if_due(self, store: PageStore) -> None:
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

    def watched_slugs(self) -> list[str]:
        """The slugs someone in this process waits on."""
        return list(self._subscriptions)

    def start(self) -> None:
        """Begin learning of saves (a no-op here; subclasses start their watcher)."""

    def health(self) -> str | None:
        """Say what is wrong with this process's look-out, or None (here: none to fail)."""
        return None

    def wake_all(self) -> None:
        """Wake every subscription: for a heartbeat tick, or to end them all."""
        for subscribers in [*self._subscriptions.values(), *self._prefixes.values()]:
            for subscription in list(subscribers):
                subscription.wake()

    def feeds_look_again(self) -> None:
        """Have every feed reader read again: after a gap in listening, saves may have gone unannounced."""
        self.saves_seen += 1
        for subscribers in list(self._prefixes.values()):
            for subscription in list(subscribers):
                subscription.saw_save()

    def close(self) -> None:
        """End every wait at once, as on SIGTERM, so clients reconnect elsewhere."""
        self.closed = True
        self.wake_all()
