"""The two-tab demo in real headless Chromium, the way a person tries it.

Each test starts gunicorn (two workers, free loopback port, fresh database)
and opens two tabs of one browser on the same slug.
"""

import base64
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

from changefeed.stores.schema import migrate
from changefeed.stores.sqlite import SQLiteStore
from support import ROOT
from support.browsers import Tab, find_chromium

find_chromium()  # one skip line for the module when there is no browser

POLL_S = 2
ARTIFACTS = ROOT / "test-artifacts"
XSS = '<script>window.top.__pwned=1</script><img src=x onerror="window.top.__pwned=1"><p>still shown</p>'

# Keeps every EventSource the page makes, so a test can count the ones still open.
COUNT_EVENT_SOURCES = """
window.__sources = [];
const NativeEventSource = window.EventSource;
window.EventSource = class extends NativeEventSource {
  constructor(...args) { super(...args); window.__sources.push(this); }
};
"""
OPEN_EVENT_SOURCES = "window.__sources.filter((source) => source.readyState !== EventSource.CLOSED).length"

# Records each state the badge takes.
RECORD_BADGE = """
document.addEventListener("DOMContentLoaded", () => {
  const badge = document.getElementById("badge");
  window.__states = [];
  new MutationObserver(() => window.__states.push(badge.dataset.state))
    .observe(badge, {attributes: true, attributeFilter: ["data-state"]});
});
"""


@pytest.fixture
def open_tab(server, context):
    """Open the demo on the shared slug in a new tab of the one browser."""

    def open_tab(transport="poll"):
        return Tab(context, server.url, "shared", transport)

    return open_tab


@pytest.fixture
def tabs(open_tab):
    return open_tab(), open_tab()


