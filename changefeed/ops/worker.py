"""The gunicorn worker: gevent's WSGI server, with time limits on what a client sends and reads.

gunicorn's `keepalive` and `timeout` do not reach the `gevent_pywsgi`
worker: it would wait forever for a request's headers, a body trickled a byte
at a time, the next request on an idle kept-alive connection, or a client
that stopped reading an event stream. Each of those holds a socket, a file
descriptor and a greenlet; enough of them take a worker's every descriptor
(slowloris). This worker bounds each one:

- the first byte of a request: within the header timeout on a new
  connection, the keep-alive timeout on a reused one (then it is closed);
- the request line and headers: within the header timeout of their first
  byte (else 408 and closed);
- the body: within the body timeout of the headers (else 408 and closed);
  one the app answers without reading whole (413, 415, 403, a GET that
  carries one) is not read at all: the answer says `Connection: close`,
  instead of gevent reading the rest, however slowly it comes, to reach the
  next request;
- every write: a client that takes nothing for the send timeout is dropped;
- a long-poll or stream whose client closed its end ends at once, instead of
  at its next write (an event, or a heartbeat 15 s later): its place among
  the client's open waits is given back, and its descriptor freed.

An event stream that waits for its next event holds no greenlet (`Parked`:
core/parked.py, ops/parking.py): its connection is kept, the greenlet that served the
request ends, and one of a few `Runners` goes on with it when it is woken.
A waiting greenlet costs about 8 KiB; 50,000 open streams are mostly waiting.

A long-poll or stream waits as long as it likes between writes: it is exempt
while it is what it claims to be, a client reading what it asked for. Served
with `flask run`, none of this applies (a development server).
"""

import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from functools import partial
from http import client
from io import BytesIO
from types import TracebackType
from typing import IO, Any, TypeVar, TypeVarTuple, Unpack
from wsgiref.types import WSGIEnvironment

import gevent
from gevent.pywsgi import Input, OldMessage, WSGIServer, headers_factory
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler
from werkzeug.exceptions import RequestTimeout

from changefeed.core import settings
from changefeed.core.parked import Parked
from changefeed.ops import metrics
from changefeed.ops.parking import NO_BODY, ParkingServer, Resume

log = logging.getLogger(__name__)

# Not ops/logs.py's: that imports Flask, and this module is imported in gunicorn's master (see metrics.py).
ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]
T = TypeVar("T")
Args = TypeVarTuple("Args")


class HeaderTimeout(socket.timeout):
    """The request line and headers did not arrive in time (an OSError: gevent then just closes)."""


