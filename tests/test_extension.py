"""The Flask extension: the service embedded in a host app under a prefix, configured from the host's app.config."""

import signal
import threading
import time
from urllib.parse import urlsplit

import jwt
import pytest
import requests
from flask import Flask, request

from changefeed import Changefeed
from changefeed.core.settings import DEFAULTS
from changefeed.http import pages
from changefeed.http.services import KEY, Services
from changefeed.stores.engines import open_engine
from changefeed.stores.schema import LATEST
from support.browsers import Tab

PAGE = {"slug": "home", "html": "<h1>Hi</h1>", "data": {"title": "Hi"}}
ENDPOINTS = [("post", "/save"), ("get", "/changes?slug=home&since=0"), ("get", "/events?slug=home"),
             ("post", "/presence"), ("post", "/delete"), ("get", "/healthz"), ("get", "/readyz"),
             ("get", "/openapi.json"), ("get", "/metrics"), ("get", "/ws"), ("get", "/"),
             ("get", "/static/changefeed.js")]


def host_app(tmp_path, **config):
    """A host's own app, with a view of its own and no CHANGEFEED_* key but the database's."""
    app = Flask("host", root_path=str(tmp_path))  # its own static folder (none here), not the repository's
    app.config.update(TESTING=True, CHANGEFEED_DB=str(tmp_path / "feed.db"), **config)

    @app.post("/echo")
    def echo():
        return {"form": request.form.to_dict()}

    return app


@pytest.fixture
def host(tmp_path):
    app = host_app(tmp_path)
    feed = Changefeed(app, url_prefix="/feed")
    assert not (tmp_path / "feed.db").exists()  # opened on first use, after migrate()
    assert feed.migrate() == 0
    yield app, feed
    close(app)


def close(app):
    feed = app.extensions.get(KEY)
    if feed is not None:
        feed.notifier.close()
        feed.store.close()


def test_migrate_creates_the_database_and_then_has_nothing_to_do(tmp_path, host):
    app, feed = host
    assert (tmp_path / "feed.db").exists()
    assert feed.migrate() == LATEST


def test_every_endpoint_answers_under_the_prefix_and_nothing_outside_it(host):
    app, _ = host
    client = app.test_client()
    assert client.post("/feed/save", json=PAGE).status_code == 200
    for method, path in ENDPOINTS:
        with getattr(client, method)(path) as outside, getattr(client, method)(f"/feed{path}") as inside:
            assert (outside.status_code, inside.status_code != 404) == (404, True), path
    assert {rule.rule.split("/")[1] for rule in app.url_map.iter_rules()} == {"feed", "echo", "static"}
    assert not [rule for rule in app.url_map.iter_rules() if rule.endpoint != "static" and rule.rule != "/echo"
                and not rule.rule.startswith("/feed/")]


def test_a_save_under_the_prefix_is_in_changes_under_the_prefix(host):
    client = host[0].test_client()
    saved = client.post("/feed/save", json=PAGE).get_json()
    assert saved["version"] == 1
    change = client.get("/feed/changes?slug=home&since=0").get_json()
    assert (change["changed"], change["version"], change["html"], change["data"]) == (True, 1, PAGE["html"],
                                                                                      PAGE["data"])
    assert client.get("/feed/changes?slug=home&since=1").get_json()["changed"] is False


def test_feed_save_returns_the_version_and_reaches_changes_and_a_long_poll(host):
    app, feed = host
    client = app.test_client()
    assert feed.save("home", "<h1>Hi</h1>", {"title": "Hi"}) == 1
    with app.app_context():
        assert feed.save("home", "<h1>Hi again</h1>") == 2
    change = client.get("/feed/changes?slug=home&since=1&wait=5").get_json()
    assert (change["version"], change["html"]) == (2, "<h1>Hi again</h1>")


