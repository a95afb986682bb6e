"""The push transports: long-poll and Server-Sent Events over one notifier.

Both follow the same rule as polling: a client says which version it has and
gets the whole newest state when there is a newer one. A slow client may skip
versions in between; it always ends at the newest, and it never holds up the
save path or other clients (a delivery only replaces what a subscription
holds and wakes it).
"""

import time

HEARTBEAT = b": heartbeat\n\n"


def long_poll(store, notifier, slug, since, wait_s):
    """Return the page's state for `since`, waiting up to `wait_s` for a newer version."""
    change = store.changes(slug, since)
    if change.version > since or wait_s <= 0:
        return change
    with notifier.subscribe(slug) as subscription:
        change = store.changes(slug, since)  # again: a save may have landed before we subscribed
        deadline = time.monotonic() + wait_s
        while change.version <= since and not notifier.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not subscription.wait(remaining):
                break
            if subscription.latest is not None and subscription.latest.version > since:
                change = subscription.latest
    return change


def event_stream(store, notifier, slug, since, retry_ms):
    """Yield the text/event-stream of `slug`: each newer version as one `change` event.

    The notifier wakes every subscription once per heartbeat interval; a wake
    with nothing new sends a heartbeat comment, so proxies keep the stream.
    """
    yield f"retry: {retry_ms}\n\n".encode()
    with notifier.subscribe(slug) as subscription:
        change = store.changes(slug, since)
        sent = since
        while not notifier.closed:
            if change is not None and change.version > sent:
                yield change.event
                sent = change.version
            subscription.wait()
            change = subscription.latest
            if (change is None or change.version <= sent) and not notifier.closed:
                yield HEARTBEAT
