"""GET /metrics: exact counts summed over gunicorn's workers, gauges of what is open now, and who may read them.

Against real gunicorn servers with two workers, a known sequence of requests
must show up exactly (as differences from a scrape taken before it), and each
worker's own file in the multi-process folder proves that both of them served
some of it. With the Flask test client the counts live in this process.
"""

import threading
import time
import uuid

import jwt
import psutil
import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector

from app import create_app
from changefeed.core.outcomes import Busy, NotStored, OutcomeUnknown, StorageFull
from changefeed.ops import metrics
from support.clients import parse, scrape, value, wait_until
from support.servers import close_app

pytestmark = pytest.mark.engines

SECRET = "metrics-secret-" + "0123456789abcdef" * 4


def diff(after, before):
    """What changed in the service's own metrics between two scrapes (not the process's CPU and memory)."""
    return {key: after[key] - before.get(key, 0) for key in after
            if key[0].startswith("changefeed_") and after[key] != before.get(key, 0)}


def metrics_folder(tmp):
    """The private folder the server's master made for its workers' files (under the TMPDIR it was given)."""
    (folder,) = tmp.glob("changefeed-metrics-*")
    return folder


def per_process(folder, kind, sample_name):
    """{pid: the sum of `sample_name` in that process's own file}, for files of `kind` (counter, gauge_livesum)."""
    totals = {}
    for path in folder.glob(f"{kind}_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        totals[pid] = sum(sample.value for metric in MultiProcessCollector.merge([str(path)])
                          for sample in metric.samples if sample.name == sample_name)
    return totals


def save(server, expect, **body):
    headers = {"Idempotency-Key": body.pop("key")} if "key" in body else {}
    response = requests.post(f"{server.url}/save", json={"html": "<p>x</p>", **body}, headers=headers, timeout=10)
    assert response.status_code == expect, response.text
    return response