def test_feed_save_checks_as_post_save_does(tmp_path):
    app = host_app(tmp_path, CHANGEFEED_MAX_HTML_BYTES=10)
    feed = Changefeed()
    feed.init_app(app, url_prefix="feed/")  # the later form; the prefix's slashes are forgiven
    feed.migrate()
    try:
        with pytest.raises(Exception, match="html"):
            feed.save("home", "<h1>more than ten bytes</h1>")
        assert app.test_client().post("/feed/save", json=PAGE).status_code == 422
        assert app.test_client().post("/feed/save", json={**PAGE, "html": "<p>ok</p>"}).status_code == 200
    finally:
        close(app)


def test_settings_come_from_the_host_config_with_defaults_for_the_rest(tmp_path):
    app = host_app(tmp_path, CHANGEFEED_METRICS="off", CHANGEFEED_MAX_WAIT_S=7)
    feed = Changefeed(app, url_prefix="/feed")
    feed.migrate()
    try:
        client = app.test_client()
        assert client.get("/feed/metrics").status_code == 404  # off, from the host's config
        assert app.config["CHANGEFEED_SSE_RETRY_MS"] == 2000  # a default filled in
        assert client.get("/feed/changes?slug=home&since=0&wait=8").status_code == 422
        assert client.get("/feed/openapi.json").get_json()["servers"] == [{"url": "/feed"}]
    finally:
        close(app)


def test_the_demo_page_and_its_scripts_live_under_the_prefix(host):
    client = host[0].test_client()
    html = client.get("/feed/?slug=demo").get_data(as_text=True)
    assert 'src="/feed/static/page.js"' in html and 'href="/feed/static/style.css"' in html
    with client.get("/feed/static/changefeed.js") as script:
        assert script.status_code == 200
        assert b"import.meta.url" in script.data  # it finds the API beside its own URL: /feed/changes


def test_the_service_bodies_are_strict_and_the_host_views_keep_their_own(host):
    client = host[0].test_client()
    refused = client.post("/feed/save", data=b"slug=home&html=%FF", content_type="application/x-www-form-urlencoded")
    assert refused.status_code == 422 and "html" in refused.get_json()["fields"]
    assert client.post("/echo", data={"a": "b"}).get_json() == {"form": {"a": "b"}}  # the host's request class
    huge = client.post("/feed/save", data=b"x" * (DEFAULTS["CHANGEFEED_MAX_BODY_BYTES"] + 1),
                       content_type="application/json")
    assert huge.status_code == 413 and huge.get_json()["error"] == "request entity too large"


