"""Polls from memory on PostgreSQL: each process remembers the pages it is polled about (stores/memory.py).

An unchanged poll, and a changed one for a page read before, is answered
without a round trip while the listener vouches for what was heard. The
unit tests hold PageMemory to its rules (the races of a read with the
notifications, its byte budget); the others run on real PostgreSQL and
gunicorn: polls come from memory, saves through another instance still
reach them, and a listener cut off between a save and a poll, or down
while a save lands, never lets an older version out.
"""

import math
import threading
import time

import psycopg
import pytest
import requests

from changefeed.core.outcomes import Change
from changefeed.stores.memory import PageMemory
from changefeed.stores.postgres_notify import APPLICATION_NAME, unread_on
from support.clients import GENEROUS_S, http_save, scrape, value, wait_until
from support.databases import TEST_DATABASE_URL

EPOCH = "e0"
QUIET = {"CHANGEFEED_SSE_HEARTBEAT_MS": "600000"}  # no heartbeat: a remembered read answers for 10 minutes


def trusted(budget=1 << 20):
    """A memory its listener vouches for, with nothing unread, from now on."""
    memory = PageMemory(budget)
    memory.trust(math.inf, lambda: False)
    return memory


def read(memory, slug, change):
    """What a read of the database does: mark the page, read it, keep what was read."""
    entry = memory.begin(slug)
    memory.store(slug, entry, change)


def whole(version, html="<p>x</p>", epoch=EPOCH):
    return Change(epoch, version, "2026-11-23T21:24:37.444Z", html, "null")


def brief(version, epoch=EPOCH):
    return Change(epoch, version, "2026-11-23T21:24:37.444Z")


# --- PageMemory, on its own ----------------------------------------------------------------------------


def test_the_memory_answers_the_version_it_heard_to_a_client_that_knows_no_newer_one():
    memory = trusted()
    read(memory, "home", whole(3))
    assert memory.answer("home", 3, EPOCH) == brief(3)  # unchanged: no page body, as the database says it
    assert memory.answer("home", 3, None) == brief(3)
    assert memory.answer("home", 0, EPOCH) == whole(3)
    assert memory.answer("home", 4, EPOCH) is None  # the client knows a version we did not hear of: we lag
    assert memory.answer("other", 0, EPOCH) is None  # never asked about
    memory.heard("home", 4)
    assert memory.answer("home", 3, EPOCH) is None  # behind: the database answers
    read(memory, "home", whole(4))
    assert memory.answer("home", 3, EPOCH) == whole(4)


def test_a_page_that_does_not_exist_is_remembered_as_version_0_until_a_save_is_heard():
    memory = trusted()
    read(memory, "new", Change(EPOCH, 0))
    assert memory.answer("new", 0, EPOCH) == Change(EPOCH, 0)
    memory.heard("new", 1)
    assert memory.answer("new", 0, EPOCH) is None


def test_a_save_heard_while_the_page_was_read_keeps_that_read_from_answering():
    memory = trusted()
    entry = memory.begin("home")  # the read's snapshot comes after this
    memory.heard("home", 2)  # a save the read may have missed
    memory.store("home", entry, whole(1))
    assert memory.answer("home", 1, EPOCH) is None
    assert memory.answer("home", 0, EPOCH) is None
    read(memory, "home", whole(2))
    assert memory.answer("home", 0, EPOCH) == whole(2)


def test_a_read_that_comes_back_after_a_newer_one_does_not_replace_it():
    memory = trusted()
    first, second = memory.begin("home"), memory.begin("home")
    memory.store("home", second, whole(2))
    memory.store("home", first, whole(1))
    assert memory.answer("home", 0, EPOCH) == whole(2)


def test_a_read_begun_before_a_clear_is_not_kept():
    memory = trusted()
    entry = memory.begin("home")
    memory.clear()  # the listener lost its connection: saves may have gone unheard since the read began
    memory.store("home", entry, whole(1))
    assert memory.answer("home", 1, EPOCH) is None and len(memory) == 0
    read(memory, "home", whole(1))  # a read begun after the clear is kept
    assert memory.answer("home", 1, EPOCH) == brief(1)


def test_a_read_whose_page_was_forgotten_meanwhile_is_not_kept_in_the_pages_new_entry():
    memory = trusted()
    entry = memory.begin("home")
    memory.heard("home", 2)  # heard by the entry that is about to go
    memory.clear()
    memory.begin("home")  # asked about again: a new entry, which did not hear of version 2
    memory.store("home", entry, whole(1))
    assert memory.answer("home", 1, EPOCH) is None


