"""GET /ws: the route of the WebSocket (simple-websocket's handshake); what a socket does lives in transports/websocket.py.

A socket's access control and cross-site check happen in the protocol
(websocket.Service.admit closes 1008 or 4001), not in the API guard: a
browser sees no HTTP answer to a refused upgrade.
"""

from typing import Any

from flask import Blueprint, Response, request

from changefeed.core.errors import ApiError
from changefeed.transports.websocket import PATH, Upgraded, reader_thread

from .services import services

blueprint = Blueprint("websocket", __name__)


@blueprint.before_request
def handshake() -> None:
    """Refuse a malformed handshake with a 400 before the upgrade; offer no compression."""
    headers = request.headers
    if headers.get("Sec-WebSocket-Version") != "13" or not headers.get("Sec-WebSocket-Key"):
        raise ApiError(400, "bad request", "A WebSocket handshake needs Sec-WebSocket-Version: 13 and a "
                                           "Sec-WebSocket-Key.", headers={"Sec-WebSocket-Version": "13"})
    # No permessage-deflate: each frame goes out as the text cached for every client, where compression
    # would cost CPU per frame and a zlib context (hundreds of KiB) per socket.
    request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


@blueprint.route(PATH, websocket=True)
def websocket() -> Response:
    """A WebSocket following many pages (and their presence): the handshake, then the socket as the answer's body.

    Not flask-sock's route, which serves the socket inside the view: that
    holds a greenlet (and its Flask frames) for as long as the socket is
    open, where the body of this answer lets the server hold it with none.
    """
    return Upgraded(services().sockets.accept(request.environ))


def server_options(ping_s: int, max_message_bytes: int) -> dict[str, Any]:
    """simple-websocket's options (app.config["SOCK_SERVER_OPTIONS"]): it pings every CHANGEFEED_WS_PING_S and
    drops a peer whose pong to the last ping did not come; it closes 1009 on a message over the limit. Its
    reader is a thread only where the server does not watch the connection (websocket.reader_thread)."""
    return {"ping_interval": max(ping_s, 1), "max_message_size": max_message_bytes, "thread_class": reader_thread}
