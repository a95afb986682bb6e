"""Follow a page: what is new to one subscriber, said once for long-poll, SSE and the WebSocket.

A subscriber holds a position: the database's `epoch`, the version it was
sent (`sent`) and the presence version it holds (`presence_sent`, None when
it did not ask for presence). Something is new to it when it is a newer
version of the same database, any state of another database (a replaced
file, a restore: then it starts over, and even version 0 is news), or
another presence list (presence versions are compared for sameness only).

News comes two ways: the notifier delivers it to the subscription (the hot
path: no store read, and nothing allocated here), or, when a wake-up brought
nothing (the heartbeat tick, a missed wake-up), the follower reads the store
itself. Either way taking news moves the position past it, so each state is
sent once, and a subscriber slower than the saves skips to the newest.
"""


from changefeed.core.outcomes import Change
from changefeed.core.presence import Presence, now_for
from changefeed.stores.contract import Store
from changefeed.stores.notify import Subscription


class Follow:
    """One subscriber's position on one page, and the subscription the notifier delivers to.

    `subscription` may come later (a long-poll subscribes only once its first
    read found nothing new); the `new_*` methods need it. Store reads raise
    Unavailable when the database cannot be read; each transport says what
    that means to its client.
    """

    __slots__ = ("store", "slug", "subscription", "epoch", "sent", "presence_sent", "_seen", "_presence_seen")

    def __init__(self, store: Store, slug: str, since: int, epoch: str | None, presence_since: int | None,
                 subscription: Subscription | None = None) -> None:
        self.store, self.slug, self.subscription = store, slug, subscription
        self.epoch, self.sent = epoch, since  # epoch None: whichever the store has (adopted on the first read)
        self.presence_sent = presence_since
        # The deliveries already looked at. A delivery stays in the subscription after the position moved
        # on by a read of the store (a new epoch, another presence list): looked at again, it would be
        # taken for news, and an old state sent again.
        self._seen: Change | None = None
        self._presence_seen: Presence | None = None

    def read(self) -> Change:
        """Read the page as the subscriber at its position gets it: the whole state when newer or of another database.

        The epoch goes with the read, so another database's state comes whole
        in the same statement. The position adopts the store's epoch; of
        another database than the one it held, whatever this one holds is news.
        """
        change = self.store.changes(self.slug, max(self.sent, 0), self.epoch)
        if change.epoch != self.epoch:
            if self.epoch is not None:
                self.sent = -1  # another database: whatever it holds is news, even version 0
            self.epoch = change.epoch
        return change

    def read_presence(self) -> Presence | None:
        """Who is on the page, for the presence version held (None: presence was not asked for).

        One indexed read when the version held is the page's: then only the
        version is filled. The whole list only when it is another one.
        """
        if self.presence_sent is None:
            return None
        return now_for(self.store, self.slug, self.presence_sent)

    def take(self, change: Change) -> Change | None:
        """Return `change` when it is news to the subscriber, moving the position past it; else None."""
        if change.epoch != self.epoch:
            # A delivery from another database: news, whatever its version. It is whole (the notifier
            # reads the page from version 0), or version 0 of a page that database does not hold.
            self.epoch, self.sent = change.epoch, -1
        if change.version <= self.sent:
            return None
        self.sent = change.version
        return change

    def take_presence(self, present: Presence | None) -> Presence | None:
        """Return `present` when it is another presence list than the one held, now held; else None."""
        if present is None or self.presence_sent is None or present.version == self.presence_sent:
            return None
        self.presence_sent = present.version
        return present

    def new_change(self, full: bool) -> Change | None:
        """What is new of the page: the subscription's delivery, else (`full`) a read of the store; taken."""
        delivered = self.subscription.latest  # type: ignore[union-attr]  # the new_* methods need a subscription
        if delivered is not None and delivered is not self._seen:
            self._seen = delivered
            if delivered.epoch != self.epoch or delivered.version > self.sent:
                return self.take(delivered)
        return self.take(self.read()) if full else None

    def new_presence(self, full: bool) -> Presence | None:
        """What is new of who is on the page: delivered, else (`full`) read; taken. None when not asked for."""
        if self.presence_sent is None:
            return None
        delivered = self.subscription.presence  # type: ignore[union-attr]
        if delivered is not None and delivered is not self._presence_seen:
            self._presence_seen = delivered
            if delivered.version != self.presence_sent:
                return self.take_presence(delivered)
        return self.take_presence(self.read_presence()) if full else None
