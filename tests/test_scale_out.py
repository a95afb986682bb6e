"""Scale-out: saves of different pages never take turns, the storage caps hold, and "saved since" never skips.

On PostgreSQL every host writes to one database. Saves of one page still
take turns on that page's row (versions 1..N exactly, test_hosts.py), but
nothing else may make a save wait for a save of another page. The storage
caps are counted in shards and checked once per batch, so a cap may be
passed by what the other processes' batches in flight add; on SQLite, with
its one writer, it is exact. saved_since() is the cursor the database feed
builds on: transactions commit out of the order of their ids, and a reader
that trusted "above the newest id seen" would skip a save committed late.
"""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from changefeed.core.outcomes import StorageFull

pytestmark = pytest.mark.engines

GENEROUS_S = 5.0  # far more than a save takes; a save that waits for the held page waits until released


@pytest.mark.postgres_only
def test_a_save_of_one_page_never_waits_for_a_save_of_another_held_by_its_row_lock(database, make_store):
    """Another host's save of page A waits on A's row; a save of page B from a third host goes through at once."""
    writer, other = make_store(), make_store()
    writer.save("page-a", "a1", "null")
    with psycopg.connect(database.postgres_url, autocommit=True) as blocker:
        blocker.execute("BEGIN")
        blocker.execute("UPDATE page_versions SET version = version WHERE slug = 'page-a'")  # holds A's row
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(writer.save, "page-a", "a2", "null")
            time.sleep(0.3)  # the save of A is inside its transaction now, waiting for the row
            assert not waiting.done()
            started = time.monotonic()
            assert other.save("page-b", "b1", "null").version == 1
            assert other.save("page-c", "c1", "null").version == 1
            assert time.monotonic() - started < GENEROUS_S
            assert not waiting.done(), "the save of A still waits: B did not go through by releasing it"
            blocker.execute("ROLLBACK")
            assert waiting.result(timeout=GENEROUS_S).version == 2


def create_pages(store, prefix, count, barrier):
    barrier.wait()
    outcomes = []
    for n in range(count):
        try:
            outcomes.append(store.save(f"{prefix}-{n}", "x", "null").version)
        except StorageFull:
            outcomes.append("full")
    return outcomes


def test_the_page_cap_is_passed_by_at_most_one_batch_of_each_other_process(database, make_store):
    """Four writers create pages at once against a cap of 5: at most 5 + 3 land (SQLite: exactly 5), the rest 507."""
    writers, cap = 4, 5
    stores = [make_store(max_pages=cap) for _ in range(writers)]  # one save per batch: DirectWriter off gevent
    barrier = threading.Barrier(writers)
    with ThreadPoolExecutor(writers) as pool:
        results = list(pool.map(lambda n: create_pages(stores[n], f"w{n}", 10, barrier), range(writers)))
    created = sum(outcome == 1 for outcomes in results for outcome in outcomes)
    (stored,) = database.query("SELECT pages FROM storage")[0]
    assert stored == created == database.query("SELECT count(*) FROM page_versions WHERE NOT deleted")[0][0]
    if database.engine == "sqlite":
        assert created == cap
    else:
        assert cap <= created <= cap + (writers - 1)
    with pytest.raises(StorageFull):
        stores[0].save("one-more", "x", "null")
    kept = next(f"w{n}-{i}" for n, outcomes in enumerate(results) for i, outcome in enumerate(outcomes)
                if outcome == 1)
    assert stores[0].save(kept, "y", "null").version == 2  # a full database still takes new versions, no bigger


def test_the_byte_cap_is_checked_per_save_near_it_and_once_per_batch_far_from_it(database, make_store):
    """Far below the cap a batch reads the counters once; near it each save is checked, and growth is refused."""
    store = make_store(max_bytes=1000)
    store.save("small", "x" * 100, "null")
    assert store.save("small", "y" * 100, "null").version == 2  # the same size: taken
    with pytest.raises(StorageFull):
        store.save("big", "z" * 2000, "null")
    assert store.save("grows", "w" * 500, "null").version == 1
    with pytest.raises(StorageFull):
        store.save("grows", "w" * 900, "null")
    assert store.save("grows", "v" * 400, "null").version == 2  # shrinking is always taken
    assert database.query("SELECT bytes FROM storage") == [(100 + 4 + 400 + 4,)]


@pytest.mark.postgres_only
def test_saved_since_waits_for_a_transaction_that_commits_after_a_later_one(database, make_store):
    """A writes first and commits last; a reader that came between must still get A, not skip it."""
    store = make_store()
    (cursor,) = [store.saved_since(0)[1]]
    late = psycopg.connect(database.postgres_url, autocommit=True)
    try:
        late.execute("BEGIN")
        late.execute("INSERT INTO page_versions (slug, html, data, version, updated_at)"
                     " VALUES ('late', '', 'null', 1, '2026-12-06T00:00:00.000Z')")
        store.save("early", "committed first", "null")  # a later transaction id, committed first
        seen, cursor = store.saved_since(cursor)
        assert seen == []  # "early" is held back: "late" has a lower id and may still commit
        late.execute("COMMIT")
        seen, cursor = store.saved_since(cursor)
        assert sorted(slug for slug, _version, _deleted in seen) == ["early", "late"]
        assert store.saved_since(cursor)[0] == []
    finally:
        late.close()


@pytest.mark.postgres_only
def test_a_reader_following_saved_since_ends_with_the_newest_version_of_every_page(database, make_store):
    """Eight writers (stores of their own, commits of random length) save 40 pages; the reader skips none."""
    pages, writers, saves = 40, 8, 60
    stores = [make_store() for _ in range(writers)]
    reader = make_store()
    done = threading.Event()
    newest: dict[str, int] = {}
    cursor = reader.saved_since(0)[1]

    went_back: list[str] = []

    def read() -> None:
        nonlocal cursor
        seen, cursor = reader.saved_since(cursor)
        for slug, version, _deleted in seen:
            if version < newest.get(slug, 0):
                went_back.append(f"{slug} went back from {newest[slug]} to {version}")
            newest[slug] = version

    def follow() -> None:
        while not done.is_set():
            read()

    def write(store) -> None:
        rng = random.Random()
        for _ in range(saves):
            store.save(f"page-{rng.randrange(pages)}", "x" * rng.randrange(1, 2000), "null")

    with psycopg.connect(database.postgres_url, autocommit=True) as slow:
        # Transactions that take their id early and commit late, beside the writers: the reader must wait for them.
        following = threading.Thread(target=follow)
        following.start()
        with ThreadPoolExecutor(writers + 1) as pool:
            jobs = [pool.submit(write, store) for store in stores]
            for n in range(10):
                with slow.transaction():
                    slow.execute("INSERT INTO page_versions (slug, html, data, version, updated_at)"
                                 " VALUES (%s, '', 'null', 1, 't')", (f"slow-{n}",))
                    time.sleep(0.05)
            for job in jobs:
                job.result(timeout=120)
        done.set()
        following.join(timeout=60)
    stored = dict(database.query("SELECT slug, version FROM page_versions"))
    # Every writer has committed; a transaction of another test on this server may hold the horizon a moment.
    deadline = time.monotonic() + 30
    while newest != stored and time.monotonic() < deadline:
        read()
    assert newest == stored and not went_back
