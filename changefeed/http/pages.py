"""The page API: POST /save, POST /delete, GET /changes (a poll, or with `wait` a long-poll).

Access control and the cross-site check run before these views, in the API
blueprint's guard (access.py); a view only names the slug it touches.
"""

from flask import Blueprint, Response, request

from changefeed.core.errors import ShuttingDown
from changefeed.ops import logs, metrics
from changefeed.transports.feeds import long_poll

from . import access, bodies
from .services import services

blueprint = Blueprint("pages", __name__)


@blueprint.post("/save")
@access.writes
def save() -> tuple[dict[str, object], list[tuple[str, str]]]:
    """Store a new version of a page and answer {slug, version, updated_at}."""
    feed = services()
    item = bodies.load_body(feed.schemas.save, feed.schemas.save_form, feed.config["CHANGEFEED_MAX_BODY_BYTES"])
    access.require("write", item["slug"])
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        key = feed.schemas.idempotency_key.load({"Idempotency-Key": key})["key"]
    saved = metrics.timed_save(feed.store.save, item["slug"], item["html"], item["data"], item["base_version"], key)
    logs.saved(saved)
    body = {"slug": saved.slug, "version": saved.version, "updated_at": saved.updated_at, "epoch": saved.epoch}
    return body, feed.closing([("Idempotent-Replayed", "true")] if saved.replayed else [])


@blueprint.post("/delete")
@access.writes
def delete() -> tuple[dict[str, object], list[tuple[str, str]]]:
    """Delete a page: a tombstone one version up, so every subscriber is told it is gone."""
    feed = services()
    item = bodies.load_body(feed.schemas.delete, feed.schemas.delete, feed.config["CHANGEFEED_MAX_BODY_BYTES"],
                            bodies.DELETE_EXAMPLE)
    access.require("write", item["slug"])
    deleted = feed.store.delete(item["slug"], item["base_version"])  # not a save in the metrics: rare, no body
    logs.saved(deleted)
    return {"slug": deleted.slug, "version": deleted.version, "deleted": True,
            "updated_at": deleted.updated_at, "epoch": deleted.epoch}, feed.closing([])


@blueprint.get("/changes")
@access.reads
def changes() -> Response:
    """Answer whether the page is newer than `since`, and if so with its content."""
    feed = services()
    store, notifier = feed.store, feed.notifier
    query = feed.queries.get(request)  # the view only reads it
    wait = query["wait"]
    if feed.verifier.reads:  # a long-poll never outlives its token
        rights = access.require("read", query["slug"])
        if rights is not None:
            wait = max(0, min(wait, int(rights.seconds_left())))
    if wait and notifier.closed:
        raise ShuttingDown()
    held = query["presence"]
    if held is not None:
        notifier.start()  # its look-out also sweeps presence entries past their TTL
    if wait:
        with feed.waits.holding(request.environ):
            change, present = long_poll(store, notifier, query["slug"], query["since"], query["epoch"], wait,
                                        request.environ.get("changefeed.on_disconnect"), held)
    else:  # a plain poll holds nothing: not counted
        change, present = long_poll(store, notifier, query["slug"], query["since"], query["epoch"], 0,
                                    presence=held)
    changed = change.changed
    presence_news = present is not None and present.version != held
    news = changed or presence_news
    if wait and notifier.closed and not news:
        raise ShuttingDown()  # the wait was cut short: not an answer to re-ask at once
    etag = f"{change.epoch}.{change.version}.{int(changed)}.{change.updated_at or ''}"
    if present is not None:
        etag = f"{etag}.p{present.version}"
    headers = feed.closing([("ETag", f'"{etag}"'),
                            *(feed.unchanged_wait_headers if wait and not news else feed.reusable_headers)])
    if_none_match = request.environ.get("HTTP_IF_NONE_MATCH")
    # A browser sends back exactly the tag it got: compare that first, parse only otherwise. The
    # comparison is weak (RFC 9110 13.1.2): a cache may send W/"tag", in a list, or `*`.
    if if_none_match and (if_none_match == headers[0][1] or request.if_none_match.contains_weak(etag)):
        metrics.POLLS_304[wait > 0].inc()
        return Response(status=304, headers=headers)
    metrics.POLLS_200[wait > 0].inc()
    body = change.answer if changed else change.unchanged
    if presence_news and present is not None:  # who is on the page, in the same answer
        body = f'{body[:-1]},"presence":{present.text(query["presence_form"] == "count")}}}'
    return Response(body, content_type="application/json", headers=headers)
