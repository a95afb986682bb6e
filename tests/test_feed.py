"""GET /feed: every page saved since a cursor, by prefix, each once at its newest version, on both stores.

The listing and its errors go through Flask's test client; the long-poll,
access control on a real server's tokens, and a reader following the feed
while many writers save (on PostgreSQL beside transactions that commit out
of the order of their ids) run against real gunicorn servers.
"""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import requests

from support.clients import SECRET, token

pytestmark = pytest.mark.engines


def read_all(client, since="0", **params):
    """Follow the feed from `since` to its end, page by page: ([entries], the last `next`)."""
    entries = []
    while True:
        answer = client.get("/feed", query_string={"since": since, **params})
        assert answer.status_code == 200, answer.get_json()
        body = answer.get_json()
        entries += body["changes"]
        if not body["changes"] or body["next"] == since:
            return entries, body["next"]
        since = body["next"]


def test_listing_from_zero_page_by_page_returns_every_page_exactly_once_at_its_newest_version(client, save):
    rng = random.Random(7)
    newest = {}
    for _ in range(120):
        slug = f"page-{rng.randrange(40)}"
        newest[slug] = save(slug, f"<p>{slug}</p>").get_json()["version"]
    entries, _next = read_all(client, limit=7)
    assert sorted((entry["slug"], entry["version"]) for entry in entries) == sorted(newest.items())
    assert len({entry["slug"] for entry in entries}) == len(entries)


def test_after_a_cursor_only_pages_saved_since_come_in_save_order(client, save):
    for slug in ("a", "b", "c"):
        save(slug)
    cursor = client.get("/feed?since=0").get_json()["next"]
    save("b")
    save("d")
    save("a")
    body = client.get(f"/feed?since={cursor}").get_json()
    assert [(entry["slug"], entry["version"]) for entry in body["changes"]] == [("b", 2), ("d", 1), ("a", 2)]
    assert client.get(f"/feed?since={body['next']}").get_json()["changes"] == []


def test_a_page_deleted_since_the_cursor_comes_once_as_a_tombstone(client, save):
    save("gone", "<p>x</p>", {"k": 1})
    cursor = client.get("/feed?since=0").get_json()["next"]
    assert client.post("/delete", json={"slug": "gone"}).status_code == 200
    body = client.get(f"/feed?since={cursor}&include=content").get_json()
    assert [{key: entry[key] for key in ("slug", "version", "deleted")} for entry in body["changes"]] == [
        {"slug": "gone", "version": 2, "deleted": True}]
    assert "html" not in body["changes"][0]


def test_include_content_carries_each_pages_html_and_data(client, save):
    save("docs-a", "<h1>A</h1>", {"n": 1, "tags": ["x"]})
    plain = client.get("/feed?since=0").get_json()["changes"][0]
    assert set(plain) == {"slug", "version", "updated_at"}
    full = client.get("/feed?since=0&include=content").get_json()["changes"][0]
    assert full["html"] == "<h1>A</h1>" and full["data"] == {"n": 1, "tags": ["x"]}


def test_a_prefix_keeps_only_the_pages_under_it_and_its_next_passes_the_others(client, save):
    for slug in ("docs-1", "blog-1", "docs-2", "blog-2", "docsx"):
        save(slug)
    body = client.get("/feed?since=0&prefix=docs-").get_json()
    assert [entry["slug"] for entry in body["changes"]] == ["docs-1", "docs-2"]
    save("blog-3")
    quiet = client.get(f"/feed?since={body['next']}&prefix=docs-").get_json()
    assert quiet["changes"] == [] and quiet["next"] != body["next"]  # past blog-3: not scanned again


