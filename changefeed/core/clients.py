"""Who the client is: the peer's address, or behind trusted proxies the address they forwarded.

Anyone can write an X-Forwarded-For header; only a trusted proxy appends
to it. So the header is read from the right, and only as far as each hop is
a proxy listed in CHANGEFEED_TRUSTED_PROXIES: the first hop that is not is
the client. The limits count by it, and the access log names it.
"""

import ipaddress
from collections.abc import Sequence
from wsgiref.types import WSGIEnvironment

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

CLIENT = "changefeed.client"  # where the resolved address is kept in the WSGI environ


def parse_networks(text: str) -> list[Network]:
    """Parse "127.0.0.1, 10.0.0.0/8, ::1" into networks; raise SystemExit naming a bad entry."""
    networks: list[Network] = []
    if text.strip().lower() == "none":
        return networks
    for entry in (part.strip() for part in text.split(",")):
        if entry:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise SystemExit(f"CHANGEFEED_TRUSTED_PROXIES: {entry!r} is not an address or network") from None
    return networks


def _trusted(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(environ: WSGIEnvironment, proxies: Sequence[Network]) -> str:
    """The client's address: the last hop of X-Forwarded-For that is not a trusted proxy.

    Walk from the peer back through X-Forwarded-For for as long as each hop
    is a trusted proxy; the first one that is not is the client. A hop that
    is not an address ends the walk at the proxy that wrote it.
    """
    address = environ.get("REMOTE_ADDR", "")
    forwarded = environ.get("HTTP_X_FORWARDED_FOR")
    if forwarded and _trusted(address, proxies):
        for hop in reversed(forwarded.split(",")):
            hop = hop.strip()
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break
            address = hop
            if not _trusted(hop, proxies):
                break
    environ[CLIENT] = address
    return address


def is_https(environ: WSGIEnvironment, proxies: Sequence[Network]) -> bool:
    """Whether the client reached us over HTTPS: directly, or as a trusted proxy (TLS ended there) says.

    The read cookie is marked Secure by this: behind nginx the service
    itself only ever sees plain HTTP.
    """
    if environ.get("wsgi.url_scheme") == "https":
        return True
    return (environ.get("HTTP_X_FORWARDED_PROTO", "").strip().lower() == "https"
            and _trusted(environ.get("REMOTE_ADDR", ""), proxies))
