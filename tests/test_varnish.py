"""deploy/varnish.vcl in front of two gunicorn servers: many long-polls of one page, one request to them.

Varnish runs the shipped file with only the backends' ports changed.
Upstream requests are counted by the servers' own /metrics
(`changefeed_polls_total`: every /changes answer they gave).
"""

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import websocket

from support import ROOT
from support.clients import GENEROUS_S, SECRET, token
from support.servers import Server, free_port, running_varnish

VCL = (ROOT / "deploy" / "varnish.vcl").read_text()


class Front:
    """Varnish before two servers: its URL, and what reached the servers."""

    def __init__(self, url: str, servers: list[Server]) -> None:
        self.url, self.servers = url, servers

    def save(self, slug: str, html: str) -> int:
        response = requests.post(f"{self.url}/save", json={"slug": slug, "html": html}, timeout=10)
        assert response.status_code == 200, response.text
        version: int = response.json()["version"]
        return version

    def polls(self) -> float:
        """The /changes answers both servers have given so far."""
        total = 0.0
        for server in self.servers:
            for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
                if line.startswith("changefeed_polls_total{"):
                    total += float(line.rpartition(" ")[2])
        return total


@pytest.fixture
def make_front(make_server: Callable[..., Server], tmp_path: Any) -> Iterator[Callable[..., Front]]:
    fronts: list[Any] = []

    def make_front(env: dict[str, str] | None = None) -> Front:
        servers = [make_server(workers=1, env=env), make_server(workers=1, env=env)]  # one database, one host
        vcl = VCL.replace('.port = "8000"', f'.port = "{servers[0].port}"')
        vcl = vcl.replace('.port = "8001"', f'.port = "{servers[1].port}"')
        assert vcl.count(f'.port = "{servers[0].port}"') == 1, "deploy/varnish.vcl no longer lists 127.0.0.1:8000"
        port = free_port()
        running = running_varnish(vcl, tmp_path, port)
        running.__enter__()
        fronts.append(running)
        return Front(f"http://127.0.0.1:{port}", servers)

    yield make_front
    for running in fronts:
        running.__exit__(None, None, None)


@pytest.fixture
def front(make_front: Callable[..., Front]) -> Front:
    return make_front()


def ask_together(count: int, url: str, **options: Any) -> Callable[[], list[tuple[requests.Response, float]]]:
    """Send `count` identical GETs at once, each on its own connection; return what waits for their answers."""
    answers: list[tuple[requests.Response, float]] = []

    def ask() -> None:
        response = requests.get(url, timeout=60, **options)
        answers.append((response, time.monotonic()))

    threads = [threading.Thread(target=ask) for _ in range(count)]
    for thread in threads:
        thread.start()

    def finish() -> list[tuple[requests.Response, float]]:
        for thread in threads:
            thread.join(60)
        assert len(answers) == count, f"{count - len(answers)} of {count} requests got no answer"
        return answers

    return finish


def test_a_hundred_long_polls_of_one_page_are_one_request_and_all_hear_of_the_save_at_once(front):
    version = front.save("home", "v1")
    before = front.polls()
    finish = ask_together(100, f"{front.url}/changes?slug=home&since={version}&wait=30")
    time.sleep(1.5)  # every one of them on the waiting list of the first one's request
    saved_at = time.monotonic()
    front.save("home", "v2")
    answers = finish()
    assert {response.json()["version"] for response, _ in answers} == {version + 1}
    assert max(at for _, at in answers) - saved_at < GENEROUS_S, "a held long-poll heard of the save late"
    assert front.polls() - before == 1, "the long-polls were not collapsed into one request to the servers"
    assert sum(response.headers["X-Cache"] == "HIT" for response, _ in answers) == 99


def test_an_unchanged_answer_reaches_those_who_waited_with_it_and_the_next_round_waits_again(front):
    version = front.save("home", "v1")
    url = f"{front.url}/changes?slug=home&since={version}&wait=1"
    before = front.polls()
    answers = ask_together(20, url)()
    assert all(response.json() == {"changed": False, "version": version, "epoch": response.json()["epoch"]}
               for response, _ in answers)
    assert front.polls() - before == 1
    started = time.monotonic()
    again = requests.get(url, timeout=10)
    assert time.monotonic() - started >= 0.8, "the re-ask was told 'unchanged' at once, from the last round"
    assert again.headers["X-Cache"] == "MISS" and front.polls() - before == 2


