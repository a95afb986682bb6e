"""changefeed.http.bodies on its own: request bodies read whole and as sent, in any Flask app that uses its Request.

The end-to-end tests send the same bodies to the service (test_errors.py for
forms that are not UTF-8, test_limits.py for chunked bodies through a real
server); these look at the module itself: a bare Flask app with
`request_class = Request`, requests built with werkzeug's test environ.
"""

import io

import pytest
from flask import Flask, request
from marshmallow import ValidationError
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.test import EnvironBuilder

from changefeed.http.bodies import NOT_UTF8, CappedStream, Request, utf8_fields

LIMIT = 1000  # bytes: room for every form here, and a body one byte past it
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def app():
    """A Flask app of its own, not the service: the bodies module is all it takes from changefeed."""
    app = Flask(__name__)
    app.request_class = Request
    app.config["MAX_CONTENT_LENGTH"] = LIMIT
    return app


def chunked(app, body, content_type="application/octet-stream"):
    """A request whose body comes as a server hands on a chunked one: no length, the input marked terminated."""
    environ = EnvironBuilder(method="POST", input_stream=io.BytesIO(body), content_type=content_type,
                             headers={"Transfer-Encoding": "chunked"}).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input_terminated"] = True
    return app.request_context(environ)


def posted(app, body, content_type):
    """A request with a Content-Length, as most clients send."""
    return app.test_request_context("/", method="POST", data=body, content_type=content_type)


def multipart(*parts):
    """A multipart/form-data body of (headers, value bytes) parts, boundary `b`."""
    return b"".join(b"--b\r\n" + headers + b"\r\n\r\n" + value + b"\r\n" for headers, value in parts) + b"--b--\r\n"


def field(name, charset=None):
    header = f'Content-Disposition: form-data; name="{name}"'
    return (header + (f"\r\nContent-Type: text/plain; charset={charset}" if charset else "")).encode()


# Bodies of no stated length: whole, or a 413.

def test_a_chunked_body_over_the_limit_is_a_413_not_cut_short(app):
    with chunked(app, b"x" * (LIMIT + 1)):
        with pytest.raises(RequestEntityTooLarge):
            request.get_data()


def test_a_chunked_body_exactly_at_the_limit_is_read_whole(app):
    with chunked(app, b"x" * LIMIT):
        assert request.get_data() == b"x" * LIMIT


def test_a_chunked_form_over_the_limit_is_a_413_not_a_form_missing_its_end(app):
    with chunked(app, b"slug=a&html=" + b"x" * LIMIT, FORM):
        with pytest.raises(RequestEntityTooLarge):
            request.form


def test_a_body_with_a_content_length_over_the_limit_is_a_413_as_well(app):
    with posted(app, b"x" * (LIMIT + 1), "application/octet-stream"):
        with pytest.raises(RequestEntityTooLarge):
            request.get_data()


@pytest.mark.parametrize("size", [1, 7, LIMIT, 4096])
def test_a_capped_stream_refuses_the_byte_past_the_limit_however_much_is_read_at_once(size):
    stream = CappedStream(io.BytesIO(b"x" * (LIMIT + 1)), LIMIT)
    with pytest.raises(RequestEntityTooLarge):
        while stream.read(size):
            pass


def test_a_capped_stream_ending_at_the_limit_reads_to_its_end():
    stream = CappedStream(io.BytesIO(b"x" * LIMIT), LIMIT)
    assert stream.read(400) + stream.read(400) + stream.read(400) == b"x" * LIMIT
    assert stream.read(400) == b""


# Form fields: UTF-8, or refused naming the field.

def test_utf8_fields_decodes_each_field_from_the_bytes_as_sent():
    sent = [(name.encode().decode("latin-1"), value.encode().decode("latin-1")) for name, value in
            [("html", "café €"), ("slug", "a")]]
    assert utf8_fields(sent, MultiDict) == MultiDict([("html", "café €"), ("slug", "a")])


def test_utf8_fields_refuses_every_field_that_is_not_utf8_each_by_name():
    with pytest.raises(ValidationError) as refused:
        utf8_fields([("a", "\xff"), ("b", "ok"), ("c", "\xed\xa0\x80")], MultiDict)  # a byte, an encoded surrogate
    assert refused.value.messages == {"a": [NOT_UTF8], "c": [NOT_UTF8]}


def test_a_percent_encoded_byte_that_is_not_utf8_is_refused_not_kept_as_the_text_percent_ff(app):
    with posted(app, b"slug=a&html=%FF", FORM):
        with pytest.raises(ValidationError) as refused:
            request.form
    assert refused.value.messages == {"html": [NOT_UTF8]}


def test_a_raw_byte_in_an_urlencoded_body_is_refused_not_an_empty_form(app):
    with posted(app, b"slug=a&html=\xff", FORM):
        with pytest.raises(ValidationError, match="html"):
            request.form


def test_percent_encoded_utf8_is_read_as_text(app):
    with posted(app, b"slug=a&html=caf%C3%A9+%E2%82%AC", FORM):
        assert request.form.to_dict() == {"slug": "a", "html": "café €"}


def test_a_multipart_field_is_read_as_utf8_text(app):
    with posted(app, multipart((field("html"), "café €".encode())), "multipart/form-data; boundary=b"):
        assert request.form["html"] == "café €"


def test_a_multipart_field_that_is_not_utf8_is_refused_not_replaced_with_u_fffd(app):
    with posted(app, multipart((field("slug"), b"a"), (field("html"), b"\xff\xfe")), "multipart/form-data; boundary=b"):
        with pytest.raises(ValidationError) as refused:
            request.form
    assert refused.value.messages == {"html": [NOT_UTF8]}


def test_a_multipart_parts_own_charset_is_ignored_every_field_is_utf8(app):
    """A part saying latin-1 is still read as UTF-8: é in latin-1 is one byte that is not UTF-8."""
    body = multipart((field("html", charset="latin-1"), "é".encode("latin-1")))
    with posted(app, body, "multipart/form-data; boundary=b"):
        with pytest.raises(ValidationError, match="html"):
            request.form
