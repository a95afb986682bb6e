"""Wake-ups across hosts: each server process LISTENs to the saves of every host (PostgreSQL only).

It lives beside the PostgreSQL engine, not in the transports: it opens a
psycopg connection of its own to the store's URL, which nothing above the
stores may know. The transports see only the contract.Notifier it
satisfies; the fan-out it inherits from stores/notify.py (Fanout).

A save's transaction sends one NOTIFY with the slugs and versions it wrote
(stores/postgres.py); PostgreSQL delivers it, once committed, to every connection
listening on the channel, on every host. Each process holds one such
connection, outside the pool and used for nothing else, and wakes its own
long-polls and streams of those slugs, reading each changed page once for
all of them, as the SQLite watcher does.

Notifications are not durable: a dropped connection or a restarted server
loses those sent meanwhile. So the listener reconnects with backoff and,
once it listens again, re-reads every page it has subscribers on: a change
made while it was deaf is delivered then, never missed. And a save sends its
NOTIFY after its commit (stores/postgres.py), so a process that dies between
the two sends none: about once a second the listener also reads what was
saved since it last looked (PostgresStore.saved_since, which never skips a
transaction that commits late) and delivers what it did not hear of. Streams
and long-polls also re-read the page on each heartbeat tick
(transports/feeds.py), which bounds what any missed wake-up could cost.

The listener also keeps the store's poll memory (stores/memory.py) honest:
it tells it each version heard before anything else, and trusts it only
while listening: it clears it once LISTEN is on (what it held may have
missed saves), distrusts and clears it on any failure before anything
else, and trusts it for a short lease that a round trip every PROBE_S
renews, so a connection that died quietly stops it answering within
LEASE_S. Before each answer the memory looks, without blocking or
yielding, whether anything waits unread on the connection (a notification
not yet taken, or the end of a backend that was killed); then the
database answers.
"""

import json
import logging
import random
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from changefeed.core.outcomes import Unavailable
from changefeed.stores.forking import after_fork_in_child
from changefeed.stores.notify import Fanout
from changefeed.stores.postgres import CHANNEL, EVERYTHING, KEEPALIVES, PRESENCE_CHANNEL, PostgresStore, _one_line

log = logging.getLogger(__name__)

APPLICATION_NAME = "changefeed-listener"  # what operators see in pg_stat_activity
LOOK_S = 1.0  # the longest the listener waits for a notification before it looks around
CATCH_UP_S = 1.0  # how often the listener reads what was saved since, for a NOTIFY that never came
PROBE_S, LEASE_S = 1.0, 2.5  # a round trip this often; the poll memory answers this long after the last one began
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.1, 5.0


def _unpatched_poll() -> Callable[[], Any]:
    """select.poll as the kernel gives it: gevent's would yield to its hub, or not see the socket yet, at timeout 0."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return select.poll
    poll: Callable[[], Any] = monkey.get_original("select", "poll")
    return poll


POLL = _unpatched_poll()


def unread_on(conn: psycopg.Connection[Any]) -> Callable[[], bool]:
    """A check, about a microsecond and never blocking, of whether input waits unread on `conn`'s socket."""
    poller = POLL()
    poller.register(conn.fileno(), select.POLLIN)

    def unread() -> bool:
        try:
            return bool(poller.poll(0))  # POLLIN, or POLLHUP/POLLERR/POLLNVAL: the connection ended
        except RuntimeError:  # another thread polls it right now (no gevent): say yes, the database answers
            return True

    return unread