def test_notifications_of_pages_never_asked_about_keep_nothing():
    memory = trusted()
    for n in range(100):
        memory.heard(f"page-{n}", 1)
    assert len(memory) == 0 and memory.size == 0


def test_the_memory_keeps_to_its_budget_in_bytes_forgetting_the_page_asked_about_least_recently():
    page = "x" * 10_000
    memory = trusted(budget=100_000)  # room for four pages of 10 kB (their text and their answer's)
    for n in range(4):
        read(memory, f"page-{n}", whole(1, page))
    assert len(memory) == 4 and memory.size <= memory.budget
    assert memory.answer("page-0", 1, EPOCH) is not None  # asked about: now the most recent
    read(memory, "page-4", whole(1, page))
    assert memory.size <= memory.budget
    assert memory.answer("page-1", 1, EPOCH) is None  # the least recently asked about went
    assert all(memory.answer(f"page-{n}", 1, EPOCH) is not None for n in (0, 2, 3, 4))
    read(memory, "huge", whole(1, "x" * 200_000))  # bigger than the whole budget: not kept, nothing evicted
    assert memory.answer("huge", 1, EPOCH) is None and len(memory) == 4


def test_a_whole_page_is_answered_only_when_it_was_read_whole_and_a_brief_read_keeps_it():
    memory = trusted()
    read(memory, "home", brief(2))  # an unchanged poll read no body
    assert memory.answer("home", 2, EPOCH) == brief(2)
    assert memory.answer("home", 1, EPOCH) is None
    read(memory, "home", whole(2))
    read(memory, "home", brief(2))  # the same version again, without its body: the body stays
    assert memory.answer("home", 1, EPOCH) == whole(2)


def test_a_client_of_another_database_is_left_to_the_database():
    memory = trusted()
    read(memory, "home", whole(2))
    assert memory.answer("home", 2, "another") is None


def test_nothing_is_answered_untrusted_past_the_lease_or_with_input_unread():
    memory = PageMemory(1 << 20)
    read(memory, "home", whole(1))
    assert memory.answer("home", 1, EPOCH) is None  # nobody vouched for it yet
    unread = [False]
    memory.trust(time.monotonic() + 60, lambda: unread[0])
    assert memory.answer("home", 1, EPOCH) == brief(1)
    unread[0] = True  # a notification (or a backend's end) waits on the listener's socket
    assert memory.answer("home", 1, EPOCH) is None
    memory.trust(time.monotonic() - 1, lambda: False)  # no round trip for its whole lease
    assert memory.answer("home", 1, EPOCH) is None
    memory.trust(math.inf, lambda: False)
    memory.distrust()
    assert memory.answer("home", 1, EPOCH) is None


def test_a_read_answers_no_longer_than_its_max_age():
    memory = PageMemory(1 << 20, max_age_s=0.2)
    memory.trust(math.inf, lambda: False)
    read(memory, "home", whole(1))
    assert memory.answer("home", 1, EPOCH) == brief(1)
    time.sleep(0.25)
    assert memory.answer("home", 1, EPOCH) is None  # a change nothing announced reaches the next read


def test_a_memory_of_0_bytes_is_off():
    memory = PageMemory(0)
    memory.trust(math.inf, lambda: False)
    read(memory, "home", whole(1))
    assert not memory.enabled and memory.answer("home", 1, EPOCH) is None and len(memory) == 0


# --- on PostgreSQL ---------------------------------------------------------------------------------------


@pytest.mark.postgres_only
def test_what_the_memory_answers_is_what_the_database_answers(make_store, epoch):
    """Every (since, epoch) a client may send, for a page, a deleted one and a missing one: the same Change."""
    remembering, plain = make_store(), make_store(poll_memory_bytes=0)
    remembering.memory.trust(math.inf, lambda: False)  # no listener here: its own saves are all there is
    for n in (1, 2, 3):
        remembering.save("page", f"<p>v{n}</p>", f'{{"n":{n}}}')
    remembering.save("gone", "<p>x</p>", "null")
    remembering.delete("gone")
    answered = 0
    for slug in ("page", "gone", "missing"):
        for since in (0, 1, 2, 3, 4):
            for client_epoch in (None, epoch, "another"):
                remembering.changes(slug, 0)  # read whole once
                expected = plain.changes(slug, since, client_epoch)
                remembered = remembering.memory.answer(slug, since, client_epoch)
                assert remembering.changes(slug, since, client_epoch) == expected
                if remembered is not None:
                    answered += 1
                    assert remembered == expected, (slug, since, client_epoch)
    # page: since 0..3, gone: 0..2, missing: 0, each for the client's epoch or none
    assert answered == 2 * (4 + 3 + 1)


