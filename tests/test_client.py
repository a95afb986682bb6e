"""The Python client (client/, `changefeed_client`) against the service under gunicorn: sync and async.

Saves are retried with one Idempotency-Key through lost answers and server
restarts and stored once; the service's errors come back as their classes;
watches and feeds go on across `kill -9`, a restored database (a new epoch)
and a slow consumer, and end at the newest version.
"""

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import pytest
import requests
from httpx_sse import ServerSentEvent

from changefeed_client import (
    AsyncClient,
    AuthError,
    Change,
    ChangefeedError,
    Client,
    Conflict,
    InvalidRequest,
    Page,
    Reset,
    TooManyRequests,
    Unavailable,
)
from changefeed_client.retries import Reconnect
from support import ROOT
from support.clients import SECRET, http_save, scrape, token, value
from support.proxy import AnswerCutter

WAIT_S = 30  # generous: a watch reconnects within seconds; this only catches one that never does


def run_async(test: Callable[[], Any]) -> Any:
    """Run an async test body on an event loop of its own, in a thread of its own.

    Not on this thread: a session's Playwright (the browser tests) keeps an
    event loop running on it, and asyncio refuses to run a second one there.
    """
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, test()).result(timeout=WAIT_S * 2)


def collect(items: Iterator[Any], done: Callable[[list[Any]], bool], timeout: float = WAIT_S) -> list[Any]:
    """Iterate in a thread until `done(got)`; fail with what came if that takes longer than `timeout`."""
    got: list[Any] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            for item in items:
                got.append(item)
                if done(got):
                    return
        except BaseException as error:  # handed to the test, not lost in the thread
            failed.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if failed:
        raise failed[0]
    assert not thread.is_alive(), f"still waiting after {timeout} s; got {got}"
    return got


def at_version(slug: str, version: int) -> Callable[[list[Any]], bool]:
    return lambda got: any(item.slug == slug and item.version == version for item in got)


def stored_version(database: Any, slug: str) -> int:
    """The page's version as the database holds it (0: never saved), read past the service."""
    rows = database.query("SELECT version FROM page_versions WHERE slug = ?", (slug,))
    return int(rows[0][0]) if rows else 0


def assert_newer_each_time(pages: list[Page]) -> None:
    """Within one database (epoch) no page is ever given at a version at or below one given before."""
    held: dict[tuple[str, str], int] = {}
    for page in pages:
        assert page.version > held.get((page.epoch, page.slug), -1), f"{page} came after version {held}"
        held[(page.epoch, page.slug)] = page.version


def nested(depth: int) -> list[Any]:
    data: list[Any] = []
    for _ in range(depth):
        data = [data]
    return data


def save_in_thread(url: str, slug: str, html: str, done: list[Any], **options: Any) -> threading.Thread:
    def save() -> None:
        with Client(url, **options) as client:
            done.append(client.save(slug, html))

    thread = threading.Thread(target=save)
    thread.start()
    return thread


def restart_later(server: Any, after: float, saves: tuple[tuple[str, str], ...] = ()) -> threading.Thread:
    """Start the server again in `after` seconds, then make these saves (slug, html); meanwhile it is down."""
    def restart() -> None:
        time.sleep(after)
        server.start()
        for slug, html in saves:
            http_save(server, slug, html)

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    return thread


def restore(db_path: str, backup: sqlite3.Connection) -> str:
    """The documented restore: copy the backup over the database, then `python migrate.py --new-epoch`."""
    backup.backup(sqlite3.connect(db_path))
    result = subprocess.run([sys.executable, "migrate.py", "--new-epoch"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "CHANGEFEED_DB": db_path, "CHANGEFEED_DATABASE_URL": ""})
    assert result.returncode == 0, result.stderr
    return sqlite3.connect(db_path).execute("SELECT value FROM epoch").fetchone()[0]


# Saves.