def test_an_unchanged_feed_answers_304_to_its_etag(client, save):
    save("a")
    first = client.get("/feed?since=0")
    again = client.get("/feed?since=0", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304
    save("b")
    assert client.get("/feed?since=0", headers={"If-None-Match": first.headers["ETag"]}).status_code == 200


def test_a_cursor_of_another_database_is_gone_and_says_to_start_over(client, save, epoch):
    save("a")
    answer = client.get("/feed?since=0123456789abcdef.1")
    body = answer.get_json()
    assert answer.status_code == 410 and body["error"] == "cursor gone"
    assert "since=0" in body["message"] and body["epoch"] == epoch


def test_a_cursor_past_everything_the_database_saved_is_gone(client, save, epoch):
    save("a")
    answer = client.get(f"/feed?since={epoch}.999999999999")
    assert answer.status_code == 410 and "since=0" in answer.get_json()["message"]


@pytest.mark.parametrize(("query", "field"), [
    ("since=abc", "since"), ("since=1", "since"), ("since=x.y", "since"), ("since=0&limit=0", "limit"),
    ("since=0&limit=1001", "limit"), ("since=0&prefix=a_b", "prefix"), ("since=0&wait=-1", "wait"),
    ("since=0&wait=61", "wait"), ("since=0&include=everything", "include"),
    ("since=e.99999999999999999999", "since"),
])
def test_a_bad_query_is_refused_naming_the_field(client, query, field):
    answer = client.get(f"/feed?{query}")
    assert answer.status_code == 422 and field in answer.get_json()["fields"]


def test_a_long_poll_wakes_at_a_save_under_its_prefix_and_not_before(make_server):
    server = make_server(workers=2)
    requests.post(f"{server.url}/save", json={"slug": "docs-0", "html": "x"}, timeout=10)
    cursor = requests.get(f"{server.url}/feed?since=0", timeout=10).json()["next"]
    answers = []

    def wait() -> None:
        started = time.monotonic()
        answer = requests.get(f"{server.url}/feed", params={"since": cursor, "prefix": "docs-", "wait": 20},
                              timeout=30)
        answers.append((time.monotonic() - started, answer.json()))

    waiting = threading.Thread(target=wait)
    waiting.start()
    time.sleep(0.5)
    requests.post(f"{server.url}/save", json={"slug": "blog-1", "html": "x"}, timeout=10)  # not under the prefix
    time.sleep(0.5)
    assert not answers
    saved_at = time.monotonic()
    requests.post(f"{server.url}/save", json={"slug": "docs-7", "html": "x"}, timeout=10)
    waiting.join(timeout=30)
    (elapsed, body), = answers
    assert [entry["slug"] for entry in body["changes"]] == ["docs-7"]
    assert time.monotonic() - saved_at < 3  # generous: the usual delay is a few ms


def test_a_long_poll_that_nothing_wakes_ends_empty_with_a_cursor_to_go_on_from(make_server):
    server = make_server(workers=1)
    requests.post(f"{server.url}/save", json={"slug": "blog-1", "html": "x"}, timeout=10)
    answer = requests.get(f"{server.url}/feed?since=0&prefix=docs-&wait=1", timeout=10)
    body = answer.json()
    assert answer.status_code == 200 and body["changes"] == [] and body["next"].startswith(body["epoch"] + ".")
    assert "no-cache" in answer.headers["Cache-Control"]


def test_a_token_limited_to_a_prefix_sees_nothing_else(make_server):
    server = make_server(workers=1, env={"CHANGEFEED_JWT_SECRET": SECRET, "CHANGEFEED_AUTH_READS": "1"})
    writer = {"Authorization": f"Bearer {token(write=('*',))}"}
    for slug in ("docs-1", "blog-1", "docs-2", "private"):
        assert requests.post(f"{server.url}/save", json={"slug": slug, "html": "x"}, headers=writer,
                             timeout=10).status_code == 200
    reader = {"Authorization": f"Bearer {token(read=('docs-*',))}"}

    def feed(query: str) -> requests.Response:
        return requests.get(f"{server.url}/feed?since=0&{query}", headers=reader, timeout=10)

    assert [entry["slug"] for entry in feed("prefix=docs-").json()["changes"]] == ["docs-1", "docs-2"]
    assert [entry["slug"] for entry in feed("").json()["changes"]] == ["docs-1", "docs-2"]
    assert [entry["slug"] for entry in feed("limit=1&prefix=docs-2").json()["changes"]] == ["docs-2"]
    for outside in ("prefix=blog-", "prefix=doc", "prefix=d"):
        refused = feed(outside)
        assert refused.status_code == 403 and "prefix" in refused.json()["message"], outside
    assert requests.get(f"{server.url}/feed?since=0", timeout=10).status_code == 401
    # Without a prefix, a long-poll is woken only by a page it may read.
    cursor = feed("").json()["next"]
    started = time.monotonic()
    requests.post(f"{server.url}/save", json={"slug": "private", "html": "y"}, headers=writer, timeout=10)
    quiet = requests.get(f"{server.url}/feed?since={cursor}&wait=1", headers=reader, timeout=10).json()
    assert quiet["changes"] == [] and time.monotonic() - started >= 0.9


def test_a_reader_following_the_feed_under_concurrent_writers_ends_at_every_newest_version(make_server, database):
    """Writers on two servers save 30 pages; a reader long-polls the feed on one and never skips a version.

    On PostgreSQL, transactions beside them take their id early and commit
    late (as a long save would): a cursor trusting "above the newest id
    seen" would pass them and never list what they wrote.
    """
    servers = [make_server(workers=2), make_server(workers=1)]
    pages, writers, saves = 30, 6, 40
    newest: dict[str, int] = {}
    went_back: list[str] = []
    done = threading.Event()
    cursor = "0"

    def read() -> None:
        nonlocal cursor
        body = requests.get(f"{servers[1].url}/feed", params={"since": cursor, "limit": 7, "wait": 1},
                            timeout=30).json()
        for entry in body["changes"]:
            if entry["version"] < newest.get(entry["slug"], 0):
                went_back.append(f"{entry['slug']} went back from {newest[entry['slug']]} to {entry['version']}")
            newest[entry["slug"]] = entry["version"]
        cursor = body["next"]

    def follow() -> None:
        while not done.is_set():
            read()

    def write(n: int) -> None:
        rng = random.Random(n)
        with requests.Session() as session:
            for _ in range(saves):
                page = {"slug": f"page-{rng.randrange(pages)}", "html": "x" * rng.randrange(1, 500)}
                answer = session.post(f"{servers[n % 2].url}/save", json=page, timeout=30)
                assert answer.status_code == 200, answer.text

    def commit_late() -> None:
        if database.engine != "postgres":
            return  # SQLite takes one writer at a time: nothing commits out of order
        with psycopg.connect(database.postgres_url, autocommit=True) as slow:
            for n in range(8):
                with slow.transaction():
                    slow.execute("SELECT pg_current_xact_id()")  # its id, taken now
                    time.sleep(0.1)  # the writers commit meanwhile, with higher ids
                    slow.execute("INSERT INTO page_versions (slug, html, data, version, updated_at)"
                                 " VALUES (%s, '', 'null', 1, 't')", (f"slow-{n}",))

    following = threading.Thread(target=follow)
    following.start()
    with ThreadPoolExecutor(writers + 1) as pool:
        jobs = [pool.submit(write, n) for n in range(writers)] + [pool.submit(commit_late)]
        for job in jobs:
            job.result(timeout=120)
    done.set()
    following.join(timeout=60)
    stored = dict(database.query("SELECT slug, version FROM page_versions"))
    deadline = time.monotonic() + 30  # another test's transaction on the server may hold the horizon a moment
    while newest != stored and time.monotonic() < deadline:
        read()
    assert newest == stored and not went_back


def changes_of(stream, count, timeout=10):
    """The next `count` change events of a stream, as (slug, version), and their events."""
    events = []
    while len(events) < count:
        event = stream.next(timeout=timeout)
        if event.get("event") == "change":
            events.append(event)
    return [(event["data"]["slug"], event["data"]["version"]) for event in events], events


def post(server, slug, html="x", **headers):
    answer = requests.post(f"{server.url}/save", json={"slug": slug, "html": html}, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_prefix_stream_gets_each_new_page_under_it_and_nothing_outside(make_server, open_stream):
    server = make_server(workers=2)
    post(server, "docs-0")
    cursor = requests.get(f"{server.url}/feed?since=0", timeout=10).json()["next"]
    stream = open_stream(f"{server.url}/events?prefix=docs-&since={cursor}")
    assert "retry" in stream.next()
    time.sleep(0.3)  # the stream is open: what follows is news to it
    post(server, "blog-1")
    post(server, "docs-new", "<p>created after the stream opened</p>")
    post(server, "docsx")
    post(server, "docs-0", "<p>again</p>")
    seen, events = changes_of(stream, 2)
    assert seen == [("docs-new", 1), ("docs-0", 2)]
    first = events[0]["data"]
    assert first["html"] == "<p>created after the stream opened</p>" and first["epoch"] and first["updated_at"]
    with pytest.raises(Exception):  # nothing else: blog-1 and docsx are outside the prefix
        changes_of(stream, 1, timeout=1)


def test_resuming_a_prefix_stream_from_any_event_id_replays_exactly_what_was_missed(make_server, open_stream):
    server = make_server(workers=2)
    for n in range(6):
        post(server, f"docs-{n}")
    stream = open_stream(f"{server.url}/events?prefix=docs-&since=0")
    seen, events = changes_of(stream, 6)
    assert sorted(seen) == [(f"docs-{n}", 1) for n in range(6)]
    stream.close()
    post(server, "docs-1")  # missed while away: saved after every id
    post(server, "docs-9")
    for index, event in enumerate(events):
        resumed = open_stream(f"{server.url}/events?prefix=docs-&since=0", headers={"Last-Event-ID": event["id"]})
        missed = [slug for slug, _version in seen[index + 1:] if slug != "docs-1"]
        expected = [(slug, 1) for slug in missed] + [("docs-1", 2), ("docs-9", 1)]
        assert changes_of(resumed, len(expected))[0] == expected, event["id"]
        with pytest.raises(Exception):
            changes_of(resumed, 1, timeout=0.5)
        resumed.close()


def test_a_stream_of_a_list_of_pages_follows_those_pages_only(make_server, open_stream):
    server = make_server(workers=1)
    post(server, "a")
    stream = open_stream(f"{server.url}/events?slug=a&slug=b&slug=c")
    assert changes_of(stream, 1)[0] == [("a", 1)]  # from the beginning: each page as it stands
    for slug in ("ab", "b", "d", "c", "a"):
        post(server, slug)
    assert changes_of(stream, 3)[0] == [("b", 1), ("c", 1), ("a", 2)]


def test_a_stream_resuming_from_another_database_starts_over_with_a_reset(make_server, open_stream, epoch):
    server = make_server(workers=1)
    post(server, "docs-1")
    stream = open_stream(f"{server.url}/events?prefix=docs-", headers={"Last-Event-ID": "0123456789abcdef.77"})
    assert stream.next()["retry"]
    reset = stream.next()
    assert reset["event"] == "reset" and reset["data"] == {"epoch": epoch}
    assert changes_of(stream, 1)[0] == [("docs-1", 1)]


@pytest.mark.parametrize(("query", "field"), [
    ("prefix=docs-&presence=0", "presence"), ("prefix=a_b", "prefix"), ("prefix=docs-&since=5", "since"),
    ("&".join(f"slug=p{n}" for n in range(101)), "slug"), ("slug=a&slug=../x", "slug"),
])
def test_a_bad_feed_stream_query_is_refused_naming_the_field(client, query, field):
    answer = client.get(f"/events?{query}")
    assert answer.status_code == 422 and field in answer.get_json()["fields"], answer.get_json()


def test_a_stream_token_limited_to_a_prefix_sees_nothing_else(make_server, open_stream):
    server = make_server(workers=1, env={"CHANGEFEED_JWT_SECRET": SECRET, "CHANGEFEED_AUTH_READS": "1"})
    writer = {"Authorization": f"Bearer {token(write=('*',))}"}
    reader = {"Authorization": f"Bearer {token(read=('docs-*', 'home'))}"}
    for slug in ("docs-1", "private"):
        post(server, slug, **writer)
    for query in ("prefix=blog-", "prefix=doc", "slug=docs-1&slug=private"):
        refused = requests.get(f"{server.url}/events?{query}", headers=reader, timeout=10)
        assert refused.status_code == 403, query
    stream = open_stream(f"{server.url}/events?slug=docs-1&slug=home", headers=reader)
    assert changes_of(stream, 1)[0] == [("docs-1", 1)]
    everything = open_stream(f"{server.url}/events?slug=docs-1&slug=home&slug=docs-2", headers=reader)
    assert changes_of(everything, 1)[0] == [("docs-1", 1)]
    readable = open_stream(f"{server.url}/events?prefix=", headers=reader)  # every page it may read
    assert changes_of(readable, 1)[0] == [("docs-1", 1)]
    post(server, "private", **writer)
    post(server, "home", **writer)
    assert changes_of(stream, 1)[0] == [("home", 1)]
    assert changes_of(readable, 1)[0] == [("home", 1)]


def test_a_socket_following_a_prefix_gets_each_page_under_it_with_a_cursor_to_resume_from(make_server, connect,
                                                                                         epoch):
    server = make_server(workers=2)
    post(server, "docs-1", "<p>one</p>")
    post(server, "blog-1")
    ws = connect(server)
    ws.send(type="subscribe", prefix="Docs-", since="0")
    assert ws.next() == {"type": "subscribed", "prefix": "docs-", "epoch": epoch}
    first = ws.next()
    assert {key: first[key] for key in ("type", "prefix", "slug", "version", "html", "epoch")} == {
        "type": "change", "prefix": "docs-", "slug": "docs-1", "version": 1, "html": "<p>one</p>", "epoch": epoch}
    ws.nothing_for(0.3)
    post(server, "blog-2")
    post(server, "docs-2")
    second = ws.next()
    assert (second["slug"], second["version"]) == ("docs-2", 1)
    ws.nothing_for(0.3)
    # From a cursor: only what came after it, on a socket of its own.
    again = connect(server)
    again.send(type="subscribe", prefix="docs-", since=first["cursor"])
    assert again.next()["type"] == "subscribed"
    assert (again.next()["slug"]) == "docs-2"
    again.nothing_for(0.3)
    ws.send(type="unsubscribe", prefix="docs-")
    assert ws.next() == {"type": "unsubscribed", "prefix": "docs-"}
    post(server, "docs-3")
    ws.nothing_for(0.5)
    assert again.next()["slug"] == "docs-3"


def test_a_socket_token_limited_to_a_prefix_may_follow_only_that_prefix(make_server, connect):
    server = make_server(workers=1, env={"CHANGEFEED_JWT_SECRET": SECRET, "CHANGEFEED_AUTH_READS": "1"})
    post(server, "private", **{"Authorization": f"Bearer {token(write=('*',))}"})
    post(server, "docs-1", **{"Authorization": f"Bearer {token(write=('*',))}"})
    ws = connect(server, header=[f"Authorization: Bearer {token(read=('docs-*',))}"])
    ws.send(type="subscribe", prefix="blog-")
    refused = ws.next()
    assert refused["type"] == "error" and refused["error"] == "insufficient scope", refused
    ws.send(type="subscribe", prefix="")
    assert ws.next()["type"] == "subscribed"
    assert ws.next()["slug"] == "docs-1"
    ws.nothing_for(0.3)


# payload=version (notification-only: which version of which page, the page itself from /changes) and
# the feed of a list of pages.


def test_the_feed_names_versions_by_default_and_carries_content_with_payload_full(make_server):
    server = make_server(workers=1)
    post(server, "docs-1", "<p>one</p>")

    def changes(query: str) -> list[dict]:
        answer = requests.get(f"{server.url}/feed?since=0&{query}", timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()["changes"]

    assert [set(entry) for entry in changes("")] == [{"slug", "version", "updated_at"}]
    assert changes("payload=version") == changes("")
    full = changes("payload=full")
    assert full[0]["html"] == "<p>one</p>" and full[0]["data"] is None
    assert full == changes("include=content") == changes("payload=full&include=content")


def test_a_feed_stream_with_payload_version_names_each_page_and_version_without_its_content(make_server,
                                                                                        open_stream):
    server = make_server(workers=1)
    post(server, "docs-1", "<p>one</p>")
    post(server, "b", "<p>b</p>")
    stream = open_stream(f"{server.url}/events?prefix=docs-&payload=version")
    listed = open_stream(f"{server.url}/events?slug=docs-1&slug=b&payload=version")
    full = open_stream(f"{server.url}/events?prefix=docs-")
    seen, (first,) = changes_of(stream, 1)
    assert seen == [("docs-1", 1)] and set(first["data"]) == {"slug", "version", "updated_at", "epoch"}
    assert first["id"].startswith(first["data"]["epoch"] + ".")  # a cursor to resume from
    seen, events = changes_of(listed, 2)
    assert seen == [("docs-1", 1), ("b", 1)] and not any("html" in event["data"] for event in events)
    assert changes_of(full, 1)[1][0]["data"]["html"] == "<p>one</p>"  # payload=full, the default
    post(server, "docs-2", "<p>two</p>")
    assert changes_of(stream, 1)[1][0]["data"].keys() == {"slug", "version", "updated_at", "epoch"}
    resumed = open_stream(f"{server.url}/events?prefix=docs-&payload=version", headers={"Last-Event-ID": first["id"]})
    seen, events = changes_of(resumed, 1)
    assert seen == [("docs-2", 1)] and "html" not in events[0]["data"]


def test_a_socket_following_a_prefix_with_payload_version_gets_frames_without_html_or_data(make_server, connect,
                                                                                          epoch):
    server = make_server(workers=1)
    post(server, "docs-1", "<p>one</p>")
    ws = connect(server)
    ws.send(type="subscribe", prefix="docs-", payload="version")
    assert ws.next()["type"] == "subscribed"
    first = ws.next()
    assert first == {"type": "change", "prefix": "docs-", "slug": "docs-1", "version": 1,
                     "updated_at": first["updated_at"], "epoch": epoch, "cursor": first["cursor"]}
    post(server, "docs-2", "<p>two</p>")
    second = ws.next()
    assert (second["slug"], second["version"], "html" in second, "data" in second) == ("docs-2", 1, False, False)
    again = connect(server)  # the cursor resumes right after the page; the default payload is full
    again.send(type="subscribe", prefix="docs-", since=first["cursor"])
    assert again.next()["type"] == "subscribed"
    assert again.next()["html"] == "<p>two</p>"
    ws.send(type="subscribe", prefix="docs-", payload="html")
    refused = ws.next()
    assert (refused["type"], list(refused["fields"])) == ("error", ["payload"]), refused
    assert refused["fields"]["payload"][0].startswith("Must be full or version")
    ws.send(type="ping", id=1)
    assert ws.next() == {"type": "pong", "id": 1}


def test_a_bad_payload_or_slug_list_is_refused_naming_the_field_and_the_server_goes_on(make_server):
    server = make_server(workers=1)
    post(server, "a")
    many = "&".join(f"slug=p{n}" for n in range(101))
    for path, field, words in [
        ("/feed?since=0&payload=html", "payload", "Must be full or version"),
        ("/feed?since=0&payload=version&include=content", "payload", "pick one"),
        ("/feed?since=0&prefix=a&slug=a", "slug", "one or the other"),
        (f"/feed?since=0&{many}", "slug", "at most 100"),
        ("/feed?since=0&slug=a&slug=../x", "slug", "Slug 2 of the list: Must be"),
        ("/events?slug=a&slug=../x", "slug", "Slug 2 of the list: Must be"),
        ("/events?slug=a&payload=FULL", "payload", "Must be full or version"),
        ("/events?prefix=a&payload=", "payload", "Must be full or version"),
        ("/events?slug=a&slug=b&payload=both", "payload", "Must be full or version"),
        ("/events?prefix=a&slug=a&slug=b", "slug", "one or the other"),
    ]:
        answer = requests.get(f"{server.url}{path}", timeout=10)
        body = answer.json()
        assert (answer.status_code, body["error"], list(body["fields"])) == (422, "invalid request", [field]), path
        assert words in body["fields"][field][0], (path, body)
    listed = requests.get(f"{server.url}/feed?since=0&slug=a&payload=full", timeout=10)
    assert listed.status_code == 200 and listed.json()["changes"][0]["html"] == "x"


def test_the_feed_of_a_slug_list_lists_only_those_pages_and_its_long_poll_wakes_only_for_them(make_server):
    server = make_server(workers=2)
    for slug in ("a", "b", "ab", "c"):
        post(server, slug)
    body = requests.get(f"{server.url}/feed?since=0&slug=a&slug=C", timeout=10).json()
    assert [entry["slug"] for entry in body["changes"]] == ["a", "c"]
    answers = []

    def wait() -> None:
        answer = requests.get(f"{server.url}/feed", params={"since": body["next"], "slug": ["a", "c"], "wait": 20},
                              timeout=30)
        answers.append(answer.json())

    waiting = threading.Thread(target=wait)
    waiting.start()
    time.sleep(0.5)
    post(server, "ab")  # starts like `a` (its subscription wakes for it), yet another page
    post(server, "b")
    time.sleep(0.5)
    assert not answers
    saved_at = time.monotonic()
    post(server, "c", "<p>again</p>")
    waiting.join(timeout=30)
    (answer,) = answers
    assert [(entry["slug"], entry["version"]) for entry in answer["changes"]] == [("c", 2)]
    assert time.monotonic() - saved_at < 3  # generous: the usual delay is a few ms


def test_a_feed_token_may_list_only_slugs_it_may_read(make_server):
    server = make_server(workers=1, env={"CHANGEFEED_JWT_SECRET": SECRET, "CHANGEFEED_AUTH_READS": "1"})
    writer = {"Authorization": f"Bearer {token(write=('*',))}"}
    for slug in ("docs-1", "docs-2", "private"):
        post(server, slug, **writer)
    reader = {"Authorization": f"Bearer {token(read=('docs-*',))}"}

    def feed(query: str) -> requests.Response:
        return requests.get(f"{server.url}/feed?since=0&{query}", headers=reader, timeout=10)

    assert [entry["slug"] for entry in feed("slug=docs-2&slug=docs-1").json()["changes"]] == ["docs-1", "docs-2"]
    for outside in ("slug=docs-1&slug=private", "slug=private", "slug=docs-1&slug=private&wait=1"):
        refused = feed(outside)
        assert (refused.status_code, refused.json()["error"]) == (403, "insufficient scope"), outside
