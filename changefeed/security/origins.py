"""Which sites may write: a page of another site must not save here (CSRF).

A form on any website can POST to /save, and a browser sends it with the
visitor's network position (a server bound to loopback, an intranet) and,
later, their cookies. So a write is refused when the browser says it comes
from another site, whether access control is on or off. Browsers say it in
`Sec-Fetch-Site` (every current one) and in `Origin`; clients that are not
browsers (curl, scripts, servers) send neither and are not affected.
"""

from collections.abc import Container
from urllib.parse import urlsplit

from werkzeug.wrappers import Request

from changefeed.core.errors import ApiError

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def parse_list(text: str) -> set[str]:
    """A setting that lists names: separated by commas or spaces."""
    return set(text.replace(",", " ").split())


def parse_origins(text: str) -> set[str]:
    """The allow-list of CHANGEFEED_CORS_ORIGINS (a trailing slash is forgiven)."""
    return {origin.rstrip("/") for origin in parse_list(text)}


def refuse_cross_site_writes(request: Request, allowed: Container[str]) -> None:
    """Raise a 403 for a write from a page of another site that is not in `allowed`."""
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get("Origin")
    if origin in allowed:
        return
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        cross = site not in ("same-origin", "none")  # "none": typed by the user, not sent by a page
    else:  # an older browser: Origin alone; compared by host, as TLS may end at a proxy
        cross = origin is not None and (origin == "null" or urlsplit(origin).netloc != request.host)
    if cross:
        raise ApiError(403, "cross-site request",
                       f"This write comes from a page of another site ({origin or 'no Origin'}), and is "
                       "refused so that no website can save here in its visitors' name. If that site is "
                       "yours, add its origin to CHANGEFEED_CORS_ORIGINS.")
