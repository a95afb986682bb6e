"""The README's nginx settings, in front of gunicorn: streams pass unbuffered, long-polls and 304s work.

The nginx block is read from README.md, so the manual and this test cannot
drift apart.
"""

import os
import re
import shutil
import subprocess
import threading
import time

import pytest
import requests

from conftest import ROOT, free_port

README = (ROOT / "README.md").read_text()


def find_nginx():
    path = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if path is None:
        reason = "the nginx tests need nginx: apt-get install nginx"
        if os.environ.get("CHANGEFEED_REQUIRE_NGINX") == "1":
            pytest.fail(f"{reason}; CHANGEFEED_REQUIRE_NGINX=1 makes this a failure", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    return path


NGINX = find_nginx()


@pytest.fixture
def nginx(server, tmp_path):
    """nginx on a free loopback port with the README's configuration, proxying to `server`."""
    block = re.search(r"```nginx\n(.*?)```", README, re.S).group(1)
    port = free_port()
    block = block.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    block = block.replace("# ... listen, server_name, TLS ...", f"listen 127.0.0.1:{port};")
    temp = tmp_path / "nginx-temp"
    temp.mkdir(mode=0o777)
    temp.chmod(0o777)  # nginx's workers drop root; they still buffer bodies here
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi; uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
{block}
}}
""")
    process = subprocess.Popen([NGINX, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            requests.get(f"{url}/changes?slug=ready", timeout=1)
            break
        except requests.ConnectionError:
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "nginx-error.log").read_text()
            time.sleep(0.05)
    yield url
    process.terminate()
    process.wait(timeout=10)


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
