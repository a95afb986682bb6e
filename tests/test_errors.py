"""Every bad input gets one JSON error shape naming the field and the reason; nothing is written."""

import json

import pytest
import requests

from app import create_app
from support.servers import close_app

pytestmark = pytest.mark.engines

MiB = 1024 * 1024
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


def body(text, content_type=JSON):
    return {"data": text, "content_type": content_type}


def page(**fields):
    return {"json": {"slug": "home", "html": "<p>x</p>", "data": None, **fields}}


# (id, method, path, request keyword arguments, status, error, field named in `fields`)
BAD_REQUESTS = [
    ("malformed json", "POST", "/save", body('{"slug": "a",'), 400, "malformed json", None),
    ("json NaN", "POST", "/save", body('{"slug": "a", "html": "x", "data": NaN}'), 400, "malformed json", None),
    ("invalid utf-8", "POST", "/save", body(b'{"slug": "a", "html": "\xff"}'), 400, "malformed json", None),
    ("json array", "POST", "/save", body("[1, 2]"), 422, "invalid request", "_schema"),
    ("json string", "POST", "/save", body('"home"'), 422, "invalid request", "_schema"),
    ("empty body", "POST", "/save", body(""), 400, "empty body", None),
    ("missing slug", "POST", "/save", {"json": {"html": "x"}}, 422, "invalid request", "slug"),
    ("slug not a string", "POST", "/save", page(slug=123), 422, "invalid request", "slug"),
    ("slug null", "POST", "/save", page(slug=None), 422, "invalid request", "slug"),
    ("slug with slash", "POST", "/save", page(slug="a/b"), 422, "invalid request", "slug"),
    ("slug dot dot", "POST", "/save", page(slug=".."), 422, "invalid request", "slug"),
    ("slug with space", "POST", "/save", page(slug="my page"), 422, "invalid request", "slug"),
    ("slug non-ascii", "POST", "/save", page(slug="caf\u00e9"), 422, "invalid request", "slug"),
    ("slug arabic digit", "POST", "/save", page(slug="\u0665"), 422, "invalid request", "slug"),
    ("slug NUL byte", "POST", "/save", page(slug="a\x00b"), 422, "invalid request", "slug"),
    ("slug trailing newline", "POST", "/save", page(slug="a\n"), 422, "invalid request", "slug"),
    ("slug empty", "POST", "/save", page(slug=""), 422, "invalid request", "slug"),
    ("slug 121 chars", "POST", "/save", page(slug="a" * 121), 422, "invalid request", "slug"),
    ("missing html", "POST", "/save", {"json": {"slug": "a"}}, 422, "invalid request", "html"),
    ("html not a string", "POST", "/save", page(html=["x"]), 422, "invalid request", "html"),
    ("html unpaired surrogate", "POST", "/save", body('{"slug": "a", "html": "\\ud800"}'), 422,
     "invalid request", "html"),
    ("html over 1 MiB", "POST", "/save", page(html="x" * (MiB + 1)), 422, "invalid request", "html"),
    ("data over 256 KiB", "POST", "/save", page(data="x" * (256 * 1024)), 422, "invalid request", "data"),
    ("unknown field", "POST", "/save", page(title="x"), 422, "invalid request", "title"),
    ("base_version text", "POST", "/save", page(base_version="one"), 422, "invalid request", "base_version"),
    ("base_version float", "POST", "/save", page(base_version=1.5), 422, "invalid request", "base_version"),
    ("base_version bool", "POST", "/save", page(base_version=True), 422, "invalid request", "base_version"),
    ("base_version negative", "POST", "/save", page(base_version=-1), 422, "invalid request", "base_version"),
    ("base_version huge", "POST", "/save", page(base_version=10**30), 422, "invalid request", "base_version"),
    ("form data not json", "POST", "/save", {"data": {"slug": "a", "html": "x", "data": "{oops"}}, 422,
     "invalid request", "data"),
    ("form html not UTF-8", "POST", "/save", body("slug=a&html=%FF", FORM), 422, "invalid request", "html"),
    ("form base_version text", "POST", "/save", {"data": {"slug": "a", "html": "x", "base_version": "1.5"}},
     422, "invalid request", "base_version"),
    ("form base_version 5000 digits", "POST", "/save",
     {"data": {"slug": "a", "html": "x", "base_version": "9" * 5000}}, 422, "invalid request", "base_version"),
    ("Idempotency-Key empty", "POST", "/save", {**page(), "headers": {"Idempotency-Key": ""}}, 422,
     "invalid request", "Idempotency-Key"),
    ("Idempotency-Key 256 chars", "POST", "/save", {**page(), "headers": {"Idempotency-Key": "k" * 256}}, 422,
     "invalid request", "Idempotency-Key"),
    ("Idempotency-Key with a space", "POST", "/save", {**page(), "headers": {"Idempotency-Key": "a b"}}, 422,
     "invalid request", "Idempotency-Key"),
    ("body over the limit", "POST", "/save", body("x" * (8 * MiB + 1)), 413, "request entity too large", None),
    ("text/plain body", "POST", "/save", body("slug=a", "text/plain"), 415, "unsupported media type", None),
    ("no content type", "POST", "/save", {"data": b"slug=a"}, 415, "unsupported media type", None),
    ("since -1", "GET", "/changes?slug=a&since=-1", {}, 422, "invalid request", "since"),
    ("since abc", "GET", "/changes?slug=a&since=abc", {}, 422, "invalid request", "since"),
    ("since 1.5", "GET", "/changes?slug=a&since=1.5", {}, 422, "invalid request", "since"),
    ("since 10**30", "GET", f"/changes?slug=a&since={10**30}", {}, 422, "invalid request", "since"),
    ("since empty", "GET", "/changes?slug=a&since=", {}, 422, "invalid request", "since"),
    ("since 5000 digits", "GET", "/changes?slug=a&since=" + "9" * 5000, {}, 422, "invalid request", "since"),
    ("wait 5000 digits", "GET", "/changes?slug=a&wait=" + "9" * 5000, {}, 422, "invalid request", "wait"),
    ("events since 5000 digits", "GET", "/events?slug=a&since=" + "9" * 5000, {}, 422, "invalid request",
     "since"),
    ("Last-Event-ID 5000 digits", "GET", "/events?slug=a", {"headers": {"Last-Event-ID": "9" * 5000}}, 422,
     "invalid request", "Last-Event-ID"),
    ("Last-Event-ID epoch and 5000 digits", "GET", "/events?slug=a",
     {"headers": {"Last-Event-ID": "5f0c8e2a9b1d4c3e:" + "9" * 5000}}, 422, "invalid request", "Last-Event-ID"),
    ("changes bad epoch", "GET", "/changes?slug=a&epoch=no%20such", {}, 422, "invalid request", "epoch"),
    ("wait 61", "GET", "/changes?slug=a&wait=61", {}, 422, "invalid request", "wait"),
    ("wait -1", "GET", "/changes?slug=a&wait=-1", {}, 422, "invalid request", "wait"),
    ("wait 1.5", "GET", "/changes?slug=a&wait=1.5", {}, 422, "invalid request", "wait"),
    ("events without slug", "GET", "/events", {}, 422, "invalid request", "slug"),
    ("events since abc", "GET", "/events?slug=a&since=abc", {}, 422, "invalid request", "since"),
    ("events bad Last-Event-ID", "GET", "/events?slug=a", {"headers": {"Last-Event-ID": "-3"}}, 422,
     "invalid request", "Last-Event-ID"),
    ("page bad transport", "GET", "/?transport=carrier-pigeon", {}, 422, "invalid request", "transport"),
    ("changes without slug", "GET", "/changes?since=1", {}, 422, "invalid request", "slug"),
    ("changes bad slug", "GET", "/changes?slug=..%2Fetc", {}, 422, "invalid request", "slug"),
    ("page bad slug", "GET", "/?slug=a%20b", {}, 422, "invalid request", "slug"),
    ("unknown route", "GET", "/nope", {}, 404, "not found", None),
    ("GET /save", "GET", "/save", {}, 405, "method not allowed", None),
    ("DELETE /changes", "DELETE", "/changes?slug=a", {}, 405, "method not allowed", None),
]