class PostgresNotifier(Fanout):
    """Learns of saves made on any host from PostgreSQL's NOTIFY."""

    def __init__(self, store: PostgresStore, heartbeat_s: float = 15.0) -> None:
        super().__init__(heartbeat_s)
        self._store = store
        self._lock = threading.Lock()
        self._running = False
        self._conn: psycopg.Connection[Any] | None = None  # handed from start() to the listener
        self.last_look = None  # monotonic time the listener last heard from its connection
        self.problem = None  # what the listener last failed on, while it fails
        self.reconnects = 0
        self._cursor = 0  # saved_since() cursor of the catch-up read, taken when the listener connects
        self._heard: dict[str, int] = {}  # slug -> newest version notified since the last catch-up
        self._next_catch_up = 0.0
        self._lease = 0.0  # the memory's lease: monotonic time the last round trip began, plus LEASE_S
        self._unread: Callable[[], bool] = lambda: True
        store.listen = self.start  # a poll starts the listener, which lets the memory answer
        store.memory.max_age_s = heartbeat_s  # what nothing announced still reaches streams (stores/memory.py)
        after_fork_in_child(self)

    def _forget_parent(self) -> None:
        self._running, self._conn, self.last_look, self._unread = False, None, None, lambda: True

    def _connect(self) -> psycopg.Connection[Any]:
        """Open the listening connection and LISTEN: from then on no notification is lost.

        Then the memory is cleared: what it held may have missed saves,
        and what is read from now on will not (reads begun before the
        clear are not kept). What the LISTENs read meanwhile (psycopg's
        backlog, taken by the next notifies()) was saved before the clear,
        so the listener may trust it at once (_hear).
        """
        began = time.monotonic()
        conn = psycopg.connect(self._store.url, autocommit=True, application_name=APPLICATION_NAME,
                               connect_timeout=5, **KEEPALIVES)
        try:
            conn.execute(f"LISTEN {CHANNEL}")
            conn.execute(f"LISTEN {PRESENCE_CHANNEL}")
            self._unread = unread_on(conn)
            # The catch-up starts here: what was saved before is read by whoever reads the store after
            # start(). On this connection, not the pool's: a pool still reconnecting must not hold it up.
            (horizon,) = conn.execute(PostgresStore.HORIZON).fetchone() or ("0",)
        except BaseException:
            conn.close()
            raise
        self._cursor = int(horizon)
        self._store.memory.clear()
        self._lease = began + LEASE_S
        return conn

    def start(self) -> None:
        """LISTEN now, in the caller, before it reads the store; then listen in the background.

        A save committed after the caller's read is then notified to us; one
        committed before it is in what the caller read.
        """
        if self._running:
            return
        with self._lock:
            if self._running or self.closed:
                return
            try:
                self._conn = self._connect()
            except psycopg.Error as exc:
                self.problem = f"cannot listen on {self._store.name}: {_one_line(exc)}"
                raise Unavailable(self.problem) from None
            self._running, self.problem, self.last_look = True, None, time.monotonic()
            threading.Thread(target=self._listen, name="changefeed-listener", daemon=True).start()

    def health(self) -> str | None:
        """Say what is wrong with this process's listener, or None when it heard from its connection lately."""
        return self._health("listener", 5 * LOOK_S)

    def _listen(self) -> None:
        conn, self._conn = self._conn, None
        memory = self._store.memory
        next_beat = time.monotonic() + self.heartbeat_s
        # Without a memory to vouch for, a round trip per heartbeat is enough.
        probe_s = PROBE_S if memory.enabled else self.heartbeat_s
        next_probe = time.monotonic() + probe_s
        failures = 0
        try:
            while not self.closed:
                try:
                    if conn is None:
                        conn = self._connect()
                        self.reconnects += 1
                        self.refresh_all()  # what was saved while we were not listening
                        log.warning("listener listening again on %s after %d failure(s)", self._store.name, failures)
                    self._hear(conn, min(LOOK_S, max(0.0, min(next_beat, next_probe) - time.monotonic())))
                    self.sweep_if_due(self._store)
                    self._catch_up_if_due()
                    now = time.monotonic()
                    if now >= next_probe:
                        self._probe(conn)  # a connection that died quietly fails here
                        self._lease, next_probe = now + LEASE_S, now + probe_s
                    if now >= next_beat:
                        next_beat = now + self.heartbeat_s
                        self.wake_all()
                except Exception as exc:  # noqa: BLE001 - the listener must outlive any failure
                    memory.distrust()  # first: notifications may be lost from now on
                    memory.clear()
                    if not failures:
                        log.warning("listener lost %s (%s); reconnecting with backoff",
                                    self._store.name, _one_line(exc))
                    failures += 1
                    self.problem = f"the listener failed {failures} time(s) in a row: {_one_line(exc)}"
                    _close(conn)
                    conn = None
                    # Full jitter: hosts that lost the server together do not return together.
                    time.sleep(random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** failures)))
                else:
                    failures, self.problem, self.last_look = 0, None, time.monotonic()
        finally:
            memory.distrust()
            _close(conn)
            self._running = False

    def _hear(self, conn: psycopg.Connection[Any], timeout: float) -> None:
        """Deliver what is notified within `timeout`: each watched page read once per notification.

        The memory is trusted while the listener waits, up to its lease.
        Each batch psycopg hands over (what one read of the socket brought)
        is told to the memory whole before any page is read, as a read
        lets other requests run.
        """
        self._store.memory.trust(self._lease, self._unread)
        notified = list(conn.notifies(timeout=timeout, stop_after=1))
        self._remember(notified)
        self._deliver(notified)

    def _probe(self, conn: psycopg.Connection[Any]) -> None:
        """One round trip on the listening connection, the notifications it reads told to the memory as they come.

        Read during a statement, they would wait in psycopg's backlog for
        the next notifies() while the memory answers; a handler takes them
        instead (only meanwhile: psycopg warns when notifies() runs with one).
        """
        caught: list[psycopg.Notify] = []

        def catch(notify: psycopg.Notify) -> None:
            self._remember((notify,))
            caught.append(notify)

        conn.add_notify_handler(catch)
        try:
            conn.execute("SELECT 1")
        finally:
            conn.remove_notify_handler(catch)
        self._deliver(caught)

    def _remember(self, notified: Sequence[psycopg.Notify]) -> None:
        """Tell the memory what was saved: each version, or (`*`) that it cannot know what it holds."""
        memory = self._store.memory
        for notify in notified:
            if notify.channel != CHANNEL:
                continue
            if notify.payload == EVERYTHING:
                memory.clear()
            else:
                for slug, version in json.loads(notify.payload):
                    memory.heard(slug, version)

    def _deliver(self, notified: Sequence[psycopg.Notify]) -> None:
        for notify in notified:
            if notify.payload == EVERYTHING:
                self.refresh_all()
            elif notify.channel == PRESENCE_CHANNEL:
                for slug in set(json.loads(notify.payload)):
                    if self.watched(slug):
                        self.refresh_presence(self._store, slug)
            else:
                versions: dict[str, int] = {}
                for slug, version in json.loads(notify.payload):
                    versions[slug] = max(version, versions.get(slug, 0))
                for slug, version in versions.items():
                    self._heard[slug] = max(version, self._heard.get(slug, 0))
                    if self.watched(slug):
                        self.refresh(self._store, slug)

    def _catch_up_if_due(self) -> None:
        """About once a second: deliver what was saved since the last look that no notification announced.

        A NOTIFY is sent after its save's commit, and lost if the saving
        process dies in between. One read per second per process (an index
        range); a page is read again only if it is watched here and its
        version is newer than every notification heard for it.
        """
        now = time.monotonic()
        if now < self._next_catch_up:
            return
        self._next_catch_up = now + CATCH_UP_S
        try:
            saved, cursor = self._store.saved_since(self._cursor)
        except Unavailable as exc:
            log.warning("catch-up read failed (%s); retrying in %g s", exc, CATCH_UP_S)
            return
        heard, self._heard = self._heard, {}
        self._cursor = cursor
        for slug, version, _deleted in saved:
            if version <= heard.get(slug, 0):
                continue
            self._store.memory.heard(slug, version)  # so a poll of it reads the database again
            if self.watched(slug):
                self.refresh(self._store, slug)

    def refresh_all(self) -> None:
        """Re-read every page (and who is on it) someone here waits on: after a gap in listening, or a new epoch."""
        for slug in self.watched_slugs():
            self.refresh(self._store, slug)
            self.refresh_presence(self._store, slug)
        self.feeds_look_again()


def _close(conn: psycopg.Connection[Any] | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass
