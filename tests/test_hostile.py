"""Hostile input: numbers too large for a float, deep nesting, lone surrogates, in every field and message.

Each is refused with a 4xx JSON error (an error frame on a WebSocket) naming
what was wrong, nothing is written, no traceback is logged, and the server
goes on answering. Should something the schemas let through still fail in
the store, it fails alone: the other saves and beats committed with it are
kept (tested with the stores themselves, on both engines).
"""

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from presence import Beat, Beaten
from store import NotStored, Saved, SaveRequest

pytestmark = pytest.mark.engines

JSON = {"Content-Type": "application/json"}
SURROGATE = "\\ud800"  # as JSON text: valid JSON, but not Unicode once parsed
BEATERS = 40


def test_among_concurrent_beats_only_the_one_with_a_bad_name_fails_and_with_422(make_server):
    """A lone surrogate once failed in the store, and with it every beat of the same group commit (503)."""
    server = make_server(workers=1)  # one process: the beats meet in its group commits
    bad = BEATERS // 2
    for round_ in range(3):  # new tabs each round: a tab may beat once a second
        bodies = [json.dumps({"slug": "crowd", "client_id": f"tab-{round_}-{n:06d}", "name": f"User {n}",
                              "state": "viewing"}) for n in range(BEATERS)]
        bodies[bad] = bodies[bad].replace(f"User {bad}", SURROGATE)
        start = threading.Barrier(BEATERS)

        def send(body):
            start.wait()
            return requests.post(f"{server.url}/presence", data=body, headers=JSON, timeout=30)

        with ThreadPoolExecutor(BEATERS) as pool:
            answers = list(pool.map(send, bodies))
        assert answers[bad].status_code == 422 and list(answers[bad].json()["fields"]) == ["name"], answers[bad].text
        failed = [(n, a.status_code, a.text[:200]) for n, a in enumerate(answers) if n != bad and a.status_code != 200]
        assert not failed, f"round {round_}: {len(failed)} good beats failed: {failed[:3]}"
    listed = requests.get(f"{server.url}/changes?slug=crowd&presence=0&presence_form=count", timeout=10).json()
    assert listed["presence"]["count"] == 3 * (BEATERS - 1)
    assert "Traceback" not in server.log()


# The stores themselves: an item the driver cannot encode, among good ones in one transaction.


def test_a_save_that_cannot_be_encoded_fails_alone_and_the_rest_of_its_batch_is_saved(make_store, database,
                                                                                      caplog):
    store = make_store()
    items = [SaveRequest("good-1", "<p>1</p>", "null"), SaveRequest("bad", "x\ud800", "null"),
             SaveRequest("good-2", "<p>2</p>", '{"a":1}', key="key-2")]
    with caplog.at_level(logging.ERROR, logger="store"):
        outcomes = store.save_batch(items, time.monotonic() + 10)
    assert [type(outcome) for outcome in outcomes] == [Saved, NotStored, Saved], outcomes
    assert "UnicodeEncodeError" in outcomes[1].reason
    assert database.query("SELECT slug, version FROM page_versions ORDER BY slug") == [("good-1", 1), ("good-2", 1)]
    assert [record.exc_info[0] for record in caplog.records] == [UnicodeEncodeError]  # logged, with its traceback
    # The connection, and the writer, go on as before.
    assert store.save("good-1", "<p>again</p>", "null").version == 2


def test_a_beat_that_cannot_be_encoded_fails_alone_and_the_rest_of_its_batch_is_recorded(make_store, caplog):
    store = make_store()
    beats = [Beat("home", f"tab-{who}", f"client:tab-{who}", name, "viewing")
             for who, name in (("aaaaaaaa", "Ada"), ("bbbbbbbb", "Bo\ud800"), ("cccccccc", "Cy"))]
    with caplog.at_level(logging.ERROR, logger="store"):
        outcomes = store.presence_batch(beats, time.monotonic() + 10)
    assert [type(outcome) for outcome in outcomes] == [Beaten, NotStored, Beaten], outcomes
    present = store.presence("home")
    assert sorted(name for _id, name, _state in present.editors) == ["Ada", "Cy"]
    assert outcomes[0].version == outcomes[2].version == present.version != 0
    assert [record.exc_info[0] for record in caplog.records] == [UnicodeEncodeError]