def test_errors_of_the_service_are_its_json_and_a_write_from_another_site_is_refused(host):
    client = host[0].test_client()
    malformed = client.post("/feed/save", data="{", content_type="application/json")
    assert malformed.status_code == 400 and malformed.get_json()["error"] == "malformed json"
    cross = client.post("/feed/save", json=PAGE, headers={"Origin": "https://evil.example",
                                                           "Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403 and cross.get_json()["error"] == "cross-site request"


def test_access_control_and_the_read_cookie_under_the_prefix(tmp_path):
    secret = "s" * 32
    app = host_app(tmp_path, CHANGEFEED_JWT_SECRET=secret, CHANGEFEED_AUTH_READS=1)
    feed = Changefeed(app, url_prefix="/feed")
    feed.migrate()
    token = jwt.encode({"sub": "ed", "exp": int(time.time()) + 600,
                        "changefeed": {"read": ["*"], "write": ["home"]}}, secret, algorithm="HS256")
    try:
        client = app.test_client()
        assert client.post("/feed/save", json=PAGE).status_code == 401
        assert client.post("/feed/save", json=PAGE, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert client.get("/feed/changes?slug=home&since=0").status_code == 401
        session = client.post("/feed/session", headers={"Authorization": f"Bearer {token}"})
        assert session.status_code == 204 and "Path=/feed" in session.headers["Set-Cookie"]
        assert client.get("/feed/changes?slug=home&since=0").get_json()["version"] == 1  # the cookie, sent
    finally:
        close(app)


def test_flask_changefeed_migrate_and_the_other_commands(tmp_path):
    app = host_app(tmp_path, CHANGEFEED_JWT_SECRET="s" * 32)
    Changefeed(app, url_prefix="/feed")
    runner = app.test_cli_runner()
    try:
        result = runner.invoke(args=["changefeed", "migrate"])
        assert result.exit_code == 0 and "created at schema version" in result.output
        assert "already at schema version" in runner.invoke(args=["changefeed", "migrate"]).output
        assert runner.invoke(args=["changefeed", "token", "create", "--sub", "ed"]).output.count(".") == 2
        assert "no page 'home'" in runner.invoke(args=["changefeed", "delete-page", "home"]).output
    finally:
        close(app)


def test_a_blueprint_module_alone_on_a_bare_app(database):
    """Each blueprint needs only the Services in app.extensions: here the page API, without the guard."""
    app = Flask("bare")
    app.config.update(TESTING=True, **database.config)
    for name, default in DEFAULTS.items():
        app.config.setdefault(name, default)
    store, notifier = open_engine(app.config)
    app.extensions[KEY] = Services.build(app, store, notifier, "", "static", {})
    app.register_blueprint(pages.blueprint)
    try:
        client = app.test_client()
        assert client.post("/save", json=PAGE).get_json()["version"] == 1
        assert client.get("/changes?slug=home&since=0").get_json()["html"] == PAGE["html"]
    finally:
        notifier.close()
        store.close()


def test_cors_covers_the_service_and_leaves_the_host_s_own_paths_alone(tmp_path):
    app = host_app(tmp_path, CHANGEFEED_CORS_ORIGINS="https://ok.example")

    @app.get("/feedback")
    def feedback():
        return {"ok": True}

    feed = Changefeed(app, url_prefix="/feed")
    feed.migrate()
    try:
        client = app.test_client()
        origin = {"Origin": "https://ok.example"}
        allowed = client.get("/feed/changes?slug=home&since=0", headers=origin)
        assert allowed.headers["Access-Control-Allow-Origin"] == "https://ok.example"
        assert "Access-Control-Allow-Origin" not in client.get("/feedback", headers=origin).headers
        assert client.post("/feed/save", json=PAGE, headers={**origin, "Sec-Fetch-Site": "cross-site"}
                           ).status_code == 200
    finally:
        close(app)


def test_the_example_host_serves_the_demo_under_its_prefix_to_a_browser(make_server, context):
    """examples/host.py under gunicorn: two tabs of its /feed/ demo see each other's saves, over every path."""
    server = make_server(app="examples.host:create_app()")
    assert requests.get(f"{server.url}/").text.startswith("<p>The host app.")
    assert requests.get(f"{server.url}/changes?slug=home&since=0").status_code == 404
    missing = []
    context.on("response", lambda r: r.status == 404 and missing.append(urlsplit(r.url).path))
    editor, viewer = (Tab(context, f"{server.url}/feed", "shared", "sse") for _ in range(2))
    editor.edit("<h1>Embedded</h1>")
    editor.save()
    viewer.expect_viewer("Embedded", timeout_s=5)
    assert all(urlsplit(url).path.startswith("/feed/") for _, url in editor.requests + viewer.requests)
    assert missing in ([], ["/favicon.ico"])  # the host's to serve, not the feed's
    assert not editor.page_errors + viewer.page_errors


def test_sigterm_ends_a_long_poll_of_the_example_host_at_once(make_server):
    """gunicorn.conf.py opens a host's feed in each worker, so its notifier hears SIGTERM as the service's does."""
    server = make_server(app="examples.host:create_app()")
    answers = []
    poll = threading.Thread(target=lambda: answers.append(
        requests.get(f"{server.url}/feed/changes?slug=home&since=0&wait=25", timeout=30)))
    poll.start()
    time.sleep(0.5)  # the poll is waiting
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    poll.join(timeout=8)
    assert answers and time.monotonic() - started < 5  # well before gunicorn's 10 s graceful timeout
    assert answers[0].status_code == 503
    server.stop()
