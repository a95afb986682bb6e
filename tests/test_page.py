"""The demo page: served, safe by construction, and wired to the swap point."""

import re


def test_page_shows_editor_and_viewer_for_the_slug(client):
    response = client.get("/?slug=Notes")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'data-slug="notes"' in html
    for element in ('id="html"', 'id="data"', 'id="save"', 'id="frame"', 'id="badge"', 'id="viewer-data"'):
        assert element in html


def test_page_defaults_to_the_demo_slug(client):
    assert 'data-slug="demo"' in client.get("/").get_data(as_text=True)


def test_viewer_iframe_is_sandboxed_without_scripts(client):
    html = client.get("/").get_data(as_text=True)
    iframe = re.search(r"<iframe[^>]*>", html).group(0)
    assert re.search(r"\ssandbox(\s|>|=\"\")", iframe), iframe
    assert "allow-scripts" not in html and "allow-same-origin" not in html


def test_page_allows_only_its_own_scripts(client):
    response = client.get("/")
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "script-src" not in policy  # falls back to default-src 'self': no inline, no eval
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_scripts_are_plain_modules_served_as_javascript(client):
    for name in ("changefeed.js", "page.js"):
        with client.get(f"/static/{name}") as response:
            assert response.status_code == 200
            assert response.mimetype in ("text/javascript", "application/javascript")
    with client.get("/static/changefeed.js") as response:
        source = response.get_data(as_text=True)
    assert "export function subscribe(target, options = {})" in source
    for option in ("since", "onChange", "onStatus", "transport"):
        assert option in source


def test_slug_is_escaped_into_the_page(client):
    # Only valid slugs reach the template; anything else is a JSON 422.
    response = client.get("/?slug=%3Cscript%3E")
    assert response.status_code == 422 and response.is_json


def test_dashboard_serves_the_prefix_with_the_page_headers(client):
    response = client.get("/dashboard?prefix=team-&transport=sse")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'data-prefix="team-"' in html and 'data-transport="sse"' in html and "dashboard.js" in html
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_dashboard_follows_every_page_over_ws_when_asked_nothing(client):
    html = client.get("/dashboard").get_data(as_text=True)
    assert 'data-prefix=""' in html and 'data-transport="ws"' in html


def test_dashboard_refuses_a_bad_prefix_or_transport_naming_the_field(client):
    for query, field in (("prefix=bad%20prefix", "prefix"), ("transport=pigeon", "transport")):
        response = client.get(f"/dashboard?{query}")
        assert response.status_code == 422 and response.is_json, query
        assert field in response.get_json()["fields"], response.get_json()
