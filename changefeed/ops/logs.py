"""Logs: a request id, an access log of one structured line per request, a line per save.

- The request id ties what a client was told (an error's `request_id`, its
  `X-Request-Id` header) to what the server logged, and to nginx's own log
  when nginx passes its `$request_id`. It is made only when something needs
  it (an error answer, a log line), so an unchanged poll, the hot path, pays
  nothing for it.
- The access log (CHANGEFEED_ACCESS_LOG=json or kv) is a WSGI middleware
  around the whole app, installed only when asked for: off, nothing of it
  runs. It writes a request's line when the server closes the response, the
  only moment a stream's or a long-poll's duration and size are known, and
  straight to standard output, as gunicorn's `--access-logfile -` would:
  through Python's logging, each line cost about three times as much.
- No line ever holds a secret or a page: no body, no header but the id, and
  the value of a token-like query parameter is replaced by REDACTED.
- Under gunicorn and `flask run` nobody configures Python's logging, so the
  app's lines would be lost (info) or bare (warnings): `configure` sends them
  to gunicorn's error log (stderr) with their level and logger name. When
  logging is already configured (pytest's caplog, gunicorn --log-config) it
  adds nothing, so no line is written twice.
"""

import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TextIO
from urllib.parse import quote, unquote_plus
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from flask import Flask, request
from flask.logging import default_handler

from changefeed.core.clients import CLIENT, Network, client_address, parse_networks
from changefeed.core.outcomes import Saved, utc_now

# Request ids come from a generator of this module's own, seeded from the OS and again in each forked
# worker: a host app seeding `random` cannot make them repeat, and none costs a system call.
_IDS = random.Random()
os.register_at_fork(after_in_child=_IDS.seed)

# The id of the OS thread running: all the greenlets of one share it (gevent patches threading.get_ident per greenlet).
try:
    from gevent.monkey import get_original

    _native_thread: Callable[[], int] = get_original("_thread", "get_ident")
except ImportError:  # pragma: no cover - gevent is a dependency
    import _thread

    _native_thread = _thread.get_ident

# Keys of the WSGI environ that carry what a log line needs past the view.
REQUEST_ID = "changefeed.request_id"
SUB = "changefeed.sub"  # the `sub` of the token verified for this request (security/tokens.py sets it)

# What a proxy's X-Request-Id may be; anything else (a forged log line, a
# megabyte) is ignored and replaced by an id of our own.
VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Query parameters whose values are credentials: never written to a log.
SECRET_PARAMS = frozenset({"token", "access_token", "jwt"})

ACCESS_FORMATS = ("off", "json", "kv")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}



class _Formatter(logging.Formatter):
    """logging's Formatter, with the time of its lines (to the second) formatted once a second, not per line.

    A save writes a line: strftime was a third of what formatting it cost.
    """

    _last: tuple[int, str | None, str] = (-1, None, "")  # (second, datefmt, its text)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is None:  # logging's default adds milliseconds: not the same each second
            return super().formatTime(record, datefmt)
        second = int(record.created)
        last = self._last
        if last[0] != second or last[1] != datefmt:
            last = self._last = (second, datefmt, super().formatTime(record, datefmt))
        return last[2]


# gunicorn's own error-log format, plus the logger's name: one log reads as one.
ERROR_LOG_FORMAT = _Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
                              "[%Y-%m-%d %H:%M:%S %z]")

saves_log = logging.getLogger("changefeed.saves")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]
Fields = dict[str, object]  # a log line's fields, by name: text, numbers, booleans, None (left out)


def request_id(environ: WSGIEnvironment | None = None) -> str:
    """Return this request's id: the proxy's X-Request-Id when sane, else a new random one; made once."""
    if environ is None:
        environ = request.environ
    rid = environ.get(REQUEST_ID)
    if rid is None:
        sent = environ.get("HTTP_X_REQUEST_ID")
        # 64 random bits: unique enough to find one request among a day's. From _IDS above (reseeded
        # in each forked worker), not os.urandom: a system call, which under gunicorn hands the GIL to the
        # commit thread (stores/writers.py) and waits to get it back. An id is no secret.
        rid = environ[REQUEST_ID] = sent if sent and VALID_ID.fullmatch(sent) else f"{_IDS.getrandbits(64):016x}"
    return rid