def test_a_long_poll_behind_the_newest_version_gets_a_newer_one_at_once_and_reaches_the_newest(front):
    """A tab behind takes the cached answer of the round it missed (a second old at most), then catches up."""
    front.save("home", "v1")
    finish = ask_together(5, f"{front.url}/changes?slug=home&since=1&wait=30")
    time.sleep(0.5)
    front.save("home", "v2")
    assert {response.json()["version"] for response, _ in finish()} == {2}
    front.save("home", "v3")
    started = time.monotonic()
    late = requests.get(f"{front.url}/changes?slug=home&since=1&wait=30", timeout=10)  # the URL of that round
    assert late.json()["changed"] and late.json()["version"] in (2, 3)
    newest = late.json()
    if newest["version"] == 2:  # the round it missed, from the cache: it asks on, and v3 comes at once
        newest = requests.get(f"{front.url}/changes?slug=home&since=2&wait=30", timeout=10).json()
    assert (newest["version"], newest["html"]) == (3, "v3")
    assert time.monotonic() - started < GENEROUS_S, "a tab behind waited instead of catching up"


def test_plain_polls_of_one_second_share_one_request(front):
    front.save("home", "v1")
    before = front.polls()
    answers = ask_together(30, f"{front.url}/changes?slug=home&since=0")()
    assert {response.json()["version"] for response, _ in answers} == {1}
    assert front.polls() - before <= 2  # one, or two when the second turned while they came in


def test_a_request_with_a_token_or_the_read_cookie_is_never_shared(make_front):
    front = make_front(env={"CHANGEFEED_JWT_SECRET": SECRET, "CHANGEFEED_AUTH_READS": "1",
                            "CHANGEFEED_METRICS": "public"})
    requests.post(f"{front.url}/save", json={"slug": "docs-a", "html": "x"},
                  headers={"Authorization": f"Bearer {token()}"}, timeout=10)
    before = front.polls()
    url = f"{front.url}/changes?slug=docs-a&since=0"
    with_token = ask_together(5, url, headers={"Authorization": f"Bearer {token()}"})()
    with_cookie = ask_together(3, url, headers={"Cookie": f"changefeed_read={token()}"})()
    anonymous = requests.get(url, timeout=10)
    assert {response.status_code for response, _ in with_token} == {200}
    assert all(response.headers["X-Cache"] == "MISS" for response, _ in with_token + with_cookie)
    assert front.polls() - before == 5 + 3  # each its own request (a refused one is no poll: not counted)
    assert anonymous.status_code == 401  # not an answer fetched with another's token


def test_event_streams_and_websockets_pass_through_at_once(front):
    with requests.get(f"{front.url}/events?slug=home&since=0", stream=True, timeout=10) as stream:
        lines = stream.iter_lines(decode_unicode=True)
        assert next(lines).startswith("retry:")
        saved_at = time.monotonic()
        front.save("home", "<p>streamed</p>")
        event = [next(lines) for _ in range(4)]
        assert time.monotonic() - saved_at < GENEROUS_S, "the event was held back"
        assert event[1:3] == ["id: " + event[1][4:], "event: change"] and "streamed" in event[3]
    socket = websocket.create_connection(front.url.replace("http", "ws") + "/ws", timeout=10,
                                         origin=front.url)
    try:
        socket.send('{"type": "subscribe", "slug": "home", "since": 0}')
        frames = [socket.recv(), socket.recv()]
        assert '"subscribed"' in frames[0] and "streamed" in frames[1]
    finally:
        socket.close()


def test_metrics_are_not_served_through_it(front):
    assert requests.get(f"{front.url}/metrics", timeout=10).status_code == 404
    assert re.search(r"^changefeed_polls_total", requests.get(f"{front.servers[0].url}/metrics", timeout=10).text,
                     re.M)
