"""The /ws protocol's words (docs/api.md): what a client may send, the frames and close codes it gets back.

The schemas validate each client message (marshmallow, as every HTTP input
is); the frames are built here as compact JSON text. How a socket is served
lives in transports/websocket.py.
"""

import json
import math
from collections.abc import Mapping
from typing import Any

from marshmallow import EXCLUDE, Schema, fields, validate

from changefeed.core.feed import START
from changefeed.core.schemas import (
    EPOCH,
    MAX_INTEGER,
    Count,
    Cursor,
    Payload,
    Prefix,
    PresenceQuery,
    Slug,
    Text,
    has_surrogate,
)

# Close codes (RFC 6455 7.4; 4001 is ours).
GOING_AWAY, POLICY_VIOLATION, MESSAGE_TOO_BIG, SERVICE_RESTART, TRY_AGAIN_LATER, TOKEN_EXPIRED = (
    1001, 1008, 1009, 1012, 1013, 4001)
PING_TIMEOUT = "Ping/Pong timeout"  # simple-websocket's words when a peer missed a ping
PING_TIMEOUT_REASON = "no answer to the last ping: reconnect"
EXPIRED_REASON = "token expired: reconnect with a fresh token"
RESTART_REASON = "server restarting: reconnect"
SLOW_REASON = "too slow: frames were not read in time"

TYPES = ("subscribe", "unsubscribe", "presence", "ping")
JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}


class SubscribeSchema(Schema):
    """{"type": "subscribe", "slug", "since"?, "epoch"?, "presence"?, "presence_form"?, "payload"?}."""

    class Meta:
        unknown = EXCLUDE  # its `type`

    slug = Slug(required=True)
    since = Count(load_default=0)
    epoch = Text(load_default=None, allow_none=True, validate=validate.Regexp(
        EPOCH, error="Must be the epoch of an earlier answer (letters, digits, - and _)."))
    presence = PresenceQuery.presence
    presence_form = PresenceQuery.presence_form
    payload = Payload()


class FeedSubscribeSchema(Schema):
    """{"type": "subscribe", "prefix", "since"?, "payload"?}: every page under `prefix`, after the cursor."""

    class Meta:
        unknown = EXCLUDE

    prefix = Prefix(required=True)
    since = Cursor(load_default=(None, START))
    payload = Payload()


class UnsubscribeSchema(Schema):
    """{"type": "unsubscribe", "slug"} or {"type": "unsubscribe", "prefix"}."""

    class Meta:
        unknown = EXCLUDE

    slug = Slug()
    prefix = Prefix()


MAX_PING_ID = 100  # characters


class PingId(fields.Field):
    """A ping's `id`, echoed in the pong: only what is sure to go out again as JSON text.

    null, a whole number up to 2**63 - 1 either way, a finite number, or a
    string of at most MAX_PING_ID characters of valid Unicode. Anything else
    (a lone surrogate, Infinity from 1e400, a deep or huge value) could fail
    to encode in the pong, and so is refused here.
    """

    default_error_messages = {
        "invalid": f"Must be null, a finite number, or a string of at most {MAX_PING_ID} characters of valid "
                   "Unicode; the pong echoes it.",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any) -> Any:
        if isinstance(value, str) and len(value) <= MAX_PING_ID and not has_surrogate(value):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INTEGER:
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise self.make_error("invalid")


class PingSchema(Schema):
    """{"type": "ping", "id"?}."""

    class Meta:
        unknown = EXCLUDE

    id = PingId(load_default=None, allow_none=True)


def close_reason(text: str) -> str:
    """A close reason: at most 123 bytes of UTF-8 (RFC 6455), cut at a character."""
    return text.encode()[:123].decode(errors="ignore")


def text_frame(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields}, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def error_frame(error: str, message: str, **details: Any) -> str:
    """An `error` frame; `details` of an ApiError (limit, retry_after_ms, ...) ride along, its headers do not."""
    details.pop("headers", None)
    return text_frame("error", error=error, message=message, **details)
