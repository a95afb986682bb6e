"""Logs: a request id on every error, one access line per request when asked, a line per save, one traceback per 500.

Most of these run gunicorn as production does and read what it wrote
(`server.log()`: its stdout and stderr), since what matters is what lands in
the log, and when.
"""

import json
import logging
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt
import pytest
import requests

from app import create_app

OUR_ID = re.compile(r"[0-9a-f]{16}")
KV_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
TRACEBACK = "Traceback (most recent call last)"
SECRET = "test-secret-that-is-long-enough-for-hs256"


def app_with_a_failing_route():
    """The service plus one route that fails, as a bug would (gunicorn serves this in the tests below)."""
    app = create_app()

    @app.get("/fail")
    def fail():
        raise RuntimeError("a bug in a view")

    return app


def access_lines(log):
    """The JSON access lines of a log, in order."""
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def kv_fields(line):
    """The key=value pairs of a kv access line, quoted values unquoted."""
    return {key: json.loads(value) if value.startswith('"') else value for key, value in KV_PAIR.findall(line)}


def wait_for(condition, timeout=10):
    """Wait until `condition()` is true (it returns the value), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def token(sub="editor-1", **rights):
    claims = {"sub": sub, "exp": int(time.time()) + 600, "changefeed": rights}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_each_request_gets_one_json_access_line_written_when_it_ends(make_server, open_stream):
    server = make_server(workers=1, env={"CHANGEFEED_ACCESS_LOG": "json", "CHANGEFEED_SSE_HEARTBEAT_MS": "200"})
    http = requests.Session()
    saved = http.post(f"{server.url}/save", json={"slug": "home", "html": "<h1>Hi</h1>"}, timeout=10)
    poll = http.get(f"{server.url}/changes?slug=home&since=0&token=secret-value", timeout=10)
    not_modified = http.get(f"{server.url}/changes?slug=home&since=0", headers={"If-None-Match": poll.headers["ETag"]},
                            timeout=10)
    missing = http.get(f"{server.url}/nope", timeout=10)
    stream = open_stream(f"{server.url}/events?slug=home&since=0")
    assert "retry" in stream.next() and stream.next()["event"] == "change"
    stream_id = stream.response.getheader("X-Request-Id")
    stream.close()  # the line is written once the server notices: at its next heartbeat
    assert (saved.status_code, poll.status_code, not_modified.status_code, missing.status_code) == (200, 200, 304, 404)

    lines = wait_for(lambda: (lines := access_lines(server.log())) and stream_id in {x["request_id"] for x in lines}
                     and lines)
    counts = Counter(line["request_id"] for line in lines)
    assert all(count == 1 for count in counts.values()), counts
    by_id = {line["request_id"]: line for line in lines}
    for response, method, path, status in [
        (saved, "POST", "/save", 200),
        (poll, "GET", "/changes?slug=home&since=0&token=REDACTED", 200),
        (not_modified, "GET", "/changes?slug=home&since=0", 304),
        (missing, "GET", "/nope", 404),
    ]:
        line = by_id[response.headers["X-Request-Id"]]  # every answer names its line
        assert (line["method"], line["path"], line["status"]) == (method, path, status)
        assert line["bytes"] == len(response.content)
        assert line["client"] == "127.0.0.1" and line["sub"] is None
        assert 0 < line["duration_ms"] < 5000
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    events = by_id[stream_id]
    assert (events["path"], events["status"]) == ("/events?slug=home&since=0", 200)
    assert events["bytes"] > len(b"retry: 2000\n\n") + len(b'data: {"changed":true')  # the retry and the event
    assert missing.json()["request_id"] == missing.headers["X-Request-Id"]
    log = server.log()
    assert "secret-value" not in log and "<h1>Hi</h1>" not in log


def test_tokens_page_content_and_cookies_never_reach_the_log(make_server):
    server = make_server(workers=1, env={"CHANGEFEED_ACCESS_LOG": "json", "CHANGEFEED_JWT_SECRET": SECRET,
                                         "CHANGEFEED_AUTH_READS": "1"})
    bearer = token(write=["home"], read=["*"])
    html, data = "<h1>page-content-marker</h1>", {"note": "data-content-marker"}
    http = requests.Session()
    saved = http.post(f"{server.url}/save", json={"slug": "home", "html": html, "data": data},
                      headers={"Authorization": f"Bearer {bearer}"}, timeout=10)
    assert saved.status_code == 200
    for query in [f"token={bearer}", f"access_token={bearer}", f"jwt={bearer}", "TOKEN=secret-value"]:
        poll = http.get(f"{server.url}/changes?slug=home&since=0&{query}",
                        headers={"Authorization": f"Bearer {bearer}"}, timeout=10)
        assert poll.status_code == 200 and html in poll.text
    assert http.post(f"{server.url}/session", headers={"Authorization": f"Bearer {bearer}"}, timeout=10).ok
    assert http.get(f"{server.url}/changes?slug=home&since=0", timeout=10).status_code == 200  # by the cookie

    log = wait_for(lambda: (log := server.log()).count("REDACTED") >= 4 and log)
    for secret in [bearer, bearer.split(".")[2], "secret-value", "page-content-marker", "data-content-marker",
                   "Authorization", "Bearer", "changefeed_read"]:
        assert secret not in log
    lines = access_lines(log)
    assert {line["sub"] for line in lines if line["path"].startswith(("/save", "/changes?slug=home"))} == {"editor-1"}
    assert "/changes?slug=home&since=0&TOKEN=REDACTED" in {line["path"] for line in lines}


def test_a_save_logs_one_info_line_with_slug_version_sub_and_request_id(make_server):
    server = make_server(workers=1, env={"CHANGEFEED_JWT_SECRET": SECRET})
    for version in (1, 2):
        saved = requests.post(f"{server.url}/save", json={"slug": "home", "html": "<p>body-marker</p>"},
                              headers={"Authorization": f"Bearer {token(write=['*'])}", "X-Request-Id": f"req-{version}"},
                              timeout=10)
        assert saved.json()["version"] == version
    log = wait_for(lambda: (log := server.log()).count("changefeed.saves") >= 2 and log)
    lines = [line for line in log.splitlines() if "changefeed.saves" in line]
    assert len(lines) == 2
    for version, line in enumerate(lines, 1):
        assert "[INFO] changefeed.saves: saved " in line  # level and logger name, like gunicorn's own lines
        assert kv_fields(line.partition(": saved ")[2]) == {
            "slug": "home", "version": str(version), "sub": "editor-1", "request_id": f"req-{version}"}
    assert "body-marker" not in log


def test_concurrent_saves_under_gunicorn_log_one_line_each_written_together(make_server):
    """A worker writes its greenlets' lines once per turn of gevent's loop: none lost, none twice, each whole."""
    server = make_server(workers=2)
    with ThreadPoolExecutor(32) as pool:
        versions = list(pool.map(lambda n: requests.post(f"{server.url}/save", json={"slug": f"p{n % 4}", "html": "x"},
                                                         timeout=10).json()["version"], range(400)))
    assert sorted(versions) == sorted(v for _ in range(4) for v in range(1, 101))
    log = wait_for(lambda: (log := server.log()).count("changefeed.saves") >= 400 and log)
    lines = [line for line in log.splitlines() if "changefeed.saves" in line]
    assert len(lines) == 400
    assert all(re.fullmatch(r"\[.+\] \[\d+\] \[INFO\] changefeed\.saves: saved slug=p\d version=\d+ request_id=[0-9a-f]{16}",
                            line) for line in lines)
    assert Counter(kv_fields(line)["slug"] + "/" + kv_fields(line)["version"] for line in lines) == Counter(
        {f"p{n}/{v}": 1 for n in range(4) for v in range(1, 101)})


def test_error_answers_carry_the_request_id_in_body_and_header(client):
    mine = client.get("/nope")
    assert mine.status_code == 404
    assert OUR_ID.fullmatch(mine.get_json()["request_id"]) and mine.headers["X-Request-Id"] == mine.get_json()["request_id"]
    for proxy_id in ["3f2a9c", "a" * 128, "req-1.2:x_Y"]:
        answer = client.post("/save", json={"slug": "a/b", "html": "x"}, headers={"X-Request-Id": proxy_id})
        assert answer.status_code == 422
        assert answer.get_json()["request_id"] == answer.headers["X-Request-Id"] == proxy_id


@pytest.mark.parametrize("forged", ["id with spaces", "a" * 129, "<script>", 'x"y', "tab\tid", "", "é"])
def test_a_forged_request_id_is_replaced_by_our_own(client, forged):
    answer = client.get("/nope", headers={"X-Request-Id": forged})
    rid = answer.get_json()["request_id"]
    assert rid == answer.headers["X-Request-Id"] and rid != forged and OUR_ID.fullmatch(rid)


def test_with_the_access_log_off_nothing_wraps_the_app_and_successes_carry_no_id(app, client, save):
    assert app.wsgi_app.__func__ is type(app).wsgi_app  # no middleware: the poll path pays nothing
    assert "X-Request-Id" not in save().headers
    assert "X-Request-Id" not in client.get("/changes?slug=home&since=0").headers


def test_an_unexpected_error_logs_one_traceback_with_the_id_its_500_carries(db_path, caplog):
    app = create_app({"CHANGEFEED_DB": db_path, "TESTING": True})

    @app.get("/fail")
    def fail():
        raise RuntimeError("a bug in a view")

    answer = app.test_client().get("/fail", headers={"X-Request-Id": "proxy-500"})
    assert answer.status_code == 500
    assert answer.get_json()["request_id"] == answer.headers["X-Request-Id"] == "proxy-500"
    with_traceback = [record for record in caplog.records if record.exc_info]
    assert len(with_traceback) == 1
    assert "request_id=proxy-500" in with_traceback[0].getMessage()
    assert "a bug in a view" not in answer.get_data(as_text=True)


def test_under_gunicorn_a_500_logs_exactly_one_traceback_carrying_its_request_id(make_server):
    server = make_server(workers=1, env={"CHANGEFEED_ACCESS_LOG": "json"}, app="tests.test_logs:app_with_a_failing_route()")
    answer = requests.get(f"{server.url}/fail", timeout=10)
    assert answer.status_code == 500
    rid = answer.json()["request_id"]
    assert rid == answer.headers["X-Request-Id"] and OUR_ID.fullmatch(rid)
    log = wait_for(lambda: (log := server.log()).count(rid) >= 2 and log)  # the traceback's line and the access line
    lines = log.splitlines()
    assert log.count(TRACEBACK) == 1 and log.count("RuntimeError: a bug in a view") == 1
    before = lines[lines.index(next(line for line in lines if line.startswith(TRACEBACK))) - 1]
    assert "[ERROR] app: unexpected error on GET '/fail'" in before and f"request_id={rid}" in before
    assert [line["status"] for line in access_lines(log) if line["request_id"] == rid] == [500]


def test_kv_access_log_is_one_line_of_key_value_pairs(make_server):
    server = make_server(workers=1, env={"CHANGEFEED_ACCESS_LOG": "kv"})
    answer = requests.get(f"{server.url}/changes?slug=home&since=0&token=secret-value",
                          headers={"X-Request-Id": "kv-1"}, timeout=10)
    line = wait_for(lambda: next((line for line in server.log().splitlines() if "request_id=kv-1" in line), None))
    assert line.startswith("time=")
    fields = kv_fields(line)
    assert fields == {"time": fields["time"], "method": "GET", "path": "/changes?slug=home&since=0&token=REDACTED",
                      "status": "200", "duration_ms": fields["duration_ms"], "bytes": str(len(answer.content)),
                      "client": "127.0.0.1", "request_id": "kv-1"}
    assert float(fields["duration_ms"]) > 0 and "secret-value" not in server.log()


def test_the_access_log_names_the_client_a_trusted_proxy_forwarded(make_server):
    server = make_server(workers=1, env={"CHANGEFEED_ACCESS_LOG": "kv"})  # loopback is a trusted proxy
    requests.get(f"{server.url}/changes?slug=home", timeout=10,
                 headers={"X-Request-Id": "fwd-1", "X-Forwarded-For": "203.0.113.7"})
    line = wait_for(lambda: next((line for line in server.log().splitlines() if "request_id=fwd-1" in line), None))
    assert kv_fields(line)["client"] == "203.0.113.7"


def test_without_gunicorn_lines_go_to_stderr_once_each_with_level_and_name(db_path):
    """As under `flask run`: nobody configured logging, the app does, and writes each line once."""
    script = """