@pytest.mark.postgres_only
def test_the_check_for_unread_input_sees_a_notification_and_a_killed_backend(database):
    with psycopg.connect(database.url, autocommit=True, application_name=APPLICATION_NAME) as listener:
        listener.execute("LISTEN changefeed")
        unread = unread_on(listener)
        assert not unread()
        with psycopg.connect(database.url, autocommit=True) as saver:
            saver.execute("NOTIFY changefeed, '[[\"home\",1]]'")
        wait_until(unread, timeout=GENEROUS_S, what="the notification on the socket")
        assert [n.payload for n in listener.notifies(timeout=0)] == ['[["home",1]]']
        assert not unread()
        took = _mean_seconds(unread)
        with psycopg.connect(TEST_DATABASE_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (listener.info.backend_pid,))
        wait_until(unread, timeout=GENEROUS_S, what="the end of the backend on the socket")
    assert took < 0.001  # about a microsecond (docs/postgresql.md); this bound only catches a blocking check


def _mean_seconds(check, times=10_000):
    started = time.perf_counter()
    for _ in range(times):
        check()
    return (time.perf_counter() - started) / times


def reads(server):
    """(answers from memory, reads of the database) of the server's workers so far."""
    samples = scrape(server)
    return (value(samples, "changefeed_page_reads_total", source="memory"),
            value(samples, "changefeed_page_reads_total", source="database"))


def poll(server, slug, since=0):
    response = requests.get(f"{server.url}/changes?slug={slug}&since={since}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def polls_from_memory(server, slug, since, times=20):
    """Poll `times` times; return how many were answered from memory (each answer checked by the caller's next poll)."""
    memory_before, _ = reads(server)
    answers = {poll(server, slug, since)["version"] for _ in range(times)}
    memory_after, _ = reads(server)
    assert len(answers) == 1, answers
    return memory_after - memory_before


def listeners(database):
    name = psycopg.conninfo.conninfo_to_dict(database.url)["dbname"]
    with psycopg.connect(TEST_DATABASE_URL, autocommit=True) as admin:
        return admin.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                             (name, APPLICATION_NAME)).fetchall()


def kill_listeners(database, allow_connections=True):
    """Terminate every listener of the test's database and wait until they are gone (refusing new ones, if asked)."""
    name = psycopg.conninfo.conninfo_to_dict(database.url)["dbname"]
    with psycopg.connect(TEST_DATABASE_URL, autocommit=True) as admin:
        if not allow_connections:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        pids = [pid for (pid,) in listeners(database)]
        admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
    wait_until(lambda: not set(pids) & {pid for (pid,) in listeners(database)}, timeout=10,
               what="the listeners to be gone")


