"""POST /session trades a bearer token for the read cookie (EventSource cannot send headers); DELETE ends it."""

from flask import Blueprint, Response, request

from changefeed.core.clients import is_https
from changefeed.core.errors import ApiError
from changefeed.security import tokens

from . import access
from .services import services

blueprint = Blueprint("session", __name__)


@blueprint.post("/session")
@access.writes
def session() -> Response:
    """Trade a bearer token for a read-only cookie, for EventSource, which cannot send headers.

    The cookie lives as long as the token; DELETE /session ends it.
    """
    feed = services()
    rights = access.rights()
    if rights is None:  # the guard verified a token whenever access control is on
        raise ApiError(404, "not found", "Access control is off: reads need no session.")
    token = tokens.bearer_token(request.headers.get("Authorization"))
    response = Response(status=204)
    response.set_cookie(tokens.READ_COOKIE, token, max_age=max(0, int(rights.seconds_left())),
                        path=_cookie_path(feed.url_prefix), httponly=True, samesite="Strict",
                        secure=is_https(request.environ, feed.proxies))
    return response


@blueprint.delete("/session")
def end_session() -> Response:
    """Forget the read cookie (signing out, or another token)."""
    response = Response(status=204)
    response.delete_cookie(tokens.READ_COOKIE, path=_cookie_path(services().url_prefix), httponly=True,
                           samesite="Strict")
    return response


def _cookie_path(url_prefix: str) -> str:
    """The cookie goes with the service's requests only: under its prefix, embedded."""
    return url_prefix or "/"