def _timeout_answer(message: str) -> bytes:
    body = json.dumps({"error": "request timeout", "message": message}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


HEADER_TIMEOUT_ANSWER = _timeout_answer(
    "The request line and headers took too long to arrive; send the whole request at once.")

SMALL_ANSWER = 16_384  # a body up to this size is copied behind its headers and sent with them
# A connection's read buffer: a request's line and headers (a browser's, cookies included, in one or
# two reads). A larger body is read past it, straight into its own bytes. gevent's is 8 KiB, held for
# as long as the connection lives: most of what an open event stream cost (22 KiB in all).
READ_BUFFER_BYTES = 2048
# Between two requests of one connection, each other ready connection gets its turn: a timer this short,
# not sleep(0), whose callback gevent may run in the same turn of its loop, before it looks at any socket.
TURN_S = 1e-6

# A header line the email parser (http.client.parse_headers, which gevent uses) reads as exactly one
# (name, value): a name of the characters it allows (printable, no colon), then a value holding no
# line break, ending in CRLF or LF. Anything else (a folded line, a bare CR, a space before the colon)
# goes the parser's own way.
PLAIN_HEADER = re.compile(r"([\x21-\x39\x3b-\x7e]+):([^\r\n]*)\r?\n")
PLAIN_HEADERS = re.compile(f"(?:{PLAIN_HEADER.pattern})*")


def parse_headers(rfile: IO[bytes], *args: object) -> OldMessage:
    """The request's headers, read as gevent reads them (its headers_factory): the same message, made faster.

    gevent hands the header lines to the email package's parser: 16 µs of a
    request with 3 headers (docs/performance.md), about 8% of a worker's
    time on polls. Lines of the plain kind (PLAIN_HEADER), which is
    what every client sends, become the same message (the same (name, value)
    list, the same empty payload) directly. Any other line, or a message the
    email parser treats as one of parts (a multipart or message type), and
    every limit and error (a line too long, too many lines), are the parser's
    own: it reads the lines again from what was read.
    """
    try:
        lines: list[bytes] = client._read_headers(rfile)  # type: ignore[attr-defined]  # its limits, its errors
    except client.LineTooLong:  # what gevent's headers_factory answers
        message = OldMessage()
        message.status = "Line too long"
        return message
    text = b"".join(lines[:-1]).decode("latin-1")  # the last line is the end: an empty one, or none (EOF)
    if not PLAIN_HEADERS.fullmatch(text):
        return headers_factory(BytesIO(b"".join(lines)))
    fields = [(name, value.lstrip(" \t")) for name, value in PLAIN_HEADER.findall(text)]
    if any(name.lower() == "content-type" and ("multipart" in value.lower() or "message" in value.lower())
           for name, value in fields):
        return headers_factory(BytesIO(b"".join(lines)))
    message = OldMessage()
    message._headers = fields
    message.set_payload("")  # as the parser leaves it: nothing after the headers
    return message


class Handler(PyWSGIHandler):
    """One client connection, with the limits of the module docstring."""

    def __init__(self, sock: socket.socket, address: object, server: WSGIServer) -> None:
        super().__init__(sock, address, server, sock.makefile("rb", READ_BUFFER_BYTES))

    def MessageClass(self, *args: object) -> OldMessage:  # noqa: N802 - gevent's name
        return parse_headers(*args)  # type: ignore[arg-type]

    socket: Any  # gevent's connection; None for gevent's request loop once its stream is parked
    result: Any  # the app's answer (gevent's): an iterable of bytes, and of Parked for a stream
    _body: Iterator[Any] | None = None  # a parked stream's body: what it yields next, once it goes on
    _parked_socket: socket.socket | None = None  # its connection, while parked (then `socket` is None)

    def run_application(self) -> None:
        """gevent's, but a body that yields a Parked keeps its connection and goes on later (see _park)."""
        assert self.result is None
        ended = True
        try:
            self.result = self.application(self.environ, self.start_response)
            ended = self._serve(iter(self.result))
        finally:
            if ended:
                self._close_result()

    def _close_result(self) -> None:
        """Close the app's answer, as WSGI asks (a stream's gives its wait's place back), and drop it."""
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            self.result = None

    def _serve(self, body: Iterator[Any]) -> bool:
        """Write what `body` yields, as gevent's process_result does; False when it parked instead of ending."""
        for data in body:
            if isinstance(data, Parked):  # the stream's wait, handed to us
                self._park(body, data)
                return False
            if data:
                self.write(data)
        if self.status and not self.headers_sent:
            self.write(b"")
        if self.response_use_chunked:
            self._sendall(b"0\r\n\r\n")
        return True

    def _park(self, body: Iterator[Any], parked: Parked) -> None:
        """Keep the connection without a greenlet until `parked` (woken, timeout) says to go on.

        gevent's request loop then ends (close_connection), without closing
        the socket: `socket` is None for it, and the server skips it
        (ParkingServer.parked). The read buffer goes: the connection reads no more.
        """
        self._body, self.close_connection = body, True
        self._parked_socket, self.socket = self.socket, None
        self.server.parked.add(self._parked_socket)
        self.environ["wsgi.input"] = NO_BODY
        Resume(parked.woken, parked.timeout, partial(self.server.runners.put, self._resume))

    def _resume(self) -> None:
        """(On a runner) go on with the parked stream: write what it yields until it parks again or ends."""
        self.socket, self._parked_socket = self._parked_socket, None
        self.server.parked.discard(self.socket)
        body, self._body = self._body, None
        assert body is not None
        ended = True
        try:
            ended = self._serve(body)
        except OSError as exc:  # the client left, or stopped reading for the send timeout
            if isinstance(exc, socket.timeout):
                metrics.refused("send_timeout")
        except Exception:
            log.exception("an event stream failed")
        finally:
            if ended:
                self._end_parked()

    def _end_parked(self) -> None:
        """The stream ended (or failed): close its body (the wait's place is given back), log, close."""
        try:
            self._close_result()
        except Exception:
            log.exception("closing an event stream failed")
        finally:
            self.time_finish = time.time()
            self.log_request()
            try:  # as gevent's handle() closes a connection: the descriptor itself, then its object
                self.socket._sock.close()
                self.socket.close()
            except OSError:
                pass

    _deadline: gevent.Timeout | None = None  # the header timer of the request being read, if one was needed
    _served = False  # whether a request was served on this connection (then it is kept alive)
    wsgi_input: "Input | DeadlineInput"  # gevent's reader of the body, or ours around it (get_environ)
    _sendall: Callable[[bytes], None]  # gevent's; _write_with_headers borrows its name for one call

    def read_requestline(self) -> str:
        if self._served:
            # The other connections first: a client that asks again the moment it has its answer (a
            # script, a proxy's kept-alive connection, wrk) finds its next request read at once, and
            # would be served again and again while the others wait (p99 of polls: 1.2 s; now 12 ms).
            gevent.sleep(TURN_S)
        limits = self.server.limits
        self.socket.settimeout(limits["keepalive_s"] if self._served else limits["header_s"])
        try:
            waiting = self.rfile.peek(1)  # the first byte; socket.timeout ends the connection quietly
        finally:
            self.socket.settimeout(None)
        # A poll arrives in one packet: with its headers all here, nothing can stall, no timer needed.
        if waiting and b"\r\n\r\n" not in waiting:
            self._deadline = gevent.Timeout.start_new(limits["header_s"], HeaderTimeout("headers took too long"))
        try:
            return super().read_requestline()
        except HeaderTimeout:  # gevent would close without a word: say why first
            metrics.refused("header_timeout")
            try:
                self.socket.sendall(HEADER_TIMEOUT_ANSWER)
            except OSError:
                pass
            return ""  # the connection ends

    def read_request(self, raw_requestline: str) -> bool:
        try:
            return super().read_request(raw_requestline)
        finally:
            self._stop_deadline()

    def handle_one_request(self) -> tuple[str, bytes] | bool | None:
        try:
            return super().handle_one_request()
        finally:
            self._stop_deadline()
            self._served = True

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.close()
            self._deadline = None

    def _handle_client_error(self, ex: BaseException) -> tuple[str, bytes]:
        if isinstance(ex, HeaderTimeout):
            metrics.refused("header_timeout")
            self.close_connection = True
            return ("408", HEADER_TIMEOUT_ANSWER)
        return super()._handle_client_error(ex)

    def get_environ(self) -> WSGIEnvironment:
        environ = super().get_environ()
        limits = self.server.limits
        if self.content_length or environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            # gevent discards what the app left of the body through self.wsgi_input: that too has the deadline.
            self.wsgi_input = environ["wsgi.input"] = DeadlineInput(self, self.wsgi_input, limits["body_s"])
        # Writes: a client that takes nothing for this long is gone, or is holding the socket on purpose.
        self.socket.settimeout(limits["send_s"])
        # Bound to the socket, not to this handler: the handler holds the environ, and a
        # handler's method in it would be a reference cycle, kept (with its buffers) until
        # the garbage collector's rare full pass (gunicorn.conf.py makes those rare).
        environ["changefeed.on_disconnect"] = partial(on_disconnect, self.socket._sock)
        environ["changefeed.park"] = True  # a stream may hand us its waits (Parked)
        environ["changefeed.readable"] = Readable  # a WebSocket reads its socket itself
        # Where simple-websocket looks for the connection first: without it, it takes a dup() of the
        # socket, a second descriptor per WebSocket (gunicorn's own worker names it gunicorn.sock).
        environ["gunicorn.socket"] = self.socket
        return environ

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: ExcInfo | None = None) -> Callable[[bytes], object]:
        # Answered before its body was read: the connection ends rather than wait for the rest of it.
        if (isinstance(self.wsgi_input, DeadlineInput) and self.wsgi_input.unread()
                and not any(name.lower() == "connection" for name, _ in headers)):
            headers = [*headers, ("Connection", "close")]
        return super().start_response(status, headers, exc_info)

    def _write_with_headers(self, data: bytes) -> None:
        """gevent's, but a small body leaves in the headers' own send: one system call per answer, not two.

        gevent sends the headers, then the body, to spare copying a large
        body; every poll and save answer is a few hundred bytes, and the
        second send was a twentieth of a save's CPU in the worker.
        """
        if len(data) > SMALL_ANSWER:
            return super()._write_with_headers(data)
        parts: list[bytes] = []
        self._sendall = parts.append  # collect, for this one call
        try:
            super()._write_with_headers(data)
        finally:
            del self._sendall  # the class's method again
        self._sendall(b"".join(parts))

    def log_request(self) -> None:
        if self._body is not None:  # parked: the request is logged when the stream ends
            return
        # gunicorn's builds the whole access-log line (two datetimes, the request's headers) before its
        # logger looks whether an access log is on: off (the default, gunicorn.conf.py), skip all of it.
        if getattr(self.server.log, "access_log_enabled", True):
            super().log_request()

    def handle_error(self, t: type[BaseException], v: BaseException, tb: TracebackType | None) -> None:
        if isinstance(v, socket.timeout):  # a write timed out: the client stopped reading
            metrics.refused("send_timeout")
            self.close_connection = True
            return
        super().handle_error(t, v, tb)


