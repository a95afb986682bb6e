"""GET /ws: the WebSocket transport, against real gunicorn workers, with a real WebSocket client.

Saves are made through HTTP (landing on any worker) or straight into the
database by a store of this test process, which no worker shares anything
with: a frame then can only come from each worker's watcher (SQLite) or
listener (PostgreSQL).
"""

import json
import signal
import socket
import threading
import time

import pytest
import requests
from websocket import ABNF
from werkzeug.serving import make_server as make_werkzeug_server

from app import create_app
from support.clients import SECRET, Closed, http_save, scrape, token, value, wait_until
from support.servers import close_app, free_port

pytestmark = pytest.mark.engines

GENEROUS_S = 2.0  # a broken wake-up misses this by far; latency targets are the bench's job
EXPIRED_REASON = "token expired: reconnect with a fresh token"


def change_frame(server, slug, since=0):
    """The change frame a socket should get: the /changes answer with type and slug in front."""
    answer = requests.get(f"{server.url}/changes?slug={slug}&since={since}", timeout=10).json()
    return {"type": "change", "slug": slug, **answer}


def open_sockets(server):
    return value(scrape(server), "changefeed_open_waits", transport="ws")


# The protocol, message by message.


def test_subscribe_is_acknowledged_then_sent_what_is_newer(server, connect, epoch):
    http_save(server, slug="home", html="v1"), http_save(server, slug="home", html="v2", data={"n": 2})
    ws = connect(server)
    assert ws.subscribe("home", since=0) == {"type": "subscribed", "slug": "home", "version": 2, "epoch": epoch}
    assert ws.next() == change_frame(server, "home")
    assert ws.subscribe("Other", since=0)["version"] == 0  # slugs fold to lower case; nothing saved: no change
    ws.nothing_for(0.3)
    http_save(server, slug="other", html="<p>new</p>")
    assert ws.next() == change_frame(server, "other")


def test_subscribe_from_the_current_version_sends_only_what_comes_next(server, connect, epoch):
    http_save(server, slug="home", html="v1")
    ws = connect(server)
    ws.subscribe("home", since=1, epoch=epoch)
    ws.nothing_for(0.3)
    for n in (2, 3):
        http_save(server, slug="home", html=f"v{n}")
        frame = ws.next()
        assert (frame["type"], frame["version"], frame["html"]) == ("change", n, f"v{n}")


def test_subscribing_from_another_epoch_sends_the_whole_state_even_when_empty(server, connect, epoch):
    http_save(server, slug="home", html="v1")
    ws = connect(server)
    ws.subscribe("home", since=5, epoch="another-database")
    assert ws.next() == change_frame(server, "home")
    assert ws.subscribe("nothing", since=3, epoch="another-database")["version"] == 0
    # A database that does not hold the page: start over from version 0.
    assert ws.next() == {"type": "change", "slug": "nothing", "changed": False, "version": 0, "epoch": epoch}


def test_subscribing_with_payload_version_sends_change_frames_without_html_or_data(server, connect, epoch):
    """For large pages and many readers: the frame says which version exists; the page comes from /changes."""
    http_save(server, slug="home", html="<p>v1</p>", data={"n": 1})
    ws = connect(server)
    ws.subscribe("home", since=0, payload="version")
    frame = ws.next()
    assert frame == {"type": "change", "slug": "home", "changed": True, "version": 1,
                     "updated_at": frame["updated_at"], "epoch": epoch}
    full = connect(server)
    full.subscribe("home", since=0)
    assert full.next() == change_frame(server, "home")  # payload=full, the default
    http_save(server, slug="home", html="<p>v2</p>")
    assert ws.next().keys() == {"type", "slug", "changed", "version", "updated_at", "epoch"}
    assert requests.post(f"{server.url}/delete", json={"slug": "home"}, timeout=10).status_code == 200
    deleted = ws.next()
    assert (deleted["version"], deleted["deleted"], "html" in deleted) == (3, True, False)
    ws.send(type="subscribe", slug="home", payload="html")
    refused = ws.next()
    assert (refused["type"], list(refused["fields"]), refused["slug"]) == ("error", ["payload"], "home"), refused
    assert refused["fields"]["payload"][0].startswith("Must be full or version")
    ws.ping()