def register(app: Flask) -> None:
    """Set up logging at CHANGEFEED_LOG_LEVEL, and the access log when CHANGEFEED_ACCESS_LOG asks for it."""
    level = app.config["CHANGEFEED_LOG_LEVEL"].lower()
    if level not in LEVELS:
        raise SystemExit(f"CHANGEFEED_LOG_LEVEL must be one of {', '.join(LEVELS)}, "
                         f"got {app.config['CHANGEFEED_LOG_LEVEL']!r}")
    access = app.config["CHANGEFEED_ACCESS_LOG"]
    if access not in ACCESS_FORMATS:
        raise SystemExit(f"CHANGEFEED_ACCESS_LOG must be one of {', '.join(ACCESS_FORMATS)}, got {access!r}")
    configure(LEVELS[level])
    logging.getLogger("changefeed").setLevel(LEVELS[level])
    app.logger.setLevel(LEVELS[level])
    # Flask's own handler would write app.logger's lines a second time, next to the root's.
    app.logger.removeHandler(default_handler)
    if access != "off":
        # Flask's documented way to add a WSGI middleware (mypy sees a method assigned).
        app.wsgi_app = AccessLog(  # type: ignore[method-assign]
            app.wsgi_app, _json_line if access == "json" else _kv,
            parse_networks(app.config["CHANGEFEED_TRUSTED_PROXIES"]))


def configure(level: int) -> None:
    """Send every logger's lines to the error log, unless logging is configured already (then change nothing)."""
    root = logging.getLogger()
    if root.handlers:  # pytest (caplog), gunicorn --log-config, a host app, or an earlier create_app
        return
    root.addHandler(_Stream(_error_log_stream, ERROR_LOG_FORMAT))
    root.setLevel(level)
    # Nothing of ours formats a line's thread or process name; under gevent, each request's greenlet
    # would make a stand-in thread object for logging to read it from (a line cost a third more).
    logging.logThreads = logging.logMultiprocessing = False


def _error_log_stream() -> TextIO:
    """Where gunicorn writes its error log (stderr, or its --error-logfile); stderr without gunicorn."""
    for handler in logging.getLogger("gunicorn.error").handlers:
        if isinstance(handler, logging.StreamHandler):
            return handler.stream
    return sys.stderr


class _Stream(logging.StreamHandler[TextIO]):
    """A StreamHandler that looks up its stream at each line.

    gunicorn reopens its log file on SIGUSR1, and pytest swaps sys.stderr for
    each test: a stream kept from start-up would then be a closed file.
    """

    def __init__(self, find_stream: Callable[[], TextIO], formatter: logging.Formatter) -> None:
        logging.Handler.__init__(self)
        self._find_stream = find_stream
        self.setFormatter(formatter)
        self._pending: list[str] = []  # lines of this turn of the gevent loop, not yet written
        self._loop, self._loop_thread = _gevent_loop()

    @property
    def stream(self) -> TextIO:  # type: ignore[override]  # read-only here: a StreamHandler's is an attribute
        return self._find_stream()

    def emit(self, record: logging.LogRecord) -> None:
        """StreamHandler.emit, finding the stream once per line instead of four times.

        In a gunicorn worker, the lines of the greenlets (a save's line, the
        hot one) are written once per turn of gevent's loop, together: every
        write releases the GIL to the commit thread (stores/writers.py) and
        waits to get it back, and the saves of one commit are answered in
        one turn. A line is written microseconds after its answer was sent,
        before the worker waits for anything; logging.shutdown() writes
        what is left. Lines of other threads are written at once.
        """
        try:
            line = self.format(record) + self.terminator
            if self._loop is not None and _native_thread() == self._loop_thread:
                self._pending.append(line)
                if len(self._pending) == 1:
                    self._loop.run_callback(self.flush)
                return
            stream = self._find_stream()
            stream.write(line)
            stream.flush()
        except RecursionError:  # as logging's own: see https://bugs.python.org/issue36272
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Write the lines this turn of the loop gathered (and at exit, what is left)."""
        if self._pending:
            lines, self._pending = "".join(self._pending), []
            try:
                stream = self._find_stream()
                stream.write(lines)
                stream.flush()
            except Exception:  # noqa: BLE001 - a log that cannot be written must not stop the loop
                pass


def _gevent_loop() -> tuple[Any, int | None]:
    """(gevent's loop, the native thread it runs in) in a gunicorn worker that gevent patched; else (None, None)."""
    try:
        from gevent import get_hub, monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return None, None
    if not monkey.is_module_patched("threading"):
        return None, None  # flask run, tests: every line written at once
    return get_hub().loop, _native_thread()


def saved(page: Saved) -> None:
    """Log one line for a save that was answered 200: which page, version, who, which request; never its content."""
    if saves_log.isEnabledFor(logging.INFO):
        environ = request.environ
        fields: Fields = {"slug": page.slug, "version": page.version, "sub": environ.get(SUB),
                  "request_id": request_id(environ)}
        if page.replayed:  # a retry answered from its Idempotency-Key: no new version was written
            fields["replayed"] = True
        if page.deleted:  # POST /delete: the version is a tombstone
            fields["deleted"] = True
        saves_log.info("saved %s", _kv(fields))


class AccessLog:
    """WSGI middleware: one line per request, written when the server closes the response.

    Every answer then carries X-Request-Id, as the line does: the id a client
    reports is the one to search for.
    """

    def __init__(self, app: WSGIApplication, format_line: Callable[[Fields], str],
                 proxies: Sequence[Network] = ()) -> None:
        self.app, self.format_line, self.proxies = app, format_line, proxies

    def write(self, line: str) -> None:
        """Write one line to standard output (looked up each time: pytest and others swap it)."""
        stream = sys.stdout
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):  # stdout closed or gone: losing the line beats failing the request
            pass

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        rid = request_id(environ)
        response = _LoggedResponse(self, environ, started)

        def start(status: str, headers: list[tuple[str, str]],
                  exc_info: ExcInfo | None = None) -> Callable[[bytes], object]:
            response.status = status
            if not any(name.lower() == "x-request-id" for name, _ in headers):
                headers.append(("X-Request-Id", rid))
            return start_response(status, headers, exc_info)

        try:
            response.iterable = self.app(environ, start)
        except BaseException:  # a bug below Flask, which answers every error, or a worker stopping: log it anyway
            response.close()
            raise
        return response


