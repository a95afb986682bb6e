"""The API as an OpenAPI 3.1 document, built from the schemas the endpoints validate with.

apispec's marshmallow plugin turns the same SaveSchema, ChangesQuerySchema and
EventsQuerySchema that refuse bad requests into the document's parameters and
bodies; the query parameters are written out here (with the patterns the
schemas enforce, which marshmallow keeps in Python's regex dialect), and
tests/test_openapi.py checks they name exactly the schemas' fields. The
answers (which the views build by hand, for speed) are described here once.
"""

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask
from marshmallow import Schema, fields

from changefeed.core.feed import CURSOR
from changefeed.core.schemas import (
    EPOCH,
    FEED_LIMIT,
    IDEMPOTENCY_KEY,
    MAX_FEED_LIMIT,
    MAX_INTEGER,
    MAX_STREAM_SLUGS,
    PAYLOADS,
    PREFIX,
    PRESENCE_FORMS,
    SLUG,
    TRANSPORTS,
    Count,
    DeleteSchema,
    PresenceSchema,
    SaveSchema,
)

from .services import services


class ErrorSchema(Schema):
    """Every error: a short stable phrase, what happened and what to do, and details."""

    error = fields.String(required=True, metadata={"example": "invalid request"})
    message = fields.String(required=True)
    fields_ = fields.Dict(data_key="fields", keys=fields.String(), values=fields.List(fields.String()),
                          metadata={"description": "each bad field (or header) and its reasons (422)"})
    version = fields.Integer(metadata={"description": "the stored version (409)"})
    checks = fields.Dict(keys=fields.String(), values=fields.String(), metadata={"description": "what is not ready"})
    limit = fields.String(metadata={"description": "which limit refused it (429, 503 server full, 507)"})
    retry_after_ms = fields.Integer(metadata={"description": "when to beat again (429 of POST /presence)"})
    epoch = fields.String(metadata={"description": "this database's epoch (410 of GET /feed: list again from 0)"})
    request_id = fields.String(required=True, metadata={
        "description": "this request's id, also its X-Request-Id header: the server's log lines carry it"})


class SavedSchema(Schema):
    slug = fields.String(required=True)
    version = fields.Integer(required=True, metadata={"minimum": 1})
    updated_at = fields.String(required=True, metadata={"format": "date-time"})
    epoch = fields.String(required=True)


class DeletedSchema(SavedSchema):
    deleted = fields.Boolean(required=True, metadata={"enum": [True]})


class EditorSchema(Schema):
    id = fields.String(required=True, metadata={"description": "the user's id in lists (a hash of who they are)"})
    name = fields.String(required=True, metadata={"description": "untrusted: show it as text only"})
    state = fields.String(required=True, metadata={"enum": ["viewing", "editing"]})


class PresenceListSchema(Schema):
    """Who is on a page; `editors` is left out of the count-only form."""

    version = fields.Integer(required=True, metadata={
        "minimum": 0, "description": "0: nobody; any other version is used once (compare for sameness)"})
    count = fields.Integer(required=True, metadata={"minimum": 0})
    editing = fields.Integer(required=True, metadata={"minimum": 0})
    editors = fields.List(fields.Nested(EditorSchema), metadata={"description": "editing users first"})


class BeatenSchema(Schema):
    slug = fields.String(required=True)
    version = fields.Integer(required=True, metadata={"description": "the page's presence version after the beat"})
    you = fields.String(required=True, metadata={"description": "this tab's user's id in presence lists"})
    beat_ms = fields.Integer(required=True)
    ttl_ms = fields.Integer(required=True)
    min_interval_ms = fields.Integer(required=True)


class ChangeSchema(Schema):
    """A /changes answer; `html`, `data` and `updated_at` only when `changed` is true."""

    changed = fields.Boolean(required=True)
    version = fields.Integer(required=True, metadata={"minimum": 0})
    html = fields.String()
    data = fields.Raw(allow_none=True, metadata={"description": "the JSON value saved"})
    updated_at = fields.String(metadata={"format": "date-time"})
    deleted = fields.Boolean(metadata={
        "enum": [True], "description": "the page was deleted: this version is its tombstone (html \"\", data null)"})
    epoch = fields.String(required=True)
    presence = fields.Nested(PresenceListSchema, metadata={
        "description": "with ?presence=V: who is on the page, when its presence version is not V"})


class FeedEntrySchema(Schema):
    """One page in a /feed answer: its newest version after the cursor (a tombstone: `deleted`, no content)."""

    slug = fields.String(required=True)
    version = fields.Integer(required=True, metadata={"minimum": 1})
    updated_at = fields.String(required=True, metadata={"format": "date-time"})
    html = fields.String(metadata={"description": "with payload=full (or include=content)"})
    data = fields.Raw(allow_none=True, metadata={
        "description": "with payload=full (or include=content): the JSON value saved"})
    deleted = fields.Boolean(metadata={"enum": [True], "description": "the page was deleted since the cursor"})