def test_subscribing_again_replaces_the_position(server, connect):
    http_save(server, slug="home", html="v1"), http_save(server, slug="home", html="v2")
    ws = connect(server)
    ws.subscribe("home", since=2)
    ws.nothing_for(0.2)
    ws.subscribe("home", since=0)  # the client lost its copy: from the start again
    assert ws.next()["version"] == 2
    http_save(server, slug="home", html="v3")
    assert ws.next()["version"] == 3
    ws.nothing_for(0.3)  # one subscription, not two: one frame per save


def test_unsubscribe_is_acknowledged_and_stops_that_slugs_frames(server, connect):
    ws = connect(server)
    ws.subscribe("gone"), ws.subscribe("kept")
    ws.send(type="unsubscribe", slug="gone")
    assert ws.next() == {"type": "unsubscribed", "slug": "gone"}
    http_save(server, slug="gone", html="unseen")
    http_save(server, slug="kept", html="seen")
    frame = ws.next()
    assert (frame["slug"], frame["html"]) == ("kept", "seen")
    ws.nothing_for(0.5)
    ws.send(type="unsubscribe", slug="never-followed")  # nothing to stop: still acknowledged
    assert ws.next() == {"type": "unsubscribed", "slug": "never-followed"}


def test_ping_is_answered_with_pong_echoing_its_id(server, connect):
    ws = connect(server)
    for ident in (7, -2**63 + 1, 2.5, "a", "\u00e9\u2603\U0001f600" + "x" * 97, None):
        ws.send(type="ping", id=ident)
        assert ws.next() == {"type": "pong", "id": ident}
    ws.send(type="ping")
    assert ws.next() == {"type": "pong", "id": None}


