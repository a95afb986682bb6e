"""deploy/nginx.conf in front of two gunicorn servers, over TLS, and deploy/changefeed.service.

nginx runs the shipped file with only what a test must change: the upstream
servers, the ports (loopback), the certificate (self-signed, made here) and
the cache folder. Upstream requests are counted by the servers' own
/metrics (`changefeed_polls_total`: every /changes answer they gave).
"""

import datetime
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import websocket
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from support import ROOT
from support.servers import free_port, running_nginx

NGINX_CONF = (ROOT / "deploy" / "nginx.conf").read_text()
UNIT = (ROOT / "deploy" / "changefeed.service").read_text()


def self_signed(folder):
    """A certificate and key for 127.0.0.1, valid for a day; return their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "fullchain.pem", folder / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Front:
    """nginx with deploy/nginx.conf before two servers: its https URL, and what reached the servers."""

    def __init__(self, url, http_url, cert, servers):
        self.url, self.http_url, self.cert, self.servers = url, http_url, str(cert), servers

    def get(self, path, **kwargs):
        return requests.get(self.url + path, verify=self.cert, timeout=30, **kwargs)

    def save(self, slug, html):
        response = requests.post(f"{self.url}/save", json={"slug": slug, "html": html}, verify=self.cert, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()["version"]

    def polls(self, status=""):
        """The /changes answers both servers have given so far (of `status`, 200 or 304, when given)."""
        total = 0
        for server in self.servers:
            for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
                if line.startswith("changefeed_polls_total{") and f'status="{status}' in line:
                    total += float(line.rpartition(" ")[2])
        return total


@pytest.fixture
def front(make_server, tmp_path):
    servers = [make_server(workers=1), make_server(workers=1)]  # one database: SQLite, one host
    cert, key = self_signed(tmp_path)
    http_port, https_port = free_port(), free_port()
    block = re.sub(r"(upstream changefeed \{\n)(?:.*\n)*?(?=    keepalive )", lambda m: m.group(1) + "".join(
        f"    server 127.0.0.1:{server.port};\n" for server in servers), NGINX_CONF)
    block = re.sub(r"\n\s*listen \[::\].*", "", block)
    block = block.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    block = block.replace("listen 443 ssl", f"listen 127.0.0.1:{https_port} ssl")
    block = block.replace("/etc/ssl/changefeed/fullchain.pem", str(cert))
    block = block.replace("/etc/ssl/changefeed/privkey.pem", str(key))
    block = block.replace("/dev/shm/nginx-changefeed", str(tmp_path / "cache"))
    with running_nginx(block, tmp_path, [http_port, https_port]):
        yield Front(f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", cert, servers)


def at_the_start_of_a_second():
    """Sleep into the next second: requests sent now share a cache entry, keyed by the second they came in."""
    time.sleep(1 - time.time() % 1 + 0.02)


def test_plain_http_is_sent_to_https(front):
    response = requests.get(f"{front.http_url}/changes?slug=x", allow_redirects=False, timeout=10)
    assert response.status_code == 301 and response.headers["Location"] == "https://127.0.0.1/changes?slug=x"


def test_metrics_are_not_served_to_the_internet(front):
    assert requests.get(f"{front.url}/metrics", verify=front.cert, timeout=10).status_code == 404
    assert requests.get(f"{front.servers[0].url}/metrics", timeout=10).status_code == 200  # scraped directly


def test_events_arrive_through_it_at_once(front, epoch):
    with requests.get(f"{front.url}/events?slug=live", stream=True, verify=front.cert, timeout=30) as stream:
        lines = stream.iter_lines(decode_unicode=True)
        assert next(lines) == "retry: 2000"
        for n in range(1, 4):
            saved_at = time.monotonic()
            front.save("live", f"v{n}")
            assert next(line for line in lines if line.startswith("id:")) == f"id: {epoch}:{n}"
            assert time.monotonic() - saved_at < 2.0  # a buffering proxy would hold it until 4-8 KiB piled up


def test_a_websocket_works_through_it(front, epoch):
    # As a browser's page of this site: its Origin has the port, the Host nginx passes on does not.
    ws = websocket.create_connection(front.url.replace("https", "wss", 1) + "/ws", timeout=10,
                                     sslopt={"ca_certs": front.cert}, header=["Sec-Fetch-Site: same-origin"])
    try:
        ws.send(json.dumps({"type": "subscribe", "slug": "live"}))
        assert json.loads(ws.recv()) == {"type": "subscribed", "slug": "live", "version": 0, "epoch": epoch}
        for n in range(1, 4):
            saved_at = time.monotonic()
            front.save("live", f"v{n}")
            frame = json.loads(ws.recv())
            assert (frame["type"], frame["version"], frame["html"]) == ("change", n, f"v{n}")
            assert time.monotonic() - saved_at < 2.0
        ws.send(json.dumps({"type": "ping", "id": 1}))
        assert json.loads(ws.recv()) == {"type": "pong", "id": 1}
    finally:
        ws.close(timeout=1)
        ws.shutdown()


def test_fifty_identical_long_polls_are_one_request_to_the_servers_and_all_hear_of_the_save(front):
    version = front.save("crowd", "v1")
    before = front.polls()
    at_the_start_of_a_second()
    with ThreadPoolExecutor(50) as pool:
        answers = [pool.submit(front.get, f"/changes?slug=crowd&since={version}&wait=20") for _ in range(50)]
        time.sleep(0.8)  # all 50 are waiting, within that one second
        saved_at = time.monotonic()
        front.save("crowd", "v2")
        bodies = [answer.result().json() for answer in answers]
        heard_within = time.monotonic() - saved_at
    assert all(body["changed"] and body["html"] == "v2" for body in bodies)
    # nginx asked once, the others waited for its answer (twice if the 50 came in over the turn of a second).
    assert front.polls() - before in (1, 2)
    assert heard_within < 3  # nginx looks for that answer every 0.5 s


def test_an_unchanged_long_poll_answers_all_who_waited_with_it_and_is_not_reused(front):
    version = front.save("quiet", "v1")
    url = f"/changes?slug=quiet&since={version}&wait=2"
    at_the_start_of_a_second()
    started = time.monotonic()
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: front.get(url), range(5)))
    # Together, at the end of the one wait: not one after another, each waiting for a wait of its own.
    assert time.monotonic() - started < 4
    assert all(not answer.json()["changed"] for answer in answers)
    assert sorted(answer.headers["X-Cache-Status"] for answer in answers) == ["HIT"] * 4 + ["MISS"]
    assert "X-Accel-Expires" not in answers[0].headers  # nginx's alone
    again = front.get(url)  # asked again at once, as a client does: a wait of its own
    assert again.headers["X-Cache-Status"] == "MISS" and time.monotonic() - started > 4


def test_if_none_match_is_answered_304_by_nginx_itself(front):
    front.save("etag", "v1")
    at_the_start_of_a_second()
    first = front.get("/changes?slug=etag&since=1")
    before = front.polls(status="304")
    again = front.get("/changes?slug=etag&since=1", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and again.content == b"" and again.headers["X-Cache-Status"] == "HIT"
    assert again.headers["Cache-Control"] == first.headers["Cache-Control"] == "public, max-age=0, s-maxage=1"
    assert front.polls(status="304") == before  # the servers never saw it


@pytest.mark.parametrize("credentials", [{"headers": {"Authorization": "Bearer not-checked-here"}},
                                         {"cookies": {"changefeed_read": "not-checked-here"}}],
                         ids=["authorization", "read cookie"])
def test_a_request_with_a_token_neither_uses_nor_fills_the_cache(front, credentials):
    front.save("mine", "v1")
    at_the_start_of_a_second()
    public = front.get("/changes?slug=mine&since=0")
    private = front.get("/changes?slug=mine&since=0", **credentials)
    assert (public.headers["X-Cache-Status"], private.headers["X-Cache-Status"]) == ("MISS", "BYPASS")
    # Its own If-None-Match reaches the server, which answers 304 itself.
    before = front.polls(status="304")
    headers = {**credentials.get("headers", {}), "If-None-Match": public.headers["ETag"]}
    revalidated = front.get("/changes?slug=mine&since=0", headers=headers, cookies=credentials.get("cookies"))
    assert revalidated.status_code == 304 and front.polls(status="304") == before + 1
    mine = front.get("/changes?slug=mine&since=1", **credentials)
    anyone = front.get("/changes?slug=mine&since=1")  # same second: would be a HIT had the token's answer been kept
    assert (mine.headers["X-Cache-Status"], anyone.headers["X-Cache-Status"]) == ("BYPASS", "MISS")


def test_a_poll_through_it_sees_a_save_within_a_second(front):
    front.save("fresh", "v1")
    at_the_start_of_a_second()
    assert front.get("/changes?slug=fresh&since=0").json()["version"] == 1  # now cached
    saved_at = time.monotonic()
    front.save("fresh", "v2")
    while front.get("/changes?slug=fresh&since=0").json()["version"] != 2:
        time.sleep(0.05)
    assert time.monotonic() - saved_at < 2.5  # at most the rest of that second, generously


def unit_lines(key):
    return [line.partition("=")[2] for line in UNIT.splitlines() if line.startswith(f"{key}=")]


def test_the_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the next test runs the unit's commands by hand")
    unit = tmp_path / "changefeed.service"
    unit.write_text(UNIT.replace("/srv/changefeed", str(ROOT)))  # where the virtualenv is, here
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr  # an unknown key is only a warning
    assert unit_lines("LimitNOFILE") == ["65536"]
    assert int(unit_lines("TimeoutStopSec")[0]) > 10  # gunicorn.conf.py's graceful_timeout


def test_the_units_commands_migrate_and_serve_from_the_repository(tmp_path):
    """ExecStartPre and ExecStart, run as systemd would, with the unit's Environment (a test database, port)."""
    env = {**os.environ, **dict(line.split("=", 1) for line in unit_lines("Environment"))}
    env.update(CHANGEFEED_DB=str(tmp_path / "changefeed.sqlite3"), CHANGEFEED_BIND=f"127.0.0.1:{free_port()}",
               CHANGEFEED_WORKERS="1")
    venv = str(Path(sys.executable).parent.parent)  # this virtualenv stands in for /srv/changefeed/.venv

    def command(key):
        argv = shlex.split(unit_lines(key)[0].replace("/srv/changefeed/.venv", venv))
        assert Path(argv[0]).exists(), argv
        return argv

    subprocess.run(command("ExecStartPre"), cwd=ROOT, env=env, check=True, capture_output=True, timeout=60)
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command("ExecStart"), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert requests.get(f"http://{env['CHANGEFEED_BIND']}/readyz", timeout=1).status_code == 200
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        process.send_signal(getattr(signal, unit_lines("KillSignal")[0]))
        assert process.wait(timeout=int(unit_lines("TimeoutStopSec")[0])) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
