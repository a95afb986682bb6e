"""Unit tests of changefeed/ops/worker.py's header parsing: the same message as gevent's parser, sooner.

The worker reads a request's headers without the email package's parser
when every line is a plain `Name: value`; these pin that the message it
makes is the one gevent's own headers_factory makes, attribute for attribute,
for plain headers and for every kind of line that must go the parser's way.
The end-to-end tests (test_limits.py, test_hostile.py) send requests through
a real gunicorn worker.
"""

import random
from http import client
from io import BytesIO

import pytest
from gevent.pywsgi import headers_factory

from changefeed.ops.worker import parse_headers

PLAIN = (b"Host: 127.0.0.1:8000\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\nContent-Type: application/json\r\n"
         b"Content-Length: 55\r\nIdempotency-Key: k-1\r\nCookie: a=1\r\nCookie: b=2\r\nX-Empty:\r\n\r\n")
ODD = [
    b"Folded: a\r\n b\r\n\r\n",          # a continuation line
    b"Bad Name: x\r\n\r\n",              # a space before the colon
    b": no name\r\n\r\n",                # no name at all
    b"X: a\rb\r\n\r\n",                  # a bare CR inside a value
    b"No colon here\r\n\r\n",            # not a header: the parser's body starts here
    b"From someone\r\nX: y\r\n\r\n",     # an mbox From line
    b"X: y\r\n",                         # the client closed before the empty line
    b"X: y",                             # ... in the middle of a line
    b"",                                 # ... before any header
    b"X: \xff\xfe\x80\r\n\r\n",          # bytes past ASCII (read as latin-1)
    b"X:  \t spaced \t \r\n\r\n",        # blanks around a value
    b"X: y\nZ: w\n\n",                   # bare LF line ends
    b"Content-Type: multipart/form-data; boundary=b\r\n\r\n",
    b"Content-Type: Message/RFC822\r\n\r\n",
    b"content-type: MULTIPART/mixed\r\n\r\n",
    b"A: " + b"x" * 70_000 + b"\r\n\r\n",  # a line past http.client's limit
    b"X: y\r\n" * 101 + b"\r\n",         # more lines than http.client allows
]


def message(parse, raw):
    """What `parse` makes of `raw` (followed by a body it must not read): the message, or the error; and how far it read."""
    rfile = BytesIO(raw + b"BODY")
    try:
        parsed = parse(rfile, 0)
    except client.HTTPException as exc:
        return repr(exc), rfile.tell()
    return attributes(parsed), rfile.tell()


def attributes(parsed):
    """A message's every attribute; defects and nested messages (a message/* type) by what they are, not identity."""
    fields = dict(vars(parsed))
    fields["defects"] = [(type(defect), str(defect)) for defect in parsed.defects]
    if isinstance(fields["_payload"], list):
        fields["_payload"] = [attributes(part) for part in fields["_payload"]]
    return fields


@pytest.mark.parametrize("raw", [PLAIN, *ODD])
def test_headers_parse_to_the_same_message_as_gevents_parser(raw):
    assert message(parse_headers, raw) == message(headers_factory, raw)


def test_random_header_blocks_parse_to_the_same_message():
    """Lines put together at random from plain and odd pieces."""
    pieces = [b"Host: a\r\n", b"X-A: 1\r\n", b"x-a:2\r\n", b"Y:\t\r\n", b" cont\r\n", b"\tcont\r\n", b"Z : 3\r\n",
              b"W: a\rb\r\n", b"V: \x85\r\n", b"U: b\n", b"Content-Type: text/plain\r\n", b"Content-Type: multipart/x\r\n",
              b"From x\r\n", b"junk\r\n", b":\r\n"]
    pick = random.Random(23)
    for _ in range(3000):
        raw = b"".join(pick.choices(pieces, k=pick.randint(0, 6))) + pick.choice([b"\r\n", b"\n", b""])
        assert message(parse_headers, raw) == message(headers_factory, raw), raw


def test_plain_headers_skip_the_email_parser(monkeypatch):
    """The point of it: a plain request never reaches the email package."""
    calls = []
    monkeypatch.setattr("changefeed.ops.worker.headers_factory", lambda *args: calls.append(args))
    assert parse_headers(BytesIO(PLAIN), 0).get("content-length") == "55"
    assert calls == []
