"""Presence: who is on a page, as a second feed beside its versions, on SQLite and PostgreSQL alike.

The contract through Flask's test client; expiry, and presence reaching
event streams and long-polls on other workers, against real gunicorn.
"""

import threading
import time

import jwt
import pytest
import requests

from app import create_app
from support.servers import close_app

pytestmark = pytest.mark.engines

GENEROUS_S = 5.0  # what a broken mechanism misses by far; the targets are the bench's


def beat(client, client_id="tab-aaaaaaaa", state="viewing", slug="home", name="Ada", **headers):
    return client.post("/presence", json={"slug": slug, "client_id": client_id, "name": name, "state": state},
                       headers=headers)


def presence_of(client, slug="home", held=0, **params):
    answer = client.get("/changes", query_string={"slug": slug, "since": 0, "presence": held, **params})
    assert answer.status_code == 200, answer.text
    return answer.json.get("presence")


def wait_for(predicate, timeout=GENEROUS_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def test_a_beat_puts_the_tab_in_the_pages_presence_list(client):
    answer = beat(client)
    assert answer.status_code == 200, answer.text
    assert answer.json["beat_ms"] == 5000 and answer.json["ttl_ms"] == 15000
    listed = presence_of(client)
    assert listed["count"] == 1 and listed["editing"] == 0
    assert listed["editors"] == [{"id": answer.json["you"], "name": "Ada", "state": "viewing"}]
    assert listed["version"] == answer.json["version"] != 0


def test_editing_users_come_first_and_each_user_is_listed_once(client):
    beat(client, "tab-aaaaaaaa", name="Zed")
    beat(client, "tab-bbbbbbbb", state="editing", name="Bob")
    listed = presence_of(client)
    assert [(e["name"], e["state"]) for e in listed["editors"]] == [("Bob", "editing"), ("Zed", "viewing")]
    assert listed["count"] == 2 and listed["editing"] == 1


def test_presence_never_moves_the_pages_version(client, save):
    assert save().json["version"] == 1
    beat(client)
    answer = client.get("/changes?slug=home&since=1&presence=0")
    assert answer.json["changed"] is False and answer.json["version"] == 1
    assert answer.json["presence"]["count"] == 1
    assert client.get("/changes?slug=home&since=1").json == {"changed": False, "version": 1,
                                                             "epoch": answer.json["epoch"]}


def test_an_unchanged_presence_poll_is_a_304_and_a_change_is_not(client):
    beat(client)
    first = client.get("/changes?slug=home&since=0&presence=0")
    held = first.json["presence"]["version"]
    url = f"/changes?slug=home&since=0&presence={held}"
    plain = client.get(url)
    assert "presence" not in plain.json  # the version held is the current one
    again = client.get(url, headers={"If-None-Match": plain.headers["ETag"]})
    assert again.status_code == 304
    beat(client, "tab-bbbbbbbb", name="Bob")
    moved = client.get(url, headers={"If-None-Match": plain.headers["ETag"]})
    assert moved.status_code == 200 and moved.json["presence"]["count"] == 2
    assert moved.headers["ETag"] != plain.headers["ETag"]


def test_a_beat_that_changes_nothing_keeps_the_presence_version(app, client):
    app.extensions["changefeed.store"].presence_min_interval_s = 0
    version = beat(client).json["version"]
    assert beat(client).json["version"] == version
    assert beat(client, state="editing").json["version"] != version


def test_the_count_only_form_names_nobody(client):
    beat(client)
    beat(client, "tab-bbbbbbbb", state="editing", name="Bob")
    listed = presence_of(client, presence_form="count")
    assert listed == {"version": listed["version"], "count": 2, "editing": 1}


def test_the_list_names_at_most_the_configured_users_and_counts_them_all(database):
    app = create_app({**database.config, "TESTING": True, "CHANGEFEED_PRESENCE_LIST_MAX": 3})
    try:
        client = app.test_client()
        for n in range(5):
            assert beat(client, f"tab-{n:08d}", name=f"User {n}").status_code == 200
        listed = presence_of(client)
        assert listed["count"] == 5 and len(listed["editors"]) == 3
    finally:
        close_app(app)


def test_a_closing_tab_leaves_at_once(client):
    beat(client)
    beat(client, "tab-bbbbbbbb", name="Bob")
    gone = beat(client, "tab-bbbbbbbb", state="gone")
    assert gone.status_code == 200
    assert [e["name"] for e in presence_of(client)["editors"]] == ["Ada"]


def test_a_gone_beat_is_never_too_soon(client):
    beat(client)
    assert beat(client, state="gone").status_code == 200


def test_alternating_viewing_and_gone_cannot_dodge_the_minimum_interval(client, database):
    """200 beats of one tab in 0.3 s, alternating viewing and gone, were all taken and broadcast."""
    answers = [beat(client, state=("viewing", "gone")[n % 2]) for n in range(40)]
    statuses = [answer.status_code for answer in answers]
    assert statuses[:2] == [200, 200]  # it arrives, and its going is always taken at once
    assert set(statuses[2:]) == {429}, statuses
    assert {answer.json["limit"] for answer in answers[2:]} == {"presence_interval"}
    assert presence_of(client) == {"version": answers[1].json["version"], "count": 0, "editing": 0, "editors": []}
    assert database.query("SELECT state FROM page_editors") == [("gone",)]  # kept, unlisted, till the TTL
    time.sleep(1.05)  # CHANGEFEED_PRESENCE_MIN_INTERVAL_MS
    assert beat(client).status_code == 200
    assert presence_of(client)["count"] == 1


def test_beats_faster_than_the_minimum_interval_get_429_with_retry_after(client):
    assert beat(client).status_code == 200
    fast = beat(client, state="editing")
    assert fast.status_code == 429
    assert fast.json["limit"] == "presence_interval"
    assert 0 < fast.json["retry_after_ms"] <= 1000
    assert fast.headers["Retry-After"] == "1"
    assert presence_of(client)["editors"][0]["state"] == "viewing"  # nothing was written


def test_a_page_holding_its_most_tabs_refuses_a_new_one_with_429(database):
    app = create_app({**database.config, "TESTING": True, "CHANGEFEED_PRESENCE_MAX_PER_PAGE": 2})
    try:
        client = app.test_client()
        assert beat(client, "tab-00000001").status_code == 200
        assert beat(client, "tab-00000002").status_code == 200
        full = beat(client, "tab-00000003")
        assert full.status_code == 429 and full.json["limit"] == "presence_entries"
        assert full.headers["Retry-After"] == "15"
        assert presence_of(client)["count"] == 2
        assert beat(client, "tab-00000001", state="gone").status_code == 200
        assert beat(client, "tab-00000003").status_code == 200  # room again
    finally:
        close_app(app)


@pytest.mark.parametrize("body, field", [
    ({"slug": "home", "client_id": "short", "state": "viewing"}, "client_id"),
    ({"slug": "home", "client_id": "tab-aaaaaaaa", "state": "asleep"}, "state"),
    ({"slug": "home", "client_id": "tab-aaaaaaaa"}, "state"),
    ({"slug": "no way", "client_id": "tab-aaaaaaaa", "state": "viewing"}, "slug"),
    ({"slug": "home", "client_id": "tab-aaaaaaaa", "state": "viewing", "name": "x" * 41}, "name"),
    ({"slug": "home", "client_id": "tab-aaaaaaaa", "state": "viewing", "name": "Ada\nBob"}, "name"),
    ({"slug": "home", "client_id": "tab-aaaaaaaa", "state": "viewing", "name": "   "}, "name"),
])
def test_a_bad_beat_is_refused_naming_the_field_and_writes_nothing(client, database, body, field):
    answer = client.post("/presence", json=body)
    assert answer.status_code == 422 and field in answer.json["fields"]
    assert database.query("SELECT count(*) FROM page_editors")[0][0] == 0


def test_a_beat_from_another_sites_page_is_refused(client):
    answer = beat(client, **{"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert answer.status_code == 403


def test_a_closing_tabs_beacon_is_taken_as_text_plain(client):
    beat(client)
    answer = client.post("/presence", data='{"slug": "home", "client_id": "tab-aaaaaaaa", "state": "gone"}',
                         content_type="text/plain;charset=UTF-8")
    assert answer.status_code == 200
    assert presence_of(client)["count"] == 0


def test_names_are_returned_as_sent_for_the_page_to_show_as_text(client):
    beat(client, name="<img src=x onerror=alert(1)>")
    assert presence_of(client)["editors"][0]["name"] == "<img src=x onerror=alert(1)>"


def test_entries_whose_beats_stop_expire_and_their_rows_are_deleted(database):
    app = create_app({**database.config, "TESTING": True, "CHANGEFEED_PRESENCE_TTL_MS": 300})
    try:
        client = app.test_client()
        beat(client)
        assert presence_of(client)["count"] == 1
        emptied = wait_for(lambda: (presence_of(client) or {}).get("count") == 0)
        assert emptied, "the entry did not expire"
        assert database.query("SELECT count(*) FROM page_editors") == [(0,)]
    finally:
        close_app(app)


def test_with_access_control_the_user_is_the_tokens_sub_and_needs_read(database):
    app = create_app({**database.config, "TESTING": True, "CHANGEFEED_JWT_SECRET": "s" * 32})
    try:
        client = app.test_client()
        verifier = app.extensions["changefeed.auth"]
        reader = verifier.mint("alice@example.com", read=["home"])
        stranger = verifier.mint("mallory", read=["other"])
        assert beat(client).status_code == 401
        assert beat(client, Authorization=f"Bearer {stranger}").status_code == 403
        answer = beat(client, name="Not Alice", Authorization=f"Bearer {reader}")
        assert answer.status_code == 200, answer.text
        listed = presence_of(client)
        assert [e["name"] for e in listed["editors"]] == ["alice@example.com"]
        # Two tabs of one user are one entry; the read cookie (what sendBeacon carries) works too.
        assert client.post("/session", headers={"Authorization": f"Bearer {reader}"}).status_code == 204
        assert beat(client, "tab-bbbbbbbb", state="editing").status_code == 200
        listed = presence_of(client)
        assert listed["count"] == 1 and listed["editors"][0]["state"] == "editing"
    finally:
        close_app(app)


def test_a_name_with_a_lone_surrogate_is_refused_naming_it_and_nothing_is_listed(client, database):
    """Valid JSON ("\\ud800"), not Unicode: it used to pass the schema and fail in the store, a 500 (or, with
    group commit, a 503 for every beat in its transaction)."""
    answer = client.post("/presence", data='{"slug": "home", "client_id": "tab-aaaaaaaa", "name": "Ada \\ud800",'
                                           ' "state": "viewing"}', content_type="application/json")
    assert answer.status_code == 422 and list(answer.json["fields"]) == ["name"], answer.text
    assert "surrogate" in answer.json["fields"]["name"][0]
    assert database.query("SELECT count(*) FROM page_editors") == [(0,)]
    assert beat(client).status_code == 200  # the next good beat is taken


def test_a_token_whose_sub_holds_a_lone_surrogate_is_refused_as_invalid_naming_the_claim(database):
    """The sub names the user in presence lists and logs: one that cannot be encoded is an invalid token (401)."""
    secret = "s" * 32
    app = create_app({**database.config, "TESTING": True, "CHANGEFEED_JWT_SECRET": secret})
    try:
        client = app.test_client()
        bad = jwt.encode({"sub": "eve\ud800", "exp": int(time.time()) + 300, "changefeed": {"read": ["*"]}},
                         secret, algorithm="HS256")
        answer = beat(client, Authorization=f"Bearer {bad}")
        assert answer.status_code == 401 and answer.json["error"] == "invalid token", answer.text
        assert "`sub`" in answer.json["message"] and "sub" in answer.headers["WWW-Authenticate"]
        assert database.query("SELECT count(*) FROM page_editors") == [(0,)]
        good = app.extensions["changefeed.auth"].mint("eve", read=["*"])
        assert beat(client, Authorization=f"Bearer {good}").status_code == 200
    finally:
        close_app(app)


# -- against real servers ---------------------------------------------------------------------


def http_beat(server, client_id, state="viewing", name="Ada", slug="live"):
    answer = requests.post(f"{server.url}/presence", json={"slug": slug, "client_id": client_id, "name": name,
                                                           "state": state}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_presence_reaches_event_streams_on_every_worker(server, open_stream):
    streams = [open_stream(f"{server.url}/events?slug=live&since=0&presence=0") for _ in range(6)]
    for stream in streams:
        assert "retry" in stream.next()
    you = [http_beat(server, f"tab-{n:08d}", name=f"User {n}")["you"] for n in range(3)]
    for stream in streams:
        deadline = time.monotonic() + GENEROUS_S
        while True:
            event = stream.next(timeout=max(0.1, deadline - time.monotonic()))
            if event.get("event") == "presence" and event["data"]["count"] == 3:
                break
        assert "id" not in event  # a presence event never moves the stream's resume point
        assert sorted(e["id"] for e in event["data"]["editors"]) == sorted(you)
    http_beat(server, "tab-00000000", state="gone")
    for stream in streams:
        while (event := stream.next(timeout=GENEROUS_S)).get("event") != "presence" or event["data"]["count"] != 2:
            pass


def test_a_long_poll_holding_presence_returns_when_someone_arrives(server):
    first = requests.get(f"{server.url}/changes?slug=live&since=0&presence=0", timeout=10).json()
    assert "presence" not in first  # nobody yet, and the client holds "nobody"
    result = {}

    def wait():
        started = time.monotonic()
        answer = requests.get(f"{server.url}/changes?slug=live&since=0&presence=0&wait=20", timeout=30)
        result["answer"], result["took"] = answer.json(), time.monotonic() - started

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    http_beat(server, "tab-aaaaaaaa", state="editing")
    waiter.join(timeout=25)
    assert result["answer"]["changed"] is False
    assert result["answer"]["presence"]["editing"] == 1
    assert result["took"] < GENEROUS_S


def test_expiry_reaches_streams_without_any_further_beat(make_server, open_stream):
    server = make_server(env={"CHANGEFEED_PRESENCE_TTL_MS": "500"})
    stream = open_stream(f"{server.url}/events?slug=live&since=0&presence=0")
    http_beat(server, "tab-aaaaaaaa")
    counts = []
    deadline = time.monotonic() + GENEROUS_S
    while 0 not in counts[1:] and time.monotonic() < deadline:
        event = stream.next(timeout=GENEROUS_S)
        if event.get("event") == "presence":
            counts.append(event["data"]["count"])
    assert counts[0] == 1 and counts[-1] == 0, counts