def assert_error_shape(status, headers, payload, expected_status, error, field):
    """Check one error answer against the envelope every error uses."""
    assert status == expected_status, payload
    assert headers["Content-Type"] == "application/json"
    assert payload["error"] == error
    assert isinstance(payload["message"], str) and payload["message"]
    if field is not None:
        assert field in payload["fields"], payload
        assert all(isinstance(m, str) and m for m in payload["fields"][field])


def page_count(database):
    return database.query("SELECT count(*) FROM page_versions")[0][0]


@pytest.mark.parametrize("name, method, path, kwargs, status, error, field", BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_json_error_and_writes_nothing(client, database, name, method, path, kwargs,
                                                        status, error, field):
    response = client.open(path, method=method, **kwargs)
    assert_error_shape(response.status_code, response.headers, response.get_json(), status, error, field)
    assert page_count(database) == 0


def test_over_size_error_says_the_limit(client):
    response = client.post("/save", data="x" * (8 * MiB + 1), content_type=JSON)
    assert str(8 * MiB) in response.get_json()["message"]


def test_wrong_method_lists_the_allowed_ones(client):
    response = client.get("/save")
    assert response.headers["Allow"] and "POST" in response.get_json()["message"]


def test_options_answers_json_naming_the_allowed_methods_on_every_route(app, client):
    """Flask's automatic OPTIONS answer was an empty text/html body, where every answer is documented as JSON."""
    adapter = app.url_map.bind("localhost")
    paths = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    # /ws matches a WebSocket handshake only (werkzeug): anything else there, OPTIONS too, is its JSON 400.
    assert client.options("/ws").get_json()["error"] == "bad request"
    for path in paths - {"/ws"}:
        response = client.options(path)
        assert response.status_code == 200, path
        assert response.headers["Content-Type"] == "application/json", path
        allowed = sorted(adapter.allowed_methods(path))
        assert response.get_json() == {"allow": allowed}, path
        assert sorted(response.headers["Allow"].split(", ")) == allowed, path


def multipart(**fields):
    parts = [b'--b\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (name.encode(), value)
             for name, value in fields.items()]
    return b"".join(parts) + b"--b--\r\n"


MULTIPART = "multipart/form-data; boundary=b"


def test_a_form_field_that_is_not_utf8_is_422_naming_it_and_nothing_is_written(client, database):
    """werkzeug kept `%FF` as the text "%FF", a raw byte in a multipart field as U+FFFD: both were saved."""
    for content_type, sent, field in [
        (FORM, b"slug=a&html=%FF", "html"),
        (FORM, b"slug=a&html=caf%C3", "html"),  # cut in the middle of a character
        (FORM, b"slug=a&html=%ED%A0%80", "html"),  # an encoded surrogate: not UTF-8 either
        (FORM, b"slug=a&html=\xff", "html"),  # a byte sent as it is
        (FORM, b"slug=%FF&html=x", "slug"),
        (MULTIPART, multipart(slug=b"a", html=b"\xff\xfe"), "html"),
    ]:
        response = client.post("/save", data=sent, content_type=content_type)
        assert_error_shape(response.status_code, response.headers, response.get_json(), 422, "invalid request", field)
        assert "UTF-8" in response.get_json()["fields"][field][0], sent
    assert page_count(database) == 0
    for content_type, sent in [(FORM, "slug=a&html=caf%C3%A9+%E2%82%AC".encode()), (FORM, "slug=a&html=café €".encode()),
                               (MULTIPART, multipart(slug=b"a", html="café €".encode()))]:
        assert client.post("/save", data=sent, content_type=content_type).status_code == 200
        assert client.get("/changes?slug=a").get_json()["html"] == "café €"


def test_limits_are_configurable(database):
    app = create_app({**database.config, "CHANGEFEED_MAX_HTML_BYTES": 10, "CHANGEFEED_MAX_DATA_BYTES": 10})
    client = app.test_client()
    assert client.post("/save", json={"slug": "a", "html": "x" * 10, "data": [1]}).status_code == 200
    for field, value in [("html", "x" * 11), ("data", "x" * 9)]:
        response = client.post("/save", json={"slug": "a", "html": "x", field: value})
        assert response.status_code == 422 and field in response.get_json()["fields"]
    close_app(app)


def test_real_server_answers_every_bad_request_and_keeps_serving(server, database):
    """The same bad requests against gunicorn: JSON errors, nothing written, still answering."""
    session = requests.Session()
    for name, method, path, kwargs, status, error, field in BAD_REQUESTS:
        kwargs = dict(kwargs)
        if "content_type" in kwargs:
            kwargs["headers"] = {"Content-Type": kwargs.pop("content_type")}
        response = session.request(method, server.url + path, timeout=10, **kwargs)
        assert_error_shape(response.status_code, response.headers, response.json(), status, error, field)
    assert page_count(database) == 0
    saved = session.post(server.url + "/save", json={"slug": "still-up", "html": "ok"}, timeout=10)
    assert saved.status_code == 200 and saved.json()["version"] == 1


def test_an_answer_that_would_hold_nan_is_a_json_500_never_invalid_json(database):
    """Flask's JSON provider refuses NaN and Infinity: a client's JSON.parse would fail on the whole answer."""
    app = create_app({**database.config})
    app.add_url_rule("/nan", "nan", lambda: {"n": float("nan"), "m": float("inf")})
    try:
        response = app.test_client().get("/nan")
        strict = json.loads(response.text, parse_constant=lambda name: pytest.fail(f"{name} in the answer"))
        assert response.status_code == 500 and strict["error"] and strict["request_id"], response.text
    finally:
        close_app(app)