class _LoggedResponse:
    """The app's answer, counting the bytes the server took, and logging the request when closed."""

    __slots__ = ("log", "environ", "started", "status", "iterable", "sent", "closed")

    def __init__(self, log: AccessLog, environ: WSGIEnvironment, started: float) -> None:
        self.log, self.environ, self.started = log, environ, started
        self.status: str | None = None
        self.iterable: Iterable[bytes] = ()
        self.sent, self.closed = 0, False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.iterable:
            yield chunk
            # The server asks for the next chunk only once it has written this one: a
            # write that failed (the client left) is not counted. A Parked (a stream's wait) is no bytes.
            if isinstance(chunk, bytes):
                self.sent += len(chunk)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            close = getattr(self.iterable, "close", None)
            if close is not None:
                close()
        finally:
            self.log.write(self.log.format_line(self.fields()))

    def fields(self) -> Fields:
        """The line's fields, in the order a person reads them."""
        environ = self.environ
        return {
            "time": utc_now(),
            "method": environ.get("REQUEST_METHOD"),
            "path": _target(environ),
            "status": int(self.status[:3]) if self.status else 0,  # 0: no answer was sent
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
            "bytes": self.sent,
            "client": environ.get(CLIENT) or client_address(environ, self.log.proxies),
            "request_id": environ.get(REQUEST_ID),
            "sub": environ.get(SUB),
        }


SAFE_PATH = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=._~-]*")


def _target(environ: WSGIEnvironment) -> str:
    """The path and query as sent, with the value of every credential parameter replaced by REDACTED."""
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    if not SAFE_PATH.fullmatch(path):
        # WSGI gives the path percent-decoded, as latin-1: encode it back, so it stays one printable token.
        path = quote(path.encode("latin-1", "replace"), safe="/:@!$&'()*+,;=-._~")
    query = environ.get("QUERY_STRING")
    if not query:
        return path
    lowered = query.lower()
    if "token" not in lowered and "jwt" not in lowered and "%" not in query:  # no credential can be named
        return f"{path}?{query}"
    parts = query.split("&")
    for n, part in enumerate(parts):
        name, equals, _ = part.partition("=")
        if equals and unquote_plus(name).lower() in SECRET_PARAMS:
            parts[n] = f"{name}=REDACTED"
    return f"{path}?{'&'.join(parts)}"


# One JSON object on one line (every control and non-ASCII character escaped);
# one encoder for all lines, as json.dumps with separators makes one per call.
_json_line = json.JSONEncoder(separators=(",", ":")).encode


# A kv value needs no quotes when it is printable ASCII without space, `"`, `=` or `\`.
BARE = re.compile(r"[!#-<>-\[\]-~]+")


def _kv(fields: Mapping[str, object]) -> str:
    """key=value pairs (logfmt); a value that needs it is a JSON string, so a line can never be split or forged."""
    pairs = []
    for key, value in fields.items():
        if value is None:
            continue
        if value is True or value is False:
            value = "true" if value else "false"
        elif isinstance(value, (int, float)):
            value = str(value)
        else:  # text, or whatever else a token's `sub` claim holds
            value = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            if not BARE.fullmatch(value):
                value = json.dumps(value)
        pairs.append(f"{key}={value}")
    return " ".join(pairs)

