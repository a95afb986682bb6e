"""Poll answers from memory: the newest version a process has heard of, for the pages it is asked about.

Engine-free, like notify.py. The PostgreSQL store (stores/postgres.py)
asks the memory before it reads, and its listener (stores/postgres_notify.py)
keeps it honest: every save of any host is NOTIFYed with its slug and
version, so a process that hears them all knows, for each page it
remembers, whether what it read last is still the newest. An unchanged
poll, and a changed one for a page it has read, is then answered without a
round trip to the database.

The memory answers only what the database would: a remembered state
whose version is the newest heard, to a client that knows no newer one,
of the same database (epoch). It answers nothing while it is not trusted:
the listener trusts it only while its connection is up and listening,
clears it whenever notifications may have been lost, and says, through
`unheard`, whether something sits unread on that connection (then the
database answers).

A read of the database races with the notifications: a save may land
after the read's snapshot and be heard before the read comes back. So a
read marks the page first (`begin`), `heard` raises the version of a
marked page, and the state read is kept (`store`) only in the entry it
began with, still there (not evicted, no `clear` meanwhile), and answers
only while no newer version was heard. Bounded by bytes, the pages asked
for least recently go first.

A state read answers for `max_age_s` at most (the listener sets it to the
heartbeat interval): a change nothing announced (a row edited by hand,
without NOTIFY) still reaches a stream's once-per-heartbeat look at its
page within two heartbeats, as it reached it within one without the memory.
"""

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from changefeed.core.outcomes import Change


def _always() -> bool:
    return True


class Entry:
    """One page: the newest version heard of it, and the state last read (as (brief, whole, answers until))."""

    __slots__ = ("heard", "known", "cost")

    def __init__(self, cost: int) -> None:
        self.heard = -1  # the newest version heard of or read; -1: nothing yet
        # The state read, as a client that has it gets it (no html) and as one behind gets it (None
        # when only the brief was read), and until when (monotonic). One tuple, replaced at once.
        self.known: tuple[Change, Change | None, float] | None = None
        self.cost = cost


class PageMemory:
    """The pages this process was asked about, by slug, with the newest version heard: answers without the database.

    Mutations take a lock (threads without gevent); `answer`, the hot path,
    takes none: it reads one entry's fields, each replaced whole.
    """

    # An entry beyond its slug, html and data: the dict slot, the Entry, its tuple, two Changes, and the
    # epoch and updated_at strings of its read (466 bytes with tracemalloc, plus about 140 for those strings).
    ENTRY_BYTES = 600

    def __init__(self, budget_bytes: int, max_age_s: float = 15.0) -> None:
        self.budget, self.max_age_s = budget_bytes, max_age_s
        self.enabled = budget_bytes > 0
        self.size = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._until = 0.0  # monotonic time until which the listener vouches for what was heard
        self._unheard: Callable[[], bool] = _always

    # -- trust: the listener's to give and take --------------------------------------------------

    def trust(self, until: float, unheard: Callable[[], bool]) -> None:
        """Answer until `until` (monotonic), unless `unheard()` says a notification waits unread."""
        self._unheard, self._until = unheard, until

    def distrust(self) -> None:
        """Answer nothing until trusted again: the database answers every read."""
        self._until = 0.0

    @property
    def trusted(self) -> bool:
        return time.monotonic() < self._until

    def clear(self) -> None:
        """Forget every page: notifications may have been lost, or the database was replaced (a new epoch)."""
        with self._lock:
            self._entries = OrderedDict()  # new entries only: what a read began with is never in it
            self.size = 0

    # -- reads -------------------------------------------------------------------------------------

    def answer(self, slug: str, since: int, epoch: str | None) -> Change | None:
        """What the database would answer a client at `since` of `epoch`, or None: ask the database.

        Only a state whose version is the newest heard, to a client that
        knows no newer version (one that does knows more than we heard: we
        lag), of this state's database; the whole page only when it was read.
        """
        entry = self._entries.get(slug)
        if entry is None or (known := entry.known) is None:
            return None
        brief, whole, until = known
        version = brief.version
        if version != entry.heard or since > version or (epoch is not None and epoch != brief.epoch):
            return None
        found = brief if since == version else whole
        now = time.monotonic()
        if found is None or now >= until or now >= self._until or self._unheard():
            return None
        try:
            self._entries.move_to_end(slug)
        except KeyError:  # cleared or evicted meanwhile by another thread: the answer still held when read
            pass
        return found

    def begin(self, slug: str) -> Entry | None:
        """Mark `slug` before reading it from the database, so what is heard during the read counts; hand to store()."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(slug)
            if entry is None:
                entry = self._entries[slug] = Entry(self.ENTRY_BYTES + sys.getsizeof(slug))
                self.size += entry.cost
                self._evict()
            else:
                self._entries.move_to_end(slug)
            return entry if self._entries.get(slug) is entry else None

    def store(self, slug: str, entry: Entry | None, change: Change) -> None:
        """Keep what a read begun with begin() found, unless its entry went meanwhile (evicted, or cleared).

        An entry is never put back once gone: a page asked about again gets
        a new one, so a read begun before a clear() is not kept after it. A
        newer state already kept stays.
        """
        if entry is None:
            return
        with self._lock:
            if self._entries.get(slug) is not entry:
                return
            known = entry.known
            if known is not None and known[0].epoch == change.epoch:
                if known[0].version > change.version:
                    return  # a read that began earlier came back later
                if known[0].version == change.version and change.html is None and known[1] is not None:
                    change = known[1]  # the same version, read whole before: kept whole, for longer
            until = time.monotonic() + self.max_age_s
            if change.html is None:
                known, cost = (change, None, until), 0
            else:
                known = (Change(change.epoch, change.version, change.updated_at, None, None, change.deleted), change,
                         until)
                # The page's text, and the answer's JSON text built from it once it is served (Change.answer).
                cost = 2 * (sys.getsizeof(change.html) + sys.getsizeof(change.data))
            cost += self.ENTRY_BYTES + sys.getsizeof(slug)
            if cost > self.budget:
                del self._entries[slug]
                self.size -= entry.cost
                return
            entry.known = known
            entry.heard = max(entry.heard, change.version)
            self.size += cost - entry.cost
            entry.cost = cost
            self._entries.move_to_end(slug)
            self._evict()

    def heard(self, slug: str, version: int) -> None:
        """A save of `slug` at `version` was committed (NOTIFY, or this process's own): a page remembered is behind."""
        entry = self._entries.get(slug)
        if entry is None:
            return  # not asked about here: nothing to keep
        with self._lock:
            if version > entry.heard:
                entry.heard = version

    def _evict(self) -> None:
        """Drop the pages asked about least recently until the memory fits its budget (the lock held)."""
        while self.size > self.budget and self._entries:
            _, entry = self._entries.popitem(last=False)
            self.size -= entry.cost

    def __len__(self) -> int:
        return len(self._entries)