import tests.test_logs as t
app = t.app_with_a_failing_route()
client = app.test_client()
with client.post("/save", json={"slug": "home", "html": "x"}, headers={"X-Request-Id": "s-1"}) as saved:
    assert saved.status_code == 200
with client.get("/fail", headers={"X-Request-Id": "f-1"}) as failed:  # closed: the access line is written
    assert failed.status_code == 500
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={"CHANGEFEED_DB": db_path, "CHANGEFEED_ACCESS_LOG": "kv", "PATH": ""},
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    errors = result.stderr.splitlines()
    assert [line for line in errors if "changefeed.saves" in line] == [
        next(line for line in errors if "changefeed.saves" in line)]
    assert re.search(r"\[INFO\] changefeed\.saves: saved slug=home version=1 request_id=s-1$", result.stderr, re.M)
    assert result.stderr.count(TRACEBACK) == 1
    assert re.search(r"\[ERROR\] app: unexpected error on GET '/fail' request_id=f-1\n" + re.escape(TRACEBACK),
                     result.stderr)
    assert [kv_fields(line)["request_id"] for line in result.stdout.splitlines()] == ["s-1", "f-1"]


def test_the_log_level_setting_silences_what_is_below_it(db_path, caplog):
    caplog.set_level(logging.DEBUG)
    quiet = create_app({"CHANGEFEED_DB": db_path, "CHANGEFEED_LOG_LEVEL": "warning"}).test_client()
    assert quiet.post("/save", json={"slug": "home", "html": "x"}).status_code == 200
    assert not [record for record in caplog.records if record.name == "changefeed.saves"]
    default = create_app({"CHANGEFEED_DB": db_path}).test_client()
    assert default.post("/save", json={"slug": "home", "html": "x"}).status_code == 200
    assert [record.levelname for record in caplog.records if record.name == "changefeed.saves"] == ["INFO"]


@pytest.mark.parametrize("name, value", [("CHANGEFEED_ACCESS_LOG", "yes"), ("CHANGEFEED_LOG_LEVEL", "loud")])
def test_a_bad_log_setting_stops_the_start_saying_what_it_accepts(db_path, name, value):
    with pytest.raises(SystemExit, match=name):
        create_app({"CHANGEFEED_DB": db_path, name: value})