def allow_connections(database):
    name = psycopg.conninfo.conninfo_to_dict(database.url)["dbname"]
    with psycopg.connect(TEST_DATABASE_URL, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")


@pytest.mark.postgres_only
def test_unchanged_polls_come_from_memory_and_follow_saves_through_another_instance(make_server):
    one, other = make_server(workers=2), make_server(workers=2)
    assert http_save(one, slug="memo", html="v1") == 1
    poll(other, "memo", 1)  # each worker starts its listener on its first poll
    wait_until(lambda: polls_from_memory(other, "memo", 1) >= 18, timeout=10, what="polls answered from memory")
    for version in (2, 3, 4):
        saved_at = time.monotonic()
        assert http_save(one, slug="memo", html=f"v{version}") == version
        # The other instance learns of it by NOTIFY: each of its workers, within milliseconds.
        wait_until(lambda: all(poll(other, "memo", 0)["version"] == version for _ in range(10)),
                   timeout=GENEROUS_S, what=f"version {version} on the other instance")
        assert time.monotonic() - saved_at < GENEROUS_S
        answer = poll(other, "memo", version - 1)
        assert (answer["version"], answer["html"]) == (version, f"v{version}")
        # ...and from memory again: whole to a client behind, unchanged to one that has it.
        assert polls_from_memory(other, "memo", version - 1) >= 10
        assert polls_from_memory(other, "memo", version) >= 10
    # A client that saves and then polls the same instance never gets an older version.
    for version in (5, 6, 7):
        assert http_save(other, slug="memo", html=f"v{version}") == version
        assert poll(other, "memo", 0)["version"] == version


@pytest.mark.postgres_only
def test_a_listener_cut_off_between_a_save_and_a_poll_never_lets_an_older_version_out(make_server, database):
    """The issue's proof: a killed listener, and a save made while it is down, still give the newest version."""
    one, other = make_server(workers=1), make_server(workers=1)
    assert http_save(one, slug="kept", html="v1") == 1
    poll(other, "kept", 1)
    wait_until(lambda: polls_from_memory(other, "kept", 1) >= 18, timeout=10, what="polls answered from memory")
    # A save, the listener killed at once, then the poll: the newest version, whatever the order they meet in.
    for version in (2, 3, 4):
        assert http_save(one, slug="kept", html=f"v{version}") == version
        kill_listeners(database)
        assert poll(other, "kept", version - 1)["version"] == version
        wait_until(lambda: len(listeners(database)) == 2, timeout=10, what="both listeners back")
        wait_until(lambda: polls_from_memory(other, "kept", version) >= 18, timeout=10,
                   what="polls answered from memory again")
    # A save made while the listener is down (and cannot come back): its NOTIFY is lost for good.
    kill_listeners(database, allow_connections=False)
    try:
        memory_before, database_before = reads(other)
        assert http_save(one, slug="kept", html="v5") == 5  # through a pooled connection that stayed
        for since in (4, 0):
            answer = poll(other, "kept", since)
            assert (answer["version"], answer["html"]) == (5, "v5")
        assert polls_from_memory(other, "kept", 5) == 0  # nothing from memory while nobody listens
        memory_after, database_after = reads(other)
        assert memory_after == memory_before and database_after - database_before >= 22
    finally:
        allow_connections(database)
    wait_until(lambda: polls_from_memory(other, "kept", 5) >= 18, timeout=10, what="polls from memory once it listens")


@pytest.mark.postgres_only
def test_a_row_changed_without_notify_reaches_the_memory_by_the_catch_up_read(make_server, database):
    """A row changed by hand, without NOTIFY: the memory answered what it heard, and the listener's catch-up
    read (about once a second) tells it of the new version, so polls read it from the database again."""
    server = make_server(workers=1, env=QUIET)
    assert http_save(server, slug="hand", html="v1") == 1
    poll(server, "hand", 0)
    wait_until(lambda: polls_from_memory(server, "hand", 0) >= 18, timeout=10, what="polls answered from memory")
    database.query("UPDATE page_versions SET version = 2, html = 'by hand' WHERE slug = 'hand'")
    wait_until(lambda: poll(server, "hand", 0)["version"] == 2, timeout=5, what="the hand-made version")
    assert poll(server, "hand", 0)["html"] == "by hand"


@pytest.mark.postgres_only
def test_a_memory_of_0_bytes_leaves_every_poll_to_the_database(make_server):
    server = make_server(workers=1, env={"CHANGEFEED_POLL_MEMORY_BYTES": "0"})
    http_save(server, slug="off", html="v1")
    assert polls_from_memory(server, "off", 1) == 0
    assert reads(server)[1] >= 20


@pytest.mark.postgres_only
def test_a_notification_waiting_unread_on_the_listeners_socket_sends_the_poll_to_the_database(
        make_server, open_stream, database):
    """The listener is held up reading another page; a save's NOTIFY reaches its socket meanwhile: a poll
    that comes then must not get the version the memory holds, though nothing told the memory yet."""
    server = make_server(workers=1, env=QUIET)
    assert http_save(server, slug="home", html="v1") == 1
    poll(server, "home", 1)
    wait_until(lambda: polls_from_memory(server, "home", 1) >= 18, timeout=10, what="polls answered from memory")
    stream = open_stream(f"{server.url}/events?slug=busy")
    stream.next()  # retry: subscribed, so the listener reads "busy" when it is notified of it
    with psycopg.connect(database.url, autocommit=True) as locker, \
            psycopg.connect(database.url, autocommit=True) as saver:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE epoch IN ACCESS EXCLUSIVE MODE")  # every read of a page waits
        saver.execute("""NOTIFY changefeed, '[["busy",1]]'""")
        time.sleep(0.3)  # the listener reads "busy", and waits
        with saver.transaction():  # a save as the service makes it: the row, then its NOTIFY
            saver.execute("UPDATE page_versions SET version = 2, html = 'v2' WHERE slug = 'home'")
            saver.execute("""NOTIFY changefeed, '[["home",2]]'""")
        time.sleep(0.2)  # ...which sits unread on the listener's socket
        answer: dict = {}
        poller = threading.Thread(target=lambda: answer.update(poll(server, "home", 1)))
        poller.start()
        poller.join(0.5)
        assert not answer, "answered from memory while a notification waited unread"
        locker.execute("ROLLBACK")
    poller.join(10)
    assert (answer["version"], answer["html"]) == (2, "v2")
