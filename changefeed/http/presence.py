"""POST /presence: a tab says it is on a page, viewing or editing (or, state "gone", that it closed)."""

from typing import Any

from flask import Blueprint

from changefeed.core import presence
from changefeed.core.schemas import MAX_NAME

from . import access, bodies
from .services import services

blueprint = Blueprint("presence", __name__)


@blueprint.post("/presence")
@access.beats
def beat() -> tuple[Any, list[tuple[str, str]]]:
    """Say that this tab is on the page, viewing or editing (or, state "gone", that it closed)."""
    feed = services()
    # Any content type: navigator.sendBeacon on a closing tab may send its JSON as text/plain.
    item = feed.schemas.presence.load(bodies.json_body(feed.config["CHANGEFEED_MAX_BODY_BYTES"],
                                                       bodies.PRESENCE_EXAMPLE))
    feed.notifier.start()  # its look-out also sweeps presence entries past their TTL
    return presence.record(feed.store, presence.beat_of(item, access.rights(), MAX_NAME), feed.config), \
        feed.closing([])
