"""The feed of the whole database, read once, waited on, or streamed: GET /feed and the feed form of /events.

A read returns the pages saved after a position (stores: `Store.feed`).
To wait, a reader subscribes to its prefix (or to each page of its list),
reads again (a save may have landed before the subscription), and reads once
more at each save it is told of, until a read brings an entry it may see.
As for a page, the heartbeat tick also makes it read, so a wake-up missed
for any reason costs at most one heartbeat interval.

On PostgreSQL a save is announced once committed, but the feed lists it
only once every older transaction has ended (the horizon: stores/postgres.py),
so a wake-up may find nothing yet: the reader then looks again after 10 ms,
20 ms, ... up to a second, instead of waiting for the next save.
"""

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack, contextmanager

from changefeed.core import feed as cursors
from changefeed.core.feed import START, FeedEntry, FeedPage, Position
from changefeed.core.outcomes import Unavailable
from changefeed.ops import metrics
from changefeed.stores.contract import Notifier, Store
from changefeed.stores.notify import Subscription
from changefeed.transports.feeds import HEARTBEAT, OnDisconnect, ends_when_gone

log = logging.getLogger(__name__)

FIRST_RETRY_S, LAST_RETRY_S = 0.01, 1.0  # a save announced but not listed yet: look again this soon, doubling


def next_retry(retry: float | None) -> float | None:
    """The pause before looking again for a save announced and not listed yet: 10, 20, ... ms, 1 s, then none."""
    if retry is None:
        return FIRST_RETRY_S
    return None if retry >= LAST_RETRY_S else min(retry * 2, LAST_RETRY_S)
STREAM_LIMIT = 100  # entries per read of a stream (it reads on at once while reads come full)
SHARED_READ_S = 1.0  # how long one read serves the readers at the same place (a look for a save: never)
MAX_SHARED_READS = 1000  # places remembered at once, past which the stale ones are forgotten


@dataclasses.dataclass
class _Read:
    """One read of the feed at one place: under way (`done` unset), or its answer and when it came."""

    seen: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    page: FeedPage | None = None
    at: float = 0.0


