"""The steps of a save that both engines share: versions, conflicts, keys, limits and presence, decided once.

A store engine (stores/sqlite.py, stores/postgres.py) brings a connection,
its SQL dialect and its transaction; everything a client can observe is
decided here, over whatever connection the engine lends, so SQLite and
PostgreSQL answer alike. Nothing here imports an engine: a connection is
anything with `execute(sql, params)` returning rows (`Connection` below),
which both sqlite3's and psycopg's are.
"""

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from changefeed.core.feed import FeedEntry, FeedPage, Position
from changefeed.core.outcomes import (
    Change,
    Conflict,
    KeyReused,
    NoSuchPage,
    NotStored,
    Saved,
    SaveRequest,
    StorageFull,
    utc_now,
)
from changefeed.core.presence import GONE, Beat, Beaten, Presence, PresenceFull, Sweep, TooSoon, user_id
from changefeed.stores import writers

log = logging.getLogger(__name__)

Params = Sequence[Any] | Mapping[str, Any]
Item = SaveRequest | Beat | Sweep  # what a writer carries to a store's batch
# What one item ended in: a Saved or Beaten, or the exception saying what became of it (None: a sweep).
Outcome = Saved | Beaten | Exception | None


class _StartOver(Exception):
    """A save applied without a savepoint of its own must be undone: the batch runs again, one savepoint each."""


