"""What talks to a running server: HTTP saves and long-polls, Server-Sent Events, WebSockets, JWTs, /metrics scrapes."""

import http.client
import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
import pytest
import requests
import websocket
from prometheus_client.parser import text_string_to_metric_families
from websocket import ABNF

GENEROUS_S = 1.0  # a broken wake-up mechanism misses this by seconds; the 50 ms target is the bench's job
FRAME_WAIT_S = 2.0  # how long a WebSocket client waits for a frame unless told: a broken wake-up misses it by far

# A JWT secret for services under test: 75 bytes, long enough for HS512 too.
SECRET = "test-secret-" + "0123456789abcdef" * 4


class Served(Protocol):
    """Anything with the URL of a running service (support.servers.Server, or a test's own)."""

    url: str


def token(write: Iterable[str] = ("docs-*",), read: Iterable[str] = ("*",), key: Any = SECRET,
          algorithm: str = "HS256", exp_in: float | None = 300, **claims: Any) -> str:
    """A JWT as an outside issuer would mint it, granting `read` and `write` on those slug patterns."""
    body = {"sub": "editor-1", "changefeed": {"read": list(read), "write": list(write)}, **claims}
    if exp_in is not None:
        body["exp"] = int(time.time() + exp_in)
    return jwt.encode(body, key, algorithm=algorithm)


def http_save(server: Served, slug: str = "live", html: str = "x", **fields: Any) -> int:
    """Save through HTTP (on whichever worker takes it); return the new version."""
    response = requests.post(f"{server.url}/save", json={"slug": slug, "html": html, **fields}, timeout=10)
    assert response.status_code == 200, response.text
    version: int = response.json()["version"]
    return version