class SharedReads:
    """One read of the feed for every waiting reader of this process at the same place.

    A save under a prefix wakes every reader that follows it, and each would
    read the feed from the same cursor: 1,000 streams, 1,000 identical
    queries. The first one reads; the others, arriving while it reads or
    just after, take its answer. An answer serves only while the notifier
    has woken no feed since it was asked for (`saves_seen`), so a reader
    woken by a later save reads again, and for at most SHARED_READ_S, so a
    heartbeat's read (the net under a wake-up missed) is at most that stale.
    A reader looking again for a save announced but not listed yet (on
    PostgreSQL) reads the database itself: the shared answer is the one that
    did not list it. Only readers that wait use it (streams, sockets,
    long-polls): a reader that took an answer from just before a save is
    woken by that save, where a plain poll would go away without it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reads: dict[tuple[object, ...], _Read] = {}

    def feed(self, reader: "FeedReader", position: Position) -> FeedPage:
        key = (id(reader.store), reader.prefix, None if reader.slugs is None else tuple(reader.slugs),
               reader.limit, reader.content, position)
        seen = reader.notifier.saves_seen
        with self._lock:
            read = self._reads.get(key)
            if read is not None and read.seen == seen and (
                    not read.done.is_set() or time.monotonic() - read.at < SHARED_READ_S):
                mine = False
            else:
                mine, read = True, _Read(seen)
                if len(self._reads) >= MAX_SHARED_READS:
                    self._forget_stale()
                self._reads[key] = read
        if not mine:
            read.done.wait()
            if read.page is not None:
                return read.page
        try:  # mine, or the one under way failed: read it here
            page = reader.store.feed(position, reader.prefix, reader.limit, reader.content, reader.slugs)
            if mine:
                read.page, read.at = page, time.monotonic()
        finally:
            if mine:
                read.done.set()  # with its answer, or without one when the read failed
        return page

    def _forget_stale(self) -> None:
        now = time.monotonic()
        for key in [key for key, read in self._reads.items() if read.done.is_set() and now - read.at >= SHARED_READ_S]:
            del self._reads[key]


SHARED_READS = SharedReads()


@dataclasses.dataclass
class FeedReader:
    """What one reader follows (a prefix, or a list of pages) and how it reads and waits.

    `readable` leaves out the pages its token may not read; `subscription`
    is set while it waits (`following()`).
    """

    store: Store
    notifier: Notifier
    prefix: str = ""
    slugs: Sequence[str] | None = None
    limit: int = 100
    content: bool = False
    readable: Callable[[str], bool] | None = None
    subscription: Subscription | None = None
    shared: bool = False  # reads at one place share one read with the process's other waiting readers (SharedReads)
    _retry: float | None = None  # while a save announced is not listed yet: when to look again

    def read(self, position: Position, fresh: bool = False, epoch: str | None = None) -> tuple[FeedPage, bool]:
        """One read after `position`, the entries the reader may not see left out; and whether it came full.

        `fresh`, or while it looks again for a save announced (`retrying`), it reads the database itself.
        So it does when a shared answer would start the reader over (another
        epoch than the reader's `epoch`, or a cursor past its end): a restore
        is no save, and an answer shared from just before it would otherwise
        send a reader back to the database it replaced.
        """
        if self.shared and not (fresh or self.retrying):
            page = SHARED_READS.feed(self, position)
            if page.ahead or (epoch is not None and page.epoch != epoch):
                page = self.store.feed(position, self.prefix, self.limit, self.content, self.slugs)
        else:
            page = self.store.feed(position, self.prefix, self.limit, self.content, self.slugs)
        full = len(page.entries) == self.limit
        if self.readable is not None:
            readable = self.readable
            page = dataclasses.replace(page, entries=[entry for entry in page.entries if readable(entry.slug)])
        return page, full

    @contextmanager
    def following(self, on_disconnect: OnDisconnect | None) -> Iterator[Subscription]:
        """Subscribe to what this reader follows (one subscription for a whole list) for a `with` block."""
        with ExitStack() as stack:
            subscription = Subscription()
            for prefix in self.slugs if self.slugs is not None else (self.prefix,):
                # A page's slug as a prefix also wakes for longer slugs: a read more, never a save missed.
                stack.enter_context(self.notifier.subscribe_prefix(prefix, subscription))
            stack.enter_context(ends_when_gone(subscription, on_disconnect))
            self.subscription = subscription
            try:
                yield subscription
            finally:
                self.subscription = None

    def wait(self, timeout: float | None) -> bool:
        """Wait for a save it follows, a heartbeat tick or the end; False when `timeout` ran out first.

        After a save it was told of, it returns again soon, however the read
        went (`retrying`): on PostgreSQL that save may not be listed yet.
        """
        subscription = self.subscription
        assert subscription is not None, "wait() inside following()"
        if subscription.saved:  # on PostgreSQL that save may not be listed yet: look again soon (SQLite: listed)
            subscription.saved = False
            self._retry = FIRST_RETRY_S if self.store.feed_lags_commits else self._retry
        if self._retry is None:
            return subscription.wait(timeout)
        pause = self._retry if timeout is None else min(self._retry, timeout)
        self._retry = next_retry(self._retry)
        return subscription.wait(pause) or timeout is None or pause < timeout

    @property
    def retrying(self) -> bool:
        """Whether it is looking again for a save it was told of (not waiting for the next)."""
        return self._retry is not None


def read_feed(reader: FeedReader, after: Position, epoch: str | None, wait_s: float = 0,
              on_disconnect: OnDisconnect | None = None) -> FeedPage:
    """The pages saved after `after` that the reader may see, waiting up to `wait_s` for one.

    Returns at once for a cursor of another epoch than `epoch`, or one past
    everything the database saved (`ahead`): the caller says to start over.
    Ends early, empty, when the worker shuts down or the client went away.
    The page's `next` is where to read on, even when every entry was one the
    reader may not see.
    """
    page, full = reader.read(after, epoch=epoch)
    if page.entries or (epoch is not None and page.epoch != epoch) or page.ahead:
        return page
    deadline = time.monotonic() + wait_s
    while full and not page.entries and (wait_s <= 0 or time.monotonic() < deadline):
        page, full = reader.read(page.next, epoch=page.epoch)  # a whole read the reader may not see: read on
        if wait_s <= 0:
            return page
    if page.entries or wait_s <= 0:
        return page
    epoch = page.epoch
    with reader.following(on_disconnect) as subscription:
        page, full = reader.read(page.next, epoch=epoch)  # again: a save may have landed before we subscribed
        while not page.entries and page.epoch == epoch and not reader.notifier.closed and not subscription.gone:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (not full and not reader.wait(remaining)):
                break
            page, full = reader.read(page.next, epoch=epoch)
    return page


def entry_event(entry: FeedEntry, epoch: str, content: bool) -> bytes:
    """One page of the feed as a Server-Sent Event: its id is the cursor that resumes right after it."""
    fields = entry.fields(content)
    cursor = cursors.encode(epoch, entry.position)
    return f'id: {cursor}\nevent: change\ndata: {fields[:-1]},"epoch":"{epoch}"}}\n\n'.encode()


def entry_frame(entry: FeedEntry, epoch: str, prefix: str, content: bool) -> str:
    """One page of a socket's feed as a `change` frame, with the `cursor` that resumes right after it."""
    fields = entry.fields(content)
    return (f'{{"type":"change","prefix":"{prefix}",' + fields[1:-1]
            + f',"epoch":"{epoch}","cursor":"{cursors.encode(epoch, entry.position)}"}}')


def reset_event(epoch: str) -> bytes:
    """The database is another one (a restore, a new epoch): forget every page; what follows is its whole state."""
    return f"event: reset\ndata: {json.dumps({'epoch': epoch})}\n\n".encode()


def feed_stream(reader: FeedReader, after: Position, epoch: str | None, retry_ms: int, lasts_s: float | None = None,
                on_disconnect: OnDisconnect | None = None) -> Generator[bytes, None, None]:
    """Yield the text/event-stream of a feed: a `change` event for each page saved after `after`, as saves land.

    Each event's id is a cursor, so a reconnecting EventSource (Last-Event-ID)
    resumes right after the last page it got: nothing older, nothing missed.
    A cursor of another database, or past everything this one saved, starts
    over: a `reset` event, then every page the reader follows as this
    database holds it. A heartbeat comment goes out when a heartbeat tick
    finds nothing new. Ends at the token's expiry (`lasts_s`), at shutdown,
    and as soon as the client goes.
    """
    ends_at = None if lasts_s is None else time.monotonic() + lasts_s
    yield f"retry: {retry_ms}\n\n".encode()
    position, waited = after, False
    try:
        with reader.following(on_disconnect) as subscription, metrics.OPEN_STREAMS.track_inprogress():
            while not reader.notifier.closed and (ends_at is None or time.monotonic() < ends_at):
                page, full = reader.read(position, epoch=epoch)
                if (epoch is not None and page.epoch != epoch) or page.ahead:
                    yield reset_event(page.epoch)
                    epoch, position = page.epoch, START
                    continue
                epoch = page.epoch
                for entry in page.entries:
                    yield entry_event(entry, epoch, reader.content)
                position = page.next
                if full:
                    continue  # more after this read: read on before waiting
                if not page.entries and not reader.retrying and waited:
                    yield HEARTBEAT  # a heartbeat tick found nothing new: keep proxies from closing the stream
                waited = reader.wait(None if ends_at is None else max(0.0, ends_at - time.monotonic()))
                waited = waited and not subscription.saved  # a tick, not a save (whose read comes next)
                if subscription.gone:
                    return
    except Unavailable as exc:
        # The client reconnects after `retry` from its Last-Event-ID, and is told 503 (or served) then.
        log.warning("feed stream ended: the database cannot be read (%s)", exc)
