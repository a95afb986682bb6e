"""Unit tests of SharedReads (transports/feed.py): one feed read for the waiting readers of a process at one place.

On a real store of each engine; the notifier is the engine-independent
Fanout, told of saves the way the engines' look-outs tell it (refresh).
"""

import threading
import time

import pytest

from changefeed.core.feed import START
from changefeed.stores import schema
from changefeed.transports import feed as feed_module
from changefeed.transports.feed import FeedReader, SharedReads, read_feed

pytestmark = pytest.mark.engines


@pytest.fixture
def store(make_store):
    store = make_store()
    store.save("team-a", "<p>a</p>", "null")
    return store


def slugs(page):
    return [entry.slug for entry in page.entries]


def test_readers_at_one_place_take_one_answer(store, notifier, monkeypatch):
    monkeypatch.setattr(feed_module, "SHARED_READ_S", 60.0)  # however slow the machine
    shared = SharedReads()
    first = shared.feed(FeedReader(store, notifier, "team-"), START)
    second = shared.feed(FeedReader(store, notifier, "team-"), START)
    assert second is first and slugs(first) == ["team-a"]


def test_readers_at_other_places_or_of_other_prefixes_read_for_themselves(store, notifier):
    shared = SharedReads()
    first = shared.feed(FeedReader(store, notifier, "team-"), START)
    assert shared.feed(FeedReader(store, notifier, "team-", content=True), START) is not first
    assert shared.feed(FeedReader(store, notifier, "te"), START) is not first
    assert shared.feed(FeedReader(store, notifier, "team-"), first.next) is not first


def test_a_save_announced_since_the_read_makes_the_next_reader_read_again(store, notifier, monkeypatch):
    monkeypatch.setattr(feed_module, "SHARED_READ_S", 60.0)  # only the announcement can make it read again
    shared = SharedReads()
    assert slugs(shared.feed(FeedReader(store, notifier, "team-"), START)) == ["team-a"]
    store.save("team-b", "<p>b</p>", "null")
    notifier.refresh(store, "team-b")  # what the look-out does for a save: wakes the feeds
    second = shared.feed(FeedReader(store, notifier, "team-"), START)
    assert slugs(second) == ["team-a", "team-b"]


def test_an_answer_is_read_again_once_the_window_has_passed(store, notifier, monkeypatch):
    monkeypatch.setattr(feed_module, "SHARED_READ_S", 0.05)
    shared = SharedReads()
    shared.feed(FeedReader(store, notifier, "team-"), START)
    store.save("team-b", "<p>b</p>", "null")  # not announced yet: a look for a save not listed yet comes later
    time.sleep(0.1)
    assert slugs(shared.feed(FeedReader(store, notifier, "team-"), START)) == ["team-a", "team-b"]


def test_many_waiting_readers_woken_by_one_save_all_get_it(store, notifier):
    """Fifty long-polls on one prefix, one save: each ends with it (the shared read loses none)."""
    after = store.feed(START, "team-").next
    answers, ready = [], threading.Barrier(51)

    def long_poll():
        reader = FeedReader(store, notifier, "team-", shared=True)
        ready.wait()
        answers.append(slugs(read_feed(reader, after, None, wait_s=10)))

    threads = [threading.Thread(target=long_poll) for _ in range(50)]
    for thread in threads:
        thread.start()
    ready.wait()
    time.sleep(0.2)  # all of them waiting
    store.save("team-b", "<p>b</p>", "null")
    notifier.refresh(store, "team-b")
    for thread in threads:
        thread.join(timeout=15)
    assert answers == [["team-b"]] * 50


def test_a_reader_looking_again_for_a_save_announced_reads_the_database_itself(store, notifier, monkeypatch):
    """The shared answer is the one that did not list the save yet (PostgreSQL's horizon): a second look skips it."""
    monkeypatch.setattr(feed_module, "SHARED_READ_S", 60.0)
    reader = FeedReader(store, notifier, "team-", shared=True)
    reader.read(START)
    store.save("team-b", "<p>b</p>", "null")  # committed, its announcement not handled yet
    assert slugs(reader.read(START)[0]) == ["team-a"]  # shared: as if read a moment before the save
    assert slugs(reader.read(START, fresh=True)[0]) == ["team-a", "team-b"]


def test_a_shared_answer_from_before_a_restore_never_sends_a_reader_back_to_the_old_database(
        store, notifier, database, monkeypatch):
    """A restore is no save: the shared answer outlives it, and must not undo a reader's start-over."""
    monkeypatch.setattr(feed_module, "SHARED_READ_S", 60.0)
    monkeypatch.setattr(feed_module, "SHARED_READS", SharedReads())
    old = FeedReader(store, notifier, "team-", shared=True).read(START)[0].epoch
    if database.engine == "sqlite":
        new = schema.new_epoch(database.path)
    else:
        new = schema.new_epoch_postgres(database.url)
    page, _ = FeedReader(store, notifier, "team-", shared=True).read(START, epoch=new)
    assert (page.epoch, slugs(page)) == (new, ["team-a"]) and new != old
