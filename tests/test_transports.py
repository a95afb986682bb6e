"""Long-poll and Server-Sent Events against real gunicorn workers.

Saves are made through HTTP (landing on any worker) or straight into the
database by a store of this test process, which is a process no worker
shares anything with: a wake-up then can only come from each worker's
watcher (SQLite) or listener (PostgreSQL).
"""

import queue
import signal
import sqlite3
import time

import pytest
import requests

from changefeed.stores import schema as migrate
from support.clients import GENEROUS_S, http_save, start_long_poll
from support.servers import streams_per_worker

pytestmark = pytest.mark.engines

def test_long_poll_answers_at_once_when_already_newer(server):
    http_save(server)
    started = time.monotonic()
    answer = requests.get(f"{server.url}/changes?slug=live&since=0&wait=30", timeout=10).json()
    assert answer["changed"] is True and answer["version"] == 1
    assert time.monotonic() - started < GENEROUS_S


def test_long_poll_wakes_promptly_on_a_save_from_another_process(server, make_store):
    store = make_store()
    finish = start_long_poll(server, "live", 0, wait=20)
    time.sleep(0.5)  # the request is now held
    saved_at = time.monotonic()
    store.save("live", "<p>from elsewhere</p>", '{"n":1}')
    result = finish()
    assert result["answer"] == {**result["answer"], "changed": True, "version": 1,
                                "html": "<p>from elsewhere</p>", "data": {"n": 1}}
    assert result["done_at"] - saved_at < GENEROUS_S


def test_long_poll_wakes_on_saves_through_either_worker(make_server):
    server = make_server(workers=2)
    for round_ in range(1, 7):  # saves land on both workers; every one must wake the poll
        finish = start_long_poll(server, "live", round_ - 1, wait=20)
        time.sleep(0.2)
        saved_at = time.monotonic()
        http_save(server, html=f"round {round_}")
        result = finish()
        assert (result["answer"]["version"], result["answer"]["html"]) == (round_, f"round {round_}")
        assert result["done_at"] - saved_at < GENEROUS_S


def test_long_poll_times_out_unchanged_after_wait(server, epoch):
    http_save(server)
    started = time.monotonic()
    answer = requests.get(f"{server.url}/changes?slug=live&since=1&wait=1", timeout=10).json()
    took = time.monotonic() - started
    assert answer == {"changed": False, "version": 1, "epoch": epoch}
    assert 0.9 <= took < 1 + GENEROUS_S


def test_event_stream_sends_current_state_on_connect(server, open_stream, epoch):
    http_save(server, html="v1"), http_save(server, html="v2")
    stream = open_stream(f"{server.url}/events?slug=live&since=0")
    assert stream.response.status == 200
    assert stream.response.getheader("Content-Type").startswith("text/event-stream")
    assert stream.response.getheader("Cache-Control") == "no-cache"
    assert stream.response.getheader("X-Accel-Buffering") == "no"
    assert stream.next() == {"retry": "2000"}
    event = stream.next()
    assert (event["id"], event["event"]) == (f"{epoch}:2", "change")
    assert event["data"] == requests.get(f"{server.url}/changes?slug=live&since=0", timeout=10).json()


def test_event_stream_sends_nothing_old_when_up_to_date(server, open_stream):
    http_save(server)
    stream = open_stream(f"{server.url}/events?slug=live&since=1")
    assert stream.next() == {"retry": "2000"}
    with pytest.raises(queue.Empty):
        stream.next(timeout=0.5)


def test_event_stream_sends_one_event_per_change_in_order(server, open_stream, epoch):
    stream = open_stream(f"{server.url}/events?slug=live&since=0")
    stream.next()  # retry
    for n in range(1, 6):
        http_save(server, html=f"v{n}", data={"n": n})
        time.sleep(0.1)  # farther apart than the watcher's tick, so no version is skipped
    events = [stream.next() for _ in range(5)]
    assert [e["id"] for e in events] == [f"{epoch}:{n}" for n in range(1, 6)]
    assert [(e["data"]["html"], e["data"]["data"]) for e in events] == [(f"v{n}", {"n": n}) for n in range(1, 6)]


def test_event_stream_resumes_from_last_event_id(server, open_stream, epoch):
    for n in range(3):
        http_save(server, html=f"v{n + 1}")
    resumed = open_stream(f"{server.url}/events?slug=live&since=0", headers={"Last-Event-ID": f"{epoch}:2"})
    resumed.next()  # retry
    assert resumed.next()["id"] == f"{epoch}:3"
    current = open_stream(f"{server.url}/events?slug=live&since=0", headers={"Last-Event-ID": f"{epoch}:3"})
    current.next()
    with pytest.raises(queue.Empty):
        current.next(timeout=0.5)
    http_save(server, html="v4")
    assert current.next()["id"] == f"{epoch}:4"


