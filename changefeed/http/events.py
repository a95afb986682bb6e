"""GET /events: each new version of a page (or of every page under a prefix, or in a list) as a Server-Sent Event."""

from collections.abc import Iterable
from typing import Any

from flask import Blueprint, Response, request

from changefeed.core.errors import ShuttingDown
from changefeed.security.limits import Held
from changefeed.transports.feed import STREAM_LIMIT, FeedReader, feed_stream
from changefeed.transports.feeds import event_stream

from . import access
from .services import services

blueprint = Blueprint("events", __name__)

# An event stream is never cached, and nginx must pass each event on at once.
EVENTS_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"), ("X-Content-Type-Options", "nosniff")]


@blueprint.get("/events")
@access.reads
def events() -> Response:
    """Stream each new version of a page as a Server-Sent Event, from `since` on (of many pages: feed_events)."""
    if "prefix" in request.args or len(request.args.getlist("slug")) > 1:
        return feed_events()
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
                          query["presence_form"] == "count", query["payload"] == "full",
                          request.environ.get("changefeed.park", False))
    # The stream yields bytes ready to send: no need for werkzeug to re-encode each one. Under gunicorn it
    # yields its waits too (Parked), which the worker takes in place of bytes (ops/worker.py).
    body: Iterable[Any] = Held(stream, release)
    return Response(body, mimetype="text/event-stream", headers=EVENTS_HEADERS, direct_passthrough=True)


def feed_events() -> Response:
    """Stream each page saved under `prefix` (or among the `slug`s) after the cursor `since`, as it lands.

    One connection for a whole dashboard: each event names its page, and its
    id is a feed cursor (GET /feed's), so a reconnecting EventSource resumes
    every page it follows from its Last-Event-ID.
    """
    found = services()
    args = request.args
    query = found.schemas.feed_events.load({
        **{key: args[key] for key in ("prefix", "since", "presence", "payload") if key in args},
        **({"slug": args.getlist("slug")} if "slug" in args else {}),
        **({"Last-Event-ID": request.headers["Last-Event-ID"]} if "Last-Event-ID" in request.headers else {})})
    slugs, prefix = query["slug"], query["prefix"] or ""
    epoch, after = query["last_event_id"] or query["since"]  # a reconnecting EventSource resumes where it was
    readable, lasts_s = None, None
    rights = access.rights() if found.verifier.reads else None
    if rights is not None:  # a stream never outlives its token: it ends at expiry, the client reconnects
        readable = access.feed_readable(rights, prefix, slugs)
        lasts_s = rights.seconds_left()
    if found.notifier.closed:
        raise ShuttingDown()
    release = found.waits.enter(request.environ)
    reader = FeedReader(found.store, found.notifier, prefix, slugs, STREAM_LIMIT, content=query["payload"] == "full",
                        readable=readable, shared=True)
    stream = feed_stream(reader, after, epoch, found.config["CHANGEFEED_SSE_RETRY_MS"], lasts_s,
                         request.environ.get("changefeed.on_disconnect"))
    return Response(Held(stream, release), mimetype="text/event-stream", headers=EVENTS_HEADERS,
                    direct_passthrough=True)
