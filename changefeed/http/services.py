"""What every view of the service reaches: one typed object in `current_app.extensions["changefeed"]`.

The views are module-level functions in blueprints, shared by every app
that registers them; what differs between apps (the store, the notifier,
the token verifier, the limits, the schemas sized by the settings) lives
here, built once per app by the extension (changefeed/extension.py). A
view asks `services()` for it: no module global, no closure.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app

from changefeed.core.clients import parse_networks
from changefeed.core.schemas import (
    ChangesQuerySchema,
    DashboardQuerySchema,
    DeleteSchema,
    EventsQuerySchema,
    FeedEventsQuerySchema,
    FeedQuerySchema,
    IdempotencyKeySchema,
    LastEventIdSchema,
    PageQuerySchema,
    PresenceSchema,
    SaveFormSchema,
    SaveSchema,
)
from changefeed.ops import metrics
from changefeed.security.limits import QueryCache, WaitGate
from changefeed.security.origins import parse_origins
from changefeed.security.tokens import TokenVerifier
from changefeed.stores.contract import Notifier, Store
from changefeed.transports.websocket import Service as Sockets

KEY = "changefeed"  # app.extensions[KEY]: the Services, once opened
OPENER = "changefeed.open"  # app.extensions[OPENER](): open them (the store, the notifier) on first use

# The headers of a /changes answer a shared cache may reuse: browsers revalidate every answer
# (max-age=0: If-None-Match each time), and with deploy/nginx.conf's micro-cache the thousand
# readers of a page, who ask the same URL, cost one request here, a reader a second late at most.
CHANGES_HEADERS = [("Cache-Control", "public, max-age=0, s-maxage=1"), ("X-Content-Type-Options", "nosniff")]
# ...except an unchanged answer to a long-poll (its wait ran out): its client asks the same URL
# again at once, and a cached copy would answer it "unchanged" at once, again and again. nginx
# alone may keep it for a second (X-Accel-Expires: never passed on; before Cache-Control, or
# nginx 1.22 obeys no-cache): deploy/nginx.conf keys each entry by the second the request came
# in, so only the requests that waited along with this one get it; the re-ask finds nothing.
CHANGES_UNCHANGED_WAIT_HEADERS = [("X-Accel-Expires", "1"), ("Cache-Control", "no-cache"),
                                  ("X-Content-Type-Options", "nosniff")]
# With access control on reads no shared cache may keep any answer: each is for its token only.
CHANGES_PRIVATE_HEADERS = [("Cache-Control", "private, no-cache"), ("X-Content-Type-Options", "nosniff")]


@dataclass(frozen=True)
class Schemas:
    """The request schemas, built once per app (the size limits come from its settings)."""

    save: SaveSchema
    save_form: SaveFormSchema
    delete: DeleteSchema
    changes: ChangesQuerySchema
    events: EventsQuerySchema
    feed: FeedQuerySchema
    feed_events: FeedEventsQuerySchema
    last_event_id: LastEventIdSchema
    idempotency_key: IdempotencyKeySchema
    presence: PresenceSchema
    page: PageQuerySchema
    dashboard: DashboardQuerySchema

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Schemas":
        limits = dict(max_html_bytes=config["CHANGEFEED_MAX_HTML_BYTES"],
                      max_data_bytes=config["CHANGEFEED_MAX_DATA_BYTES"])
        return cls(save=SaveSchema(**limits), save_form=SaveFormSchema(**limits), delete=DeleteSchema(),
                   changes=ChangesQuerySchema(max_wait_s=config["CHANGEFEED_MAX_WAIT_S"]),
                   events=EventsQuerySchema(), feed=FeedQuerySchema(max_wait_s=config["CHANGEFEED_MAX_WAIT_S"]),
                   feed_events=FeedEventsQuerySchema(),
                   last_event_id=LastEventIdSchema(),
                   idempotency_key=IdempotencyKeySchema(), presence=PresenceSchema(), page=PageQuerySchema(),
                   dashboard=DashboardQuerySchema())


@dataclass(frozen=True)
class Services:
    """The store, notifier, verifier, limits and schemas of one app, and the settings they came from."""

    config: Mapping[str, Any]
    store: Store  # SQLite or PostgreSQL: the view never knows which
    notifier: Notifier
    verifier: TokenVerifier
    schemas: Schemas
    queries: QueryCache  # GET /changes's parsed query strings, reused
    waits: WaitGate  # the open long-polls and streams, per worker and per client
    sockets: Sockets  # what every WebSocket of the app shares
    allowed_origins: frozenset[str]  # CHANGEFEED_CORS_ORIGINS: the other sites' pages that may call the API
    proxies: tuple[Any, ...]  # CHANGEFEED_TRUSTED_PROXIES, parsed
    url_prefix: str  # where the service answers: "" standalone, e.g. "/feed" embedded
    static_endpoint: str  # what serves the demo's scripts and styles (demo.py)
    document: dict[str, Any]  # the OpenAPI document, built once
    reusable_headers: list[tuple[str, str]]  # of a /changes answer a shared cache may reuse
    unchanged_wait_headers: list[tuple[str, str]]  # of an unchanged long-poll answer

    @classmethod
    def build(cls, app: Flask, store: Store, notifier: Notifier, url_prefix: str, static_endpoint: str,
              document: dict[str, Any]) -> "Services":
        """Everything the views of `app` need, from its settings and the opened store and notifier."""
        config = app.config
        schemas = Schemas.from_config(config)
        proxies = tuple(parse_networks(config["CHANGEFEED_TRUSTED_PROXIES"]))
        verifier = TokenVerifier(config)
        waits = WaitGate(config["CHANGEFEED_MAX_WAITS_PER_WORKER"], config["CHANGEFEED_MAX_WAITS_PER_CLIENT"],
                         proxies, on_refusal=metrics.refused)
        queries = QueryCache(schemas.changes.load, schemas.changes.fields, config["CHANGEFEED_QUERY_CACHE_BYTES"])
        reusable, unchanged_wait = ((CHANGES_PRIVATE_HEADERS, CHANGES_PRIVATE_HEADERS) if verifier.reads
                                    else (CHANGES_HEADERS, CHANGES_UNCHANGED_WAIT_HEADERS))
        return cls(config=config, store=store, notifier=notifier, verifier=verifier, schemas=schemas,
                   queries=queries, waits=waits, sockets=Sockets(app, store, notifier, verifier, waits),
                   allowed_origins=frozenset(parse_origins(config["CHANGEFEED_CORS_ORIGINS"])), proxies=proxies,
                   url_prefix=url_prefix, static_endpoint=static_endpoint, document=document, reusable_headers=reusable,
                   unchanged_wait_headers=unchanged_wait)

    def closing(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Once this worker shuts down, each answer ends its connection, so clients move on."""
        return [*headers, ("Connection", "close")] if self.notifier.closed else headers


def services() -> Services:
    """The services of the app handling this request (or of the app context); opened on first use."""
    extensions = current_app.extensions
    try:
        found: Services = extensions[KEY]
    except KeyError:
        found = extensions[OPENER]()
    return found
