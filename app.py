"""changefeed: save a page, and every open tab learns of the new version.

    POST /save       upsert a page; its version goes up by exactly 1
    POST /delete     delete a page: a tombstone, one version up, that every subscriber hears of
    GET  /changes    anything newer than version `since`? then here it is
                     (with `wait`, held until there is: long-poll)
    GET  /events     the same, pushed as Server-Sent Events
    GET  /           the two-pane demo (editor and viewer)
    GET  /healthz    the process answers; /readyz: and its database and watcher work

Run it with `python migrate.py && flask run`, or in production with
`gunicorn -c gunicorn.conf.py 'app:create_app()'`.
"""

import json
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, render_template, request
from flask.json.provider import DefaultJSONProvider
from flask_cors import CORS
from marshmallow import ValidationError

from changefeed.core import presence, settings
from changefeed.core.clients import is_https, parse_networks
from changefeed.core.errors import ApiError, ShuttingDown
from changefeed.core.outcomes import Unavailable
from changefeed.core.schemas import (
    MAX_NAME,
    TRANSPORTS,
    ChangesQuerySchema,
    DeleteSchema,
    EventsQuerySchema,
    IdempotencyKeySchema,
    LastEventIdSchema,
    PageQuerySchema,
    PresenceSchema,
    SaveFormSchema,
    SaveSchema,
    reject_constant,
)
from changefeed.http import bodies, errors, openapi
from changefeed.ops import logs, metrics
from changefeed.security import tokens as auth
from changefeed.security.limits import Held, QueryCache, WaitGate
from changefeed.security.origins import parse_list, parse_origins, refuse_cross_site_writes
from changefeed.security.tokens import TokenVerifier
from changefeed.stores.contract import Notifier, Store
from changefeed.stores.engines import open_engine
from changefeed.transports import websocket as sockets
from changefeed.transports.feeds import event_stream, long_poll

# What a page of an allowed origin may send, and read of the answers.
CORS_REQUEST_HEADERS = ["Content-Type", "Idempotency-Key", "Authorization", "If-None-Match", "Last-Event-ID"]
CORS_RESPONSE_HEADERS = ["ETag", "Retry-After", "Idempotent-Replayed"]

JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

# Browsers revalidate every /changes answer (max-age=0: If-None-Match each
# time). A shared cache may reuse one for a second: with deploy/nginx.conf's
# micro-cache the thousand readers of a page, who ask the same URL, cost one
# request here, and a reader sees a version at most that second late.
CHANGES_HEADERS = [("Cache-Control", "public, max-age=0, s-maxage=1"), ("X-Content-Type-Options", "nosniff")]
# ...except an unchanged answer to a long-poll (its wait ran out): its client
# asks the same URL again at once, and a cached copy would answer it
# "unchanged" at once, again and again. nginx alone may keep it for a second
# (X-Accel-Expires: never passed on; before Cache-Control, or nginx 1.22 obeys
# no-cache): deploy/nginx.conf keys each entry by the second the request came
# in, so only the requests that waited along with this one get it, and none
# waits for a new wait of its own; the re-ask, seconds later, finds nothing.
CHANGES_UNCHANGED_WAIT_HEADERS = [("X-Accel-Expires", "1"), ("Cache-Control", "no-cache"),
                                  ("X-Content-Type-Options", "nosniff")]
# With access control on reads no shared cache may keep any answer: each is for its token only.
CHANGES_PRIVATE_HEADERS = [("Cache-Control", "private, no-cache"), ("X-Content-Type-Options", "nosniff")]

# An event stream is never cached, and nginx must pass each event on at once.
EVENTS_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"),
                  ("X-Content-Type-Options", "nosniff")]

