"""Unit tests of changefeed/security/origins.py: which writes come from a page of another site."""

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from changefeed.core.errors import ApiError
from changefeed.security.origins import parse_list, parse_origins, refuse_cross_site_writes

ALLOWED = parse_origins("https://app.example")


def request(method="POST", host="feed.example", **headers):
    """A real request to http://<host>/save with the given headers (Sec_Fetch_Site for Sec-Fetch-Site)."""
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    return Request(EnvironBuilder(method=method, base_url=f"http://{host}/", path="/save", headers=sent).get_environ())


def test_parse_list_splits_on_commas_and_spaces():
    assert parse_list("a.example, b.example c.example,,") == {"a.example", "b.example", "c.example"}


def test_parse_origins_forgives_a_trailing_slash():
    assert parse_origins("https://app.example/, http://localhost:3000") == {
        "https://app.example", "http://localhost:3000"}


def test_parse_origins_of_nothing_allows_no_other_site():
    assert parse_origins("") == set()


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_a_read_from_another_site_is_never_refused(method):
    refuse_cross_site_writes(request(method, Origin="https://evil.example", Sec_Fetch_Site="cross-site"), ALLOWED)


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_a_write_a_browser_says_comes_from_another_site_is_refused_with_403(site):
    with pytest.raises(ApiError) as refused:
        refuse_cross_site_writes(request(Origin="https://evil.example", Sec_Fetch_Site=site), ALLOWED)
    assert (refused.value.status, refused.value.error) == (403, "cross-site request")
    assert "https://evil.example" in refused.value.message and "CHANGEFEED_CORS_ORIGINS" in refused.value.message


@pytest.mark.parametrize("site", ["same-origin", "none"])
def test_a_write_from_this_site_or_typed_by_the_user_is_taken(site):
    refuse_cross_site_writes(request(Origin="http://feed.example", Sec_Fetch_Site=site), ALLOWED)


def test_a_write_from_a_listed_origin_is_taken_whatever_the_browser_says():
    refuse_cross_site_writes(request(Origin="https://app.example", Sec_Fetch_Site="cross-site"), ALLOWED)


def test_a_client_that_is_not_a_browser_sends_neither_header_and_is_taken():
    refuse_cross_site_writes(request(), ALLOWED)


def test_without_sec_fetch_site_an_origin_of_this_host_is_taken_whatever_its_scheme():
    refuse_cross_site_writes(request(Origin="https://feed.example"), ALLOWED)  # TLS ended at a proxy


@pytest.mark.parametrize("origin", ["https://evil.example", "http://feed.example:8080", "null"])
def test_without_sec_fetch_site_an_origin_of_another_host_or_null_is_refused(origin):
    with pytest.raises(ApiError) as refused:
        refuse_cross_site_writes(request(Origin=origin), ALLOWED)
    assert refused.value.status == 403


def test_the_refusal_of_a_write_without_origin_says_so():
    with pytest.raises(ApiError) as refused:
        refuse_cross_site_writes(request(Sec_Fetch_Site="cross-site"), ALLOWED)
    assert "no Origin" in refused.value.message
