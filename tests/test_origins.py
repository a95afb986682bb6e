"""A page of another site cannot save here, whether or not access control is on (CSRF)."""

import pytest
import requests

from app import create_app

FORM = {"slug": "home", "html": "<p>defaced</p>"}


def stored(client):
    return client.get("/changes?slug=home").get_json()["version"]


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    {"Origin": "http://localhost:8000", "Sec-Fetch-Site": "same-site"},  # another port: another origin
    {"Origin": "https://evil.example"},  # a browser that sends no Sec-Fetch-Site
    {"Origin": "null"},  # a sandboxed frame, a file:// page
    {"Sec-Fetch-Site": "cross-site"},
], ids=["cross-site", "same-site other port", "Origin only", "Origin null", "Sec-Fetch-Site only"])
def test_a_write_from_another_site_is_refused_and_writes_nothing(client, headers):
    for send in [dict(data=FORM), dict(json=FORM)]:
        response = client.post("/save", headers=headers, **send)
        body = response.get_json()
        assert response.status_code == 403, body
        assert body["error"] == "cross-site request" and "CHANGEFEED_CORS_ORIGINS" in body["message"]
    assert stored(client) == 0


@pytest.mark.parametrize("headers", [
    {},  # curl, scripts, servers
    {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"},  # the demo page itself
    {"Sec-Fetch-Site": "none"},  # typed or bookmarked by the user
    {"Origin": "http://localhost"},  # an older browser on this very host
], ids=["no browser", "same origin", "user-initiated", "same host by Origin"])
def test_writes_from_this_site_and_from_non_browsers_are_taken(client, headers):
    assert client.post("/save", json=FORM, headers=headers).status_code == 200
    assert stored(client) == 1


def test_reads_from_other_sites_are_still_answered(client):
    response = client.get("/changes?slug=home", headers={"Origin": "https://evil.example",
                                                          "Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 200


def test_an_origin_on_the_allow_list_may_write(db_path):
    client = create_app({"CHANGEFEED_DB": db_path,
                         "CHANGEFEED_CORS_ORIGINS": "https://app.example, https://admin.example/"}).test_client()
    for origin in ["https://app.example", "https://admin.example"]:
        response = client.post("/save", json=FORM, headers={"Origin": origin, "Sec-Fetch-Site": "cross-site"})
        assert response.status_code == 200, response.get_json()
    refused = client.post("/save", json=FORM, headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403 and stored(client) == 2


def test_a_form_on_another_site_cannot_save_in_real_chromium(server, context):
    """What the issue reproduced: a form on any website posting to /save, in a real browser."""
    page = context.new_page()
    evil = (f'<form method="post" action="{server.url}/save">'
            '<input name="slug" value="home"><input name="html" value="&lt;p&gt;defaced&lt;/p&gt;">'
            '<button>go</button></form>')
    page.route("http://evil.example/", lambda route: route.fulfill(body=evil, content_type="text/html"))
    page.goto("http://evil.example/")
    with page.expect_response(f"{server.url}/save") as answer:
        page.click("button")
    assert answer.value.status == 403
    assert requests.get(f"{server.url}/changes?slug=home", timeout=5).json()["version"] == 0


@pytest.mark.parametrize("host", ["evil.example", "rebind.attacker.example:8000", "[::1]:8000"])
def test_a_request_for_another_host_name_is_refused_as_dns_rebinding_would_be(client, host):
    for method, path in [("GET", "/changes?slug=home"), ("POST", "/save"), ("GET", "/")]:
        response = client.open(path, method=method, json=FORM if method == "POST" else None,
                               headers={"Host": host})
        body = response.get_json()
        assert response.status_code == 400, body
        assert body["error"] == "untrusted host" and "CHANGEFEED_TRUSTED_HOSTS" in body["message"]
    assert stored(client) == 0


def test_trusted_hosts_are_configurable(db_path):
    client = create_app({"CHANGEFEED_DB": db_path, "CHANGEFEED_TRUSTED_HOSTS": "feed.example.com, .example.org"}
                        ).test_client()
    for host in ["feed.example.com", "feed.example.com:443", "a.example.org"]:
        assert client.get("/changes?slug=home", headers={"Host": host}).status_code == 200, host
    assert client.get("/changes?slug=home", headers={"Host": "localhost"}).status_code == 400
    anyone = create_app({"CHANGEFEED_DB": db_path, "CHANGEFEED_TRUSTED_HOSTS": "*"}).test_client()
    assert anyone.get("/changes?slug=home", headers={"Host": "whatever.example"}).status_code == 200


@pytest.fixture
def cors_client(db_path):
    return create_app({"CHANGEFEED_DB": db_path, "CHANGEFEED_CORS_ORIGINS": "https://app.example"}).test_client()


def test_a_listed_origin_gets_cors_headers_with_credentials_and_an_answered_preflight(cors_client):
    preflight = cors_client.options("/save", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, idempotency-key"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert {"content-type", "idempotency-key"} <= {
        h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")}
    saved = cors_client.post("/save", json=FORM, headers={"Origin": "https://app.example",
                                                           "Sec-Fetch-Site": "cross-site"})
    assert saved.status_code == 200 and saved.headers["Access-Control-Allow-Origin"] == "https://app.example"
    read = cors_client.get("/changes?slug=home", headers={"Origin": "https://app.example"})
    assert "ETag" in read.headers["Access-Control-Expose-Headers"]


def test_a_preflight_of_a_listed_origin_is_answered_in_json_with_its_cors_headers(cors_client):
    preflight = cors_client.options("/save", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200 and preflight.headers["Content-Type"] == "application/json"
    assert preflight.get_json() == {"allow": ["OPTIONS", "POST"]}
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]


@pytest.mark.parametrize("listed", [False, True], ids=["no list (default)", "another origin listed"])
def test_an_unlisted_origin_gets_no_cors_headers(client, cors_client, listed):
    client = cors_client if listed else client
    preflight = client.options("/save", headers={"Origin": "https://evil.example",
                                                  "Access-Control-Request-Method": "POST"})
    read = client.get("/changes?slug=home", headers={"Origin": "https://evil.example"})
    for response in (preflight, read):
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Access-Control-Allow-Credentials" not in response.headers