def test_save_stores_one_version_and_get_reads_it_back(server):
    with Client(server.url) as client:
        first = client.save("home", "<h1>One</h1>", {"n": 1})
        second = client.save("home", "<h1>Two</h1>")
        page = client.get("home")
        assert client.get("never-saved") is None
    assert (first.version, second.version, first.replayed) == (1, 2, False)
    assert page == Page("home", 2, "<h1>Two</h1>", None, second.updated_at, second.epoch)


def test_a_save_whose_answer_is_lost_while_the_server_is_killed_and_restarted_is_stored_once(server, database):
    """The worst moment: stored, then the answer is cut off and the server dies; the retry learns it was stored."""
    restarts: list[threading.Thread] = []

    def crash() -> None:
        server.kill()
        restarts.append(restart_later(server, after=1.0))

    proxy = AnswerCutter(server.port, cuts=1, on_cut=crash)
    try:
        with Client(proxy.url) as client:
            saved = client.save("home", "<h1>Once</h1>")
            again = client.save("home", "<h1>Twice</h1>")
    finally:
        proxy.close()
    assert restarts, "the proxy never cut an answer"
    restarts[0].join()
    assert (saved.version, saved.replayed) == (1, True)  # the retry got the first attempt's answer
    assert again.version == 2
    assert stored_version(database, "home") == 2
    assert proxy.connections >= 3  # the cut one, at least one refused while down, the one that answered


def test_a_save_held_by_another_writer_while_the_server_is_killed_is_stored_once_after_the_restart(server, database):
    release = database.hold_writes()
    done: list[Any] = []
    thread = save_in_thread(server.url, "home", "x", done, retry_for=WAIT_S)
    time.sleep(0.5)  # the save waits for the lock inside the server
    server.kill()
    release()
    server.start()
    thread.join(WAIT_S)
    assert done and done[0].version == 1
    assert stored_version(database, "home") == 1


def test_a_busy_answer_is_retried_after_its_retry_after(make_server, database):
    server = make_server(env={"CHANGEFEED_BUSY_TIMEOUT_MS": "200"})
    release = database.hold_writes()
    done: list[Any] = []
    started = time.monotonic()
    thread = save_in_thread(server.url, "home", "x", done)
    time.sleep(0.3)
    release()  # free again long before Retry-After (1 s) is over
    thread.join(WAIT_S)
    took = time.monotonic() - started
    saved = done[0]
    assert saved.version == 1 and not saved.replayed
    assert value(scrape(server), "changefeed_saves_total", outcome="busy") == 1, "the first attempt was not refused"
    assert took >= 1.0, f"retried after {took:.2f} s: sooner than the answer's Retry-After: 1"


def test_retries_end_after_retry_for_and_the_same_key_saves_it_later(server, database):
    server.kill()
    started = time.monotonic()
    with Client(server.url, retry_for=1.5) as client:
        with pytest.raises(Unavailable) as refused:
            client.save("home", "<h1>Later</h1>")
        took = time.monotonic() - started
        assert 0.3 < took < 1.5 + 1, f"gave up after {took:.2f} s with retry_for=1.5"
        assert refused.value.status is None and refused.value.idempotency_key
        server.start()
        saved = client.save("home", "<h1>Later</h1>", idempotency_key=refused.value.idempotency_key)
        replay = client.save("home", "<h1>Later</h1>", idempotency_key=refused.value.idempotency_key)
    assert (saved.version, saved.replayed, replay.version, replay.replayed) == (1, False, 1, True)
    assert stored_version(database, "home") == 1


def test_a_stale_base_version_raises_conflict_with_the_stored_version_and_writes_nothing(server, database):
    with Client(server.url) as client:
        client.save("home", "v1")
        client.save("home", "v2", base_version=1)
        with pytest.raises(Conflict) as conflict:
            client.save("home", "mine", base_version=1)
    assert (conflict.value.status, conflict.value.version, conflict.value.error) == (409, 2, "conflict")
    assert stored_version(database, "home") == 2