class Readable:
    """Calls `callback()` once the connection `raw` has bytes to read (or has ended), after each arm().

    For a WebSocket whose worker reads the socket itself instead of a reader
    greenlet of the library's: one libev watcher, armed while the worker
    waits. One-shot: a watcher left on would wake the loop again and again
    while the worker, busy writing, leaves the bytes unread.
    """

    def __init__(self, raw: socket.socket, callback: Callable[[], object]) -> None:
        self._watcher = gevent.get_hub().loop.io(raw.fileno(), 1)
        self._callback: Callable[[], object] | None = callback

    def arm(self) -> None:
        if not self._watcher.active:
            self._watcher.start(self._fire)

    def _fire(self) -> None:
        self._watcher.stop()
        if self._callback is not None:
            self._callback()

    def close(self) -> None:
        self._watcher.close()
        self._callback = None  # the callback refers to the socket's worker: no cycle through the watcher


def on_disconnect(raw: socket.socket, callback: Callable[[], object]) -> Callable[[], None]:
    """Call `callback()` once the client closes its end of the connection `raw`; return a cancel().

    For a request that waits (a long-poll, a stream): nothing more is read
    from the socket meanwhile, so its becoming readable means the end of it,
    unless the client already sent its next request (then there is no
    telling: stop looking). One libev watcher, no greenlet. `raw` is gevent's
    own non-blocking socket, so a peek never waits.
    """
    watcher = gevent.get_hub().loop.io(raw.fileno(), 1)

    def readable() -> None:
        try:
            if raw.recv(1, socket.MSG_PEEK):
                watcher.stop()  # a next request, not a goodbye
                return
        except BlockingIOError:
            return
        except OSError:
            pass  # reset by the peer: gone as well
        watcher.stop()
        callback()

    def cancel() -> None:
        watcher.close()
        watcher.callback = None  # readable() refers to the watcher: break the cycle now

    watcher.start(readable)
    return cancel