def strict_json(text):
    """Parse as a browser's JSON.parse would: NaN and Infinity are not JSON."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in a frame: not JSON"))


@pytest.mark.sqlite_only  # no store is involved
@pytest.mark.parametrize("ident", [
    '"\\ud800"', "1e400", "-1e400", "1" * 30, '"' + "x" * 101 + '"', "true", '{"nested": [1, null]}',
    "[" * 900 + "]" * 900,
], ids=["lone surrogate", "1e400", "-1e400", "30 digits", "101 characters", "true", "object", "900 deep"])
def test_a_ping_id_the_pong_cannot_echo_gets_an_error_frame_and_the_socket_stays_open(server, connect, ident):
    """A lone surrogate once closed the socket with 1011 (the pong could not be encoded), 1e400 came back
    as Infinity, and a deep id was an internal error: each is now refused as any bad message is."""
    ws = connect(server)
    ws.ws.send(f'{{"type": "ping", "id": {ident}}}')
    opcode, frame = ws.ws.recv_data_frame(True)
    assert opcode == ABNF.OPCODE_TEXT, (opcode, frame.data[:2])
    frame = strict_json(frame.data)
    assert (frame["type"], frame["error"], list(frame["fields"])) == ("error", "invalid message", ["id"]), frame
    ws.ping("still open")
    assert "Traceback" not in server.log()


@pytest.mark.sqlite_only  # no store is involved
def test_an_error_frame_names_the_messages_slug_only_when_valid_as_sent(server, connect):
    """A lone surrogate there once made the error frame itself unencodable: the socket closed with 1011."""
    ws = connect(server)
    deep_id = "[" * 900 + "]" * 900  # once an internal error, now an invalid id: either way an error frame
    for text in ('{"type": "ping", "slug": "\\ud800", "id": %s}' % deep_id,
                 '{"type": "ping", "slug": "\\u212a", "id": true}'):
        ws.ws.send(text)
        frame = ws.next()
        assert (frame["type"], "slug" in frame) == ("error", False), frame
        ws.ping()
    ws.send(type="ping", slug="Home", id=True)  # a valid one is still named, folded
    assert ws.next()["slug"] == "home"


def test_a_presence_message_with_a_lone_surrogate_name_is_refused_naming_it(server, connect, database):
    """It used to reach the store, fail its whole group commit, and answer `unavailable`."""
    ws = connect(server)
    ws.ws.send('{"type": "presence", "slug": "home", "client_id": "tab-12345678", "name": "\\ud800",'
               ' "state": "viewing"}')
    frame = ws.next()
    assert (frame["type"], frame["error"], list(frame["fields"])) == ("error", "invalid message", ["name"]), frame
    assert database.query("SELECT count(*) FROM page_editors") == [(0,)]
    ws.send(type="presence", slug="home", client_id="tab-12345678", name="Ada", state="viewing")
    assert ws.next()["type"] == "beat"


def test_one_socket_follows_many_slugs_each_save_reaching_only_its_frame(server, connect, make_store):
    slugs = [f"page-{n}" for n in range(20)]
    ws = connect(server)
    for slug in slugs:
        ws.subscribe(slug)
    store = make_store()  # saves by another process: only the workers' watchers can tell them
    for n, slug in enumerate(slugs):
        store.save(slug, f"<p>{slug}</p>", json.dumps({"n": n}))
        frame = ws.next()
        assert (frame["type"], frame["slug"], frame["version"], frame["html"], frame["data"]) == (
            "change", slug, 1, f"<p>{slug}</p>", {"n": n})
    ws.nothing_for(0.3)
    for slug in reversed(slugs[::5]):  # and again, in another order
        http_save(server, slug=slug, html="again")
        assert (ws.next()["slug"], ws.ping()) == (slug, None)
    ws.nothing_for(0.3)


# Bad messages: an error frame naming the problem; the socket stays open.

BAD_MESSAGES = [
    ("not json", "not valid JSON", None, None),
    ("[1, 2]", "JSON object", None, None),
    ('"subscribe"', "JSON object", None, None),
    ('{"type": "subscribe", "slug": NaN}', "not valid JSON", None, None),
    ("{}", None, "type", None),
    ('{"type": "dance"}', None, "type", None),
    ('{"type": ["subscribe"]}', None, "type", None),
    ('{"type": "subscribe"}', None, "slug", None),
    ('{"type": "subscribe", "slug": "../etc"}', None, "slug", None),
    ('{"type": "subscribe", "slug": "home", "since": -1}', None, "since", "home"),
    ('{"type": "subscribe", "slug": "home", "since": "soon"}', None, "since", "home"),
    ('{"type": "subscribe", "slug": "home", "epoch": "not an epoch!"}', None, "epoch", "home"),
    ('{"type": "subscribe", "slug": "home", "presence": -3}', None, "presence", "home"),
    ('{"type": "subscribe", "slug": "home", "presence": 0, "presence_form": "tree"}', None, "presence_form", "home"),
    ('{"type": "unsubscribe"}', None, "slug", None),
    ('{"type": "presence", "slug": "home", "client_id": "short", "state": "viewing"}', None, "client_id", "home"),
    ('{"type": "presence", "slug": "home", "client_id": "tab-12345678", "state": "asleep"}', None, "state", "home"),
]


@pytest.mark.sqlite_only
def test_every_bad_message_gets_an_error_frame_naming_the_problem_and_the_socket_stays_usable(server, connect):
    ws = connect(server)
    for n, (text, words, field, slug) in enumerate(BAD_MESSAGES):
        ws.ws.send(text)
        frame = ws.next()
        assert frame["type"] == "error" and frame["error"] == "invalid message", (text, frame)
        if words:
            assert words in frame["message"], (text, frame)
        if field:
            assert list(frame["fields"]) == [field] and frame["fields"][field][0], (text, frame)
        assert frame.get("slug") == slug, (text, frame)
        ws.ping(n)
    ws.ws.send_binary(b'{"type": "ping"}')
    frame = ws.next()
    assert frame["type"] == "error" and "binary" in frame["message"]
    ws.ping("after binary")
    ws.subscribe("home")  # and it still follows pages
    http_save(server, slug="home")
    assert ws.next()["type"] == "change"


@pytest.mark.sqlite_only
def test_more_subscriptions_than_the_limit_get_an_error_frame(make_server, connect):
    server = make_server(workers=1, env={"CHANGEFEED_WS_MAX_SLUGS": "3"})
    ws = connect(server)
    for n in range(3):
        ws.subscribe(f"p{n}")
    ws.send(type="subscribe", slug="p3")
    frame = ws.next()
    assert (frame["type"], frame["error"], frame["slug"]) == ("error", "too many subscriptions", "p3")
    assert "CHANGEFEED_WS_MAX_SLUGS" in frame["message"]
    ws.subscribe("p0", since=0)  # one already followed: a new position, not a new subscription
    ws.send(type="unsubscribe", slug="p1")
    assert ws.next()["type"] == "unsubscribed"
    ws.subscribe("p3")  # room again
    http_save(server, slug="p3")
    assert ws.next()["slug"] == "p3"


@pytest.mark.sqlite_only
def test_a_message_over_the_size_limit_closes_the_socket_1009(make_server, connect):
    server = make_server(workers=1, env={"CHANGEFEED_WS_MAX_MESSAGE_BYTES": "1024"})
    ws = connect(server)
    ws.ping()
    ws.send(type="ping", id="under", pad="x" * 900)  # under the limit (an id holds at most 100 characters)
    assert ws.next()["id"] == "under"
    ws.send(type="ping", id="over", pad="x" * 2000)
    assert ws.closed()[0] == 1009


@pytest.mark.sqlite_only
def test_a_plain_get_is_a_json_400(server):
    response = requests.get(f"{server.url}/ws", timeout=10)
    assert response.status_code == 400 and response.json()["error"] == "bad request"


# Across workers and instances.


def test_a_save_from_another_process_reaches_sockets_on_both_workers(make_server, connect, make_store):
    server = make_server(workers=2)
    sockets = [connect(server) for _ in range(8)]  # spread over both workers by the kernel
    for ws in sockets:
        ws.subscribe("shared")
    wait_until(lambda: open_sockets(server) == 8, what="every socket to count")
    store = make_store()
    for version in range(1, 4):
        store.save("shared", f"v{version}", "null")
        for ws in sockets:
            frame = ws.next()
            assert (frame["slug"], frame["version"], frame["html"]) == ("shared", version, f"v{version}")
    http_save(server, slug="shared", html="over http")  # through either worker
    assert all(ws.next()["html"] == "over http" for ws in sockets)


@pytest.mark.postgres_only
def test_a_save_through_one_instance_reaches_sockets_on_the_other(make_server, connect, epoch):
    one, other = make_server(workers=2), make_server(workers=2)
    sockets = [connect(other) for _ in range(4)]
    for ws in sockets:
        ws.subscribe("across")
    for version in range(1, 4):
        saved_at = time.monotonic()
        assert http_save(one, slug="across", html=f"from one, {version}") == version
        for ws in sockets:
            frame = ws.next()
            assert (frame["version"], frame["html"], frame["epoch"]) == (version, f"from one, {version}", epoch)
        assert time.monotonic() - saved_at < GENEROUS_S


# Who may connect.


@pytest.fixture
def guarded(make_server):
    """A server whose reads need a token, with no leeway on `exp`."""
    return make_server(workers=1, env={"CHANGEFEED_JWT_SECRET": SECRET, "CHANGEFEED_AUTH_READS": "1",
                                       "CHANGEFEED_JWT_LEEWAY_S": "0"})


@pytest.mark.sqlite_only
@pytest.mark.parametrize("header", [None, "Bearer not-a-token", "Basic dXNlcjpwYXNz",
                                    f"Bearer {token(key='another secret' * 4)}"],
                         ids=["missing", "garbage", "not bearer", "forged"])
def test_without_a_valid_token_reads_protected_close_1008_with_a_reason(guarded, connect, header):
    ws = connect(guarded, header=[f"Authorization: {header}"] if header else [])
    code, reason = ws.closed()
    assert code == 1008 and "token" in reason


@pytest.mark.sqlite_only
@pytest.mark.parametrize("how", ["header", "cookie"])
def test_an_expired_token_closes_4001(guarded, connect, how):
    expired = token(exp_in=-10)
    options = {"header": [f"Authorization: Bearer {expired}"]} if how == "header" else {
        "cookie": f"changefeed_read={expired}"}
    assert connect(guarded, **options).closed() == (4001, EXPIRED_REASON)


@pytest.mark.sqlite_only
def test_a_token_lets_read_its_slugs_only_and_the_socket_closes_4001_when_it_expires(guarded, connect):
    ws = connect(guarded, cookie=f"changefeed_read={token(read=('docs-*',), exp_in=3)}")  # POST /session's cookie
    ws.subscribe("docs-intro")
    ws.send(type="subscribe", slug="home")
    frame = ws.next()
    assert (frame["type"], frame["error"], frame["slug"]) == ("error", "insufficient scope", "home")
    assert "may not read" in frame["message"]
    ws.ping()
    assert ws.closed(timeout=6) == (4001, EXPIRED_REASON)


@pytest.mark.sqlite_only
def test_a_token_expiring_past_what_a_float_holds_connects_and_reads(guarded, connect):
    """Its `exp` (10**400) made the handshake fail (OverflowError): its rights now last at most 400 days."""
    ws = connect(guarded, header=[f"Authorization: Bearer {token(exp_in=None, exp=10**400)}"])
    ws.subscribe("docs-intro")
    ws.nothing_for(1.5)  # the pump's first wait, until the token's clamped end, is a sane one
    ws.ping()


@pytest.mark.sqlite_only
def test_the_read_cookie_is_honoured_beside_a_basic_authorization_header(guarded, connect):
    """Behind HTTP Basic auth the browser's handshake carries `Authorization: Basic ...` as well as the cookie."""
    ws = connect(guarded, header=["Authorization: Basic dXNlcjpwYXNz"], cookie=f"changefeed_read={token()}")
    ws.subscribe("docs-intro")
    ws.ping()