def test_bad_fields_raise_invalid_request_naming_each_field_and_write_nothing(server, database):
    with Client(server.url) as client:
        with pytest.raises(InvalidRequest) as invalid:
            client.save("no spaces", "x")
        with pytest.raises(InvalidRequest) as too_big:
            client.save("home", "x", base_version=-1)
    assert list(invalid.value.fields) == ["slug"] and invalid.value.status == 422
    assert list(too_big.value.fields) == ["base_version"]
    assert isinstance(invalid.value, ChangefeedError) and invalid.value.request_id
    assert database.query("SELECT count(*) FROM page_versions")[0][0] == 0


def test_a_missing_or_narrow_token_raises_auth_error_and_a_good_one_saves(make_server, database):
    server = make_server(env={"CHANGEFEED_JWT_SECRET": SECRET})
    with Client(server.url) as anonymous, pytest.raises(AuthError) as missing:
        anonymous.save("docs-a", "x")
    with Client(server.url, token=token(write=["docs-*"])) as editor:
        with pytest.raises(AuthError) as narrow:
            editor.save("blog-a", "x")
        saved = editor.save("docs-a", "x")
    assert (missing.value.status, narrow.value.status, saved.version) == (401, 403, 1)
    assert stored_version(database, "blog-a") == 0


# Watching pages.

def test_watch_gives_the_page_now_then_each_save_and_nothing_twice(server):
    http_save(server, "home", "v1")
    with Client(server.url) as client:
        pages = client.watch("home")
        got = collect(pages, at_version("home", 1))
        for n in (2, 3):
            http_save(server, "home", f"v{n}")
            got += collect(pages, at_version("home", n))
    assert [(p.version, p.html) for p in got] == [(1, "v1"), (2, "v2"), (3, "v3")]


def test_watch_goes_on_across_kill_9_and_restart_and_ends_at_the_newest_version(server):
    with Client(server.url) as client:
        pages = client.watch("home")
        http_save(server, "home", "v1")
        got = collect(pages, at_version("home", 1))
        server.kill()  # the stream breaks; the watch reconnects, refused, until the server is back
        restart = restart_later(server, after=1.0, saves=(("home", "v2"), ("home", "v3"), ("home", "v4")))
        got += collect(pages, at_version("home", 4))
        restart.join()
    assert_newer_each_time(got)
    assert (got[-1].version, got[-1].html) == (4, "v4")


def test_watch_of_a_slow_consumer_ends_at_the_newest_version(server):
    with Client(server.url) as client:
        pages = client.watch("home")
        http_save(server, "home", "v1")
        got = collect(pages, at_version("home", 1))
        for n in range(2, 101):
            http_save(server, "home", "x" * 10_000 + str(n))

        def slow(pages: Iterator[Page]) -> Iterator[Page]:
            for page in pages:
                time.sleep(0.02)  # a consumer that does real work per version
                yield page

        got += collect(slow(pages), at_version("home", 100), timeout=60)
    assert_newer_each_time(got)
    assert got[-1].html.endswith("100")


@pytest.mark.sqlite_only
def test_watch_starts_over_when_the_database_is_restored_with_a_new_epoch(server, db_path, epoch, tmp_path):
    http_save(server, "home", "v1")
    backup = sqlite3.connect(str(tmp_path / "backup.sqlite3"))
    sqlite3.connect(db_path).backup(backup)
    http_save(server, "home", "v2")
    with Client(server.url) as client:
        pages = client.watch("home")
        got = collect(pages, at_version("home", 2))
        new_epoch = restore(db_path, backup)
        got += collect(pages, lambda got: got[-1].epoch == new_epoch)
        http_save(server, "home", "v2 again")
        got += collect(pages, lambda got: got[-1].html == "v2 again")
    assert [(p.version, p.epoch, p.html) for p in got] == [
        (2, epoch, "v2"), (1, new_epoch, "v1"), (2, new_epoch, "v2 again")]