def test_event_stream_with_payload_version_sends_each_version_without_html_or_data(server, open_stream, epoch):
    """For large pages and many readers: the event says which version exists; the page comes from /changes."""
    http_save(server, html="<p>v1</p>", data={"n": 1})
    stream = open_stream(f"{server.url}/events?slug=live&since=0&payload=version")
    full = open_stream(f"{server.url}/events?slug=live&since=0")
    stream.next()  # retry
    event = stream.next()
    assert (event["id"], event["data"]) == (f"{epoch}:1", {
        "changed": True, "version": 1, "updated_at": event["data"]["updated_at"], "epoch": epoch})
    full.next()
    assert full.next()["data"]["html"] == "<p>v1</p>"  # payload=full, the default
    http_save(server, html="<p>v2</p>")
    assert stream.next()["data"].keys() == {"changed", "version", "updated_at", "epoch"}
    assert requests.post(f"{server.url}/delete", json={"slug": "live"}, timeout=10).status_code == 200
    deleted = stream.next()
    assert (deleted["id"], deleted["data"]["deleted"], "html" in deleted["data"]) == (f"{epoch}:3", True, False)
    resumed = open_stream(f"{server.url}/events?slug=live&payload=version", headers={"Last-Event-ID": f"{epoch}:1"})
    resumed.next()
    event = resumed.next()
    assert (event["id"], "html" in event["data"], "data" in event["data"]) == (f"{epoch}:3", False, False)
    refused = requests.get(f"{server.url}/events?slug=live&payload=html", timeout=10)
    assert refused.status_code == 422 and list(refused.json()["fields"]) == ["payload"]


def test_bad_last_event_id_is_a_clear_error(server):
    response = requests.get(f"{server.url}/events?slug=live", headers={"Last-Event-ID": "abc"}, timeout=10)
    assert response.status_code == 422
    assert "Last-Event-ID" in response.json()["fields"]


def test_event_stream_sends_heartbeats(make_server, open_stream):
    server = make_server(env={"CHANGEFEED_SSE_HEARTBEAT_MS": "200"})
    stream = open_stream(f"{server.url}/events?slug=quiet")
    stream.next()  # retry
    beats = [stream.next(timeout=2, skip_comments=False) for _ in range(3)]
    assert beats == [{"comment": "heartbeat"}] * 3


def test_event_stream_survives_a_bad_save_elsewhere(server, open_stream, epoch):
    stream = open_stream(f"{server.url}/events?slug=live")
    stream.next()
    bad = requests.post(f"{server.url}/save", json={"slug": "live", "html": 1}, timeout=10)
    assert bad.status_code == 422
    requests.post(f"{server.url}/save", data="{broken", headers={"Content-Type": "application/json"}, timeout=10)
    http_save(server, html="good")
    event = stream.next()
    assert (event["id"], event["data"]["html"]) == (f"{epoch}:1", "good")


def test_every_subscriber_on_every_worker_sees_every_save(make_server, open_stream, epoch):
    server = make_server(workers=2)
    streams = []
    # Which worker accepts a connection is the kernel's choice: open streams until both hold some.
    while len(streams) < 24 or min(streams_per_worker(server)) == 0:
        assert len(streams) < 400, f"the streams all went to one worker: {streams_per_worker(server)}"
        batch = [open_stream(f"{server.url}/events?slug=fan") for _ in range(8)]
        for stream in batch:
            stream.next()  # retry: the stream is open and subscribed
        streams += batch
    pollers = [start_long_poll(server, "fan", 0, wait=20) for _ in range(8)]
    time.sleep(0.3)
    for n in range(1, 4):
        http_save(server, slug="fan", html=f"v{n}")
        time.sleep(0.2)
    for stream in streams:
        assert [stream.next()["id"] for _ in range(3)] == [f"{epoch}:{n}" for n in range(1, 4)]
    assert all(poll()["answer"]["changed"] for poll in pollers)


def test_sigterm_ends_open_streams_at_once(server, open_stream):
    stream = open_stream(f"{server.url}/events?slug=live")
    stream.next()
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert stream.ended.wait(timeout=5)  # well before gunicorn's 10 s graceful timeout
    assert time.monotonic() - started < 5
    server.stop()


def test_event_stream_of_another_epoch_starts_over_with_the_whole_state(server, open_stream, epoch):
    http_save(server, html="v1"), http_save(server, html="v2")
    for url, headers in [(f"{server.url}/events?slug=live&since=9&epoch=0123456789abcdef", {}),
                         (f"{server.url}/events?slug=live", {"Last-Event-ID": "0123456789abcdef:9"})]:
        stream = open_stream(url, headers)
        stream.next()  # retry
        event = stream.next()
        assert (event["id"], event["data"]["html"]) == (f"{epoch}:2", "v2")
    empty = open_stream(f"{server.url}/events?slug=empty", {"Last-Event-ID": "0123456789abcdef:9"})
    empty.next()
    event = empty.next()  # version 0 of this database: the client must forget its version 9
    assert (event["id"], event["data"]) == (f"{epoch}:0", {"changed": False, "version": 0, "epoch": epoch})


@pytest.mark.sqlite_only  # restores the SQLite file itself, with its backup API
def test_streams_and_long_polls_start_over_when_the_database_is_restored_in_place(server, open_stream, db_path,
                                                                                   tmp_path, epoch):
    http_save(server, html="v1")
    backup = sqlite3.connect(str(tmp_path / "backup.sqlite3"))
    sqlite3.connect(db_path).backup(backup)
    http_save(server, html="v2"), http_save(server, html="v3")
    stream = open_stream(f"{server.url}/events?slug=live&since=0")
    stream.next()  # retry
    assert stream.next()["id"] == f"{epoch}:3"
    finish = start_long_poll(server, "live", 3, wait=30)
    time.sleep(0.3)
    backup.backup(sqlite3.connect(db_path))  # the restore README describes...
    new = migrate.new_epoch(db_path)  # ...then `python migrate.py --new-epoch`
    restored_at = time.monotonic()
    event = stream.next(timeout=5)
    assert (event["id"], event["data"]["html"], event["data"]["epoch"]) == (f"{new}:1", "v1", new)
    result = finish()
    assert (result["answer"]["epoch"], result["answer"]["version"]) == (new, 1)
    assert result["done_at"] - restored_at < 5
