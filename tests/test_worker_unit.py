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


def serving(app):
    """A gevent WSGI server with the worker's Handler in this process (gevent's own sockets: no patching)."""
    from gevent.pywsgi import WSGIServer

    from changefeed.ops import worker

    server = WSGIServer(("127.0.0.1", 0), app, handler_class=worker.Handler, log=None)
    server.limits = {"header_s": 5, "body_s": 5, "keepalive_s": 5, "send_s": 5}
    server.log = type("Log", (), {"access_log_enabled": False})()
    server.start()
    return server


def test_a_client_asking_again_at_once_does_not_keep_the_others_waiting():
    """Fifty requests sent at once on one kept-alive connection; another client's, sent meanwhile, is served among them."""
    import gevent
    from gevent import socket

    served = []

    def app(environ, start_response):
        served.append(environ["PATH_INFO"])
        if served == ["/eager"]:  # the other client asks while the first one's requests are being served
            other.sendall(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    server = serving(app)
    try:
        eager = socket.create_connection(server.address, timeout=5)
        other = socket.create_connection(server.address, timeout=5)
        eager.sendall(b"".join(b"GET /eager HTTP/1.1\r\nHost: x\r\n\r\n" for _ in range(50)))
        with gevent.Timeout(5):
            while len(served) < 51:
                gevent.sleep(0.01)
        eager.close()
        other.close()
    finally:
        server.stop()
    assert served.index("/other") < 5, served  # without its turn: 50th, after all of the first client's


def serve_and_count_sends(monkeypatch, body):
    """Serve one GET answering `body` with the worker's Handler in this process; return (raw answer, sends made).

    Server and client are gevent's (no monkey-patching needed): the client's reads let the server run.
    """
    from gevent import socket

    from changefeed.ops import worker

    sends = []
    real = worker.Handler._sendall

    def counting(self, data):
        sends.append(len(data))
        return real(self, data)

    monkeypatch.setattr(worker.Handler, "_sendall", counting)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    server = serving(app)
    try:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
    finally:
        server.stop()
    return raw, sends


def test_a_small_answer_leaves_in_one_send_with_its_headers(monkeypatch):
    raw, sends = serve_and_count_sends(monkeypatch, b'{"changed": false}')
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b'\r\n\r\n{"changed": false}')
    assert sends == [len(raw)]


def test_a_large_answer_is_sent_after_its_headers_not_copied_behind_them(monkeypatch):
    body = b"x" * 100_000
    raw, sends = serve_and_count_sends(monkeypatch, body)
    assert raw.endswith(b"\r\n\r\n" + body)
    assert sends == [len(raw) - len(body), len(body)]
