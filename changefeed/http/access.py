"""Access control and the cross-site check, in one place: `guard`, the before_request of the API blueprint.

A view says which token it takes with one decorator, and the guard does the
rest before the view runs:

    @access.writes   a Bearer header, whenever access control is on (a cookie never writes)
    @access.reads    a Bearer header or the read cookie, when reads are guarded (CHANGEFEED_AUTH_READS)
    @access.beats    a Bearer header or the read cookie, whenever access control is on (presence)
    @access.scrapes  a Bearer header with `"metrics": true`, when CHANGEFEED_METRICS is `on` and control is on

Every write (any method but GET, HEAD, OPTIONS) from a page of another site is
refused first (security/origins.py). Which pages a token may touch depends on
the slug, which only the view has parsed: it asks `require(right, slug)`.
With access control off, a read (the hot poll path) costs the guard a method
comparison and an attribute read.
"""

from collections.abc import Callable
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
    """Refuse another site's write; verify the token the view asks for, and keep its Rights for the view."""
    method = request.method
    if method == "OPTIONS":  # Flask's automatic answer (and a CORS preflight): nothing to guard
        return
    feed = services()
    if method not in SAFE_METHODS:
        refuse_cross_site_writes(request, feed.allowed_origins)
    verifier = feed.verifier
    if not verifier.enabled:
        return
    credential = getattr(current_app.view_functions.get(request.endpoint or ""), CREDENTIAL, None)
    if credential == "writes":
        setattr(g, RIGHTS, verifier.verify(request.headers.get("Authorization")))
    elif credential == "beats" or (credential == "reads" and verifier.reads):
        setattr(g, RIGHTS, verifier.read_rights(request))
    elif credential == "scrapes" and feed.config["CHANGEFEED_METRICS"] == "on":
        verifier.verify(request.headers.get("Authorization")).require_metrics()


def rights() -> Rights | None:
    """The Rights of this request's token, or None when its view needs none (access control off)."""
    found: Rights | None = g.get(RIGHTS)
    return found


def require(right: str, slug: str) -> Rights | None:
    """Raise 403 unless this request's token may `right` ("read" or "write") the page `slug`."""
    found = rights()
    return found.require(right, slug) if found is not None else None
