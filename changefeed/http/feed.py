"""GET /feed: every page saved since a cursor, by prefix, each once at its newest version (a long-poll with `wait`).

What a mirror, an indexer or a dashboard reads instead of knowing every
slug (CouchDB's `_changes`, Kubernetes' list-then-watch): ask with `since=0`,
keep the answer's `next`, ask again with it. A cursor of another database
(a new epoch) or past everything this one saved is answered 410 Gone:
the reader lists again from 0, never skipping anything silently.
"""

from flask import Blueprint, Response, request

from changefeed.core import feed as cursors
from changefeed.core.errors import ApiError, ShuttingDown
from changefeed.ops import metrics
from changefeed.transports.feed import FeedReader, read_feed

from . import access
from .services import services

blueprint = Blueprint("feed", __name__)


@blueprint.get("/feed")
@access.reads
def feed() -> Response:
    """Answer {changes: [{slug, version, updated_at[, html, data | deleted]}], next, epoch} after the cursor `since`.

    Of every page under `prefix`, or of the pages of a `slug` list (as
    /events?slug=a&slug=b). Notification-only by default (payload=version):
    a reader fetches the pages it wants through the cacheable /changes;
    payload=full (or include=content) carries each page's html and data.
    """
    found = services()
    args = request.args
    query = found.schemas.feed.load({**args.to_dict(), **({"slug": args.getlist("slug")} if "slug" in args else {})})
    epoch, after = query["since"]
    prefix, slugs, wait = query["prefix"] or "", query["slug"], query["wait"]
    content = query["payload"] == "full" or query["include"] == "content"
    readable = None
    rights = access.rights() if found.verifier.reads else None
    if rights is not None:  # a token sees only the pages it may read; a long-poll never outlives it
        readable = access.feed_readable(rights, prefix, slugs)
        wait = max(0, min(wait, int(rights.seconds_left())))
    if wait and found.notifier.closed:
        raise ShuttingDown()
    # A long-poll shares its reads with the process's other waiting readers; a plain read reads for itself,
    # so that it never misses a save its client just made (transports/feed.py: SharedReads).
    reader = FeedReader(found.store, found.notifier, prefix, slugs, limit=query["limit"], content=content,
                        readable=readable, shared=bool(wait))
    if wait:
        with found.waits.holding(request.environ), metrics.OPEN_LONG_POLLS.track_inprogress():
            page = read_feed(reader, after, epoch, wait, request.environ.get("changefeed.on_disconnect"))
    else:
        page = read_feed(reader, after, epoch)
    if (epoch is not None and page.epoch != epoch) or page.ahead:
        raise ApiError(410, "cursor gone", _start_over(epoch, page.epoch), epoch=page.epoch)
    if wait and found.notifier.closed and not page.entries:
        raise ShuttingDown()  # the wait was cut short: not an answer to re-ask at once
    cursor = cursors.encode(page.epoch, page.next)
    etag = f'"{cursor}.{len(page.entries)}"'
    headers = found.closing([("ETag", etag),
                             *(found.unchanged_wait_headers if wait and not page.entries else found.reusable_headers)])
    if request.environ.get("HTTP_IF_NONE_MATCH") == etag or request.if_none_match.contains_weak(etag[1:-1]):
        return Response(status=304, headers=headers)
    changes = ",".join(entry.fields(content) for entry in page.entries)
    body = f'{{"changes":[{changes}],"next":"{cursor}","epoch":"{page.epoch}"}}'
    return Response(body, content_type="application/json", headers=headers)


def _start_over(asked: str | None, epoch: str) -> str:
    """Why a cursor cannot be served, and what to do."""
    if asked is not None and asked != epoch:
        why = f"This cursor belongs to another database (epoch {asked}), not this one (see `epoch`)"
    else:
        why = "This cursor lies past everything this database saved (it was restored from an older copy)"
    return f"{why}: list every page again from since=0, then follow the new `next`."
