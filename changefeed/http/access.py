"""Access control and the cross-site check, in one place: this module (`guard` is the API blueprint's before_request).

A view says which token it takes with one decorator, and this module does
the rest:

    @access.writes   a Bearer header, whenever access control is on (a cookie never writes)
    @access.reads    a Bearer header or the read cookie, when reads are guarded (CHANGEFEED_AUTH_READS)
    @access.beats    a Bearer header or the read cookie, whenever access control is on (presence)
    @access.scrapes  a Bearer header with `"metrics": true`, when CHANGEFEED_METRICS is `on` and control is on

Before any view, the guard refuses every write (any method but GET, HEAD,
OPTIONS) from a page of another site (security/origins.py), and verifies the
token of a view that `writes` or `scrapes`: a write without a valid token is
refused before its body is read. Which pages a token may touch depends on the
slug, which only the view has parsed: it asks `require(right, slug)`, and a
read's token (`reads`, `beats`) is verified then, once its query or body was
found valid, as before the blueprints. With access control off, a read (the
hot poll path) costs the guard a method comparison and an attribute read.
"""

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flask import current_app, g, request

from changefeed.security.origins import SAFE_METHODS, refuse_cross_site_writes
from changefeed.security.tokens import Rights

from .services import services

View = TypeVar("View", bound=Callable[..., Any])

CREDENTIAL = "changefeed_credential"  # the attribute the decorators set on a view
RIGHTS = "changefeed_rights"  # in flask.g: the Rights of this request's token, when one was asked for


def _needs(credential: str) -> Callable[[View], View]:
    def mark(view: View) -> View:
        setattr(view, CREDENTIAL, credential)
        return view

    return mark


writes = _needs("writes")
reads = _needs("reads")
beats = _needs("beats")
scrapes = _needs("scrapes")


def guard() -> None:
    """Refuse another site's write; verify the token of a view that writes or scrapes, and keep its Rights."""
    method = request.method
    if method == "OPTIONS":  # Flask's automatic answer (and a CORS preflight): nothing to guard
        return
    feed = services()
    if method not in SAFE_METHODS:
        refuse_cross_site_writes(request, feed.allowed_origins)
    verifier = feed.verifier
    if not verifier.enabled:
        return
    credential = _credential()
    if credential == "writes":
        setattr(g, RIGHTS, verifier.verify(request.headers.get("Authorization")))
    elif credential == "scrapes" and feed.config["CHANGEFEED_METRICS"] == "on":
        verifier.verify(request.headers.get("Authorization")).require_metrics()


def rights() -> Rights | None:
    """The Rights of this request's token (verified on first ask), or None when its view needs none."""
    if RIGHTS in g:
        found: Rights | None = g.get(RIGHTS)
        return found
    verifier = services().verifier
    credential = _credential()
    if verifier.enabled and (credential == "beats" or (credential == "reads" and verifier.reads)):
        found = verifier.read_rights(request)  # a Bearer header, else the read cookie
    else:
        found = None
    setattr(g, RIGHTS, found)
    return found


def _credential() -> str | None:
    """What the view of this request declared: writes, reads, beats, scrapes (None: nothing)."""
    view = current_app.view_functions.get(request.endpoint or "")
    found: str | None = getattr(view, CREDENTIAL, None)
    return found


def require(right: str, slug: str) -> Rights | None:
    """Raise 403 unless this request's token may `right` ("read" or "write") the page `slug`."""
    if not services().verifier.enabled:  # access control off: no token, no rights to look up (every save)
        return None
    found = rights()
    return found.require(right, slug) if found is not None else None


def feed_readable(rights: Rights, prefix: str, slugs: Sequence[str] | None) -> Callable[[str], bool] | None:
    """Check a feed's pages against a token (GET /feed, /events): what to leave out of it, or None.

    Each slug of a list must be readable and a prefix must lie within the
    token's rights (403 otherwise); only the empty prefix, every page, is
    filtered instead, down to the pages the token may read.
    """
    if slugs is not None:
        for slug in slugs:
            rights.require("read", slug)
    elif prefix:
        rights.require_prefix("read", prefix)
    else:
        return lambda slug: rights.may("read", slug)
    return None