@pytest.mark.sqlite_only
def test_with_public_reads_an_anonymous_socket_reads_but_needs_a_token_for_presence(make_server, connect):
    server = make_server(workers=1, env={"CHANGEFEED_JWT_SECRET": SECRET})
    ws = connect(server)
    ws.subscribe("home")
    ws.send(type="presence", slug="home", client_id="tab-12345678", state="viewing")
    frame = ws.next()
    assert (frame["type"], frame["slug"]) == ("error", "home") and "token" in frame["message"]
    ws.ping()


@pytest.mark.sqlite_only
@pytest.mark.parametrize("headers", [["Origin: https://evil.example"], ["Origin: null"],
                                     ["Origin: http://127.0.0.1", "Sec-Fetch-Site: cross-site"]],
                         ids=["other origin", "null origin", "sec-fetch-site"])
def test_a_page_of_another_site_is_refused_1008(server, connect, headers):
    ws = connect(server, header=headers, suppress_origin=True)
    code, reason = ws.closed()
    assert code == 1008 and "another site" in reason


@pytest.mark.sqlite_only
def test_a_page_of_an_allowed_origin_or_the_same_host_connects(make_server, connect):
    server = make_server(workers=1, env={"CHANGEFEED_CORS_ORIGINS": "https://app.example"})
    connect(server, origin="https://app.example").ping()
    connect(server).ping()  # the client's own Origin: http://127.0.0.1:<port>, this host
    connect(server, header=["Sec-Fetch-Site: same-origin"], origin="https://proxy.example").ping()


