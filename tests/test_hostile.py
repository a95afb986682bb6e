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
from websocket import ABNF

from changefeed.core.outcomes import NotStored, Saved, SaveRequest
from changefeed.core.presence import Beat, Beaten

pytestmark = pytest.mark.engines

JSON = {"Content-Type": "application/json"}
SURROGATE = "\\ud800"  # as JSON text: valid JSON, but not Unicode once parsed
BEATERS = 40


def deep(levels, inner="0"):
    return "[" * levels + inner + "]" * levels


def save_json(fields):
    """A /save JSON body: `fields` maps each field to its JSON text, as sent."""
    return {"data": "{" + ", ".join(f'"{name}": {text}' for name, text in fields.items()) + "}", "headers": JSON}


def beat_json(**overrides):
    fields = {"slug": '"home"', "client_id": '"tab-aaaaaaaa"', "name": '"Ada"', "state": '"viewing"', **overrides}
    return save_json(fields)


PAGE = {"slug": '"hostile"', "html": '"x"'}

# (id, method, path, requests keyword arguments, status (or either of two), field named in `fields` (422))
HOSTILE_REQUESTS = [
    ("data 1e400", "POST", "/save", save_json({**PAGE, "data": '{"n": 1e400}'}), 422, "data"),
    ("data -1e400 in an array", "POST", "/save", save_json({**PAGE, "data": "[1, [-1e400]]"}), 422, "data"),
    ("data 1e400 alone", "POST", "/save", save_json({**PAGE, "data": "1E+999999999"}), 422, "data"),
    ("data 65 deep", "POST", "/save", save_json({**PAGE, "data": deep(65)}), 422, "data"),
    ("data 900 deep", "POST", "/save", save_json({**PAGE, "data": deep(900)}), 422, "data"),
    # Near the parser's own limit, which depends on the stack in use: parsed and refused, or not parsed.
    ("data 955 deep", "POST", "/save", save_json({**PAGE, "data": deep(955)}), (400, 422), "data"),
    ("body 100000 deep", "POST", "/save", save_json({**PAGE, "data": deep(100_000)}), 400, None),
    ("data key surrogate", "POST", "/save", save_json({**PAGE, "data": f'{{"{SURROGATE}": 1}}'}), 422, "data"),
    ("data string surrogate", "POST", "/save", save_json({**PAGE, "data": f'[[["a{SURROGATE}"]]]'}), 422, "data"),
    ("html surrogate", "POST", "/save", save_json({**PAGE, "html": f'"{SURROGATE}"'}), 422, "html"),
    ("slug surrogate", "POST", "/save", save_json({**PAGE, "slug": f'"a{SURROGATE}"'}), 422, "slug"),
    ("slug kelvin sign", "POST", "/save", save_json({**PAGE, "slug": '"\\u212a"'}), 422, "slug"),
    ("base_version 1e400", "POST", "/save", save_json({**PAGE, "base_version": "1e400"}), 422, "base_version"),
    ("form data 1e400", "POST", "/save", {"data": {"slug": "hostile", "html": "x", "data": '{"n": 1e400}'}}, 422,
     "data"),
    ("form data 1000 deep", "POST", "/save", {"data": {"slug": "hostile", "html": "x", "data": deep(1000)}}, 422,
     "data"),
    ("form data 100000 deep", "POST", "/save", {"data": {"slug": "hostile", "html": "x", "data": deep(100_000)}},
     422, "data"),
    ("Idempotency-Key surrogate bytes", "POST", "/save",
     {**save_json(PAGE), "headers": {**JSON, "Idempotency-Key": b"k\xed\xa0\x80"}}, 422, "Idempotency-Key"),
    ("beat name surrogate", "POST", "/presence", beat_json(name=f'"{SURROGATE}"'), 422, "name"),
    ("beat name 1e400", "POST", "/presence", beat_json(name="1e400"), 422, "name"),
    ("beat name 900 deep", "POST", "/presence", beat_json(name=deep(900)), 422, "name"),
    ("beat client_id surrogate", "POST", "/presence", beat_json(client_id=f'"tab-aaaaaaa{SURROGATE}"'), 422,
     "client_id"),
    ("beat slug surrogate", "POST", "/presence", beat_json(slug=f'"{SURROGATE}"'), 422, "slug"),
    ("beat state surrogate", "POST", "/presence", beat_json(state=f'"{SURROGATE}"'), 422, "state"),
    ("beat 100000 deep", "POST", "/presence", beat_json(name=deep(100_000)), 400, None),
    ("changes slug surrogate bytes", "GET", "/changes?slug=%ED%A0%80", {}, 422, "slug"),
    ("changes slug kelvin sign", "GET", "/changes?slug=%E2%84%AA", {}, 422, "slug"),
    ("changes epoch surrogate bytes", "GET", "/changes?slug=a&epoch=%ED%A0%80", {}, 422, "epoch"),
    ("changes since 1e400", "GET", "/changes?slug=a&since=1e400", {}, 422, "since"),
    ("events Last-Event-ID surrogate bytes", "GET", "/events?slug=a",
     {"headers": {"Last-Event-ID": b"\xed\xa0\x80:1"}}, 422, "Last-Event-ID"),
    ("page slug kelvin sign", "GET", "/?slug=%E2%84%AA", {}, 422, "slug"),
    ("form html not UTF-8", "POST", "/save", {"data": "slug=hostile&html=%FF",
                                               "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
     422, "html"),
    ("delete slug surrogate", "POST", "/delete", save_json({"slug": f'"{SURROGATE}"'}), 422, "slug"),
    ("delete base_version 1e400", "POST", "/delete", save_json({"slug": '"a"', "base_version": "1e400"}), 422,
     "base_version"),
    ("delete 100000 deep", "POST", "/delete", save_json({"slug": deep(100_000)}), 400, None),
]
# Chunked bodies past the limit: tests/test_limits.py (a 413, never cut short and read as the whole body).


def test_a_real_server_answers_every_hostile_request_with_json_and_keeps_serving(server, database):
    session = requests.Session()
    for name, method, path, kwargs, status, field in HOSTILE_REQUESTS:
        answer = session.request(method, server.url + path, timeout=10, **kwargs)
        assert answer.status_code in (status if isinstance(status, tuple) else (status,)), (name, answer.text)
        assert answer.headers["Content-Type"] == "application/json", name
        body = strict_json(answer.text)
        if answer.status_code == 422:
            assert list(body["fields"]) == [field], (name, body)
    assert database.query("SELECT count(*) FROM page_versions") == [(0,)]
    assert database.query("SELECT count(*) FROM page_editors") == [(0,)]
    assert session.get(f"{server.url}/readyz", timeout=10).status_code == 200
    assert session.post(f"{server.url}/save", json={"slug": "still-up", "html": "ok"}, timeout=10).status_code == 200
    assert "Traceback" not in server.log()


def strict_json(text):
    """Parse as a browser's JSON.parse would: NaN and Infinity are not JSON."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in an answer: not JSON"))


HOSTILE_MESSAGES = [
    '{"type": "ping", "id": "%s"}' % SURROGATE,
    '{"type": "ping", "id": 1e400}',
    '{"type": "ping", "id": %s}' % deep(900),
    '{"type": "subscribe", "slug": "%s"}' % SURROGATE,
    '{"type": "subscribe", "slug": "\\u212a"}',
    '{"type": "subscribe", "slug": "home", "epoch": "%s"}' % SURROGATE,
    '{"type": "subscribe", "slug": "home", "since": 1e400}',
    '{"type": "subscribe", "slug": "home", "presence": 0, "presence_form": "%s"}' % SURROGATE,
    '{"type": "unsubscribe", "slug": "%s"}' % SURROGATE,
    '{"type": "presence", "slug": "home", "client_id": "tab-12345678", "name": "%s", "state": "viewing"}' % SURROGATE,
    '{"type": "presence", "slug": "home", "client_id": "tab-12345678", "name": 1e400, "state": "viewing"}',
    '{"type": "presence", "slug": "home", "client_id": "tab-1234567%s", "state": "viewing"}' % SURROGATE,
    '{"type": "presence", "slug": "home", "client_id": "tab-12345678", "state": "%s"}' % SURROGATE,
    '{"type": "presence", "slug": "%s", "client_id": "tab-12345678", "state": "viewing"}' % SURROGATE,
    '{"type": "%s"}' % SURROGATE,
    '{"type": "dance", "slug": "%s"}' % SURROGATE,
    '{"type": "ping", "n": %s}' % deep(30_000),  # under the 64 KiB message limit; deeper than the parser goes
]


def test_a_real_server_answers_every_hostile_message_with_an_error_frame_and_the_socket_stays_open(
        server, connect, database):  # noqa: F811 - the fixture
    ws = connect(server)
    for n, text in enumerate(HOSTILE_MESSAGES):
        ws.ws.send(text)
        opcode, frame = ws.ws.recv_data_frame(True)
        assert opcode == ABNF.OPCODE_TEXT, (text[:80], opcode, frame.data[:40])
        frame = strict_json(frame.data)
        assert frame["type"] == "error" and frame["error"] == "invalid message", (text[:80], frame)
        ws.ping(n)  # still open, still answering
    assert database.query("SELECT count(*) FROM page_editors") == [(0,)]
    assert "Traceback" not in server.log()


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
