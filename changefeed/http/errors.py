"""One JSON error shape for every failure: {"error", "message", ...details, "request_id"}.

`error` is a short stable phrase a program can test; `message` tells a person
what went wrong and what to do. Every 4xx and 5xx the service sends, including
werkzeug's own 404/405/413 and unexpected exceptions, goes through `envelope`.
`request_id` (also the `X-Request-Id` header) is what to quote in a bug
report: the server's log lines about the request carry it.
"""

from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException, SecurityError

from changefeed.core.errors import ApiError, ShuttingDown
from changefeed.core.outcomes import (
    Busy,
    Conflict,
    KeyReused,
    NoSuchPage,
    NotStored,
    OutcomeUnknown,
    StorageFull,
    Unavailable,
)
from changefeed.ops import logs


def envelope(status: int, error: str, message: str, headers: dict[str, str] | None = None,
             **details: Any) -> Response:
    """Build the JSON error response every failure uses."""
    rid = logs.request_id()
    response = jsonify({"error": error, "message": message, **details, "request_id": rid})
    response.status_code = status
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Request-Id"] = rid
    response.headers.update(headers or {})
    return response


def _http_message(exc: Any) -> str:
    """Say in plain words what a werkzeug HTTP error means for this API."""
    if exc.code == 404:
        return (f"No such endpoint: {request.method} {request.path}. The API is "
                "POST /save and GET /changes?slug=...&since=...")
    if exc.code == 405:
        allowed = ", ".join(sorted(m for m in exc.valid_methods or () if m not in ("HEAD", "OPTIONS")))
        return f"{request.method} is not allowed on {request.path}; use {allowed}."
    if exc.code == 413:
        return f"The request body is larger than {request.max_content_length} bytes."
    return str(exc.description)


def register(app: Flask | Blueprint) -> None:
    """Route every error the app (or the blueprint's views) can meet to the envelope."""

    @app.errorhandler(ApiError)
    def api_error(exc: Any) -> Response:
        return envelope(exc.status, exc.error, exc.message, **exc.details)

    @app.errorhandler(ValidationError)
    def invalid(exc: Any) -> Response:
        return envelope(422, "invalid request",
                        "Fix the fields listed in `fields` and send the request again.",
                        fields=exc.messages)

    @app.errorhandler(Conflict)
    def conflict(exc: Any) -> Response:
        return envelope(
            409, "conflict",
            f"This page was saved by someone else: it is now at version {exc.version}. "
            f"Load that version, or save again with base_version {exc.version} to overwrite it.",
            version=exc.version,
        )

    @app.errorhandler(NoSuchPage)
    def no_such_page(exc: Any) -> Response:
        if exc.version:
            message = (f"This page is deleted already (its tombstone is version {exc.version}); "
                       "there is nothing to delete.")
        else:
            message = "No page has this slug (it was never saved); there is nothing to delete."
        return envelope(404, "not found", message, version=exc.version)

    @app.errorhandler(KeyReused)
    def key_reused(exc: Any) -> Response:
        return envelope(422, "invalid request",
                        "This Idempotency-Key was first used for a different save: "
                        "send a new key with each new save, and the same key only to retry.",
                        fields={"Idempotency-Key": [
                            "Was already used for a different save; send a new key for a new save."]})

    @app.errorhandler(Busy)
    def busy(exc: Any) -> Response:
        return envelope(503, "busy", "The database is busy with other saves; this save was not stored. "
                        "Retry in a moment.", headers={"Retry-After": "1"})

    @app.errorhandler(NotStored)
    def not_stored(exc: Any) -> Response:
        return envelope(503, "not saved", f"This save was not stored: {exc.reason}. "
                        "Nothing was written; retry once the cause is fixed.", headers={"Retry-After": "5"})

    @app.errorhandler(StorageFull)
    def storage_full(exc: Any) -> Response:
        field = "slug" if exc.limit == "pages" else "html"
        return envelope(507, "storage full",
                        f"This save was not stored: {exc.reason}. Pages already stored can still be "
                        "saved at their size or smaller; to add more, delete pages or raise the limit.",
                        limit=exc.limit, fields={field: [exc.reason]})

    @app.errorhandler(OutcomeUnknown)
    def outcome_unknown(exc: Any) -> Response:
        current_app.logger.warning("save outcome unknown: %s request_id=%s", exc, logs.request_id())
        return envelope(503, "outcome unknown",
                        "This save may or may not have been stored. Retry it with the same "
                        "Idempotency-Key (it is then stored exactly once), or read GET /changes "
                        "to see whether it is there.", headers={"Retry-After": "1"})

    @app.errorhandler(Unavailable)
    def unavailable(exc: Any) -> Response:
        return envelope(503, "unavailable", f"The database cannot be read right now ({exc}). "
                        "Retry in a moment.", headers={"Retry-After": "5"})

    @app.errorhandler(ShuttingDown)
    def shutting_down(exc: Any) -> Response:
        return envelope(503, "shutting down", "This server process is restarting; "
                        "ask again in a second (a new connection reaches another one).",
                        headers={"Retry-After": "1", "Connection": "close"})

    @app.errorhandler(SecurityError)
    def untrusted_host(exc: Any) -> Response:
        host = request.environ.get("HTTP_HOST", "")
        return envelope(400, "untrusted host",
                        f"This server does not answer to the host name {host!r} (a DNS rebinding attack "
                        "would look like this). If it is this server's name, add it to CHANGEFEED_TRUSTED_HOSTS.")

    @app.errorhandler(HTTPException)
    def http_error(exc: Any) -> Response:
        headers = {"Allow": ", ".join(exc.valid_methods)} if exc.code == 405 else None
        if exc.code == 408:  # the rest of the body is not read: the connection cannot carry another request
            headers = {"Connection": "close"}
        return envelope(exc.code, exc.name.lower(), _http_message(exc), headers=headers)

    @app.errorhandler(Exception)
    def unexpected(exc: Any) -> Response:
        # The one traceback of this request (Flask does not log an error a handler answered;
        # gunicorn never sees it), with the id the 500 answer carries too.
        current_app.logger.exception("unexpected error on %s %r request_id=%s", request.method, request.path,
                             logs.request_id())  # %r: a path cannot forge a log line
        return envelope(500, "internal error",
                        "The server failed to answer this request; the error is logged. Try again.")
