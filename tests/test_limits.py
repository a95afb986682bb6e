"""Limits on what one client can take, driven with real sockets against gunicorn.

Each test provokes a limit the way a careless or hostile client would (a
trickle of headers, a body that never ends, ten times the streams it may
hold, pages past the cap), checks the refusal, and then checks that the
server answers normally and that the refused request wrote nothing.
"""

import json
import resource
import socket
import time

import psutil
import pytest
import requests

from app import create_app
from support.servers import close_app, development_server

pytestmark = pytest.mark.engines

# Limits of sockets and of gunicorn's workers, the same whatever the store: one run, on SQLite.
socket_only = pytest.mark.sqlite_only

TIMEOUTS = {"CHANGEFEED_HEADER_TIMEOUT_S": "1", "CHANGEFEED_BODY_TIMEOUT_S": "1",
            "CHANGEFEED_KEEPALIVE_S": "1", "CHANGEFEED_SEND_TIMEOUT_S": "1"}
GENEROUS_S = 6  # a missing limit never ends; a working one ends within a second or two past its bound


OPEN = []  # every raw socket a test opened, closed after it whatever happened


@pytest.fixture(autouse=True)
def close_sockets():
    yield
    while OPEN:
        OPEN.pop().close()


def connect(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=GENEROUS_S + 5)
    OPEN.append(sock)
    return sock


def read_until_closed(sock):
    """Everything the server sends until it closes the connection (or the socket times out)."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def read_head(sock):
    """The status code and headers of one answer, read byte by byte up to the blank line."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0] else None
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    return status, headers