class FeedSchema(Schema):
    """A /feed answer: the pages saved after the cursor, in save order, and the cursor to read on from."""

    changes = fields.List(fields.Nested(FeedEntrySchema), required=True)
    next = fields.String(required=True, metadata={"description": "the cursor to send as `since` next (opaque)"})
    epoch = fields.String(required=True)


def _header(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "schema": schema or {"type": "string"}}


RETRY_AFTER = _header("seconds to wait before asking again", {"type": "integer", "minimum": 0})
WWW_AUTHENTICATE = _header('RFC 6750: Bearer realm="changefeed", error="invalid_token" | "insufficient_scope"')
REQUEST_ID = _header("this request's id: the proxy's X-Request-Id when it sent a sane one (1-128 of "
                     "A-Z a-z 0-9 . _ : -), else one of the server's; the body's `request_id`",
                     {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"})


def _error(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": "Error"}},
            "headers": {"X-Request-Id": REQUEST_ID, **headers}}


ERRORS = {
    "400": _error("malformed JSON, an empty body, or a Host name not in CHANGEFEED_TRUSTED_HOSTS"),
    "401": _error("no valid token (access control on)", **{"WWW-Authenticate": WWW_AUTHENTICATE}),
    "403": _error("a slug outside the token's rights, or a write from another site's page",
                  **{"WWW-Authenticate": WWW_AUTHENTICATE}),
    "408": _error("the headers or body took too long to arrive (gunicorn); nothing written"),
    "413": _error("body over CHANGEFEED_MAX_BODY_BYTES"),
    "415": _error("body neither JSON nor form fields"),
    "422": _error("a field or header is invalid: `fields` names each, with its reasons"),
    "429": _error("this client holds CHANGEFEED_MAX_WAITS_PER_CLIENT open streams and long-polls",
                  **{"Retry-After": RETRY_AFTER}),
    "503": _error("busy, not saved, outcome unknown, unavailable, server full, or shutting down (see `error`)",
                  **{"Retry-After": RETRY_AFTER}),
    "507": _error("storage full: a new page past CHANGEFEED_MAX_PAGES, or past CHANGEFEED_MAX_STORED_BYTES"),
}


# Flask answers OPTIONS on every route by itself (http/standalone.App: in JSON); a CORS preflight is this answer too.
OPTIONS = {"summary": "The methods this path allows", "responses": {"200": {
    "description": "the methods, also in the Allow header",
    "headers": {"Allow": _header("the same methods, comma-separated")},
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["allow"],
        "properties": {"allow": {"type": "array", "items": {"type": "string"}, "example": ["OPTIONS", "POST"]}}}}}}}}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: ERRORS[code] for code in codes}


