"""The dashboard (/dashboard?prefix=P) in real headless Chromium: many pages, one connection.

Each test starts gunicorn (two workers, free loopback port, fresh database),
saves more pages than a browser opens connections to one origin (six), and
watches the dashboard follow them all on one stream or socket.
"""

import pytest
import requests
from playwright.sync_api import expect

from support.browsers import Tab, find_chromium

find_chromium()  # one skip line for the module when there is no browser

PAGES = [f"team-{n}" for n in range(1, 8)]  # seven: more than the browser's six connections per origin


def save(server, slug, html="<p>hello</p>"):
    response = requests.post(f"{server.url}/save", json={"slug": slug, "html": html}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["version"]


def open_dashboard(context, server, prefix, transport):
    return Tab(context, server.url, None, path=f"/dashboard?prefix={prefix}&transport={transport}")


def rows(tab):
    return tab.page.locator("#pages tbody tr")


def expect_row(tab, slug, version, timeout_s=5):
    expect(tab.page.locator(f'#pages tr[data-slug="{slug}"]')).to_have_attribute(
        "data-version", str(version), timeout=timeout_s * 1000)


@pytest.mark.parametrize("transport", ["ws", "sse", "longpoll"])
def test_a_dashboard_of_seven_pages_follows_them_all_on_one_connection(context, server, transport):
    for slug in PAGES:
        save(server, slug)
    save(server, "elsewhere")
    tab = open_dashboard(context, server, "team-", transport)
    expect(rows(tab)).to_have_count(len(PAGES))
    expect(tab.page.locator("#count")).to_have_text(str(len(PAGES)))

    save(server, "team-3", "<p>again</p>")
    expect_row(tab, "team-3", 2)
    save(server, "team-8")  # created after the dashboard opened
    expect_row(tab, "team-8", 1)
    save(server, "elsewhere", "<p>not under the prefix</p>")
    save(server, "team-1", "<p>after the one elsewhere</p>")
    expect_row(tab, "team-1", 2)
    expect(tab.page.locator('#pages tr[data-slug="elsewhere"]')).to_have_count(0)
    expect(rows(tab)).to_have_count(len(PAGES) + 1)

    # One connection for all of it: one socket, or one stream, or one long-poll at a time; no page asked alone.
    if transport == "ws":
        assert len(tab.sockets) == 1, tab.sockets
    elif transport == "sse":
        assert len(tab.requests_to("/events")) == 1, tab.requests
    else:
        assert tab.requests_to("/feed"), tab.requests
    assert tab.requests_to("/changes") == []
    assert tab.page_errors == []


def test_the_dashboard_shows_who_is_editing_each_page_over_the_one_socket(context, server):
    for slug in PAGES:
        save(server, slug)
    dashboard = open_dashboard(context, server, "team-", "ws")
    expect(rows(dashboard)).to_have_count(len(PAGES))
    editor = Tab(context, server.url, "team-5", "poll", name="Grace")
    editor.page.type("#html", "<p>typing</p>")
    expect(dashboard.page.locator('#pages tr[data-slug="team-5"] .editing')).to_have_text("Grace", timeout=8000)
    expect(dashboard.page.locator('#pages tr[data-slug="team-4"] .editing')).to_have_text("–")
    assert len(dashboard.sockets) == 1, dashboard.sockets  # a prefix and seven pages' presence, one socket


def test_a_deleted_page_is_marked_and_a_new_version_shows_after_it(context, server):
    for slug in PAGES[:2]:
        save(server, slug)
    tab = open_dashboard(context, server, "team-", "sse")
    expect(rows(tab)).to_have_count(2)
    response = requests.post(f"{server.url}/delete", json={"slug": "team-2"}, timeout=10)
    assert response.status_code == 200, response.text
    row = tab.page.locator('#pages tr[data-slug="team-2"]')
    expect(row).to_have_attribute("data-deleted", "true")
    save(server, "team-2", "<p>back</p>")
    expect(row).to_have_attribute("data-deleted", "false")
    expect(row).to_have_attribute("data-version", "3")



@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_two_dashboards_in_one_browser_share_one_connection_and_a_new_leader_takes_over(context, server, transport):
    for slug in PAGES:
        save(server, slug)
    first = open_dashboard(context, server, "team-", transport)
    expect(rows(first)).to_have_count(len(PAGES))
    second = open_dashboard(context, server, "team-", transport)
    expect(rows(second)).to_have_count(len(PAGES))  # replayed by the leader, not read again
    save(server, "team-2", "<p>again</p>")
    for tab in (first, second):
        expect_row(tab, "team-2", 2)
    if transport == "ws":
        assert len(first.sockets) + len(second.sockets) == 1, (first.sockets, second.sockets)
    else:
        assert len(first.requests_to("/events") + second.requests_to("/events")) == 1

    first.page.close()  # the leader goes: the other takes over from the last cursor it heard
    save(server, "team-9")
    expect_row(second, "team-9", 1, timeout_s=8)
    save(server, "team-2", "<p>third</p>")
    expect_row(second, "team-2", 3)
    assert second.page_errors == []


FOLLOW_PAGES = """async ([slugs, transport]) => {
  const {subscribe} = await import("/static/changefeed.js");
  window.__seen = {};
  for (const slug of slugs) {
    subscribe(slug, {transport, shared: false, onChange: ({version, html}) => { window.__seen[slug] = [version, html]; }});
  }
}"""


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_tab_following_seven_pages_one_by_one_opens_one_connection(context, server, transport):
    for slug in PAGES:
        save(server, slug, f"<p>{slug} one</p>")
    tab = open_dashboard(context, server, "nothing-here-", "poll")  # a page that serves the script
    mark = tab.mark()
    tab.page.evaluate(FOLLOW_PAGES, [PAGES, transport])
    seen = lambda: tab.page.evaluate("window.__seen")  # noqa: E731
    expect_seen = lambda expected: tab.page.wait_for_function(  # noqa: E731
        "expected => JSON.stringify(window.__seen) === JSON.stringify(expected)", arg=expected, timeout=8000)
    expect_seen({slug: [1, f"<p>{slug} one</p>"] for slug in PAGES})
    save(server, "team-4", "<p>team-4 two</p>")
    expect_seen({**{slug: [1, f"<p>{slug} one</p>"] for slug in PAGES}, "team-4": [2, "<p>team-4 two</p>"]})
    assert set(seen()) == set(PAGES)
    if transport == "ws":
        assert len(tab.sockets) == 1, tab.sockets
    else:
        streams = tab.requests_to("/events", after=mark)
        assert len(streams) == 1 and streams[0].count("slug=") == len(PAGES), streams
    assert tab.requests_to("/changes", after=mark) == []
    assert tab.page_errors == []