def remote_save(server, html, **fields):
    response = requests.post(f"{server.url}/save", json={"slug": "shared", "html": html, **fields}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["version"]


def stored(server):
    """What the server holds for the shared slug: the whole newest version."""
    return requests.get(f"{server.url}/changes?slug=shared&since=0", timeout=10).json()


def wait_until(tab, condition, timeout_s=10):
    """Let the page run until `condition()` holds; fail after `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        tab.wait(0.05)


def side_by_side(a, b, context, path):
    """Save one PNG of two tabs next to each other, for a person to look at."""
    shots = [base64.b64encode(tab.page.screenshot()).decode() for tab in (a, b)]
    sheet = context.new_page()
    sheet.set_viewport_size({"width": 1560, "height": 920})
    sheet.set_content(
        "<body style='margin:0;display:flex;gap:20px;background:#888;padding:10px'>"
        + "".join(f"<img src='data:image/png;base64,{s}' width=760>" for s in shots) + "</body>")
    path.parent.mkdir(exist_ok=True)
    sheet.screenshot(path=str(path))
    sheet.close()


def test_save_in_one_tab_shows_in_the_other_within_a_poll(tabs, context):
    a, b = tabs
    a.edit("<h1>Hello from tab A</h1>", '{"from": "A"}')
    a.save()
    b.expect_viewer("Hello from tab A", timeout_s=POLL_S + 1)  # the bound: one poll interval plus a second
    a.expect_version(1), b.expect_version(1)
    expect(b.page.locator("#viewer-data")).to_contain_text('"from": "A"')
    side_by_side(a, b, context, ARTIFACTS / "two-tabs.png")


@pytest.mark.parametrize("transport", ["longpoll", "sse", "ws"])
def test_push_transports_show_a_save_in_the_other_tab_at_once(open_tab, transport, context):
    a, b = open_tab(transport), open_tab(transport)
    for tab in (a, b):
        expect(tab.page.locator("#transport")).to_contain_text(transport)
    for n in range(1, 4):
        a.edit(f"<h1>push {n}</h1>")
        a.save()
        b.expect_viewer(f"push {n}", timeout_s=1)  # no poll interval to wait for
        a.expect_version(n), b.expect_version(n)
    if transport == "ws":
        assert len(a.sockets + b.sockets) == 1, a.sockets + b.sockets  # the leader's, shared with the other tab
        assert urlsplit((a.sockets + b.sockets)[0]).scheme == "ws"
    side_by_side(a, b, context, ARTIFACTS / f"two-tabs-{transport}.png")


# --- presence: who else has the page open, and who of them types ---------------------------------------

ADA = "Ada <img src=x onerror=alert(1)>"  # names are untrusted: shown as text, never as markup


@pytest.mark.parametrize("transport, people", [
    ("poll", "two browsers"), ("poll", "one browser"), ("sse", "one browser"),
    ("ws", "one browser"), ("ws", "two browsers"),
])
def test_the_other_tab_shows_who_is_here_who_types_and_who_left(browser, context, server, transport, people):
    other = browser.new_context(viewport={"width": 760, "height": 900}) if people == "two browsers" else context
    try:
        a = Tab(context, server.url, "shared", transport, name=ADA)
        b = Tab(other, server.url, "shared", transport, name="Bob")
        expect(b.page.locator("#transport")).to_contain_text(transport)
        b.expect_present(ADA)
        a.expect_present("Bob")  # each leaves itself out
        expect(b.page.locator("#presence-empty")).to_be_hidden()
        ada = b.page.locator("#presence li[data-id]")
        expect(ada).to_have_attribute("data-state", "viewing")
        expect(b.page.locator("#presence img")).to_have_count(0)
        # The chip's own style, not its computed one: a poll may re-render the list between finding the
        # chip and reading it, and a chip no longer in the page has no computed style ('').
        hue = ada.evaluate("chip => chip.style.getPropertyValue('--hue')")
        assert hue.strip().isdigit(), hue

        a.page.type("#html", "<p>typing</p>")
        expect(ada).to_have_attribute("data-state", "editing", timeout=POLL_S * 1000 + 3000)
        expect(ada).to_contain_text(f"{ADA} is editing")
        expect(a.page.locator("#presence li[data-id]")).to_have_attribute("data-state", "viewing")

        closed_at = time.monotonic()
        a.page.close(run_before_unload=True)  # pagehide: the beacon says "gone"
        b.expect_present(timeout_s=5)  # far under the 15 s an entry lives without beats
        assert time.monotonic() - closed_at < 5
        expect(b.page.locator("#presence-empty")).to_be_visible()
        assert b.page_errors == []
    finally:
        if other is not context:
            other.close()


def test_a_page_with_more_people_than_named_shows_how_many_more(make_server, context):
    server = make_server(env={"CHANGEFEED_PRESENCE_LIST_MAX": "1"})
    tabs = [Tab(context, server.url, "shared", name=f"Person {n}") for n in range(3)]
    for tab in tabs:
        expect(tab.page.locator("#presence-count")).to_have_attribute("data-count", "2", timeout=POLL_S * 1000 + 3000)
        named = tab.page.locator("#presence li[data-id]").count()
        expect(tab.page.locator("#presence-count")).to_have_text(f"+{2 - named} more")


def test_a_new_name_is_sent_with_the_next_beat_and_kept(open_tab, server):
    a, b = open_tab(), open_tab()
    guest = a.page.locator("#name").input_value()
    assert re.fullmatch(r"Guest \d{3}", guest), guest
    b.expect_present(guest)
    a.page.fill("#name", "Grace")
    b.expect_present("Grace", timeout_s=5 + POLL_S + 1)  # the next beat (5 s), then a poll
    a.page.reload()
    expect(a.page.locator("#name")).to_have_value("Grace")


@pytest.mark.parametrize("engine", ["postgres"])
def test_tabs_on_two_instances_sharing_one_postgresql_see_each_others_saves(make_server, context, engine):
    """Two hosts behind a load balancer: each tab talks to another instance, and both stay in step."""
    one, other = make_server(), make_server()
    a, b = Tab(context, one.url, "shared", "sse"), Tab(context, other.url, "shared", "sse")
    for n, (writer, reader) in enumerate([(a, b), (b, a), (a, b)], start=1):
        writer.edit(f"<h1>hop {n}</h1>")
        writer.save()
        reader.expect_viewer(f"hop {n}", timeout_s=2)
        a.expect_version(n), b.expect_version(n)
    side_by_side(a, b, context, ARTIFACTS / "two-tabs-two-instances.png")


def test_sse_tabs_share_one_stream_and_a_new_leader_takes_over(open_tab, server):
    a = open_tab("sse")
    b = open_tab("sse")
    c = open_tab("sse")
    expect(b.page.locator("#transport")).to_have_text("sse via another tab")
    remote_save(server, "<p>one stream</p>")
    for tab in (a, b, c):
        tab.expect_viewer("one stream", timeout_s=1)
    streams = [url for tab in (a, b, c) for url in tab.requests_to("/events")]
    assert len(streams) == 1, streams  # the leader's; the others hear it over BroadcastChannel

    a.page.close()  # the leader goes; one of the others takes the lock and opens its stream
    remote_save(server, "<p>after the leader left</p>")
    for tab in (b, c):
        tab.expect_viewer("after the leader left", timeout_s=3)
        tab.expect_version(2)
    assert len([url for tab in (b, c) for url in tab.requests_to("/events")]) == 1


def test_sse_falls_back_to_long_poll_when_the_stream_is_refused(open_tab, context, server):
    context.route("**/events?*", lambda route: route.fulfill(status=503, body="no streams here"))
    a = open_tab("sse")
    expect(a.page.locator("#transport")).to_have_text("longpoll")
    remote_save(server, "<p>through the fallback</p>")
    a.expect_viewer("through the fallback", timeout_s=1)


def test_ctrl_s_saves(tabs):
    a, b = tabs
    a.edit("<p>saved with the keyboard</p>")
    a.page.press("#html", "Control+s")
    b.expect_viewer("saved with the keyboard", timeout_s=POLL_S + 1)
    a.expect_version(1), b.expect_version(1)


def test_save_from_outside_the_browser_shows_in_both_tabs(tabs, server):
    a, b = tabs
    remote_save(server, "<h2>from curl</h2>", data={"n": 1})
    for tab in (a, b):
        tab.expect_viewer("from curl", timeout_s=POLL_S + 1)
        tab.expect_version(1)
    expect(a.page.locator("#html")).to_have_value("<h2>from curl</h2>")  # a clean editor follows


@pytest.mark.parametrize("transport", ["poll", "sse"])
def test_a_deleted_page_empties_the_viewer_says_so_and_saving_re_creates_it(open_tab, server, transport):
    a = open_tab(transport)
    remote_save(server, "<h2>soon gone</h2>")
    a.expect_viewer("soon gone", timeout_s=POLL_S + 1)
    deleted = requests.post(f"{server.url}/delete", json={"slug": "shared"}, timeout=10)
    assert deleted.status_code == 200
    a.expect_version(2)
    expect(a.page.locator("#message")).to_contain_text("This page was deleted (version 2)")
    expect(a.page.locator("#html")).to_have_value("")
    a.edit("<h2>back</h2>", "")
    a.save()
    a.expect_version(3)
    assert stored(server)["html"] == "<h2>back</h2>" and "deleted" not in stored(server)


def test_conflict_is_reported_and_loses_nothing(tabs, server):
    a, b = tabs
    remote_save(server, "<p>version one</p>")
    a.expect_version(1), b.expect_version(1)

    b.edit("<p>B's work</p>")
    a.edit("<p>A's work</p>")
    b.save()
    b.expect_version(2)
    a.save()  # A still edits version 1
    expect(a.page.locator("#conflict")).to_be_visible()
    expect(a.page.locator("#conflict-text")).to_contain_text("version 2")
    stored = requests.get(f"{server.url}/changes?slug=shared", timeout=10).json()
    assert (stored["version"], stored["html"]) == (2, "<p>B's work</p>")

    a.page.click("#load-theirs")
    expect(a.page.locator("#html")).to_have_value("<p>B's work</p>")
    expect(a.page.locator("#conflict")).to_be_hidden()

    a.edit("<p>A insists</p>")
    remote_save(server, "<p>someone else again</p>")  # version 3, A edits version 2
    a.save()
    expect(a.page.locator("#conflict")).to_be_visible()
    a.page.click("#overwrite")
    a.expect_version(4)
    stored = requests.get(f"{server.url}/changes?slug=shared", timeout=10).json()
    assert (stored["version"], stored["html"]) == (4, "<p>A insists</p>")
    b.expect_viewer("A insists", timeout_s=POLL_S + 1)


def test_saved_scripts_never_run(tabs):
    a, b = tabs
    a.edit(XSS)
    a.save()
    for tab in (a, b):
        tab.expect_viewer("still shown", timeout_s=POLL_S + 1)
        frame = tab.page.frame_locator("#frame")
        expect(frame.locator("img")).to_have_count(1)
        expect(frame.locator("script")).to_have_count(1)
    a.wait(0.5)  # give a handler every chance to fire
    for tab in (a, b):
        assert tab.page.evaluate("window.__pwned") is None
        assert tab.page_errors == []
        # The only console errors allowed are the sandbox refusing the script
        # and the broken image `x` failing to load: proof of the block, not faults.
        unexpected = [e for e in tab.console_errors
                      if "Blocked script execution" not in e and "Failed to load resource" not in e]
        assert unexpected == []
    assert any("Blocked script execution" in e for e in a.console_errors + b.console_errors)


def test_badge_shows_retrying_when_the_server_stops_and_catches_up_after(tabs, server, db_path):
    a, b = tabs
    remote_save(server, "<p>before</p>")
    a.expect_version(1)
    server.stop()
    for tab in (a, b):
        tab.expect_state("retrying", "offline", timeout_s=POLL_S + 3)
    SQLiteStore(db_path).save("shared", "<p>saved while down</p>", "null")  # e.g. by another server
    server.start()
    for tab in (a, b):
        tab.expect_state("live", timeout_s=35)  # the longest backoff is 30 s
        tab.expect_viewer("saved while down", timeout_s=POLL_S + 1)
        tab.expect_version(2)


def test_hidden_tab_stops_polling_and_catches_up_when_shown(tabs, server):
    a, b = tabs
    b.set_hidden(True)
    b.wait(0.2)  # let a request already in flight finish
    hidden_a, hidden_b = a.mark(), b.mark()
    remote_save(server, "<p>saved while hidden</p>")
    b.wait(3 * POLL_S)
    assert b.requests_to("/changes", after=hidden_b) == []
    assert len(a.requests_to("/changes", after=hidden_a)) >= 2  # the visible tab kept polling
    expect(b.page.locator("#version")).to_have_text("–")

    shown = b.mark()
    b.set_hidden(False)
    b.expect_viewer("saved while hidden", timeout_s=1)
    assert b.requests_to("/changes", after=shown)


def test_bad_data_json_is_refused_in_the_page_before_any_request(tabs):
    a, _ = tabs
    a.edit("<p>x</p>", '{"unclosed": ')
    before = a.mark()
    a.save()
    expect(a.page.locator("#message")).to_contain_text("not valid JSON")
    expect(a.page.locator("#message")).to_have_attribute("data-kind", "error")
    a.wait(0.3)
    assert a.requests_to("/save", method="POST", after=before) == []
    expect(a.page.locator("#version")).to_have_text("–")

    a.edit("<p>x</p>", '{"closed": true}')
    a.save()
    a.expect_version(1)
    assert len(a.requests_to("/save", method="POST", after=before)) == 1


@pytest.mark.parametrize("server_down", [True, False], ids=["server down", "server answers"])
def test_unsubscribing_while_the_stream_handler_waits_leaves_nothing_open(context, server, server_down):
    context.add_init_script(COUNT_EVENT_SOURCES)
    a = Tab(context, server.url, "shared")  # the page itself polls: it opens no stream
    held = []

    def fail_the_stream_hold_the_probe(route):
        """The stream fails at once; the handler then asks the server why, and that question is held."""
        if route.request.resource_type == "eventsource":
            route.abort()
        else:
            held.append(route)

    a.page.route(lambda url: "slug=leak" in url, fail_the_stream_hold_the_probe)
    a.page.evaluate("""async () => {
        const {subscribe} = await import("/static/changefeed.js");
        window.__calls = [];
        window.__unsubscribe = subscribe("leak", {transport: "sse", shared: false,
            onChange: (change) => window.__calls.push(change), onStatus: (status) => window.__calls.push(status)});
    }""")
    wait_until(a, lambda: held)
    a.page.evaluate("window.__unsubscribe(); window.__calls.length = 0")
    unsubscribed = a.mark()
    try:
        if server_down:
            held[0].abort()
        else:
            held[0].continue_()
    except PlaywrightError:
        pass  # the page already gave up the request: just as good
    a.wait(3)  # longer than the first backoff (at most 2 s)
    assert a.page.evaluate(OPEN_EVENT_SOURCES) == 0
    assert a.requests_to("/events", after=unsubscribed) == []
    assert [url for _, url in a.requests[unsubscribed:] if "slug=leak" in url] == []
    assert a.page.evaluate("window.__calls") == []  # no callback after unsubscribe


def test_sse_reconnects_instead_of_falling_back_when_a_restarting_server_says_later(open_tab, context, server):
    refusals = []

    def shutting_down_twice(route):
        """A worker shutting down answers 503 with Retry-After, to the stream and to the probe."""
        if len(refusals) == 2:
            return route.continue_()
        refusals.append(route.request.resource_type)
        route.fulfill(status=503, json={"error": "shutting down", "message": "Restarting."},
                      headers={"Retry-After": "1", "Connection": "close"})

    context.route(lambda url: urlsplit(url).path == "/events", shutting_down_twice)
    a = open_tab("sse")
    expect(a.page.locator("#transport")).to_have_text("sse")
    remote_save(server, "<p>through the stream</p>")
    a.expect_viewer("through the stream", timeout_s=1)
    assert len(refusals) == 2
    assert len(a.requests_to("/events")) == 3
    assert not [url for url in a.requests_to("/changes") if "wait=" in url]  # never fell back to long-poll


def test_a_follower_takes_over_from_a_frozen_leader(open_tab, server, context):
    context.add_init_script(COUNT_EVENT_SOURCES)
    a, b = open_tab("sse"), open_tab("sse")
    expect(a.page.locator("#transport")).to_have_text("sse")
    expect(b.page.locator("#transport")).to_have_text("sse via another tab")
    # Freeze the leader: none of its scripts run (no beats, no relays), and it keeps
    # the Web Lock. (Page.setWebLifecycleState "frozen" does nothing here: Chromium
    # freezes only hidden pages, and Playwright keeps every page visible.)
    leader = context.new_cdp_session(a.page)
    leader.send("Debugger.enable")
    paused = []
    leader.on("Debugger.paused", lambda event: paused.append(event))
    leader.send("Debugger.pause")  # takes effect at its next script: its next beat at the latest
    wait_until(b, lambda: paused, timeout_s=3)

    remote_save(server, "<p>while the leader is frozen</p>")
    b.expect_viewer("while the leader is frozen", timeout_s=10)
    b.expect_version(1)
    expect(b.page.locator("#transport")).to_have_text("sse")  # b leads now
    assert b.page.evaluate(OPEN_EVENT_SOURCES) == 1

    leader.send("Debugger.resume")  # a wakes up, finds its lock stolen, and follows b
    expect(a.page.locator("#transport")).to_have_text("sse via another tab", timeout=5000)
    a.expect_version(1)
    assert a.page.evaluate(OPEN_EVENT_SOURCES) == 0
    remote_save(server, "<p>after the thaw</p>")
    for tab in (a, b):
        tab.expect_viewer("after the thaw", timeout_s=2)
        tab.expect_version(2)


def test_badge_says_retrying_while_the_server_is_down_and_offline_only_without_network(context, server):
    # Every backoff at its floor, so a few seconds take the retries past the ceiling.
    context.add_init_script("Math.random = () => 0;")
    context.add_init_script(RECORD_BADGE)
    a = Tab(context, server.url, "shared")
    server.stop()
    a.expect_state("retrying", timeout_s=POLL_S + 3)
    a.wait(8)  # five failures and more: past the 30 s ceiling of the backoff
    expect(a.page.locator("#state")).to_contain_text("retrying")
    assert "offline" not in a.page.evaluate("window.__states")

    context.set_offline(True)
    a.expect_state("offline", timeout_s=3)
    context.set_offline(False)
    a.expect_state("retrying", timeout_s=3)
    server.start()
    a.expect_state("live", timeout_s=POLL_S + 3)


@pytest.mark.parametrize("status, retry_after_s, most", [(200, None, 5), (503, 2, 3)], ids=["200", "503"])
def test_long_poll_pauses_after_an_early_unchanged_answer(context, server, status, retry_after_s, most):
    a = Tab(context, server.url, "shared", "longpoll")
    # The tab's own first beat changes the presence list, which answers a held long-poll: wait for
    # the one held after it, so that the save below, not presence, answers the last unrouted one.
    wait_until(a, lambda: any("wait=" in url and re.search(r"presence=[1-9]", url)
                              for url in a.requests_to("/changes")))
    early = []

    def answer_early(route):
        """Answer a held long-poll at once, unchanged, as a server shutting down or a proxy might."""
        early.append(time.monotonic())
        if status == 200:
            route.fulfill(status=200, json={"changed": False, "version": 1, "epoch": stored(server)["epoch"]})
        else:
            route.fulfill(status=503, json={"error": "shutting down", "message": "Restarting."},
                          headers={"Retry-After": str(retry_after_s), "Connection": "close"})

    a.page.route(lambda url: urlsplit(url).path == "/changes" and "wait=" in url, answer_early)
    remote_save(server, "<p>answers the held long-poll</p>")  # the next long-polls meet the route
    a.expect_viewer("answers the held long-poll", timeout_s=1)
    a.wait(5)
    in_five_s = [t for t in early if t - early[0] <= 5]
    assert 2 <= len(in_five_s) <= most, len(early)  # it goes on asking, but never in a tight loop
    if retry_after_s:
        assert min(later - first for first, later in zip(early, early[1:])) >= retry_after_s - 0.1


@pytest.mark.parametrize("lost", ["network error", "503 outcome unknown"])
def test_a_save_whose_answer_is_lost_is_retried_with_its_key_and_stored_once(tabs, server, lost):
    a, b = tabs
    keys, replayed = [], []

    def lose_first_answer(route):
        keys.append(route.request.headers.get("idempotency-key"))
        response = route.fetch()  # the save reaches the server and is stored...
        replayed.append(response.headers.get("idempotent-replayed"))
        if len(keys) > 1:
            route.fulfill(response=response)
        elif lost == "network error":
            route.abort()  # ...but its answer never reaches the page
        else:
            route.fulfill(status=503, headers={"Retry-After": "1"}, json={
                "error": "outcome unknown", "message": "This save may or may not have been stored."})

    a.page.route("**/save", lose_first_answer)
    a.edit("<p>saved once</p>")
    a.save()
    expect(a.page.locator("#message")).to_have_text("Saved version 1.", timeout=10_000)
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1], keys
    assert replayed == [None, "true"]
    assert (stored(server)["version"], stored(server)["html"]) == (1, "<p>saved once</p>")
    b.expect_viewer("saved once", timeout_s=POLL_S + 1)

    a.edit("<p>a new edit</p>")
    a.save()
    a.expect_version(2)
    assert len(keys) == 3 and keys[2] != keys[0]  # a new edit is a new save: a new key


@pytest.mark.parametrize("transport", ["poll", "longpoll", "sse", "ws"])
def test_a_replaced_database_is_followed_even_to_a_lower_version(context, server, db_path, transport):
    a = Tab(context, server.url, "shared", transport)
    for n in (1, 2, 3):
        remote_save(server, f"<p>old database {n}</p>")
    a.expect_version(3)
    old_epoch = stored(server)["epoch"]

    server.stop()
    for suffix in ("", "-wal", "-shm"):
        Path(db_path + suffix).unlink(missing_ok=True)
    migrate(db_path)  # a new database, with a new epoch
    SQLiteStore(db_path).save("shared", "<p>new database</p>", "null")
    server.start()  # same port: the page reconnects by itself
    assert stored(server)["epoch"] != old_epoch

    a.expect_viewer("new database", timeout_s=20)
    a.expect_version(1)
    expect(a.page.locator("#html")).to_have_value("<p>new database</p>")  # the clean editor follows
    a.edit("<p>saved on the new database</p>")
    a.save()
    a.expect_version(2)
    assert stored(server)["html"] == "<p>saved on the new database</p>"


# --- access control: a token in the URL fragment ----------------------------------------------------

JWT_SECRET = "browser-test-secret-" + "0123456789abcdef" * 3


def jwt_token(read=("*",), write=("*",), exp_in=600):
    import jwt

    return jwt.encode({"sub": "tab", "exp": int(time.time() + exp_in),
                       "changefeed": {"read": list(read), "write": list(write)}}, JWT_SECRET, algorithm="HS256")


@pytest.fixture
def auth_server(make_server):
    return make_server(env={"CHANGEFEED_JWT_SECRET": JWT_SECRET, "CHANGEFEED_AUTH_READS": "1"})


@pytest.mark.parametrize("transport", ["poll", "sse", "ws"])
def test_with_access_control_the_page_saves_and_streams_with_a_token_from_the_fragment(auth_server, context,
                                                                                       transport):
    given = jwt_token()
    writer = Tab(context, auth_server.url, "shared", transport, fragment=f"#token={given}")
    assert "token" not in writer.page.url  # taken out of the address: not shared, not bookmarked
    reader = Tab(context, auth_server.url, "shared", transport)  # another tab: reads with the cookie the first set
    writer.edit("<p>with a token</p>")
    writer.save()
    writer.expect_version(1)
    reader.expect_viewer("with a token", timeout_s=POLL_S + 3)
    assert all("token=" not in url for _, url in writer.requests)  # never sent to the server in a URL
    stored = requests.get(f"{auth_server.url}/changes?slug=shared",
                          headers={"Authorization": f"Bearer {given}"}, timeout=5).json()
    assert stored["version"] == 1


def test_a_read_only_token_may_read_but_the_page_says_it_cannot_save(auth_server, context):
    tab = Tab(context, auth_server.url, "shared", fragment=f"#token={jwt_token(write=())}")
    expect(tab.page.locator("#save")).to_be_disabled()
    expect(tab.page.locator("#message")).to_contain_text("may read this page but not save it")


@pytest.mark.parametrize("transport", ["poll", "longpoll", "sse", "ws"])
def test_without_a_token_the_page_stops_and_says_so_instead_of_retrying(auth_server, context, transport):
    tab = Tab(context, auth_server.url, "lonely", transport, state="unauthorized")
    expect(tab.page.locator("#message")).to_contain_text("needs a token")
    mark = tab.mark()
    tab.wait(3)
    asked = tab.requests_to("/changes", after=mark) + tab.requests_to("/events", after=mark)
    assert asked == [], f"kept asking after a 401: {asked}"
    # A WebSocket closed with 1008 (policy violation) is never opened again, nor replaced by a long-poll.
    assert len(tab.sockets) == (1 if transport == "ws" else 0), tab.sockets
    if transport == "ws":
        assert tab.requests_to("/changes") == []


def test_a_websocket_closed_because_the_token_expired_says_so_and_stops(make_server, context):
    server = make_server(env={"CHANGEFEED_JWT_SECRET": JWT_SECRET, "CHANGEFEED_AUTH_READS": "1",
                              "CHANGEFEED_JWT_LEEWAY_S": "0"})
    tab = Tab(context, server.url, "shared", "ws", fragment=f"#token={jwt_token(exp_in=3)}")
    tab.expect_state("unauthorized", timeout_s=8)  # closed with 4001 when the token expires
    expect(tab.page.locator("#message")).to_contain_text("token expired")
    tab.wait(3)
    assert len(tab.sockets) == 1, tab.sockets
    assert tab.requests_to("/changes") == []