def start_long_poll(server: Served, slug: str, since: int, wait: float) -> Callable[[], dict[str, Any]]:
    """Run one long-poll in a thread; return a function giving (answer, seconds it took)."""
    result: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        response = requests.get(f"{server.url}/changes?slug={slug}&since={since}&wait={wait}", timeout=wait + 10)
        result["answer"], result["took"] = response.json(), time.monotonic() - started
        result["done_at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()

    def finish() -> dict[str, Any]:
        thread.join(timeout=wait + 15)
        return result

    return finish


def save_over_http(url: str, worker: int, saves: int) -> list[int]:
    """Save one page `saves` times in one HTTP session (run in a process of its own); return the versions."""
    session = requests.Session()
    versions = []
    for n in range(saves):
        response = session.post(f"{url}/save", json={"slug": "race", "html": f"{worker}:{n}"}, timeout=30)
        assert response.status_code == 200, response.text
        versions.append(response.json()["version"])
    return versions


def save_pages_over_http(url: str, worker: int, saves: int) -> list[tuple[str, int]]:
    """Save three pages in turn, so that saves of several pages share transactions; return [(slug, version)]."""
    session = requests.Session()
    versions = []
    for n in range(saves):
        slug = f"race-{(worker + n) % 3}"
        response = session.post(f"{url}/save", json={"slug": slug, "html": f"{worker}:{n}"}, timeout=30)
        assert response.status_code == 200, response.text
        versions.append((slug, response.json()["version"]))
    return versions


class EventStream:
    """A Server-Sent Events client: reads the stream in a thread, one parsed event at a time."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        try:
            self.connection.request("GET", f"{parts.path}?{parts.query}", headers=headers or {})
            self.response = self.connection.getresponse()
        except BaseException:
            self.connection.close()  # a server gone mid-request leaves no socket behind for the collector
            raise
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        """Parse the stream into dicts: {"id", "event", "data"}, {"retry"} or {"comment"}."""
        event: dict[str, Any] = {}
        try:
            for raw in iter(self.response.readline, b""):
                line = raw.decode().rstrip("\n")
                if line.startswith(":"):
                    self.events.put({"comment": line[1:].strip()})
                elif line:
                    field, _, value = line.partition(":")
                    event[field] = value.removeprefix(" ")
                elif event:
                    if "data" in event:
                        event["data"] = json.loads(event["data"])
                    self.events.put(event)
                    event = {}
        except (OSError, ValueError, AttributeError):
            pass  # closed by us (http.client drops its file) or by the server
        finally:
            self.ended.set()

    def next(self, timeout: float = 5, skip_comments: bool = True) -> dict[str, Any]:
        """Return the next event (or comment), or raise queue.Empty after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if not (skip_comments and "comment" in item):
                return item

    def close(self) -> None:
        try:
            if self.connection.sock is not None:
                self.connection.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread at once
        except OSError:
            pass  # the server is gone already: nothing to wake
        finally:
            self.connection.close()


class Closed(Exception):
    """The server closed the socket: with a close frame (`code`, `reason`), or without one (code None)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed: {code} {reason}")
        self.code, self.reason = code, reason


class Client:
    """One WebSocket: JSON messages out, parsed frames in, each awaited with a time limit."""

    def __init__(self, url: str, **options: Any) -> None:
        self.ws = websocket.create_connection(url, timeout=10, **options)

    def send(self, **message: Any) -> None:
        self.ws.send(json.dumps(message))

    def next(self, timeout: float = FRAME_WAIT_S) -> Any:
        """The next text frame, parsed; raise Closed when the server closes, TimeoutError when none comes."""
        deadline = time.monotonic() + timeout
        try:
            while True:  # the server's pings come in between: answered, and the time limit still holds
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise websocket.WebSocketTimeoutException()
                self.ws.settimeout(remaining)
                opcode, frame = self.ws.recv_data_frame(True)
                if opcode == ABNF.OPCODE_TEXT:
                    return json.loads(frame.data)
                if opcode == ABNF.OPCODE_CLOSE:
                    data = frame.data
                    raise Closed(int.from_bytes(data[:2], "big") if data else 1005, data[2:].decode())
        except websocket.WebSocketTimeoutException:
            raise TimeoutError(f"no frame within {timeout} s") from None
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            raise Closed(None) from None

    def nothing_for(self, seconds: float = 0.3) -> None:
        """Assert that no frame comes within `seconds`."""
        with pytest.raises(TimeoutError):
            frame = self.next(timeout=seconds)
            pytest.fail(f"unexpected frame {frame}")

    def closed(self, timeout: float = FRAME_WAIT_S) -> tuple[int | None, str]:
        """Wait for the server to close; return (code, reason). Any frame before that fails the test."""
        with pytest.raises(Closed) as closed:
            frame = self.next(timeout=timeout)
            pytest.fail(f"expected the socket to close, got {frame}")
        return closed.value.code, closed.value.reason

    def subscribe(self, slug: str, **fields: Any) -> dict[str, Any]:
        """Subscribe, and return the `subscribed` acknowledgement."""
        self.send(type="subscribe", slug=slug, **fields)
        ack: dict[str, Any] = self.next()
        assert ack["type"] == "subscribed" and ack["slug"] == slug.lower(), ack
        return ack

    def ping(self, ident: Any = "check") -> None:
        """A round trip: the socket is open and answers."""
        self.send(type="ping", id=ident)
        assert self.next() == {"type": "pong", "id": ident}

    def close(self) -> None:
        try:
            self.ws.close(timeout=1)
        except (OSError, websocket.WebSocketException):
            pass
        finally:
            self.ws.shutdown()  # the socket, however the close went


def socket_url(server_or_url: Served | str) -> str:
    """ws://host/ws of a server, or of its URL."""
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.url
    return url.replace("http", "ws", 1) + "/ws"


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """{(sample name, sorted labels): value} of a /metrics answer."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape(server: Served) -> Samples:
    """The samples of the server's /metrics, summed over its workers."""
    response = requests.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a sample that is missing fails the test (every label value is there from the start)."""
    return samples[(name, tuple(sorted(labels.items())))]


def wait_until(condition: Callable[[], Any], timeout: float = 10, what: str = "the condition") -> None:
    """Return once `condition()` is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
