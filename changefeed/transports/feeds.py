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
from contextlib import contextmanager

from changefeed.core.outcomes import Change, Unavailable
from changefeed.core.presence import now_for as presence_now
from changefeed.ops import metrics

log = logging.getLogger(__name__)

HEARTBEAT = b": heartbeat\n\n"


@contextmanager
def _ends_when_gone(subscription, on_disconnect):
    """Have the server end `subscription`'s wait when its client disconnects (gunicorn: ops/worker.py)."""
    cancel = on_disconnect(subscription.leave) if on_disconnect is not None else None
    try:
        yield
    finally:
        if cancel is not None:
            cancel()


def long_poll(store, notifier, slug, since, epoch, wait_s, on_disconnect=None, presence=None):
    """Return (the page's state for a client at `since` of `epoch`, its presence), waiting up to `wait_s` for news.

    With `presence` (the presence version the client holds) a change of who
    is on the page is news too, and the second item is the page's Presence
    (only its version is filled when that is the one held); without, None.
    Ends early, unchanged, when the worker shuts down, the database is
    replaced (a new epoch: the client starts over) or the client went away.
    """
    change = store.changes(slug, since, epoch)
    present = None if presence is None else presence_now(store, slug, presence)
    if (change.changed or wait_s <= 0 or (epoch is not None and change.epoch != epoch)
            or _news(present, presence)):
        return change, present
    epoch = change.epoch
    # An open wait from here on (metrics): a poll answered above held nothing.
    with (notifier.subscribe(slug) as subscription, _ends_when_gone(subscription, on_disconnect),
          metrics.OPEN_LONG_POLLS.track_inprogress()):
        change = store.changes(slug, since, epoch)  # again: a save may have landed before we subscribed
        if presence is not None:
            present = presence_now(store, slug, presence)
        deadline = time.monotonic() + wait_s
        while (not change.changed and change.epoch == epoch and not _news(present, presence)
               and not notifier.closed and not subscription.gone):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not subscription.wait(remaining):
                break
            latest, delivered = subscription.latest, subscription.presence
            if presence is not None and _news(delivered, presence):
                present = delivered
            elif latest is not None and latest.version > since and latest.epoch == epoch:
                change = latest
            else:  # a heartbeat tick, or another database: look for ourselves
                change = store.changes(slug, since, epoch)
                if presence is not None:
                    present = presence_now(store, slug, presence)
    return change, present


def _news(present, held):
    """Whether `present` is presence news to a client holding version `held` (None: it did not ask)."""
    return present is not None and held is not None and present.version != held


def event_stream(store, notifier, slug, since, epoch, retry_ms, lasts_s=None, on_disconnect=None,
                 presence=None, count_only=False):
    """Yield the text/event-stream of `slug`: each newer version as one `change` event.

    With `presence` (the presence version the client holds), each other
    presence list as a `presence` event too (`count_only`: without names).

    The notifier wakes every subscription once per heartbeat interval; a wake
    with nothing new re-reads the store, and sends a heartbeat comment when
    that has nothing new either, so proxies keep the stream. When the
    database is replaced (a new epoch) the stream starts over from version 0,
    as it does for a client resuming from a version of another epoch. With
    `lasts_s` (the seconds its token has left) it ends then, and the client
    reconnects with a fresh token. It ends, too, as soon as the client goes.
    """
    ends_at = None if lasts_s is None else time.monotonic() + lasts_s
    yield f"retry: {retry_ms}\n\n".encode()
    try:
        with (notifier.subscribe(slug) as subscription, _ends_when_gone(subscription, on_disconnect),
              metrics.OPEN_STREAMS.track_inprogress()):
            change = store.changes(slug, since, epoch)
            if presence is not None:
                subscription.deliver_presence(store.presence(slug))
            if epoch is not None and change.epoch != epoch:
                since = -1  # whatever this database holds is news, even version 0
            epoch, sent, presence_sent = change.epoch, since, presence
            while not notifier.closed and (ends_at is None or time.monotonic() < ends_at):
                if change.epoch != epoch:
                    epoch, sent = change.epoch, -1  # a new database: whatever it holds is news
                    change = store.changes(slug, 0)
                if change.version > sent:
                    yield change.event
                    sent = change.version
                if _news(subscription.presence, presence_sent):
                    yield subscription.presence.count_event if count_only else subscription.presence.event
                    presence_sent = subscription.presence.version
                subscription.wait(None if ends_at is None else max(0.0, ends_at - time.monotonic()))
                if subscription.gone:
                    return
                change = subscription.latest
                if change is None or (change.version <= sent and change.epoch == epoch):
                    if _news(subscription.presence, presence_sent):
                        change = change or Change(epoch, sent)  # only presence is news: sent at the loop's top
                        continue
                    change = store.changes(slug, max(sent, 0))
                    if presence is not None:  # a tick: look at presence too
                        subscription.deliver_presence(store.presence(slug))
                    if (change.version <= sent and change.epoch == epoch and not notifier.closed
                            and not _news(subscription.presence, presence_sent)):
                        yield HEARTBEAT
    except Unavailable as exc:
        # The database cannot be read: end the stream cleanly. The client
        # reconnects after `retry` from its Last-Event-ID, and is told 503
        # (or served) then; nothing it had is lost.
        log.warning("event stream of %s ended: the database cannot be read (%s)", slug, exc)