class DeadlineInput:
    """A request body that must arrive before a deadline, however it is read."""

    def __init__(self, handler: Handler, stream: Input, timeout_s: float) -> None:
        self._handler, self._stream = handler, stream
        self._ends_at = gevent.get_hub().loop.now() + timeout_s

    def _call(self, method: Callable[[Unpack[Args]], T], *args: Unpack[Args]) -> T:
        stream = self._stream
        if not stream.chunked_input and stream.position >= (stream.content_length or 0):
            return method(*args)  # all read: gevent answers b"" without reading (werkzeug's last look), no timer
        remaining = self._ends_at - gevent.get_hub().loop.now()
        try:
            with gevent.Timeout(max(remaining, 0.001), HeaderTimeout("body took too long")):
                return method(*args)
        except HeaderTimeout:
            metrics.refused("body_timeout")
            # The rest of the body is not worth waiting for: the connection ends (so _discard reads no more).
            self._handler.close_connection = True
            raise RequestTimeout("The request body took too long to arrive; send it at once.") from None

    def read(self, length: int | None = None) -> bytes:
        return self._call(self._stream.read, length)

    def readline(self, size: int | None = None) -> bytes:
        return self._call(self._stream.readline, size)

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return self._call(self._stream.readlines, hint)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def unread(self) -> bool:
        """Whether some of the body is still to come (gevent's Input knows how far it got)."""
        stream = self._stream
        if stream.chunked_input:
            return stream.chunk_length != 0  # 0 once the last chunk was read
        return stream.position < (stream.content_length or 0)

    def _discard(self) -> None:
        """What gevent calls after the answer, to reach the next request: read the rest, within the deadline.

        Not at all when the connection ends anyway (an answer given before
        the body was read says so): a slow client could trickle it for ever,
        each byte restarting the send timeout, the only one that applied.
        """
        if self._handler.close_connection or not self.unread():  # the usual case: read whole, no timer
            return
        try:
            self._call(self._stream._discard)
        except RequestTimeout:  # _call ended the connection; the answer was sent already
            pass


class Worker(GeventPyWSGIWorker):
    """gunicorn's gevent_pywsgi worker with the limits above (worker_class = "worker.Worker")."""

    wsgi_handler = Handler
    server_class: type[WSGIServer]  # gunicorn's; run() puts the limits on a subclass of it

    def run(self) -> None:
        config = settings.from_environ()
        limits = {"header_s": config["CHANGEFEED_HEADER_TIMEOUT_S"],
                  "body_s": config["CHANGEFEED_BODY_TIMEOUT_S"],
                  "keepalive_s": config["CHANGEFEED_KEEPALIVE_S"],
                  "send_s": config["CHANGEFEED_SEND_TIMEOUT_S"]}

        self.server_class = type("Server", (ParkingServer, self.server_class), {"limits": limits, "instances": []})
        super().run()
        self._let_parked_end(self.server_class.instances)

    def _let_parked_end(self, servers: list[ParkingServer]) -> None:
        """After gunicorn's graceful wait, which counts only requests with a greenlet: the parked ones too.

        On SIGTERM the notifier wakes every stream and socket to end it (a
        WebSocket with a close frame, 1012); a socket that follows nothing
        wakes on its own within a second. Without this wait the worker
        would exit before their turns had run.
        """
        ends = time.monotonic() + self.cfg.graceful_timeout
        while any(server.holding() for server in servers) and time.monotonic() < ends:
            self.notify()
            gevent.sleep(0.1)
