"""GET /events: each new version of a page pushed as a Server-Sent Event."""

from flask import Blueprint, Response, request

from changefeed.core.errors import ShuttingDown
from changefeed.security.limits import Held
from changefeed.transports.feeds import event_stream

from . import access
from .services import services

blueprint = Blueprint("events", __name__)

# An event stream is never cached, and nginx must pass each event on at once.
EVENTS_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"), ("X-Content-Type-Options", "nosniff")]


@blueprint.get("/events")
@access.reads
def events() -> Response:
    """Stream each new version of a page as a Server-Sent Event, from `since` on."""
    feed = services()
    query = feed.schemas.events.load(request.args)
    lasts_s = None
    if feed.verifier.reads:  # a stream never outlives its token: it ends at expiry, the client reconnects
        rights = access.require("read", query["slug"])
        lasts_s = rights.seconds_left() if rights is not None else None
    since, epoch = query["since"], query["epoch"]
    last_event_id = request.headers.get("Last-Event-ID")
    if last_event_id is not None:  # a reconnecting EventSource resumes where it was
        last = feed.schemas.last_event_id.load({"Last-Event-ID": last_event_id})["last_event_id"]
        since, epoch = last["since"], last["epoch"]
    if feed.notifier.closed:
        raise ShuttingDown()
    release = feed.waits.enter(request.environ)
    stream = event_stream(feed.store, feed.notifier, query["slug"], since, epoch,
                          feed.config["CHANGEFEED_SSE_RETRY_MS"], lasts_s,
                          request.environ.get("changefeed.on_disconnect"), query["presence"],
                          query["presence_form"] == "count")
    # The stream yields bytes ready to send: no need for werkzeug to re-encode each one.
    return Response(Held(stream, release), mimetype="text/event-stream", headers=EVENTS_HEADERS,
                    direct_passthrough=True)
