"""deploy/nginx.conf, in front of gunicorn: streams pass unbuffered, long-polls and 304s work.

The configuration is the shipped file (the one docs/production.md explains),
so the file and this test cannot drift apart. It runs over plain HTTP before
one server; tests/test_deploy.py runs it over TLS before two.
"""

import json
import re
import threading
import time

import pytest
import requests

from support import ROOT
from support.servers import find_nginx, free_port, running_nginx

NGINX_CONF = (ROOT / "deploy" / "nginx.conf").read_text()

find_nginx()  # or skip this module, saying how to get it


@pytest.fixture
def nginx(server, tmp_path):
    """nginx on free loopback ports with deploy/nginx.conf, its TLS left out, proxying to `server`."""
    port, redirect_port = free_port(), free_port()
    block = re.sub(r"(upstream changefeed \{\n)(?:.*\n)*?(?=    keepalive )",
                   lambda m: m.group(1) + f"    server 127.0.0.1:{server.port};\n", NGINX_CONF)
    block = re.sub(r"\n\s*(listen \[::\]|ssl_).*", "", block)
    block = block.replace("listen 80;", f"listen 127.0.0.1:{redirect_port};")
    block = re.sub(r"listen 443 ssl http2;", f"listen 127.0.0.1:{port};", block)
    block = block.replace("/dev/shm/nginx-changefeed", str(tmp_path / "cache"))
    assert "ssl" not in block.replace("$ssl", "") and f"127.0.0.1:{port}" in block
    with running_nginx(block, tmp_path, [port]):
        yield f"http://127.0.0.1:{port}"


def save(url, html):
    response = requests.post(f"{url}/save", json={"slug": "proxied", "html": html}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["version"]


def test_events_pass_through_nginx_at_once(nginx, open_stream, epoch):
    stream = open_stream(f"{nginx}/events?slug=proxied")
    assert stream.next() == {"retry": "2000"}
    for n in range(1, 4):
        saved_at = time.monotonic()
        save(nginx, f"v{n}")
        event = stream.next(timeout=2)
        assert (event["id"], event["data"]["html"]) == (f"{epoch}:{n}", f"v{n}")
        assert time.monotonic() - saved_at < 1.0  # a buffering proxy would hold it until 4-8 KiB piled up


def test_long_poll_through_nginx_wakes_on_a_save(nginx):
    answer = {}
    poller = threading.Thread(target=lambda: answer.update(
        requests.get(f"{nginx}/changes?slug=proxied&since=0&wait=20", timeout=30).json()))
    poller.start()
    time.sleep(0.5)
    saved_at = time.monotonic()
    save(nginx, "woken")
    poller.join(timeout=10)
    assert answer["html"] == "woken" and time.monotonic() - saved_at < 1.0


def test_unchanged_poll_through_nginx_is_a_304(nginx):
    save(nginx, "cached?")
    first = requests.get(f"{nginx}/changes?slug=proxied&since=1", timeout=10)
    again = requests.get(f"{nginx}/changes?slug=proxied&since=1", timeout=10,
                         headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""


def test_a_websocket_upgrades_through_nginx_and_gets_each_save(nginx, epoch):
    import websocket  # the test client of tests/test_websocket.py

    ws = websocket.create_connection(nginx.replace("http", "ws", 1) + "/ws", timeout=5)
    try:
        ws.send(json.dumps({"type": "subscribe", "slug": "proxied", "since": 0}))
        assert json.loads(ws.recv())["type"] == "subscribed"
        for n in range(1, 3):
            saved_at = time.monotonic()
            save(nginx, f"w{n}")
            frame = json.loads(ws.recv())
            assert (frame["type"], frame["version"], frame["html"], frame["epoch"]) == ("change", n, f"w{n}", epoch)
            assert time.monotonic() - saved_at < 1.0
    finally:
        ws.close()