def test_watch_of_slugs_gives_each_named_page_and_no_other(server):
    for slug in ("a", "b", "c"):
        http_save(server, slug, f"{slug}1")
    with Client(server.url) as client:
        pages = client.watch(slugs=["a", "b"])
        got = collect(pages, lambda got: len(got) == 2)
        http_save(server, "c", "c2"), http_save(server, "b", "b2")
        got += collect(pages, at_version("b", 2))
    assert sorted((p.slug, p.html) for p in got) == [("a", "a1"), ("b", "b1"), ("b", "b2")]


def test_watch_of_a_prefix_goes_on_across_kill_9_and_restart_and_ends_at_every_pages_newest(server):
    http_save(server, "docs-a", "a1"), http_save(server, "blog-a", "no")
    with Client(server.url) as client:
        pages = client.watch(prefix="docs-")
        got = collect(pages, at_version("docs-a", 1))
        server.kill()
        restart = restart_later(server, after=1.0, saves=(("docs-a", "a2"), ("docs-b", "b1"), ("docs-a", "a3")))
        got += collect(pages, lambda got: at_version("docs-a", 3)(got) and at_version("docs-b", 1)(got))
        restart.join()
    assert_newer_each_time(got)
    assert all(page.slug.startswith("docs-") for page in got)
    assert {(p.slug, p.html) for p in got} >= {("docs-a", "a3"), ("docs-b", "b1")}


def test_a_watch_the_token_may_not_read_raises_auth_error_instead_of_retrying(make_server):
    server = make_server(env={"CHANGEFEED_JWT_SECRET": SECRET, "CHANGEFEED_AUTH_READS": "1"})
    with Client(server.url, token=token(read=["docs-*"])) as client:
        with pytest.raises(AuthError) as refused:  # not retried: collect fails after 10 s if it is
            collect(client.watch("blog-a"), lambda got: True, timeout=10)
        with pytest.raises(AuthError):
            collect(client.watch(prefix="blog-"), lambda got: True, timeout=10)
    assert refused.value.status == 403


def test_reconnects_wait_the_services_retry_jittered_and_double_on_each_failure_up_to_the_cap():
    reconnect = Reconnect(cap=1.0)
    reconnect.saw(ServerSentEvent(retry=200))  # the stream's first event: `retry: 200`
    first, second, third, fourth = (reconnect.failed() for _ in range(4))
    assert 0.1 <= first <= 0.2 and 0.2 <= second <= 0.4 and 0.4 <= third <= 0.8 and 0.5 <= fourth <= 1.0


# The feed.

def test_feed_gives_changes_with_cursors_and_resumes_after_a_cursor(server):
    for slug in ("docs-a", "docs-b", "docs-c"):
        http_save(server, slug, slug)
    with Client(server.url) as client:
        changes = collect(client.feed(prefix="docs-"), lambda got: len(got) == 3)
        assert [c.slug for c in changes] == ["docs-a", "docs-b", "docs-c"]
        assert all(isinstance(c, Change) and c.html is None for c in changes)
        http_save(server, "docs-a", "again")
        resumed = collect(client.feed(changes[1].cursor, prefix="docs-", payload="full"), lambda got: len(got) == 2)
    assert [(c.slug, c.version, c.html) for c in resumed] == [("docs-c", 1, "docs-c"), ("docs-a", 2, "again")]


@pytest.mark.sqlite_only
def test_feed_from_a_cursor_of_a_restored_database_resets_then_lists_every_page(server, db_path, tmp_path):
    http_save(server, "a", "a1")
    backup = sqlite3.connect(str(tmp_path / "backup.sqlite3"))
    sqlite3.connect(db_path).backup(backup)
    http_save(server, "b", "b1")
    with Client(server.url) as client:
        cursor = collect(client.feed(), lambda got: len(got) == 2)[-1].cursor
        new_epoch = restore(db_path, backup)
        items = collect(client.feed(cursor), lambda got: len(got) == 2)  # the reset, then page a
    assert items[0] == Reset(new_epoch), items
    assert (items[1].slug, items[1].epoch) == ("a", new_epoch), items