# Slow clients, closing and shutting down.


@pytest.mark.sqlite_only
def test_a_client_that_never_reads_is_dropped_without_delaying_another(make_server, connect):
    server = make_server(workers=1, env={"CHANGEFEED_SEND_TIMEOUT_S": "1"})
    stalled = connect(server, sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    stalled.subscribe("big")  # and never reads again
    reader = connect(server)
    reader.subscribe("big")
    for n in range(1, 11):  # 10 MB: more than the kernel buffers of the stalled socket hold
        saved_at = time.monotonic()
        http_save(server, slug="big", html=chr(ord("a") + n) * 1_000_000)
        frame = reader.next()
        assert (frame["version"], len(frame["html"])) == (n, 1_000_000)
        assert time.monotonic() - saved_at < GENEROUS_S
    wait_until(lambda: value(scrape(server), "changefeed_refusals_total", limit="send_timeout") >= 1,
               timeout=5, what="the stalled socket to be dropped")
    wait_until(lambda: open_sockets(server) == 1, timeout=5, what="the stalled socket to leave the gauge")
    with pytest.raises(Closed):  # what was buffered, then the end
        while True:
            stalled.next(timeout=5)
    reader.ping()


@pytest.mark.sqlite_only
def test_the_server_pings_and_drops_a_peer_that_does_not_answer(make_server, connect):
    server = make_server(workers=1, env={"CHANGEFEED_WS_PING_S": "1"})
    answering, silent = connect(server), connect(server)
    answering.ping(), silent.ping()
    answering.nothing_for(3.5)  # reading, so the client answers each ping (websocket-client does)
    answering.ping()
    assert open_sockets(server) == 1  # the silent one was dropped after a ping it left unanswered
    # 1001, "reconnect" (never the library's 1008, which a client must not retry), unless the
    # client's late answer to a ping still in its buffer meets the closed connection first.
    assert silent.closed()[0] in (1001, None)


@pytest.mark.sqlite_only
def test_a_client_that_goes_ends_its_socket_at_once(server, connect):
    sockets = [connect(server) for _ in range(3)]
    for ws in sockets:
        ws.subscribe("home")
    wait_until(lambda: open_sockets(server) == 3, what="every socket to count")
    sockets[0].close()  # with a close frame
    sockets[1].ws.sock.shutdown(socket.SHUT_RDWR)  # without one, as a lost tab would
    wait_until(lambda: open_sockets(server) == 1, timeout=3, what="the two sockets to end")
    http_save(server, slug="home")
    assert sockets[2].next()["version"] == 1


@pytest.mark.sqlite_only
def test_a_worker_shutting_down_closes_its_sockets_1012(make_server, connect):
    server = make_server(workers=1)
    following, idle = connect(server), connect(server)
    following.subscribe("home")
    idle.ping()
    server.send_signal(signal.SIGTERM)
    assert following.closed() == (1012, "server restarting: reconnect")
    assert idle.closed()[0] == 1012


@pytest.mark.sqlite_only
def test_the_access_log_says_101(make_server, connect):
    server = make_server(workers=1, env={"CHANGEFEED_ACCESS_LOG": "json"})
    ws = connect(server)
    ws.ping()
    ws.close()

    def logged():
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        return [line for line in lines if line["path"] == "/ws"]

    wait_until(logged, what="the socket's access log line")
    assert logged()[0]["status"] == 101


# Presence.


def test_presence_of_one_socket_reaches_another_and_leaves_when_it_closes(server, connect):
    watcher = connect(server)
    watcher.subscribe("room", presence=0)
    watcher.nothing_for(0.2)  # version 0: nobody here, nothing to send
    tab = connect(server)
    tab.send(type="presence", slug="room", client_id="tab-aaaa1111", name="Ada", state="editing")
    beat = tab.next()
    assert beat["type"] == "beat" and beat["slug"] == "room" and beat["version"] > 0
    assert {"you", "beat_ms", "ttl_ms", "min_interval_ms"} <= set(beat)
    frame = watcher.next()
    assert frame == {"type": "presence", "slug": "room", "version": beat["version"], "count": 1, "editing": 1,
                     "editors": [{"id": beat["you"], "name": "Ada", "state": "editing"}]}
    tab.send(type="presence", slug="room", client_id="tab-aaaa1111", state="viewing")  # too soon
    refused = tab.next()
    assert (refused["type"], refused["error"], refused["slug"]) == ("error", "too many requests", "room")
    assert refused["retry_after_ms"] > 0
    tab.close()  # the tab closed: it leaves at once, not after the TTL
    frame = watcher.next()
    assert (frame["type"], frame["count"], frame["editors"]) == ("presence", 0, [])


def test_subscribing_with_presence_sends_the_current_list_in_the_asked_form(server, connect):
    tab = connect(server)
    tab.send(type="presence", slug="room", client_id="tab-bbbb2222", name="Bo", state="viewing")
    version = tab.next()["version"]
    counter = connect(server)
    assert counter.subscribe("room", presence=0, presence_form="count")["version"] == 0
    assert counter.next() == {"type": "presence", "slug": "room", "version": version, "count": 1, "editing": 0}
    current = connect(server)
    current.subscribe("room", presence=version)  # already up to date: no frame
    current.nothing_for(0.3)
    plain = connect(server)
    plain.subscribe("room")  # no presence asked: no presence frames, ever
    tab.close()
    assert counter.next()["count"] == 0 and current.next()["count"] == 0
    plain.nothing_for(0.3)


# The development server (`flask run`: threads, not gevent).


@pytest.mark.sqlite_only
def test_it_works_under_the_development_server_too(database, connect):
    app = create_app(database.config)
    port = free_port()
    httpd = make_werkzeug_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        ws = connect(url)
        ws.subscribe("home")
        ws.ping()
        requests.post(f"{url}/save", json={"slug": "home", "html": "dev"}, timeout=10).raise_for_status()
        assert ws.next()["html"] == "dev"
        ws.close()
    finally:
        httpd.shutdown()
        thread.join(timeout=10)
        close_app(app)
