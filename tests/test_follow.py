"""Unit tests of transports/follow.py: what is new to one subscriber, on a real SQLite store.

Deliveries come the way they do in the service: a Notifier reads the page
once (refresh) and hands it to the subscription.
"""

from contextlib import ExitStack

import pytest

from changefeed.core.presence import Beat
from changefeed.transports.follow import Follow


@pytest.fixture
def store(make_store):
    store = make_store()
    store.configure_presence(ttl_s=15.0, min_interval_s=0.0, max_per_page=200, list_max=50)  # beat at will
    return store


@pytest.fixture
def follow_of():
    """Make Follows with a subscription held on the notifier until the test ends."""
    with ExitStack() as held:

        def follow_of(store, notifier, slug="home", since=0, epoch=None, presence=None):
            subscription = held.enter_context(notifier.subscribe(slug))
            return Follow(store, slug, since, epoch, presence, subscription)

        yield follow_of


def beat(store, client_id, state="viewing", slug="home"):
    return store.beat(Beat(slug, client_id, f"client:{client_id}", client_id, state))


def restore_in_place(database, epoch="restored"):
    """The database becomes another one at the same place: its epoch changes (as a restore does)."""
    database.query("UPDATE epoch SET value = ?", (epoch,))


def test_a_read_at_the_current_version_is_unchanged_and_not_news(store, notifier, epoch, follow_of):
    store.save("home", "v1", "null")
    follow = follow_of(store, notifier, since=1)
    change = follow.read()
    assert (change.changed, change.version, change.epoch) == (False, 1, epoch)
    assert follow.epoch == epoch  # adopted: the client named none
    assert follow.take(change) is None
    assert follow.sent == 1


def test_a_newer_version_is_read_whole_and_taken_once(store, notifier, follow_of):
    store.save("home", "v1", "null")
    store.save("home", "v2", '{"n":2}')
    follow = follow_of(store, notifier, since=1)
    change = follow.take(follow.read())
    assert (change.version, change.html, change.data) == (2, "v2", '{"n":2}')
    assert follow.sent == 2
    assert follow.take(change) is None
    assert follow.take(follow.read()) is None


def test_a_position_of_another_database_makes_whatever_it_holds_news(store, notifier, epoch, follow_of):
    follow = follow_of(store, notifier, since=7, epoch="elsewhere")
    change = follow.read()
    assert (change.version, change.epoch, follow.sent, follow.epoch) == (0, epoch, -1, epoch)
    assert follow.take(change) is change  # even version 0 of a page this database does not hold


def test_a_delivery_is_news_without_a_store_read(store, notifier, follow_of):
    store.save("home", "v1", "null")
    follow = follow_of(store, notifier, since=0)
    follow.take(follow.read())
    assert follow.new_change(full=False) is None  # nothing delivered
    store.save("home", "v2", "null")
    notifier.refresh(store, "home")
    store.save("home", "v3", "null")  # saved, not delivered: only a read of the store would see it
    change = follow.new_change(full=False)
    assert (change.version, change.html) == (2, "v2")
    assert follow.new_change(full=False) is None  # once, and still no read
    assert follow.new_change(full=True).version == 3  # only a full look reads


def test_a_full_look_finds_what_no_delivery_brought(store, notifier, follow_of):
    follow = follow_of(store, notifier)
    follow.take(follow.read())
    store.save("home", "missed", "null")  # saved, never delivered (a missed wake-up)
    assert follow.new_change(full=False) is None
    change = follow.new_change(full=True)
    assert (change.version, change.html) == (1, "missed")
    assert follow.new_change(full=True) is None


def test_a_slow_subscriber_skips_to_the_newest(store, notifier, follow_of):
    follow = follow_of(store, notifier)
    follow.take(follow.read())
    for n in range(1, 4):
        store.save("home", f"v{n}", "null")
        notifier.refresh(store, "home")
    change = follow.new_change(full=False)
    assert (change.version, change.html) == (3, "v3")
    assert follow.new_change(full=True) is None