def body_of(answer):
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def open_stream(server, slug="a", forwarded_for=None):
    """Open GET /events on a raw socket; return (socket, status, headers)."""
    sock = connect(server)
    extra = f"X-Forwarded-For: {forwarded_for}\r\n" if forwarded_for else ""
    sock.sendall(f"GET /events?slug={slug} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
    status, headers = read_head(sock)
    return sock, status, headers


def assert_answers_normally(server):
    response = requests.post(f"{server.url}/save", json={"slug": "after", "html": "ok"}, timeout=10)
    assert response.status_code == 200, response.text
    assert requests.get(f"{server.url}/changes?slug=after", timeout=10).json()["version"] >= 1


def stored_version(database, slug):
    rows = database.query("SELECT version FROM page_versions WHERE slug = ?", (slug,))
    return rows[0][0] if rows else 0


@socket_only
def test_headers_trickled_a_byte_at_a_time_get_408_and_the_connection_ends(make_server):
    server = make_server(env=TIMEOUTS)
    sock = connect(server)
    started = time.monotonic()
    sock.sendall(b"GET /changes?slug=a HTTP/1.1\r\n")
    answer = b""
    try:
        for byte in b"Host: 127.0.0.1\r\nX-Slow: " + b"x" * 100:
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
    except OSError:  # closed by the server while we trickled
        pass
    answer = read_until_closed(sock)
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert body_of(answer)["error"] == "request timeout"
    assert took < GENEROUS_S
    assert_answers_normally(server)


@socket_only
def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(make_server):
    server = make_server(env=TIMEOUTS)
    sock = connect(server)
    started = time.monotonic()
    assert read_until_closed(sock) == b""  # closed without a word: there was no request
    assert 0.8 < time.monotonic() - started < GENEROUS_S
    assert_answers_normally(server)


@socket_only
def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(make_server):
    server = make_server(env=TIMEOUTS)
    sock = connect(server)
    sock.sendall(b"GET /changes?slug=a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, headers = read_head(sock)
    assert status == 200
    sock.recv(int(headers["content-length"]))
    started = time.monotonic()
    assert read_until_closed(sock) == b""
    assert 0.8 < time.monotonic() - started < GENEROUS_S


@socket_only
def test_a_trickled_body_gets_408_and_nothing_is_written(make_server, database):
    server = make_server(env=TIMEOUTS)
    body = json.dumps({"slug": "slow", "html": "x" * 200}).encode()
    sock = connect(server)
    sock.sendall(b"POST /save HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:20])
    started = time.monotonic()
    try:
        for byte in body[20:40]:
            time.sleep(0.2)
            sock.sendall(bytes([byte]))
    except OSError:
        pass
    answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"connection: close" in answer.lower()
    assert body_of(answer)["error"] == "request timeout"
    assert time.monotonic() - started < GENEROUS_S
    assert stored_version(database, "slow") == 0
    assert_answers_normally(server)


@socket_only
def test_ten_times_the_per_client_cap_of_streams_gets_429_past_the_cap(make_server):
    cap = 3
    server = make_server(workers=1, env={"CHANGEFEED_MAX_WAITS_PER_CLIENT": str(cap)})
    opened, refused = [], []
    for _ in range(10 * cap):
        sock, status, headers = open_stream(server)
        (opened if status == 200 else refused).append((sock, status, headers))
    assert len(opened) == cap
    assert {status for _, status, _ in refused} == {429}
    _, _, headers = refused[0]
    assert headers["retry-after"] == "5"
    long_poll = requests.get(f"{server.url}/changes?slug=a&wait=5", timeout=10)  # a long-poll is a wait too
    assert long_poll.status_code == 429
    assert long_poll.json()["limit"] == "waits_per_client"
    assert requests.get(f"{server.url}/changes?slug=a", timeout=10).status_code == 200  # a plain poll is not
    for sock, _, _ in opened + refused:
        sock.close()
    deadline = time.monotonic() + 2  # at once, not at the next heartbeat (15 s)
    while time.monotonic() < deadline:  # closed streams give their places back
        sock, status, _ = open_stream(server)
        sock.close()
        if status == 200:
            break
        time.sleep(0.1)
    assert status == 200
    assert_answers_normally(server)


@socket_only
def test_a_long_poll_whose_client_left_gives_its_place_back_at_once(make_server):
    server = make_server(workers=1, env={"CHANGEFEED_MAX_WAITS_PER_CLIENT": "1"})
    sock = connect(server)
    sock.sendall(b"GET /changes?slug=a&wait=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    time.sleep(0.3)  # it waits now
    assert requests.get(f"{server.url}/changes?slug=a&wait=1", timeout=10).status_code == 429
    sock.close()  # a closed tab
    deadline = time.monotonic() + 2  # long before its 30 s wait ends
    while time.monotonic() < deadline:
        status = requests.get(f"{server.url}/changes?slug=a&wait=1", timeout=10).status_code
        if status == 200:
            break
    assert status == 200


@socket_only
def test_clients_behind_a_trusted_proxy_are_counted_by_their_forwarded_address(make_server):
    server = make_server(workers=1, env={"CHANGEFEED_MAX_WAITS_PER_CLIENT": "1"})
    first, status_a, _ = open_stream(server, forwarded_for="203.0.113.1")
    second, status_b, _ = open_stream(server, forwarded_for="203.0.113.2")
    third, status_again, _ = open_stream(server, forwarded_for="198.51.100.9, 203.0.113.1")  # the proxy's hop counts
    assert (status_a, status_b, status_again) == (200, 200, 429)
    for sock in (first, second, third):
        sock.close()


@socket_only
def test_a_forwarded_address_from_an_untrusted_peer_is_ignored(make_server):
    server = make_server(workers=1, env={"CHANGEFEED_MAX_WAITS_PER_CLIENT": "1", "CHANGEFEED_TRUSTED_PROXIES": "none"})
    first, status_a, _ = open_stream(server, forwarded_for="203.0.113.1")
    second, status_b, _ = open_stream(server, forwarded_for="203.0.113.2")  # a lie: both are this peer
    assert (status_a, status_b) == (200, 429)
    first.close(), second.close()


@socket_only
def test_past_the_per_worker_cap_streams_get_503_with_retry_after(make_server):
    server = make_server(workers=1, env={"CHANGEFEED_MAX_WAITS_PER_WORKER": "4"})
    results = [open_stream(server, forwarded_for=f"203.0.113.{i}") for i in range(1, 9)]
    statuses = [status for _, status, _ in results]
    assert statuses == [200] * 4 + [503] * 4
    assert results[-1][2]["retry-after"] == "5"
    for sock, _, _ in results:
        sock.close()
    assert_answers_normally(server)


def test_a_stream_whose_client_stops_reading_is_dropped_and_gives_its_place_back(make_server):
    server = make_server(workers=1, env={**TIMEOUTS, "CHANGEFEED_MAX_WAITS_PER_CLIENT": "1"})
    sock = socket.socket()
    OPEN.append(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after a few kilobytes
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(b"GET /events?slug=big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert read_head(sock)[0] == 200
    # Never read again: saves of a big page fill the socket's buffers, and the server's write stalls.
    deadline = time.monotonic() + GENEROUS_S + 4
    n = 0
    while time.monotonic() < deadline:
        n += 1
        saved = requests.post(f"{server.url}/save", json={"slug": "big", "html": "y" * 900_000 + str(n)}, timeout=10)
        assert saved.status_code == 200
        other, status, _ = open_stream(server, slug="other")
        other.close()
        if status == 200:
            break
        time.sleep(0.25)
    assert status == 200, "the stalled stream still holds the client's one place"
    sock.close()


def test_past_the_page_cap_a_new_slug_gets_507_and_existing_pages_can_still_be_saved(make_server, database):
    server = make_server(env={"CHANGEFEED_MAX_PAGES": "3"})
    for slug in ("p1", "p2", "p3"):
        assert requests.post(f"{server.url}/save", json={"slug": slug, "html": "x"}, timeout=10).status_code == 200
    refused = requests.post(f"{server.url}/save", json={"slug": "p4", "html": "x"}, timeout=10)
    assert refused.status_code == 507
    assert refused.json()["error"] == "storage full" and refused.json()["limit"] == "pages"
    assert "CHANGEFEED_MAX_PAGES" in refused.json()["fields"]["slug"][0]
    assert requests.post(f"{server.url}/save", json={"slug": "p2", "html": "longer"}, timeout=10).status_code == 200
    assert database.query("SELECT count(*) FROM page_versions") == [(3,)]
    assert database.query("SELECT pages FROM storage") == [(3,)]
    assert stored_version(database, "p4") == 0 and stored_version(database, "p2") == 2


def test_past_the_byte_cap_a_page_cannot_grow_but_can_be_saved_at_its_size(make_server, database):
    server = make_server(env={"CHANGEFEED_MAX_STORED_BYTES": "1000"})
    url = f"{server.url}/save"
    assert requests.post(url, json={"slug": "big", "html": "x" * 900}, timeout=10).status_code == 200
    grown = requests.post(url, json={"slug": "big", "html": "x" * 1200}, timeout=10)
    assert grown.status_code == 507 and grown.json()["limit"] == "stored_bytes"
    added = requests.post(url, json={"slug": "new", "html": "x" * 200}, timeout=10)
    assert added.status_code == 507
    assert requests.post(url, json={"slug": "big", "html": "z" * 900}, timeout=10).status_code == 200
    assert requests.post(url, json={"slug": "big", "html": "z" * 10}, timeout=10).status_code == 200
    assert requests.post(url, json={"slug": "new", "html": "small"}, timeout=10).status_code == 200
    stored = sum(len(html.encode()) + len(data.encode())
                 for html, data in database.query("SELECT html, data FROM page_versions"))
    assert database.query("SELECT bytes FROM storage") == [(stored,)]
    assert stored_version(database, "big") == 3


def test_idempotency_keys_count_against_the_byte_cap_so_they_cannot_grow_the_database_past_it(make_server, database):
    """5,000 one-byte saves with a key each once grew a 4 KiB-capped database to 3.7 MiB: keys now count."""
    server = make_server(env={"CHANGEFEED_MAX_STORED_BYTES": "4096", "CHANGEFEED_MAX_PAGES": "1",
                              "CHANGEFEED_IDEMPOTENCY_TTL_S": "3"})
    url = f"{server.url}/save"
    answers = [requests.post(url, json={"slug": "p", "html": "x"}, headers={"Idempotency-Key": f"key-{n:04}"},
                             timeout=10) for n in range(40)]
    statuses = [answer.status_code for answer in answers]
    accepted = statuses.count(200)
    assert 10 <= accepted < 40 and set(statuses) == {200, 507}, statuses  # ~16 keys of 200 + 8 + 1 bytes
    assert statuses == sorted(statuses)  # refused from the first key that would pass the cap on
    refused = answers[accepted].json()
    assert refused["limit"] == "stored_bytes" and "Idempotency-Keys" in refused["message"]
    stored = database.query("SELECT bytes FROM storage")[0][0]
    keys = database.query("SELECT count(*), coalesce(sum(200 + length(key) + length(slug)), 0) FROM idempotency_keys")
    assert keys[0][0] == accepted and stored == 1 + 4 + keys[0][1] <= 4096
    # A retry of a kept key is still answered, and a save without a key still takes the page at its size.
    replay = requests.post(url, json={"slug": "p", "html": "x"}, headers={"Idempotency-Key": "key-0000"}, timeout=10)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert requests.post(url, json={"slug": "p", "html": "y"}, timeout=10).status_code == 200
    assert requests.post(url, json={"slug": "p", "html": "y" * 500}, timeout=10).status_code == 507  # full
    time.sleep(3.5)  # the keys expire: the next save forgets them, and their bytes with them
    assert requests.post(url, json={"slug": "p", "html": "y" * 500}, timeout=10).status_code == 200
    assert database.query("SELECT count(*) FROM idempotency_keys") == [(0,)]
    assert database.query("SELECT bytes FROM storage") == [(500 + 4,)]
    fresh = requests.post(url, json={"slug": "p", "html": "z"}, headers={"Idempotency-Key": "key-new"}, timeout=10)
    assert fresh.status_code == 200
    assert database.query("SELECT count(*) FROM idempotency_keys") == [(1,)]
    assert database.query("SELECT bytes FROM storage") == [(1 + 4 + 200 + len("key-new") + len("p"),)]


def worker_pids(server):
    return sorted(child.pid for child in psutil.Process(server.process.pid).children())


def test_a_worker_out_of_file_descriptors_stays_up_and_recovers(make_server):
    server = make_server(workers=1, env=TIMEOUTS)
    (pid,) = worker_pids(server)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (64, 64))
    socks = []
    for _ in range(150):  # far more than it may open: its accept() fails with EMFILE
        try:
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            OPEN.append(socks[-1])
        except OSError:
            break
    time.sleep(0.5)
    for sock in socks:
        sock.close()
    time.sleep(2.5)  # the header timeout frees whatever the worker had accepted
    assert "Too many open files" in server.log()  # the limit was reached, not just approached
    assert_answers_normally(server)
    assert worker_pids(server) == [pid]


def test_junk_parameters_do_not_multiply_the_cached_queries(database):
    app = create_app({**database.config, "TESTING": True})
    client = app.test_client()
    cache = app.extensions["changefeed.queries"]
    for n in range(500):
        assert client.get(f"/changes?slug=a&junk={n}").status_code == 200
        assert client.get(f"/changes?slug=a&slug=b{n}").status_code == 200
    assert len(cache._entries) == 1
    close_app(app)


def test_the_query_cache_stays_within_its_byte_budget(database):
    app = create_app({**database.config, "TESTING": True, "CHANGEFEED_QUERY_CACHE_BYTES": 50_000})
    client = app.test_client()
    cache = app.extensions["changefeed.queries"]
    for n in range(2_000):
        assert client.get(f"/changes?slug=page-{n}-{'x' * 100}").status_code == 200
    assert 0 < cache.size <= 50_000
    assert len(cache._entries) < 2_000
    assert client.get("/changes?slug=page-1999-" + "x" * 100).status_code == 200  # still answers from the newest
    close_app(app)


def test_waits_that_come_and_go_leave_no_memory_behind(make_server):
    """Each closed stream or long-poll is freed at once, not kept for the collector's rare full pass.

    A reference cycle through a connection's handler kept about 8 KiB per
    closed wait until then: 1,000 waits grew a worker by about 8 MiB a round.
    """
    server = make_server(workers=1, env={"CHANGEFEED_MAX_WAITS_PER_CLIENT": "100000"})
    (pid,) = worker_pids(server)
    worker = psutil.Process(pid)

    def come_and_go(n=1000):
        socks = []
        for i in range(n):
            sock = connect(server)
            path = f"/events?slug=s{i % 50}" if i % 2 else f"/changes?slug=s{i % 50}&wait=20"
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            socks.append(sock)
        time.sleep(0.5)
        requests.post(f"{server.url}/save", json={"slug": "s1", "html": "x" * 1000}, timeout=10)
        time.sleep(0.2)
        for sock in socks:
            OPEN.remove(sock)
            sock.close()
        time.sleep(0.5)

    come_and_go()  # warm-up: pools, caches and the allocator's arenas reach their size
    before = worker.memory_info().rss
    for _ in range(3):
        come_and_go()
    grown_mib = (worker.memory_info().rss - before) / 2**20
    assert grown_mib < 6, f"the worker grew {grown_mib:.1f} MiB over 3,000 closed waits"
    assert worker.num_fds() < 40  # every connection's descriptor was closed


# A body the app answers without reading (a refusal, or a GET that carries one).
UNREAD = {"CHANGEFEED_BODY_TIMEOUT_S": "2", "CHANGEFEED_MAX_BODY_BYTES": "1000"}
UNREAD_BOUND_S = 3 * 2  # a few times the body timeout; without a bound the trickle holds the socket for ever


def trickle_until_closed(sock, limit_s):
    """Send a body a byte every 0.3 s, as a slowloris does, until the server ends the connection.

    Return (what the server sent, seconds until it closed), or (what it sent, None) if it was still
    open after `limit_s`.
    """
    started = time.monotonic()
    sock.settimeout(0.3)
    received = b""
    while time.monotonic() - started < limit_s:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            try:
                sock.sendall(b" ")
            except OSError:  # reset: the server closed while we sent
                return received, time.monotonic() - started
            continue
        except ConnectionResetError:
            return received, time.monotonic() - started
        if not chunk:
            return received, time.monotonic() - started
        received += chunk
    return received, None


@socket_only
@pytest.mark.parametrize("head, status", [
    (b"POST /save HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Content-Length: 100000\r\n\r\n", 413),
    (b"POST /save HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: 500\r\n\r\n", 415),
    (b"POST /save HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nSec-Fetch-Site: cross-site\r\n"
     b"Origin: https://evil.example\r\nContent-Length: 500\r\n\r\n", 403),
    (b"GET /changes?slug=a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500\r\n\r\n", 200),
], ids=["413 over the limit", "415 not json nor form", "403 cross-site", "GET with a body"])
def test_a_body_answered_before_it_is_read_cannot_hold_the_connection_by_trickling(make_server, database, head,
                                                                                    status):
    """gevent read what the app left of a body after answering, with no deadline: a byte a second kept it."""
    server = make_server(env=UNREAD)
    sock = connect(server)
    sock.sendall(head)
    answer, closed_after_s = trickle_until_closed(sock, limit_s=UNREAD_BOUND_S + 4)
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:300]
    assert closed_after_s is not None, "still open: the server waits for the trickled body"
    assert closed_after_s < UNREAD_BOUND_S
    if status >= 400:  # refused at once: the client is told the connection ends, and nothing more is read
        assert b"\r\nconnection: close\r\n" in answer.lower().split(b"\r\n\r\n")[0] + b"\r\n"
        assert body_of(answer)["request_id"]
    assert stored_version(database, "a") == 0
    assert_answers_normally(server)


BODY_LIMIT = 2000


@pytest.fixture
def serve(request, make_server, database):
    """The base URL of the service with a small body limit: under gunicorn, or under the development server."""
    if request.param == "gunicorn":
        yield make_server(env={"CHANGEFEED_MAX_BODY_BYTES": str(BODY_LIMIT)}).url
        return
    app = create_app({**database.config, "CHANGEFEED_MAX_BODY_BYTES": BODY_LIMIT})
    with development_server(app) as url:
        yield url
    close_app(app)


def chunked(body):
    """A body requests sends with Transfer-Encoding: chunked (no Content-Length), in 500-byte chunks."""
    return iter([body[i:i + 500] for i in range(0, len(body), 500)])


@socket_only
@pytest.mark.parametrize("serve", ["gunicorn", "flask run"], indirect=True)
def test_a_chunked_body_over_the_limit_is_refused_413_not_cut_short(serve, database):
    """werkzeug stopped reading a body of no stated length at the limit and handed on what it had read."""
    small_json = json.dumps({"slug": "cut", "html": "x"}).encode()
    multipart = (b'--b\r\nContent-Disposition: form-data; name="slug"\r\n\r\ncut\r\n'
                 b'--b\r\nContent-Disposition: form-data; name="html"\r\n\r\n' + b"x" * BODY_LIMIT + b"\r\n--b--\r\n")
    over = [
        ("application/json", small_json + b" " * BODY_LIMIT),  # was saved: the JSON ended before the cut
        ("application/json", json.dumps({"slug": "cut", "html": "x" * BODY_LIMIT}).encode()),  # was 400
        ("application/x-www-form-urlencoded", b"slug=cut&html=" + b"x" * BODY_LIMIT),
        ("multipart/form-data; boundary=b", multipart),
    ]
    for content_type, body in over:
        response = requests.post(f"{serve}/save", data=chunked(body), headers={"Content-Type": content_type},
                                 timeout=10)
        assert response.status_code == 413, (content_type, response.text)
        assert response.json()["error"] == "request entity too large"
        assert str(BODY_LIMIT) in response.json()["message"]
    assert stored_version(database, "cut") == 0
    at_limit = small_json + b" " * (BODY_LIMIT - len(small_json))  # exactly the limit: taken
    assert requests.post(f"{serve}/save", data=chunked(at_limit), headers={"Content-Type": "application/json"},
                         timeout=10).status_code == 200
    assert stored_version(database, "cut") == 1
