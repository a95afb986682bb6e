"""An event stream or a WebSocket that waits holds no greenlet of its worker (ops/worker.py: Parked, Runners).

Against real gunicorn. What a user sees of it: a worker holds far more open
streams and sockets than it has connection slots (greenlets), each still
gets every save and answers its client, and a stream whose reader stalls is
dropped without holding up the others.
"""

import socket
import time

import pytest

from support.clients import GENEROUS_S, http_save, scrape, value, wait_until

pytestmark = pytest.mark.sqlite_only


def raw_stream(server, path, receive_buffer=None):
    """A socket that asked for `path` (an event stream), read by the test as it likes."""
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(GENEROUS_S + 5)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


def read_until(sock, marker, received=b""):
    """Read until `marker` arrived; return everything read so far."""
    while marker not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the stream before {marker!r}: {received[-300:]!r}"
        received += chunk
    return received


def open_streams(server, transport="sse"):
    return value(scrape(server), "changefeed_open_waits", transport=transport)


def test_a_worker_holds_many_more_waiting_streams_than_it_has_connection_slots(make_server):
    # 10 greenlets per worker (gunicorn's worker_connections): a stream that held its greenlet
    # while it waited would leave the 11th connection unaccepted.
    server = make_server(workers=1, env={"CHANGEFEED_WORKER_CONNECTIONS": "10",
                                         "CHANGEFEED_MAX_WAITS_PER_CLIENT": "1000"})
    http_save(server, slug="crowd", html="v1")
    socks, seen = [], []
    try:
        for _ in range(60):
            socks.append(raw_stream(server, "/events?slug=crowd&since=0"))
            seen.append(read_until(socks[-1], b"id: "))  # open, and given version 1
        assert open_streams(server) == 60
        http_save(server, slug="crowd", html="v2")
        for sock, received in zip(socks, seen):
            received = read_until(sock, b'"version":2', received)
            assert b'"html":"v2"' in received
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: open_streams(server) == 0, timeout=GENEROUS_S, what="every closed stream to be let go")


def test_a_worker_holds_many_more_waiting_websockets_than_it_has_connection_slots(make_server, connect):
    # As for streams: a socket whose worker held its greenlet while it waited (flask-sock's view did)
    # would leave the 11th handshake unanswered.
    server = make_server(workers=1, env={"CHANGEFEED_WORKER_CONNECTIONS": "10",
                                         "CHANGEFEED_MAX_WAITS_PER_CLIENT": "1000"})
    http_save(server, slug="crowd", html="v1")
    sockets = [connect(server) for _ in range(60)]
    for client in sockets:
        assert client.subscribe("crowd", since=1)["version"] == 1
    assert open_streams(server, "ws") == 60
    http_save(server, slug="crowd", html="v2")
    for client in sockets:
        frame = client.next()
        assert (frame["type"], frame["version"], frame["html"]) == ("change", 2, "v2")
    sockets[-1].ping()  # a woken socket still reads its client
    for client in sockets:
        client.close()
    wait_until(lambda: open_streams(server, "ws") == 0, timeout=GENEROUS_S,
               what="every closed socket to be let go")


def test_a_stream_that_stops_reading_is_dropped_without_delaying_the_others(make_server, open_stream):
    # Longer than the test allows a save to take: a stalled reader must not hold up the one that reads.
    server = make_server(workers=1, env={"CHANGEFEED_SEND_TIMEOUT_S": "3"})
    http_save(server, slug="big", html="v1")
    stalled = raw_stream(server, "/events?slug=big&since=1", receive_buffer=4096)  # never read
    reader = open_stream(f"{server.url}/events?slug=big&since=1")
    assert "retry" in reader.next()
    try:
        for n in range(2, 12):  # 10 MB: more than the kernel buffers of the stalled socket hold
            saved_at = time.monotonic()
            http_save(server, slug="big", html=chr(ord("a") + n) * 1_000_000)
            event = reader.next(timeout=GENEROUS_S)
            assert (event["data"]["version"], len(event["data"]["html"])) == (n, 1_000_000)
            assert time.monotonic() - saved_at < GENEROUS_S
        wait_until(lambda: value(scrape(server), "changefeed_refusals_total", limit="send_timeout") >= 1,
                   timeout=10, what="the stalled stream to be dropped")
        wait_until(lambda: open_streams(server) == 1, timeout=5, what="the stalled stream to leave the gauge")
    finally:
        stalled.close()
    http_save(server, slug="big", html="last")
    assert reader.next(timeout=GENEROUS_S)["data"]["html"] == "last"