def build(app: Flask) -> dict[str, Any]:
    """Return the OpenAPI document of `app` as a dict."""
    plugin = MarshmallowPlugin()
    spec = APISpec(title="changefeed", version="1", openapi_version="3.1.0", plugins=[plugin], info={
        "description": "Save a page; every open tab learns of the new version at once. See docs/api.md.",
    })
    plugin.map_to_openapi_type(Count, "integer", None)
    spec.components.schema("Error", schema=ErrorSchema)
    spec.components.schema("Saved", schema=SavedSchema)
    spec.components.schema("Change", schema=ChangeSchema)
    spec.components.schema("Feed", schema=FeedSchema)
    spec.components.schema("Deleted", schema=DeletedSchema)
    spec.components.schema("DeleteRequest", schema=DeleteSchema)
    spec.components.schema("SaveRequest", schema=SaveSchema(max_html_bytes=0, max_data_bytes=0))
    spec.components.schema("Beat", schema=PresenceSchema)
    spec.components.schema("Beaten", schema=BeatenSchema)
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"})
    spec.components.security_scheme("readCookie", {"type": "apiKey", "in": "cookie", "name": "changefeed_read"})
    count = {"type": "integer", "minimum": 0, "maximum": MAX_INTEGER}
    slug = {"in": "query", "name": "slug", "required": True,
            "schema": {"type": "string", "pattern": f"^{SLUG.pattern}$"}}
    epoch = {"in": "query", "name": "epoch", "schema": {"type": "string", "pattern": f"^{EPOCH.pattern[:-2]}$"}}
    optional_auth: list[dict[str, list[str]]] = [{}, {"bearer": []}, {"readCookie": []}]
    presence = [{"in": "query", "name": "presence", "schema": count,
                 "description": "the presence version held (0: nobody): who is on the page comes along when it differs"},
                {"in": "query", "name": "presence_form", "schema": {"enum": list(PRESENCE_FORMS)},
                 "description": "`count`: how many, without names"}]
    payload = {"in": "query", "name": "payload", "schema": {"enum": list(PAYLOADS), "default": "full"},
               "description": "`version`: each change says which version exists, without html and data; "
                              "fetch the page from /changes (cacheable) with `since` the version held"}

    spec.path("/save", operations={"post": {
        "summary": "Store a new version of a page (its version goes up by exactly 1)",
        "security": [{}, {"bearer": []}],
        "parameters": [{"in": "header", "name": "Idempotency-Key", "schema": {
            "type": "string", "pattern": f"^{IDEMPOTENCY_KEY.pattern[:-2]}$"},
            "description": "a retry with the same key returns the first answer and saves nothing more"}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": "SaveRequest"},
            "application/x-www-form-urlencoded": {"schema": {"type": "object", "required": ["slug", "html"],
                                                             "properties": {"slug": {"type": "string"},
                                                                            "html": {"type": "string"},
                                                                            "data": {"type": "string"},
                                                                            "base_version": {"type": "string"}}}}}},
        "responses": {
            "200": {"description": "stored", "content": {"application/json": {"schema": "Saved"}},
                    "headers": {"Idempotent-Replayed": _header("`true` when this answers an earlier request")}},
            "409": _error("stale base_version: `version` is the stored one"),
            **_errors("400", "401", "403", "408", "413", "415", "422", "503", "507")},
    }})
    spec.path("/delete", operations={"post": {
        "summary": "Delete a page: a tombstone one version up, which every subscriber is told of",
        "security": [{}, {"bearer": []}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": "DeleteRequest"},
            "application/x-www-form-urlencoded": {"schema": {"type": "object", "required": ["slug"],
                                                             "properties": {"slug": {"type": "string"},
                                                                            "base_version": {"type": "string"}}}}}},
        "responses": {
            "200": {"description": "deleted", "content": {"application/json": {"schema": "Deleted"}}},
            "404": _error("no such page, or deleted already (`version`: its tombstone)"),
            "409": _error("stale base_version: `version` is the stored one"),
            **_errors("400", "401", "403", "408", "413", "415", "422", "503")},
    }})
    spec.path("/changes", operations={"get": {
        "summary": "Is the page newer than `since`? Then here it is (with `wait`: a long-poll)",
        "security": optional_auth,
        "parameters": [slug, {"in": "query", "name": "since", "schema": count}, epoch,
                       {"in": "query", "name": "wait", "schema": {
                           "type": "integer", "minimum": 0, "maximum": app.config["CHANGEFEED_MAX_WAIT_S"]}},
                       *presence],
        "responses": {
            "200": {"description": "the page's state for `since`",
                    "content": {"application/json": {"schema": "Change"}},
                    "headers": {"ETag": _header("changes whenever the answer would")}},
            "304": {"description": "unchanged since the ETag sent in If-None-Match"},
            **_errors("400", "401", "403", "422", "429", "503")},
    }})
    spec.path("/feed", operations={"get": {
        "summary": "Every page saved after the cursor `since`, by prefix or slug list, each once at its newest version",
        "security": optional_auth,
        "parameters": [
            {"in": "query", "name": "since", "schema": {"type": "string", "pattern": f"^(0|{CURSOR.pattern})$"},
             "description": "0 (from the beginning) or the `next` of an earlier answer"},
            {"in": "query", "name": "prefix", "schema": {"type": "string", "pattern": f"^{PREFIX.pattern[:-2]}$"},
             "description": "only pages whose slug starts with it"},
            {"in": "query", "name": "slug", "style": "form", "explode": True,
             "schema": {"type": "array", "items": slug["schema"], "maxItems": MAX_STREAM_SLUGS},
             "description": "only these pages (slug=a&slug=b); not with `prefix`"},
            {"in": "query", "name": "limit", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_FEED_LIMIT,
                                                        "default": FEED_LIMIT}},
            {"in": "query", "name": "wait", "schema": {
                "type": "integer", "minimum": 0, "maximum": app.config["CHANGEFEED_MAX_WAIT_S"]}},
            {"in": "query", "name": "include", "schema": {"enum": ["content"]},
             "description": "each page's html and data too (as payload=full)"},
            {**payload, "schema": {"enum": list(PAYLOADS), "default": "version"},
             "description": "`full`: each page's html and data too (not with include=content)"}],
        "responses": {
            "200": {"description": "the pages saved after `since`",
                    "content": {"application/json": {"schema": "Feed"}},
                    "headers": {"ETag": _header("changes whenever the answer would")}},
            "304": {"description": "unchanged since the ETag sent in If-None-Match"},
            "410": _error("a cursor of another database (a new epoch) or past everything this one saved: "
                          "list again from since=0"),
            **_errors("400", "401", "403", "422", "429", "503")},
    }})
    spec.path("/events", operations={"get": {
        "summary": "Each new version of a page, as Server-Sent Events",
        "security": optional_auth,
        "parameters": [slug, {"in": "query", "name": "since", "schema": count}, epoch,
                       {"in": "header", "name": "Last-Event-ID", "schema": {"type": "string"},
                        "description": "<epoch>:<version> of the last event received (or a version)"}, *presence,
                       payload],
        "responses": {
            "200": {"description": "`id: <epoch>:<version>`, `event: change`, `data:` a /changes answer "
                                   "(payload=version: without html and data); with ?presence, "
                                   "`event: presence`, `data:` a presence list",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **_errors("400", "401", "403", "422", "429", "503")},
    }})
    spec.path("/presence", operations={"post": {
        "summary": "This tab is on the page, viewing or editing (state `gone`: it closed); every 5 s",
        "security": [{}, {"bearer": []}, {"readCookie": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": "Beat"}}},
        "responses": {
            "200": {"description": "recorded", "content": {"application/json": {"schema": "Beaten"}}},
            "429": _error("a beat within CHANGEFEED_PRESENCE_MIN_INTERVAL_MS of the last (`limit`: presence_interval), "
                          "or the page lists its most tabs (presence_entries)", **{"Retry-After": RETRY_AFTER}),
            **_errors("400", "401", "403", "413", "422", "503")},
    }})
    spec.path("/ws", operations={"get": {
        "summary": "A WebSocket following many pages: JSON messages subscribe, unsubscribe, presence, ping "
                   "(see docs/api.md)",
        "security": optional_auth,
        "responses": {"101": {"description": "switched to the WebSocket protocol"},
                      **_errors("400", "403", "429", "503")},
    }})
    spec.path("/session", operations={
        "post": {"summary": "Trade a bearer token for the read-only cookie (for EventSource)",
                 "security": [{"bearer": []}],
                 "responses": {"204": {"description": "cookie set", "headers": {"Set-Cookie": _header(
                     "changefeed_read; HttpOnly; SameSite=Strict")}},
                     "404": _error("access control is off"), **_errors("401")}},
        "delete": {"summary": "Forget the read cookie", "responses": {"204": {"description": "cookie removed"}}},
    })
    spec.path("/healthz", operations={"get": {"summary": "The process answers (liveness)", "responses": {
        "200": {"description": "ok", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"status": {"const": "ok"}}}}}}}}})
    spec.path("/readyz", operations={"get": {
        "summary": "The process can serve: its database reads and its watcher looks (readiness)",
        "responses": {"200": {"description": "ready", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"status": {"const": "ready"}, "epoch": {"type": "string"}}}}}},
            "503": _error("not ready: `checks` says what", **{"Retry-After": RETRY_AFTER})}}})
    spec.path("/openapi.json", operations={"get": {"summary": "This document", "responses": {
        "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}}})
    if app.config["CHANGEFEED_METRICS"] != "off":
        spec.path("/metrics", operations={"get": {
            "summary": "Prometheus metrics, summed over the server's processes (see docs/operations.md)",
            "security": [{}, {"bearer": []}],
            "responses": {"200": {"description": "the Prometheus text format (OpenMetrics when the Accept header "
                                                 "asks for it)", "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/openmetrics-text": {"schema": {"type": "string"}}}},
                **_errors("400", "401", "403")}}})
    spec.path("/", operations={"get": {
        "summary": "The demo page: an editor and a viewer of one slug",
        "parameters": [{**slug, "required": False},
                       {"in": "query", "name": "transport", "schema": {"enum": list(TRANSPORTS)}}],
        "responses": {"200": {"description": "html", "content": {"text/html": {"schema": {"type": "string"}}}},
                      **_errors("400", "422")}}})
    spec.path("/dashboard", operations={"get": {
        "summary": "The dashboard: every page under a prefix, live on one connection",
        "parameters": [{"in": "query", "name": "prefix",
                        "schema": {"type": "string", "pattern": f"^{PREFIX.pattern[:-2]}$"}},
                       {"in": "query", "name": "transport", "schema": {"enum": list(TRANSPORTS)}}],
        "responses": {"200": {"description": "html", "content": {"text/html": {"schema": {"type": "string"}}}},
                      **_errors("400", "422")}}})
    document = spec.to_dict()
    for path, operations in document["paths"].items():
        if path != "/ws":  # a WebSocket route matches a handshake only: OPTIONS there is its 400
            operations["options"] = OPTIONS
    return document


blueprint = Blueprint("openapi", __name__)


@blueprint.get("/openapi.json")
def document() -> dict[str, Any]:
    """The API as an OpenAPI 3.1 document."""
    return services().document
