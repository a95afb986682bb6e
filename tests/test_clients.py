"""Unit tests of changefeed/core/clients.py: who the client is, behind the proxies we trust and no others."""

import ipaddress

import pytest

from changefeed.core.clients import CLIENT, client_address, is_https, parse_networks

LOCAL_PROXIES = parse_networks("127.0.0.1, ::1, 10.0.0.0/8")


def environ(peer, forwarded=None, **extra):
    """A WSGI environ as a server builds it: the peer's address, and the X-Forwarded-For it sent, if any."""
    env = {"REMOTE_ADDR": peer, **extra}
    if forwarded is not None:
        env["HTTP_X_FORWARDED_FOR"] = forwarded
    return env


def test_parse_networks_reads_addresses_and_networks_separated_by_commas():
    assert parse_networks(" 127.0.0.1, 10.0.0.0/8 ,,::1 ") == [
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]


def test_parse_networks_forgives_host_bits_of_a_network():
    assert parse_networks("10.1.2.3/8") == [ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize("text", ["none", " None ", ""])
def test_parse_networks_of_none_or_nothing_trusts_no_proxy(text):
    assert parse_networks(text) == []


def test_parse_networks_refuses_a_bad_entry_naming_the_setting_and_the_entry():
    with pytest.raises(SystemExit, match=r"CHANGEFEED_TRUSTED_PROXIES: 'proxy\.internal' is not an address"):
        parse_networks("127.0.0.1, proxy.internal")


def test_without_a_forwarded_header_the_client_is_the_peer_and_is_kept_in_the_environ():
    env = environ("203.0.113.7")
    assert client_address(env, LOCAL_PROXIES) == "203.0.113.7"
    assert env[CLIENT] == "203.0.113.7"


def test_a_forwarded_header_from_an_untrusted_peer_is_ignored():
    assert client_address(environ("203.0.113.7", "198.51.100.1"), LOCAL_PROXIES) == "203.0.113.7"


def test_a_trusted_proxy_names_the_client_it_forwarded():
    assert client_address(environ("127.0.0.1", "198.51.100.1"), LOCAL_PROXIES) == "198.51.100.1"


def test_the_walk_goes_back_through_trusted_proxies_and_stops_at_the_first_untrusted_hop():
    # The client forged the first entry; the untrusted hop that appended after it is the client.
    forwarded = "192.0.2.66, 198.51.100.1, 10.0.0.5"
    assert client_address(environ("127.0.0.1", forwarded), LOCAL_PROXIES) == "198.51.100.1"


def test_when_every_hop_is_a_trusted_proxy_the_first_one_is_the_client():
    assert client_address(environ("127.0.0.1", "10.0.0.9, 10.0.0.5"), LOCAL_PROXIES) == "10.0.0.9"


def test_a_hop_that_is_not_an_address_ends_the_walk_at_the_proxy_that_wrote_it():
    assert client_address(environ("127.0.0.1", "198.51.100.1, unknown, 10.0.0.5"), LOCAL_PROXIES) == "10.0.0.5"


def test_ipv6_peers_and_hops_are_understood():
    assert client_address(environ("::1", "2001:db8::1"), LOCAL_PROXIES) == "2001:db8::1"


def test_with_no_trusted_proxy_the_forwarded_header_never_counts():
    assert client_address(environ("127.0.0.1", "198.51.100.1"), parse_networks("none")) == "127.0.0.1"


def test_a_direct_https_connection_is_https():
    assert is_https(environ("203.0.113.7", **{"wsgi.url_scheme": "https"}), LOCAL_PROXIES)


def test_a_trusted_proxy_that_ended_tls_says_https():
    assert is_https(environ("127.0.0.1", **{"wsgi.url_scheme": "http", "HTTP_X_FORWARDED_PROTO": " HTTPS "}),
                    LOCAL_PROXIES)


def test_an_untrusted_peer_cannot_claim_https():
    assert not is_https(environ("203.0.113.7", **{"wsgi.url_scheme": "http", "HTTP_X_FORWARDED_PROTO": "https"}),
                        LOCAL_PROXIES)


def test_plain_http_without_a_forwarded_proto_is_not_https():
    assert not is_https(environ("127.0.0.1", **{"wsgi.url_scheme": "http"}), LOCAL_PROXIES)