def test_a_delete_is_news_as_a_tombstone(store, notifier, follow_of):
    store.save("home", "v1", "null")
    follow = follow_of(store, notifier, since=1)
    follow.take(follow.read())
    store.delete("home")
    notifier.refresh(store, "home")
    change = follow.new_change(full=False)
    assert (change.version, change.deleted, change.html, change.changed) == (2, True, "", True)


def test_a_new_database_starts_the_subscriber_over(store, notifier, database, epoch, follow_of):
    store.save("home", "v1", "null")
    store.save("home", "v2", "null")
    follow = follow_of(store, notifier, since=2)
    follow.take(follow.read())
    notifier.refresh(store, "home")  # version 2 of the old database, delivered and not news
    assert follow.new_change(full=False) is None
    restore_in_place(database)
    change = follow.new_change(full=True)
    assert (change.epoch, change.version, change.html) == ("restored", 2, "v2")  # whole, though not newer
    assert (follow.epoch, follow.sent) == ("restored", 2)
    # The old database's delivery still sits in the subscription: it is not news again.
    assert follow.new_change(full=False) is None
    assert follow.new_change(full=True) is None


def test_a_delivery_from_another_database_is_news_whatever_its_version(store, notifier, database, follow_of):
    for n in range(1, 4):
        store.save("home", f"v{n}", "null")
    follow = follow_of(store, notifier, since=3)
    follow.take(follow.read())
    restore_in_place(database)
    notifier.refresh(store, "home")
    change = follow.new_change(full=False)
    assert (change.epoch, change.version) == ("restored", 3)
    assert follow.new_change(full=False) is None


def test_presence_not_asked_for_is_never_read_nor_news(store, notifier, follow_of):
    beat(store, "tab-a")
    notifier.refresh_presence(store, "home")
    follow = follow_of(store, notifier)
    assert follow.read_presence() is None
    assert follow.new_presence(full=False) is None
    assert follow.new_presence(full=True) is None


def test_presence_held_reads_only_its_version(store, notifier, follow_of):
    version = beat(store, "tab-a").version
    follow = follow_of(store, notifier, presence=version)
    present = follow.read_presence()
    assert (present.version, present.count, present.editors) == (version, 0, ())  # the version alone
    assert follow.take_presence(present) is None


def test_another_presence_list_is_news_once(store, notifier, follow_of):
    follow = follow_of(store, notifier, presence=0)
    assert follow.take_presence(follow.read_presence()) is None  # nobody, as held
    beat(store, "tab-a")
    notifier.refresh_presence(store, "home")
    present = follow.new_presence(full=False)
    assert (present.count, [name for _id, name, _state in present.editors]) == (1, ["tab-a"])
    assert follow.presence_sent == present.version
    assert follow.new_presence(full=False) is None
    assert follow.new_presence(full=True) is None


def test_a_delivered_presence_list_read_past_is_not_sent_again(store, notifier, follow_of):
    follow = follow_of(store, notifier, presence=0)
    beat(store, "tab-a")
    notifier.refresh_presence(store, "home")
    first = follow.new_presence(full=False)
    beat(store, "tab-a", state="editing")  # never delivered: found by a full look
    second = follow.new_presence(full=True)
    assert second.version != first.version and second.editing == 1
    # The first list is still the subscription's delivery: looked at already, it is no news.
    assert follow.new_presence(full=False) is None


def test_both_kinds_of_news_are_taken_from_the_deliveries(store, notifier, follow_of):
    follow = follow_of(store, notifier, presence=0)
    follow.take(follow.read())
    store.save("home", "v1", "null")
    beat(store, "tab-a")
    notifier.refresh(store, "home")
    notifier.refresh_presence(store, "home")
    store.save("home", "v2", "null")  # neither delivered
    beat(store, "tab-b")
    assert follow.new_change(full=False).version == 1
    assert follow.new_presence(full=False).count == 1
    assert follow.new_change(full=True).version == 2
    assert follow.new_presence(full=True).count == 2