# Presence.

def test_a_beat_lists_this_client_and_a_second_one_too_soon_raises_too_many_requests(server):
    with Client(server.url) as client:
        beat = client.beat("home", "Ada", "editing")
        with pytest.raises(TooManyRequests) as too_soon:
            client.beat("home", "Ada", "viewing")
    listed = requests.get(f"{server.url}/changes", params={"slug": "home", "presence": 0}, timeout=10).json()
    assert [(e["name"], e["state"], e["id"]) for e in listed["presence"]["editors"]] == [("Ada", "editing", beat.you)]
    assert too_soon.value.status == 429 and too_soon.value.retry_after and too_soon.value.retry_after > 0


# The async client: the same calls, awaited.

def test_async_save_retries_a_lost_answer_and_stores_once(server, database):
    proxy = AnswerCutter(server.port, cuts=1)

    async def body() -> tuple[Any, ...]:
        async with AsyncClient(proxy.url) as client:
            saved = await client.save("home", "<h1>Once</h1>", data={"k": 1})
            page = await client.get("home")
            with pytest.raises(Conflict) as conflict:
                await client.save("home", "x", base_version=0)
            with pytest.raises(InvalidRequest) as invalid:
                await client.save("home", "x", data=nested(100))
        return saved, page, conflict, invalid

    try:
        saved, page, conflict, invalid = run_async(body)
    finally:
        proxy.close()
    assert (saved.version, saved.replayed) == (1, True)
    assert page is not None and (page.html, page.data) == ("<h1>Once</h1>", {"k": 1})
    assert conflict.value.version == 1 and "data" in invalid.value.fields
    assert stored_version(database, "home") == 1


def test_async_watch_goes_on_across_kill_9_and_restart_and_ends_at_the_newest_version(server):
    http_save(server, "home", "v1")
    got: list[Page] = []

    async def body() -> threading.Thread:
        async with AsyncClient(server.url) as client:
            pages = client.watch("home")
            with anyio.fail_after(WAIT_S):
                got.append(await anext(pages))
                server.kill()
                restart = restart_later(server, after=1.0, saves=(("home", "v2"), ("home", "v3")))
                while got[-1].version < 3:
                    got.append(await anext(pages))  # refused while the server is down, then resumed
            await pages.aclose()
        return restart

    run_async(body).join()
    assert_newer_each_time(got)
    assert (got[0].version, got[-1].version, got[-1].html) == (1, 3, "v3")


def test_async_feed_and_prefix_watch_follow_saves(server):
    http_save(server, "docs-a", "a1")

    async def body() -> tuple[Any, ...]:
        async with AsyncClient(server.url) as client:
            feed, pages = client.feed(prefix="docs-"), client.watch(prefix="docs-")
            with anyio.fail_after(WAIT_S):
                first_change, first_page = await anext(feed), await anext(pages)
                http_save(server, "blog-a", "no"), http_save(server, "docs-a", "a2")
                second_change, second_page = await anext(feed), await anext(pages)
            await feed.aclose()
            await pages.aclose()
        return first_change, second_change, first_page, second_page

    first_change, second_change, first_page, second_page = run_async(body)
    assert isinstance(first_change, Change) and isinstance(second_change, Change)
    assert [(c.slug, c.version) for c in (first_change, second_change)] == [("docs-a", 1), ("docs-a", 2)]
    assert second_change.cursor != first_change.cursor
    assert [(p.slug, p.html) for p in (first_page, second_page)] == [("docs-a", "a1"), ("docs-a", "a2")]