class Rows(Protocol):
    """What a statement returns, in both engines."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """A database connection as the save steps use it: sqlite3's and psycopg's both are one."""

    def execute(self, sql: str, params: Any = ..., /) -> Rows: ...


class PageStore:
    """The steps of a save that both engines share, run inside the engine's own transaction.

    A subclass gives its SQL (these statements, with `?` placeholders, and
    its three upserts), its database error class, and `_fatal`: whether an
    error lost the whole transaction rather than one save's savepoint.
    Everything else a client can observe (versions, conflicts, keys,
    limits) is decided here once, so SQLite and PostgreSQL answer alike.
    """

    Error: type[Exception] = Exception
    # Whether the feed may list a save later than its commit (PostgreSQL's horizon): readers woken by a save
    # then look again until they see it. SQLite lists each save as it commits.
    feed_lags_commits = False
    EPOCH = "SELECT value FROM epoch"
    FORGET_KEYS = "DELETE FROM idempotency_keys WHERE created_at <= ?"
    OLDEST_KEY = "SELECT min(created_at) FROM idempotency_keys"
    FIND_KEY = ("SELECT fingerprint, slug, version, updated_at FROM idempotency_keys"
                " WHERE key = ? AND created_at > ?")
    # Keeps a key, or takes over an expired one; no row when a live one is there (kept meanwhile).
    KEEP_KEY = ("INSERT INTO idempotency_keys (key, fingerprint, slug, version, updated_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint,"
                " slug = excluded.slug, version = excluded.version, updated_at = excluded.updated_at,"
                " created_at = excluded.created_at WHERE idempotency_keys.created_at <= ? RETURNING 1")
    VERSION = "SELECT version, deleted FROM page_versions WHERE slug = ?"
    STORAGE = "SELECT pages, bytes FROM storage"
    # (slug, html, data, updated_at) -> version: first save 1, then +1, whatever the last.
    UPSERT: str
    # (slug, html, data, updated_at) -> version 1, or no row when the page exists (base_version 0).
    INSERT_NEW: str
    # (html, data, updated_at, slug, base_version) -> base + 1, or no row when the stored version is another.
    UPDATE_FROM: str
    # (updated_at, slug, base_version, base_version) -> the tombstone's version (+1), or no row when the
    # page is missing, deleted already, or (a base_version given) at another version.
    DELETE: str

    # Presence (core/presence.py): entries by tab, a version per page from one clock.
    FIND_ENTRY = "SELECT state, name, seen_at FROM page_editors WHERE slug = ? AND user_key = ? AND client_id = ?"
    COUNT_ENTRIES = "SELECT count(*) FROM page_editors WHERE slug = ? AND state <> 'gone'"
    PUT_ENTRY = ("INSERT INTO page_editors (slug, user_key, client_id, name, state, seen_at) VALUES (?, ?, ?, ?, ?, ?)"
                 " ON CONFLICT (slug, user_key, client_id) DO UPDATE SET name = excluded.name,"
                 " state = excluded.state, seen_at = excluded.seen_at")
    EXPIRE_PAGE = "DELETE FROM page_editors WHERE slug = ? AND seen_at < ? RETURNING state"
    EXPIRE_ALL = "DELETE FROM page_editors WHERE seen_at < ? RETURNING slug, state"
    ANY_EXPIRED = "SELECT 1 FROM page_editors WHERE seen_at < ? LIMIT 1"
    FORGET_PRESENCE = ("DELETE FROM presence WHERE changed_at < ?"
                       " AND NOT EXISTS (SELECT 1 FROM page_editors e WHERE e.slug = presence.slug)")
    PRESENCE_VERSION = "SELECT version FROM presence WHERE slug = ?"
    SET_PRESENCE = ("INSERT INTO presence (slug, version, changed_at) VALUES (?, ?, ?) ON CONFLICT (slug)"
                    " DO UPDATE SET version = excluded.version, changed_at = excluded.changed_at")
    # One statement, so the version and the list always belong together: users (not tabs),
    # editing ones first, with how many there are in all.
    PRESENCE = ("SELECT p.version, g.user_key, g.name, g.editing, count(g.user_key) OVER (), sum(g.editing) OVER ()"
                " FROM (SELECT 1 AS one) o"
                " LEFT JOIN presence p ON p.slug = ?"
                " LEFT JOIN (SELECT user_key, max(name) AS name,"
                "            max(CASE WHEN state = 'editing' THEN 1 ELSE 0 END) AS editing"
                "            FROM page_editors WHERE slug = ? AND state <> 'gone' GROUP BY user_key) g ON 1 = 1"
                " ORDER BY g.editing DESC, g.name, g.user_key LIMIT ?")
    NEXT_PRESENCE_VERSION: str  # -> the clock's next value
    FORGET_PRESENCE_AFTER_S = 60  # an empty page's presence row is kept this long, then version 0 says "nobody"

    epoch: str | None = None  # the database's identity, as last read
    _max_pages: int | None = None
    _max_bytes: int | None = None
    _key_ttl: float = 86_400
    _forget_keys_at = 0.0  # when the oldest Idempotency-Key expires, as far as this process knows: look then
    _busy_timeout = 10.0
    _native_commits = True  # whether a commit blocks its thread (SQLite), so needs one of its own
    _writer: writers.Writer | None = None
    _presence_writer: writers.Writer | None = None
    presence_ttl_s, presence_min_interval_s, presence_max_per_page, presence_list_max = 15.0, 1.0, 200, 50

    def save(self, slug: str, html: str, data: str, base_version: int | None = None, key: str | None = None) -> Saved:
        """Store a new version of `slug`, one more than the last, or raise what became of it."""
        writer = self._writer or self._choose_writer()
        deadline = time.monotonic() + self._busy_timeout
        return writer.save(SaveRequest(slug, html, data, base_version, key), deadline)

    def delete(self, slug: str, base_version: int | None = None) -> Saved:
        """Delete `slug`: a tombstone one version above the last, or raise NoSuchPage, Conflict or NotStored.

        The row stays (html "", data null, `deleted`): versions never go back
        within an epoch, a re-created page goes on from the tombstone's
        version, and every transport tells its subscribers the page is gone.
        """
        writer = self._writer or self._choose_writer()
        deadline = time.monotonic() + self._busy_timeout
        return writer.save(SaveRequest(slug, "", "null", base_version, delete=True), deadline)

    def configure_presence(self, ttl_s: float, min_interval_s: float, max_per_page: int, list_max: int) -> None:
        """Set the presence limits (settings CHANGEFEED_PRESENCE_*), once, before the first beat."""
        self.presence_ttl_s, self.presence_min_interval_s = ttl_s, min_interval_s
        self.presence_max_per_page, self.presence_list_max = max_per_page, list_max

    def beat(self, beat: Beat) -> Beaten:
        """Record a heartbeat (presence.Beat); return a Beaten, or raise TooSoon, PresenceFull or NotStored."""
        return self._presence_write(beat)

    def sweep_presence(self) -> None:
        """Delete the entries whose beats stopped, if there are any; a cheap read when there are none."""
        if self._presence_expired():
            self._presence_write(Sweep())

    def _presence_write(self, item: Beat | Sweep) -> Any:
        writer = self._presence_writer or self._choose_presence_writer()
        return writer.save(item, time.monotonic() + self._busy_timeout)

    def _choose_presence_writer(self) -> writers.Writer:
        """Beats go through a writer of their own: grouped, and never in a save's transaction."""

        self._presence_writer = writers.for_this_process(native_thread=self._native_commits)(self.presence_batch)
        return self._presence_writer

    def _apply_beats(self, conn: Connection, items: Sequence[Any]) -> list[Outcome]:
        """Apply heartbeats and sweeps, each in a savepoint; then give each page that changed a new version."""
        now = time.time()
        changed: set[str] = set()
        outcomes: list[Outcome] = []
        for item in items:
            item_changed: set[str] = set()  # the pages this item changed: none, should it be rolled back
            outcome = self._in_savepoint(conn, item, lambda: (
                self._sweep(conn, now, item_changed) if isinstance(item, Sweep)
                else self._apply_beat(conn, item, now, item_changed)))
            if not isinstance(outcome, NotStored):
                changed |= item_changed
            outcomes.append(outcome)
        versions: dict[str, int] = {}
        for slug in sorted(changed):  # in order: two hosts' transactions never wait on each other in a cycle
            (versions[slug],) = conn.execute(self.NEXT_PRESENCE_VERSION).fetchone()
            conn.execute(self.SET_PRESENCE, (slug, versions[slug], now))
        self._presence_changed(conn, sorted(changed))
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, Beaten) and outcome.slug not in versions:
                row = conn.execute(self.PRESENCE_VERSION, (outcome.slug,)).fetchone()
                versions[outcome.slug] = row[0] if row else 0
            if isinstance(outcome, Beaten):
                outcomes[i] = Beaten(outcome.slug, versions[outcome.slug], outcome.you)
        return outcomes

    def _apply_beat(self, conn: Connection, beat: Beat, now: float, changed: set[str]) -> Outcome:
        """One tab's beat: refresh, add or (state "gone") unlist its entry; a change marks the page.

        Every beat waits the minimum interval after the tab's last one, but
        a "gone" that unlists a listed tab, which is always taken (a tab
        closing right after it opened must not linger). The unlisted entry
        stays, state "gone", until the TTL: the tab's next beat still waits
        its turn, so alternating "viewing" and "gone" changes the list at
        most twice per interval.
        """
        key = (beat.slug, beat.user, beat.client_id)
        if any(state != GONE for (state,) in conn.execute(self.EXPIRE_PAGE, (beat.slug, now - self.presence_ttl_s))):
            changed.add(beat.slug)
        row = conn.execute(self.FIND_ENTRY, key).fetchone()
        listed = row is not None and row[0] != GONE
        leaving = beat.state == GONE and listed  # always taken
        if row is not None and not leaving and now - row[2] < self.presence_min_interval_s:
            return TooSoon(self.presence_min_interval_s - (now - row[2]))
        if beat.state == GONE and not listed:
            return Beaten(beat.slug, 0, user_id(beat.user))  # not listed: nothing changes
        if row is None and conn.execute(self.COUNT_ENTRIES, (beat.slug,)).fetchone()[0] >= self.presence_max_per_page:
            return PresenceFull(self.presence_max_per_page)
        conn.execute(self.PUT_ENTRY, (*key, beat.name, beat.state, now))
        if not listed or (row[0], row[1]) != (beat.state, beat.name):
            changed.add(beat.slug)
        return Beaten(beat.slug, 0, user_id(beat.user))

    def _sweep(self, conn: Connection, now: float, changed: set[str]) -> None:
        changed.update(slug for slug, state in conn.execute(self.EXPIRE_ALL, (now - self.presence_ttl_s,)).fetchall()
                       if state != GONE)  # an unlisted entry's going changes no list
        conn.execute(self.FORGET_PRESENCE, (now - self.FORGET_PRESENCE_AFTER_S,))
        return None

    def _presence_changed(self, conn: Connection, slugs: list[str]) -> None:
        """Tell the other processes which pages' presence changed (PostgreSQL NOTIFYs; SQLite's watcher reads)."""

    def changes(self, slug: str, since: int, epoch: str | None = None) -> Change:  # pragma: no cover
        """Return the page's state for a client at version `since` of database `epoch` (each engine says how)."""
        raise NotImplementedError

    def _read(self, sql: str, params: Params) -> list[Any]:  # pragma: no cover - each engine says
        """Run one read; return its rows, or raise Unavailable."""
        raise NotImplementedError

    def presence(self, slug: str) -> Presence:
        """Who is on the page now (presence.Presence), in one statement."""
        return self._presence_from_rows(self._read(self.PRESENCE, (slug, slug, self.presence_list_max)))

    def presence_version(self, slug: str) -> int:
        """The page's presence version alone: what an unchanged poll needs to say 304."""
        rows = self._read(self.PRESENCE_VERSION, (slug,))
        return rows[0][0] if rows else 0

    FEED: str  # each engine's read of the feed: (epoch, next number, ceiling, slug, version, ..., html, data)
    FEED_POSITIONS_NAME_SLUGS: bool

    @staticmethod
    def _slugs_param(slugs: Sequence[str] | None) -> Any:
        """The list of slugs as the engine's driver takes it for FEED's `slugs` (None: every slug)."""
        return None if slugs is None else list(slugs)

    def feed(self, after: Position, prefix: str = "", limit: int = 100, content: bool = False,
             slugs: Sequence[str] | None = None) -> FeedPage:
        """The pages saved after position `after` whose slug starts with `prefix`, oldest first, at most `limit`.

        With `slugs`, only those pages (a stream following a list of them).

        Each page once, at its newest version (a tombstone for a deleted
        one), with its html and data when `content`. One statement, so the
        entries, the epoch and where to read on come from one snapshot.
        When fewer than `limit` came, the next position is past everything
        this read could see (other prefixes' saves included), so a reader
        of a quiet prefix does not scan the same rows again.
        """
        rows = self._read(self.FEED, {"number": after[0], "slug": after[1], "prefix": prefix, "limit": limit,
                                      "content": content, "slugs": self._slugs_param(slugs)})
        epoch, next_number, ceiling = rows[0][0], int(rows[0][1]), int(rows[0][2])
        by_slug = self.FEED_POSITIONS_NAME_SLUGS
        entries = [FeedEntry(slug, version, updated_at, bool(deleted), (int(number), slug if by_slug else ""),
                             html, data)
                   for _e, _n, _c, slug, version, updated_at, deleted, number, html, data in rows if slug is not None]
        self.epoch = epoch
        if len(entries) == limit:
            following = entries[-1].position
        else:
            following = max(after, (next_number, ""))
        return FeedPage(epoch, entries, following, ahead=after[0] > ceiling)

    def _presence_expired(self) -> bool:
        return bool(self._read(self.ANY_EXPIRED, (time.time() - self.presence_ttl_s,)))

    def _presence_from_rows(self, rows: list[Any]) -> Presence:
        """The Presence of the PRESENCE query's rows."""
        first = rows[0]
        if first[1] is None:  # nobody
            return Presence(first[0] or 0)
        return Presence(first[0] or 0, first[4], int(first[5] or 0),
                        tuple((user_id(user), name, "editing" if editing else "viewing")
                              for _v, user, name, editing, _c, _e in rows))

    def _fatal(self, conn: Any, exc: Exception) -> bool:  # pragma: no cover - each engine says
        raise NotImplementedError

    def _reason(self, exc: Exception) -> str:
        return f"the database failed ({exc})"

    def _choose_writer(self) -> writers.Writer:  # pragma: no cover - each engine says
        """Pick how saves reach save_batch in this process: after fork, after gevent patched it."""
        raise NotImplementedError

    def presence_batch(self, items: Sequence[Item], deadline: float) -> list[Outcome]:  # pragma: no cover
        """Apply heartbeats [Beat, Sweep] in one transaction (each engine says how)."""
        raise NotImplementedError

    def _apply_all(self, conn: Connection, items: Sequence[Any]) -> list[Outcome]:
        """Apply each item; raise when the whole transaction is lost.

        One savepoint holds the whole batch: the common case, where every
        save simply lands, costs no statement per save beyond its own. Should
        any save fail, or need undoing (a storage limit near it, a key kept
        meanwhile by another host), the batch goes back to that savepoint and
        runs again with a savepoint per item, so one failing save does not
        fail the others (_in_savepoint). Items are applied in slug order
        (saves of one page keep their order): two hosts' transactions that
        write the same pages take their rows in the same order, and never
        wait on each other in a cycle.
        """
        now = time.time()
        # Read in the transaction, so each answer names the database that holds its save.
        (epoch,) = conn.execute(self.EPOCH).fetchone()
        self.epoch = epoch
        if now >= self._forget_keys_at:
            self._forget_keys(conn, now)
        room = self._room_for(conn, items)
        order = sorted(range(len(items)), key=lambda i: items[i].slug)
        outcomes: list[Outcome] = [None] * len(items)
        if room:
            conn.execute("SAVEPOINT batch")
            try:
                for i in order:
                    outcomes[i] = self._apply(conn, items[i], now, epoch, room=True, alone=False)
            except _StartOver:
                conn.execute("ROLLBACK TO SAVEPOINT batch")
            except self.Error as exc:
                if self._fatal(conn, exc):
                    raise
                conn.execute("ROLLBACK TO SAVEPOINT batch")
            except Exception:  # noqa: BLE001 - not a database error: each item again, on its own, to find it
                conn.execute("ROLLBACK TO SAVEPOINT batch")
            else:
                conn.execute("RELEASE SAVEPOINT batch")
                return outcomes
            conn.execute("RELEASE SAVEPOINT batch")
        for i in order:
            item = items[i]
            outcomes[i] = self._in_savepoint(conn, item, lambda: self._apply(conn, item, now, epoch, room))
        return outcomes

    def _room_for(self, conn: Connection, items: Sequence[SaveRequest]) -> bool:
        """Whether the whole batch fits under the storage limits whatever each save replaces (one read).

        Then no save needs a look at the counters of its own, which is the
        common case: a database far from its limits. Otherwise each save is
        checked on its own (_over_limit). On PostgreSQL this sees what other
        transactions have committed, not what they are writing: a limit may
        be passed by what one batch of each other process adds meanwhile.
        """
        if self._max_pages is None and self._max_bytes is None:
            return True
        pages, stored = conn.execute(self.STORAGE).fetchone()
        added_pages = sum(not item.delete for item in items)
        added_bytes = sum(_utf8_len(item.html) + _utf8_len(item.data)
                          + (200 + len(item.key) + _utf8_len(item.slug) if item.key else 0) for item in items)
        return ((self._max_pages is None or pages + added_pages <= self._max_pages)
                and (self._max_bytes is None or stored + added_bytes <= self._max_bytes))

    def _in_savepoint(self, conn: Connection, item: Item, apply: Callable[[], Outcome]) -> Outcome:
        """Run `apply()` for one item in a savepoint of its own; return its outcome.

        Only a database error that lost the whole transaction fails the
        batch (it is raised). Any other failure is this item's alone: its
        savepoint is rolled back, it gets its own NotStored, and the others
        still commit. That includes exceptions that are not database errors
        (a string the driver cannot encode, a bug): left to escape, they
        would end every caller of the batch in OutcomeUnknown.
        """
        conn.execute("SAVEPOINT item")
        try:
            outcome = apply()
        except self.Error as exc:
            if self._fatal(conn, exc):
                raise
            conn.execute("ROLLBACK TO SAVEPOINT item")
            outcome = NotStored(self._reason(exc))
        except Exception as exc:  # noqa: BLE001 - see above: this item only, logged with its traceback
            log.exception("%s for %r not stored", type(item).__name__, getattr(item, "slug", None))
            conn.execute("ROLLBACK TO SAVEPOINT item")
            outcome = NotStored(f"it could not be written ({type(exc).__name__}); the error is logged")
        conn.execute("RELEASE SAVEPOINT item")
        return outcome

    def _apply(self, conn: Connection, item: SaveRequest, now: float, epoch: str, room: bool = False,
               alone: bool = True) -> Outcome:
        """Write one save inside the caller's transaction; a stale base writes nothing.

        The base version is checked by the write itself (an UPDATE of that
        version, an INSERT of a page that must not exist), so two engines
        with different locking (SQLite's one writer, PostgreSQL's row locks)
        never let two saves from the same base both land. `alone`: in a
        savepoint of its own, which it may roll back; otherwise it raises
        _StartOver where it would.
        """
        if item.key is not None:
            fingerprint = item.fingerprint()
            row = conn.execute(self.FIND_KEY, (item.key, now - self._key_ttl)).fetchone()
            if row is not None:
                if row[0] != fingerprint:
                    return KeyReused(item.key)
                return Saved(row[1], row[2], row[3], epoch, replayed=True)
        updated_at = utc_now()
        if item.delete:
            return self._delete(conn, item, updated_at, epoch)
        limited = not room and (self._max_pages is not None or self._max_bytes is not None)
        if limited:
            before = conn.execute(self.STORAGE).fetchone()
        if item.base_version is None:
            row = conn.execute(self.UPSERT, (item.slug, item.html, item.data, updated_at)).fetchone()
        elif item.base_version == 0:
            row = conn.execute(self.INSERT_NEW, (item.slug, item.html, item.data, updated_at)).fetchone()
        else:
            row = conn.execute(self.UPDATE_FROM,
                               (item.html, item.data, updated_at, item.slug, item.base_version)).fetchone()
        if row is None:
            current = conn.execute(self.VERSION, (item.slug,)).fetchone()
            return Conflict(current[0] if current else 0)
        (version,) = row
        if item.key is not None:
            kept = conn.execute(self.KEEP_KEY, (item.key, fingerprint, item.slug, version, updated_at, now,
                                                now - self._key_ttl)).fetchone()
            if kept is None:
                # Another transaction kept this key since FIND_KEY looked (a retry on another host, which
                # READ COMMITTED let this one miss): its save is the one, this one writes nothing.
                if not alone:
                    raise _StartOver()
                conn.execute("ROLLBACK TO SAVEPOINT item")
                row = conn.execute(self.FIND_KEY, (item.key, now - self._key_ttl)).fetchone()
                if row is None or row[0] != fingerprint:
                    return KeyReused(item.key)
                return Saved(row[1], row[2], row[3], epoch, replayed=True)
        if limited:  # after the key too: what keys keep counts against the byte limit
            refused = self._over_limit(conn, *before)
            if refused is not None:
                conn.execute("ROLLBACK TO SAVEPOINT item")  # undo this save only; the caller releases the savepoint
                return refused
        return Saved(item.slug, version, updated_at, epoch)

    def _delete(self, conn: Connection, item: SaveRequest, updated_at: str, epoch: str) -> Outcome:
        """Turn a page into a tombstone, one version up; a missing or deleted page, or another base, writes nothing."""
        row = conn.execute(self.DELETE, (updated_at, item.slug, item.base_version, item.base_version)).fetchone()
        if row is None:
            current = conn.execute(self.VERSION, (item.slug,)).fetchone()
            if current is None or current[1]:
                return NoSuchPage(current[0] if current else 0)
            return Conflict(current[0])
        return Saved(item.slug, row[0], updated_at, epoch, deleted=True)

    def _forget_keys(self, conn: Connection, now: float) -> None:
        """Delete the Idempotency-Keys past their window, and note when the oldest left expires.

        Their bytes count against the byte limit, so they must go when they
        expire, whether or not new keys come. Until the oldest key left
        expires (or, with none left, a window from now: any key kept later
        expires later) no batch looks again.
        """
        conn.execute(self.FORGET_KEYS, (now - self._key_ttl,))
        (oldest,) = conn.execute(self.OLDEST_KEY).fetchone()
        self._forget_keys_at = (now if oldest is None else oldest) + self._key_ttl

    def _over_limit(self, conn: Connection, pages_before: int, bytes_before: int) -> StorageFull | None:
        """After a save, inside its savepoint: a StorageFull if it took the database past a limit.

        Triggers have already counted it (and its Idempotency-Key), so this
        reads one row. Only saves that add a page (a new one, or one
        re-created over its tombstone) or grow the bytes stored are refused:
        a full database still takes new versions of its pages that are no bigger.
        """
        pages, stored = conn.execute(self.STORAGE).fetchone()
        if pages > pages_before and self._max_pages is not None and pages > self._max_pages:
            return StorageFull("pages", f"the service holds its most pages ({self._max_pages}, "
                                        "CHANGEFEED_MAX_PAGES), so a new page cannot be added")
        if self._max_bytes is not None and stored > self._max_bytes and stored > bytes_before:
            return StorageFull("stored_bytes", f"the pages, and the Idempotency-Keys kept for retries, would "
                                               f"hold more than {self._max_bytes} bytes "
                                               "(CHANGEFEED_MAX_STORED_BYTES), so a page cannot grow or be added")
        return None


def _utf8_len(text: str) -> int:
    """How many bytes `text` takes in UTF-8 (what the storage triggers count), without encoding ASCII."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def change_from_row(row: Sequence[Any]) -> Change:
    """The Change of a row (epoch, version, updated_at, html, data, deleted) of the changes() query.

    No page is version 0.
    """
    if row[1] is None:
        return Change(row[0], 0)
    return Change(row[0], row[1], row[2], row[3], row[4], bool(row[5]))


def unless_settled(outcome: Outcome, failed: Exception) -> Outcome:
    """What a failed commit means for one item: only a new version is affected."""
    if isinstance(outcome, Saved) and not outcome.replayed:
        return type(failed)(*failed.args)  # each caller gets its own exception object
    return outcome