# The page itself runs only its own scripts; saved html lives in a sandboxed
# srcdoc iframe, which inherits this policy and may show images and styles.
PAGE_HEADERS = [
    ("Content-Security-Policy",
     "default-src 'self'; img-src * data: blob:; style-src 'self' 'unsafe-inline'; "
     "font-src * data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
]


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's JSON, refusing NaN and Infinity: they are not JSON, and a client's parser would fail on the answer.

    An answer that would hold one fails on the server (a logged 500) instead.
    """

    def dumps(self, obj, **kwargs):
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)


class App(Flask):
    """Flask, reading bodies with bodies.Request, writing strict JSON, and answering its automatic OPTIONS in JSON."""

    request_class = bodies.Request  # a chunked body past MAX_CONTENT_LENGTH is a 413, not cut short
    json_provider_class = StrictJSONProvider

    def make_default_options_response(self):
        """200 {"allow": [...]} with the Allow header (Flask's own is an empty text/html body).

        A CORS preflight is this answer too, with flask-cors's headers added.
        """
        allowed = sorted(super().make_default_options_response().allow)
        response = self.json.response({"allow": allowed})
        response.allow.update(allowed)
        return response


def create_app(test_config=None):
    """Build the app from the environment's settings, overridden by `test_config`."""
    app = App(__name__, instance_relative_config=True)
    app.config.from_mapping(settings.from_environ())
    app.config.from_mapping(test_config or {})
    app.config["MAX_CONTENT_LENGTH"] = app.config["CHANGEFEED_MAX_BODY_BYTES"]
    hosts = parse_list(app.config["CHANGEFEED_TRUSTED_HOSTS"])
    app.config["TRUSTED_HOSTS"] = None if "*" in hosts else sorted(hosts)
    app.json.sort_keys = False
    logs.register(app)  # first, so whatever follows logs with a level and a name; the access log if asked

    store, notifier = open_store(app.config)
    app.extensions["changefeed.store"], app.extensions["changefeed.notifier"] = store, notifier
    limits = dict(max_html_bytes=app.config["CHANGEFEED_MAX_HTML_BYTES"],
                  max_data_bytes=app.config["CHANGEFEED_MAX_DATA_BYTES"])
    save_schema, save_form_schema = SaveSchema(**limits), SaveFormSchema(**limits)
    changes_schema = ChangesQuerySchema(max_wait_s=app.config["CHANGEFEED_MAX_WAIT_S"])
    page_schema = PageQuerySchema()
    events_schema, last_event_id_schema = EventsQuerySchema(), LastEventIdSchema()
    idempotency_key_schema = IdempotencyKeySchema()
    presence_schema = PresenceSchema()
    delete_schema = DeleteSchema()

    def closing(headers):
        """Once this worker shuts down, each answer ends its connection, so clients move on."""
        return [*headers, ("Connection", "close")] if notifier.closed else headers

    changes_queries = app.extensions["changefeed.queries"] = QueryCache(
        changes_schema.load, changes_schema.fields, app.config["CHANGEFEED_QUERY_CACHE_BYTES"])
    proxies = parse_networks(app.config["CHANGEFEED_TRUSTED_PROXIES"])
    waits = app.extensions["changefeed.waits"] = WaitGate(
        app.config["CHANGEFEED_MAX_WAITS_PER_WORKER"], app.config["CHANGEFEED_MAX_WAITS_PER_CLIENT"],
        proxies, on_refusal=metrics.refused)

    errors.register(app)
    document = openapi.build(app)
    verifier = app.extensions["changefeed.auth"] = TokenVerifier(app.config)
    # The headers of a /changes answer a shared cache may reuse, and of an unchanged long-poll answer.
    reusable, unchanged_wait = ((CHANGES_PRIVATE_HEADERS, CHANGES_PRIVATE_HEADERS) if verifier.reads
                                else (CHANGES_HEADERS, CHANGES_UNCHANGED_WAIT_HEADERS))
    auth.register_cli(app, verifier)
    register_cli(app, store)
    metrics.register(app)  # GET /metrics, unless CHANGEFEED_METRICS=off
    sockets.register(app, store, notifier, verifier, waits)  # GET /ws: WebSocket
    allowed_origins = parse_origins(app.config["CHANGEFEED_CORS_ORIGINS"])
    if allowed_origins:  # none by default: no page of another site may call the API
        CORS(app, origins=sorted(allowed_origins), supports_credentials=True, max_age=600,
             allow_headers=CORS_REQUEST_HEADERS, expose_headers=CORS_RESPONSE_HEADERS)

    def same_site_writes_only():
        """Every write view calls this first; reads (the hot poll path) pay nothing for it."""
        refuse_cross_site_writes(request, allowed_origins)

    @app.post("/save")
    def save():
        """Store a new version of a page and answer {slug, version, updated_at}."""
        same_site_writes_only()
        rights = verifier.verify(request.headers.get("Authorization")) if verifier.enabled else None
        item = load_body(save_schema, save_form_schema)
        if rights is not None:
            rights.require("write", item["slug"])
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            key = idempotency_key_schema.load({"Idempotency-Key": key})["key"]
        saved = metrics.timed_save(store.save, item["slug"], item["html"], item["data"], item["base_version"], key)
        logs.saved(saved)
        body = {"slug": saved.slug, "version": saved.version, "updated_at": saved.updated_at,
                "epoch": saved.epoch}
        return body, closing([("Idempotent-Replayed", "true")] if saved.replayed else [])

    @app.post("/delete")
    def delete():
        """Delete a page: a tombstone one version up, so every subscriber is told it is gone."""
        same_site_writes_only()
        rights = verifier.verify(request.headers.get("Authorization")) if verifier.enabled else None
        item = load_body(delete_schema, delete_schema, DELETE_EXAMPLE)
        if rights is not None:
            rights.require("write", item["slug"])
        deleted = store.delete(item["slug"], item["base_version"])  # not a save in the metrics: rare, and no body
        logs.saved(deleted)
        return {"slug": deleted.slug, "version": deleted.version, "deleted": True,
                "updated_at": deleted.updated_at, "epoch": deleted.epoch}, closing([])

    @app.get("/changes")
    def changes():
        """Answer whether the page is newer than `since`, and if so with its content."""
        query = changes_queries.get(request)  # the view only reads it
        wait = query["wait"]
        if verifier.reads:  # a long-poll never outlives its token
            rights = verifier.read_rights(request).require("read", query["slug"])
            wait = max(0, min(wait, int(rights.seconds_left())))
        if wait and notifier.closed:
            raise ShuttingDown()
        held = query["presence"]
        if held is not None:
            notifier.start()  # its look-out also sweeps presence entries past their TTL
        if wait:
            with waits.holding(request.environ):
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
        headers = closing([("ETag", f'"{etag}"'), *(unchanged_wait if wait and not news else reusable)])
        if_none_match = request.environ.get("HTTP_IF_NONE_MATCH")
        # A browser sends back exactly the tag it got: compare that first, parse only otherwise. The
        # comparison is weak (RFC 9110 13.1.2): a cache may send W/"tag", in a list, or `*`.
        if if_none_match and (if_none_match == headers[0][1] or request.if_none_match.contains_weak(etag)):
            metrics.POLLS_304[wait > 0].inc()
            return Response(status=304, headers=headers)
        metrics.POLLS_200[wait > 0].inc()
        body = change.answer if changed else change.unchanged
        if presence_news:  # who is on the page, in the same answer
            body = f'{body[:-1]},"presence":{present.text(query["presence_form"] == "count")}}}'
        return Response(body, content_type="application/json", headers=headers)

    @app.get("/events")
    def events():
        """Stream each new version of a page as a Server-Sent Event, from `since` on."""
        query = events_schema.load(request.args)
        lasts_s = None
        if verifier.reads:  # a stream never outlives its token: it ends at expiry, the client reconnects
            rights = verifier.read_rights(request).require("read", query["slug"])
            lasts_s = rights.seconds_left()
        since, epoch = query["since"], query["epoch"]
        last_event_id = request.headers.get("Last-Event-ID")
        if last_event_id is not None:  # a reconnecting EventSource resumes where it was
            last = last_event_id_schema.load({"Last-Event-ID": last_event_id})["last_event_id"]
            since, epoch = last["since"], last["epoch"]
        if notifier.closed:
            raise ShuttingDown()
        release = waits.enter(request.environ)
        stream = event_stream(store, notifier, query["slug"], since, epoch, app.config["CHANGEFEED_SSE_RETRY_MS"],
                              lasts_s, request.environ.get("changefeed.on_disconnect"), query["presence"],
                              query["presence_form"] == "count")
        # The stream yields bytes ready to send: no need for werkzeug to re-encode each one.
        return Response(Held(stream, release), mimetype="text/event-stream", headers=EVENTS_HEADERS,
                        direct_passthrough=True)

    @app.post("/presence")
    def beat():
        """Say that this tab is on the page, viewing or editing (or, state "gone", that it closed)."""
        same_site_writes_only()
        # Any content type: navigator.sendBeacon on a closing tab may send its JSON as text/plain.
        item = presence_schema.load(json_body(PRESENCE_EXAMPLE))
        rights = verifier.read_rights(request) if verifier.enabled else None
        notifier.start()  # its look-out also sweeps presence entries past their TTL
        return presence.record(store, presence.beat_of(item, rights, MAX_NAME), app.config), closing([])

    @app.post("/session")
    def session():
        """Trade a bearer token for a read-only cookie, for EventSource, which cannot send headers.

        The cookie lives as long as the token; DELETE /session ends it.
        """
        same_site_writes_only()
        if not verifier.enabled:
            raise ApiError(404, "not found", "Access control is off: reads need no session.")
        token = auth.bearer_token(request.headers.get("Authorization"))
        rights = verifier.verify_token(token)
        response = Response(status=204)
        response.set_cookie(auth.READ_COOKIE, token, max_age=max(0, int(rights.seconds_left())), path="/",
                            httponly=True, samesite="Strict", secure=is_https(request.environ, proxies))
        return response

    @app.delete("/session")
    def end_session():
        """Forget the read cookie (signing out, or another token)."""
        same_site_writes_only()
        response = Response(status=204)
        response.delete_cookie(auth.READ_COOKIE, path="/", httponly=True, samesite="Strict")
        return response

    @app.get("/openapi.json")
    def openapi_document():
        """The API as an OpenAPI 3.1 document."""
        return document

    @app.get("/healthz")
    def healthz():
        """Say that this process answers (a liveness probe)."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        """Say whether this process can serve: its database reads and its watcher looks (readiness)."""
        problems = {}
        missing = store.problem()  # first: its message says what to do about the file itself
        if missing:
            problems["database"] = missing
        else:
            try:
                store.ping()
                notifier.start()
            except Unavailable as exc:
                problems["database"] = str(exc)
            else:
                watcher = notifier.health()
                if watcher:
                    problems["watcher"] = watcher
        if notifier.closed:
            problems["process"] = "shutting down"
        if problems:
            return errors.envelope(503, "not ready", "Not ready to serve: " + "; ".join(
                f"{part}: {why}" for part, why in problems.items()), headers={"Retry-After": "1"},
                checks=problems)
        return {"status": "ready", "epoch": store.epoch}

    @app.get("/")
    def page():
        """Serve the demo: an editor and a viewer of one slug."""
        query = page_schema.load(request.args)
        html = render_template("index.html", slug=query["slug"], transport=query["transport"],
                               transports=TRANSPORTS)
        return html, PAGE_HEADERS

    return app


def open_store(config: Mapping[str, Any]) -> tuple[Store, Notifier]:
    """The store and notifier the settings ask for: PostgreSQL with its URL, else the SQLite file.

    Nothing above these two objects knows which engine runs (stores/engines.py does).
    """
    return open_engine(config)


def register_cli(app, store):
    """`flask delete-page SLUG`: the supported way to delete a page from a shell (never SQL: see schema.sql)."""
    import click

    @app.cli.command("delete-page")
    @click.argument("slug")
    @click.option("--base-version", type=int, default=None,
                  help="delete only if the page is still at this version")
    def delete_page(slug, base_version):
        """Delete page SLUG: subscribers are told it is gone; a later save re-creates it, one version up."""
        from changefeed.core.outcomes import Conflict, NoSuchPage, NotStored, OutcomeUnknown

        try:
            item = DeleteSchema().load({"slug": slug, "base_version": base_version})
            deleted = store.delete(item["slug"], item["base_version"])
        except ValidationError as exc:
            raise click.ClickException(f"{exc.messages}") from None
        except NoSuchPage as exc:
            raise click.ClickException(f"no page {slug!r} to delete"
                                       + (f" (deleted already at version {exc.version})" if exc.version else ""))
        except Conflict as exc:
            raise click.ClickException(f"{slug!r} is at version {exc.version}, not {base_version}: nothing deleted")
        except (NotStored, OutcomeUnknown) as exc:
            raise click.ClickException(f"not deleted: {exc}") from None
        click.echo(f"{deleted.slug}: deleted at version {deleted.version} (epoch {deleted.epoch})")


SAVE_EXAMPLE = '{"slug": "home", "html": "<h1>Hi</h1>", "data": {}}'
DELETE_EXAMPLE = '{"slug": "home"}'
PRESENCE_EXAMPLE = '{"slug": "home", "client_id": "tab-5f0c2a9e", "name": "Ada", "state": "viewing"}'


def load_body(schema, form_schema, example=SAVE_EXAMPLE):
    """Validate a write's body, sent as JSON or as form fields (curl -d), with the schema for that form."""
    if request.mimetype == "application/json":
        return schema.load(json_body(example))
    if request.mimetype in FORM_TYPES:
        return form_schema.load(request.form.to_dict())
    raise ApiError(
        415, "unsupported media type",
        f"Send the body as application/json or as form fields "
        f"(application/x-www-form-urlencoded, multipart/form-data), "
        f"not {request.mimetype or 'without a Content-Type'}.",
    )


def json_body(example=SAVE_EXAMPLE):
    """Parse the request body as a JSON object, or raise a 400 that says why not."""
    raw = request.get_data(cache=False)
    if not raw.strip():
        raise ApiError(400, "empty body", f"The body is empty; send a JSON object such as {example}.")
    try:
        body = json.loads(raw, parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "malformed json", f"The body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise ValidationError({"_schema": [
            f"The body must be a JSON object such as {example}, not {JSON_TYPES[type(body)]}."
        ]})
    return body

