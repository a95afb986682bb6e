"""The push transports: long-poll and Server-Sent Events over one notifier.

Both follow the same rule as polling: a client says which version it has and
gets the whole newest state when there is a newer one. A slow client may skip
versions in between; it always ends at the newest, and it never holds up the
save path or other clients (a delivery only replaces what a subscription
holds and wakes it).

Neither relies on the notifier alone: each wake-up without news (the
process's heartbeat tick) makes the request look at the store itself, so a
wake-up that was missed for any reason costs at most one heartbeat interval,
never a stream that hears nothing forever.
"""

import logging
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager

from changefeed.core.outcomes import Change, Unavailable
from changefeed.core.parked import Parked
from changefeed.core.presence import Presence
from changefeed.ops import metrics
from changefeed.stores.contract import Notifier, Store
from changefeed.stores.notify import Subscription
from changefeed.transports.follow import Follow

log = logging.getLogger(__name__)

HEARTBEAT = b": heartbeat\n\n"

# The server's disconnect watch (ops/worker.py): on_disconnect(callback) returns a cancel(), or None.
OnDisconnect = Callable[[Callable[[], None]], Callable[[], None] | None]


@contextmanager
def ends_when_gone(subscription: Subscription, on_disconnect: OnDisconnect | None) -> Iterator[None]:
    """Have the server end `subscription`'s wait when its client disconnects (gunicorn: ops/worker.py)."""
    cancel = on_disconnect(subscription.leave) if on_disconnect is not None else None
    try:
        yield
    finally:
        if cancel is not None:
            cancel()


def long_poll(store: Store, notifier: Notifier, slug: str, since: int, epoch: str | None, wait_s: float,
              on_disconnect: OnDisconnect | None = None,
              presence: int | None = None) -> tuple[Change, Presence | None]:
    """Return (the page's state for a client at `since` of `epoch`, its presence), waiting up to `wait_s` for news.

    With `presence` (the presence version the client holds) a change of who
    is on the page is news too, and the second item is the page's Presence
    (only its version is filled when that is the one held); without, None.
    Ends early, unchanged, when the worker shuts down, the database is
    replaced (a new epoch: the client starts over) or the client went away.
    """
    follow = Follow(store, slug, since, epoch, presence)
    change, present = follow.read(), follow.read_presence()
    if (change.changed or wait_s <= 0 or (epoch is not None and change.epoch != epoch)
            or _news(present, presence)):
        return change, present
    epoch = change.epoch
    # An open wait from here on (metrics): a poll answered above held nothing.
    with (notifier.subscribe(slug) as subscription, ends_when_gone(subscription, on_disconnect),
          metrics.OPEN_LONG_POLLS.track_inprogress()):
        follow.subscription = subscription
        change, present = follow.read(), follow.read_presence()  # again: a save may have landed before we subscribed
        deadline = time.monotonic() + wait_s
        while (not change.changed and change.epoch == epoch and not _news(present, presence)
               and not notifier.closed and not subscription.gone):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not subscription.wait(remaining):
                break
            if (delivered_presence := follow.new_presence(full=False)) is not None:
                present = delivered_presence  # answered alone: the client asks again at once
            elif (delivered := follow.new_change(full=False)) is not None:
                change = delivered
            else:  # a heartbeat tick: look for ourselves
                change, present = follow.read(), follow.read_presence()
    return change, present


def _news(present: Presence | None, held: int | None) -> bool:
    """Whether `present` is presence news to a client holding version `held` (None: it did not ask)."""
    return present is not None and held is not None and present.version != held


def event_stream(store: Store, notifier: Notifier, slug: str, since: int, epoch: str | None, retry_ms: int,
                 lasts_s: float | None = None, on_disconnect: OnDisconnect | None = None,
                 presence: int | None = None, count_only: bool = False,
                 content: bool = True, park: bool = False) -> Generator[bytes | Parked, None, None]:
    """Yield the text/event-stream of `slug`: each newer version as one `change` event.

    Without `content` (payload=version) each event says which version
    exists, without html and data: the client fetches the page from
    /changes, through the cache (schemas.Payload). With `presence` (the
    presence version the client holds), each other presence list as a
    `presence` event too (`count_only`: without names).

    The notifier wakes every subscription once per heartbeat interval; a wake
    with nothing new re-reads the store, and sends a heartbeat comment when
    that has nothing new either, so proxies keep the stream. When the
    database is replaced (a new epoch) the stream starts over from version 0,
    as it does for a client resuming from a version of another epoch. With
    `lasts_s` (the seconds its token has left) it ends then, and the client
    reconnects with a fresh token. It ends, too, as soon as the client goes.

    With `park` (a server that offers it) each wait is yielded as a Parked,
    and the server holds the stream without a greenlet until the wake-up.
    """
    ends_at = None if lasts_s is None else time.monotonic() + lasts_s
    yield f"retry: {retry_ms}\n\n".encode()
    try:
        with (notifier.subscribe(slug) as subscription, ends_when_gone(subscription, on_disconnect),
              metrics.OPEN_STREAMS.track_inprogress()):
            follow = Follow(store, slug, since, epoch, presence, subscription)
            change, present = follow.take(follow.read()), follow.take_presence(follow.read_presence())
            while not notifier.closed and (ends_at is None or time.monotonic() < ends_at):
                if change is not None:
                    yield change.event if content else change.notice_event
                if present is not None:
                    yield present.count_event if count_only else present.event
                timeout = None if ends_at is None else max(0.0, ends_at - time.monotonic())
                if park:
                    yield subscription.park(timeout)
                    subscription.resumed()
                else:
                    subscription.wait(timeout)
                if subscription.gone:
                    return
                change, present = follow.new_change(full=False), follow.new_presence(full=False)
                if change is None and present is None:  # a heartbeat tick, or a missed wake-up: look ourselves
                    change, present = follow.new_change(full=True), follow.new_presence(full=True)
                    if change is None and present is None and not notifier.closed:
                        yield HEARTBEAT
    except Unavailable as exc:
        # The database cannot be read: end the stream cleanly. The client
        # reconnects after `retry` from its Last-Event-ID, and is told 503
        # (or served) then; nothing it had is lost.
        log.warning("event stream of %s ended: the database cannot be read (%s)", slug, exc)