@pytest.fixture
def tmp(tmp_path):
    """A TMPDIR for the server, so the test finds the metrics folder its master makes there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    return folder


def test_metrics_count_every_request_exactly_summed_over_both_workers(make_server, tmp, open_stream):
    server = make_server(workers=2, env={"TMPDIR": str(tmp)})
    folder = metrics_folder(tmp)
    workers = {child.pid for child in psutil.Process(server.process.pid).children()}
    assert len(workers) == 2
    before = scrape(server)

    # Saves: 3 stored, a retry replayed, its key reused for another save, a stale base_version.
    key = str(uuid.uuid4())
    save(server, 200, slug="a", key=key)
    save(server, 200, slug="a")
    save(server, 200, slug="a")
    assert save(server, 200, slug="a", key=key).headers["Idempotent-Replayed"] == "true"
    save(server, 422, slug="a", html="<p>other</p>", key=key)
    save(server, 409, slug="a", base_version=1)

    # Plain polls answered 200, each on a new connection, until both workers have answered some.
    polled = 0
    while len({pid for pid, count in per_process(folder, "counter", "changefeed_polls_total").items() if count}) < 2:
        assert polled < 500, "one worker answered every poll"
        assert requests.get(f"{server.url}/changes?slug=a&since=0", timeout=10).status_code == 200
        polled += 1
    etag = requests.get(f"{server.url}/changes?slug=a&since=3", timeout=10).headers["ETag"]
    for _ in range(5):
        response = requests.get(f"{server.url}/changes?slug=a&since=3", headers={"If-None-Match": etag}, timeout=10)
        assert response.status_code == 304

    # A long-poll counted while it waits, woken by a save.
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(
        requests.get(f"{server.url}/changes?slug=b&since=0&wait=20", timeout=30).json()))
    thread.start()
    wait_until(lambda: value(scrape(server), "changefeed_open_waits", transport="long-poll") == 1,
               what="the long-poll to wait")
    waiting = scrape(server)
    assert value(waiting, "changefeed_subscribers") == 1 and value(waiting, "changefeed_watched_slugs") == 1
    save(server, 200, slug="b")
    thread.join(timeout=10)
    assert answer["changed"] and answer["version"] == 1

    # An event stream counted while it is open, and a save delivered to it.
    stream = open_stream(f"{server.url}/events?slug=a&since=3")
    assert "retry" in stream.next()
    wait_until(lambda: value(scrape(server), "changefeed_open_waits", transport="sse") == 1,
               what="the stream to open")
    save(server, 200, slug="a")
    assert stream.next()["data"]["version"] == 4

    after = scrape(server)
    assert diff(after, before) == {
        ("changefeed_saves_total", (("outcome", "ok"),)): 5,
        ("changefeed_saves_total", (("outcome", "replayed"),)): 1,
        ("changefeed_saves_total", (("outcome", "key_reused"),)): 1,
        ("changefeed_saves_total", (("outcome", "conflict"),)): 1,
        ("changefeed_save_seconds_count", ()): 8,
        # Sequential saves: each one its own commit.
        ("changefeed_commit_batch_saves_count", ()): 8,
        ("changefeed_commit_batch_saves_sum", ()): 8,
        **{("changefeed_commit_batch_saves_bucket", (("le", le),)): 8
           for le in ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "200.0", "+Inf")},
        ("changefeed_polls_total", (("status", "200"), ("wait", "0"))): polled + 1,
        ("changefeed_polls_total", (("status", "304"), ("wait", "0"))): 5,
        ("changefeed_polls_total", (("status", "200"), ("wait", "1"))): 1,
        ("changefeed_open_waits", (("transport", "sse"),)): 1,  # still open; the long-poll ended
        ("changefeed_subscribers", ()): 1,
        ("changefeed_watched_slugs", ()): 1,
        ("changefeed_deliveries_total", ()): 2,  # b to the long-poll, a to the stream
        ("changefeed_watcher_lag_seconds_count", ()): 2,
        **{key: delta for key, delta in diff(after, before).items()  # their values are timings, not counts
           if key[0] in ("changefeed_save_seconds_sum", "changefeed_save_seconds_bucket",
                         "changefeed_watcher_lag_seconds_sum", "changefeed_watcher_lag_seconds_bucket")},
        # PostgreSQL: which reads its poll memory answered depends on when each worker's listener
        # heard each save (tests/test_postgres_memory.py counts them).
        **{key: delta for key, delta in diff(after, before).items() if key[0] == "changefeed_page_reads_total"},
    }
    assert value(after, "changefeed_save_seconds_bucket", le="+Inf") - value(before, "changefeed_save_seconds_bucket",
                                                                               le="+Inf") == 8
    assert value(after, "changefeed_watcher_lag_seconds_bucket", le="1.0") - value(
        before, "changefeed_watcher_lag_seconds_bucket", le="1.0") == 2  # delivered within a second
    # Both workers wrote files of their own, and the scrape added them up.
    assert workers <= set(per_process(folder, "counter", "changefeed_polls_total"))

    stream.close()
    server.stop()
    assert not list(tmp.glob("changefeed-metrics-*")), "the master left its metrics folder behind"


def test_gauges_fall_when_a_stream_closes_and_when_its_worker_dies(make_server, tmp, open_stream):
    # Heartbeats every 100 ms: a closed stream is noticed at its next write.
    server = make_server(workers=2, env={"TMPDIR": str(tmp), "CHANGEFEED_SSE_HEARTBEAT_MS": "100"})
    folder = metrics_folder(tmp)

    def open_waits():
        samples = scrape(server)
        return (value(samples, "changefeed_open_waits", transport="sse"), value(samples, "changefeed_subscribers"),
                value(samples, "changefeed_watched_slugs"))

    stream = open_stream(f"{server.url}/events?slug=a&since=0")
    wait_until(lambda: open_waits() == (1, 1, 1), what="the stream to count")
    stream.close()
    wait_until(lambda: open_waits() == (0, 0, 0), what="the closed stream to leave the gauges")

    stream = open_stream(f"{server.url}/events?slug=a&since=0")
    wait_until(lambda: open_waits() == (1, 1, 1), what="the second stream to count")
    (holder,) = [pid for pid, count in per_process(folder, "gauge_livesum", "changefeed_open_waits").items() if count]

    def poll_until_answered_by(pids):
        for _ in range(500):
            if any(count for pid, count in per_process(folder, "counter", "changefeed_polls_total").items()
                   if pid in pids):
                return
            assert requests.get(f"{server.url}/changes?slug=a", timeout=10).status_code == 200
        pytest.fail(f"no poll reached {pids}")

    poll_until_answered_by({holder})  # so that the worker about to die has counts of its own
    polls = value(scrape(server), "changefeed_polls_total", status="200", wait="0")
    workers = {child.pid for child in psutil.Process(server.process.pid).children()}

    psutil.Process(holder).kill()  # as the kernel's OOM killer would: no clean-up in the worker
    wait_until(lambda: open_waits() == (0, 0, 0), what="the dead worker to leave the gauges")
    assert value(scrape(server), "changefeed_polls_total", status="200", wait="0") == polls  # its counts stay
    # Let the replacement boot before the server stops: told to stop while booting, it would hold the stop 10 s.
    wait_until(lambda: len(psutil.Process(server.process.pid).children()) == 2, what="a replacement worker")
    poll_until_answered_by({child.pid for child in psutil.Process(server.process.pid).children()} - workers)


def in_process(client):
    response = client.get("/metrics")
    assert response.status_code == 200, response.get_data(as_text=True)
    return parse(response.get_data(as_text=True))


def test_without_a_multiprocess_folder_metrics_count_in_this_process(client, save):
    assert not metrics.MULTIPROCESS
    before = in_process(client)
    assert save(slug="m").status_code == 200
    assert save(slug="m", base_version=0).status_code == 409
    etag = client.get("/changes?slug=m&since=0").headers["ETag"]
    assert client.get("/changes?slug=m&since=0", headers={"If-None-Match": etag}).status_code == 304
    changes = diff(in_process(client), before)
    assert changes[("changefeed_saves_total", (("outcome", "ok"),))] == 1
    assert changes[("changefeed_saves_total", (("outcome", "conflict"),))] == 1
    assert changes[("changefeed_commit_batch_saves_count", ())] == 2  # one save per commit without gevent
    assert changes[("changefeed_polls_total", (("status", "200"), ("wait", "0")))] == 1
    assert changes[("changefeed_polls_total", (("status", "304"), ("wait", "0")))] == 1


@pytest.mark.parametrize("exception, outcome, status", [
    (Busy("other saves held the database"), "busy", 503),
    (NotStored("the disk is full"), "not_stored", 503),
    (OutcomeUnknown("the commit failed"), "unknown", 503),
    (StorageFull("pages", "the service holds its most pages"), "refused", 507),
    (RuntimeError("a bug"), "error", 500),
], ids=["busy", "not_stored", "unknown", "refused", "error"])
def test_each_failed_save_is_counted_under_its_outcome(app, client, save, monkeypatch, exception, outcome, status):
    def failing_save(*args):
        raise exception

    monkeypatch.setattr(app.extensions["changefeed.store"], "save", failing_save)
    before = in_process(client)
    assert save(slug="f").status_code == status
    assert diff(in_process(client), before) == {
        ("changefeed_saves_total", (("outcome", outcome),)): 1,
        ("changefeed_save_seconds_count", ()): 1,
        **{key: delta for key, delta in diff(in_process(client), before).items()
           if key[0] in ("changefeed_save_seconds_sum", "changefeed_save_seconds_bucket")},
    }


def test_every_limit_is_shown_from_the_start_and_each_refusal_counted(client):
    before = in_process(client)
    assert {labels for name, labels in before if name == "changefeed_refusals_total"} >= {
        (("limit", limit),) for limit in metrics.LIMITS}
    metrics.refused("pages")
    metrics.refused("waits_per_client")
    assert diff(in_process(client), before) == {("changefeed_refusals_total", (("limit", "pages"),)): 1,
                                                ("changefeed_refusals_total", (("limit", "waits_per_client"),)): 1}


def token(**rights):
    return jwt.encode({"sub": "scraper", "exp": int(time.time()) + 300, "changefeed": rights}, SECRET,
                      algorithm="HS256")


def assert_error(response, status, error):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"] == error and body["message"]


def test_with_access_control_metrics_need_a_token_with_the_metrics_right(database):
    app = create_app({**database.config, "CHANGEFEED_JWT_SECRET": SECRET})
    client = app.test_client()
    assert_error(client.get("/metrics"), 401, "invalid token")
    assert_error(client.get("/metrics", headers={"Authorization": "Bearer not.a.jwt"}), 401, "invalid token")
    for rights in ({"read": ["*"], "write": ["*"]}, {"metrics": "true"}, {"metrics": 1}):
        response = client.get("/metrics", headers={"Authorization": f"Bearer {token(**rights)}"})
        assert_error(response, 403, "insufficient scope")
        assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    response = client.get("/metrics", headers={"Authorization": f"Bearer {token(metrics=True)}"})
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert ("changefeed_saves_total", (("outcome", "ok"),)) in parse(response.get_data(as_text=True))
    close_app(app)


def test_flask_token_create_with_metrics_mints_a_token_that_may_scrape(database):
    app = create_app({**database.config, "CHANGEFEED_JWT_SECRET": SECRET})
    result = app.test_cli_runner().invoke(args=["token", "create", "--sub", "prometheus", "--metrics"])
    assert result.exit_code == 0, result.output
    client = app.test_client()
    assert client.get("/metrics", headers={"Authorization": f"Bearer {result.output.strip()}"}).status_code == 200
    plain = app.test_cli_runner().invoke(args=["token", "create", "--sub", "editor", "--read", "*"]).output.strip()
    assert_error(client.get("/metrics", headers={"Authorization": f"Bearer {plain}"}), 403, "insufficient scope")
    close_app(app)


def test_public_metrics_need_no_token_even_with_access_control(database):
    app = create_app({**database.config, "CHANGEFEED_JWT_SECRET": SECRET, "CHANGEFEED_METRICS": "public"})
    client = app.test_client()
    assert client.get("/metrics").status_code == 200
    assert_error(client.post("/save", json={"slug": "a", "html": "x"}), 401, "invalid token")  # the rest stays closed
    close_app(app)


def test_without_access_control_metrics_are_open(client):
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"


def test_metrics_off_is_a_404_like_any_unknown_path(database):
    app = create_app({**database.config, "CHANGEFEED_METRICS": "off"})
    client = app.test_client()
    assert_error(client.get("/metrics"), 404, "not found")
    assert "/metrics" not in client.get("/openapi.json").get_json()["paths"]
    close_app(app)


def test_an_unknown_metrics_setting_stops_the_start(database):
    with pytest.raises(SystemExit, match="CHANGEFEED_METRICS must be one of on, off, public"):
        create_app({**database.config, "CHANGEFEED_METRICS": "yes"})


def test_openmetrics_is_served_to_a_scraper_that_asks_for_it(client):
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200 and response.mimetype == "application/openmetrics-text"
    assert response.get_data(as_text=True).endswith("# EOF\n")
