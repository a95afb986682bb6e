"""The two seams between the stores and everything above them: `Store` and `Notifier`.

They are exactly what the layers above call (the views, the feeds, the
socket, presence, gunicorn.conf.py), and no more: an engine's own needs
stay inside the engine. The SQLite file's identity and generation, its
check_file() and watch() cursor, the PostgreSQL URL and its LISTEN
connection are reached only by that engine's notifier, which lives beside
it (stores/sqlite_notify.py, stores/postgres_notify.py). What an operator
must fix before a store can serve (a missing or replaced SQLite file) is
`problem()`: a generic question every engine answers, cheaply, so /readyz
can say it first without knowing which engine runs.

Both are `typing.Protocol`s, so SQLiteStore and PostgresStore (and their
notifiers) satisfy them by shape: mypy checks it where stores/engines.py
returns them as these types, and a test double needs no base class.
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from changefeed.core.feed import FeedPage, Position
from changefeed.core.outcomes import Change, Saved
from changefeed.core.presence import Beat, Beaten, Presence
from changefeed.stores.notify import Subscription

__all__ = ["Notifier", "Store", "Subscription"]


class Store(Protocol):
    """Where pages (and who is on them) live; every method raises the outcome types of core/outcomes.py."""

    @property
    def epoch(self) -> str | None:
        """The database's identity as last read (None until it could be read): a new one means start over."""

    @property
    def feed_lags_commits(self) -> bool:
        """Whether `feed` may list a save after its commit was announced (readers then look again for it)."""

    def save(self, slug: str, html: str, data: str, base_version: int | None = None,
             key: str | None = None) -> Saved:
        """Store a new version of `slug`, or raise Conflict, KeyReused, StorageFull, NotStored or OutcomeUnknown."""

    def delete(self, slug: str, base_version: int | None = None) -> Saved:
        """Store a tombstone one version up, or raise NoSuchPage, Conflict, NotStored or OutcomeUnknown."""

    def changes(self, slug: str, since: int, epoch: str | None = None) -> Change:
        """The page as a client at version `since` of database `epoch` sees it; raise Unavailable."""

    def feed(self, after: Position, prefix: str = "", limit: int = 100, content: bool = False,
             slugs: Sequence[str] | None = None) -> FeedPage:
        """The pages saved after `after` under `prefix` (among `slugs`), each once, oldest first; raise Unavailable."""

    def beat(self, beat: Beat) -> Beaten:
        """Record a tab's heartbeat; raise TooSoon, PresenceFull, NotStored or OutcomeUnknown."""

    def presence(self, slug: str) -> Presence:
        """Who is on the page now; raise Unavailable."""

    def presence_version(self, slug: str) -> int:
        """The page's presence version alone (0: nobody), for an unchanged poll; raise Unavailable."""

    def ping(self) -> None:
        """Read from the database once; raise Unavailable when it cannot be read."""

    def problem(self) -> str | None:
        """What an operator must fix before this store can serve, in words saying what to do, or None."""


class Notifier(Protocol):
    """Tells the requests of this process waiting on a page that it changed (or who is on it)."""

    @property
    def closed(self) -> bool:
        """The process is shutting down: every wait ends, and no new one begins."""

    @property
    def heartbeat_s(self) -> float:
        """How often every subscription is woken even without a change (streams send a heartbeat)."""

    @property
    def saves_seen(self) -> int:
        """How many times this process woke the feeds' subscriptions: a feed read is current while it holds."""

    def subscribe(self, slug: str,
                  subscription: Subscription | None = None) -> AbstractContextManager[Subscription]:
        """Hold a Subscription to `slug` for a `with` block; subscribe first, then read the store."""

    def subscribe_prefix(self, prefix: str,
                         subscription: Subscription | None = None) -> AbstractContextManager[Subscription]:
        """Hold a Subscription woken (`saved`) by each save of a page under `prefix` ("": any), for a `with` block."""

    def start(self) -> None:
        """Begin learning of saves (idempotent); raise Unavailable when the look-out cannot start."""

    def health(self) -> str | None:
        """What is wrong with this process's look-out, or None when it looked recently."""

    def close(self) -> None:
        """End every wait at once (SIGTERM), so clients reconnect elsewhere."""
