"""What the API accepts: one marshmallow schema per input.

Every rule about an input lives here, so a bad request is refused by the
schema with a message naming the field, before any view or store sees it.
"""

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, TypedDict

from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    missing,
    post_load,
    pre_load,
    validate,
    validates_schema,
)
from marshmallow.types import UnknownOption

from changefeed.core import feed

MAX_INTEGER = 2**63 - 1  # SQLite's and PostgreSQL's largest INTEGER/BIGINT
MAX_WAIT_S = 60
FEED_LIMIT, MAX_FEED_LIMIT = 100, 1_000  # pages in one /feed answer: by default, at most
MAX_STREAM_SLUGS = 100  # pages one /events stream may name (a prefix follows any number)
TRANSPORTS = ("poll", "longpoll", "sse", "ws")
SLUG = re.compile(r"[A-Za-z0-9-]{1,120}")
PREFIX = re.compile(r"[A-Za-z0-9-]{0,120}\Z")  # the start of a slug ("" is every slug)
# Anchored at both ends: validate.Regexp only matches at the start.
EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}\Z")  # printable ASCII, no spaces
CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{8,64}\Z")
MAX_NAME = 40
PRESENCE_FORMS = ("list", "count")
PAYLOADS = ("full", "version")
MAX_DATA_DEPTH = 64  # levels of arrays and objects in `data`: far more than a page needs, far below a stack's
# A lone (unpaired) surrogate: JSON's "\ud800" decodes to one, but it is not Unicode text, and
# encoding it as UTF-8 (to store, log or send it) fails.
SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATE_MESSAGE = "Contains an unpaired surrogate (U+D800 to U+DFFF); send valid Unicode text."


def has_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate; ASCII text (most of it) is answered without a scan."""
    return not text.isascii() and SURROGATE.search(text) is not None


def validate_slug(value: str) -> None:
    """Refuse anything but 1 to 120 ASCII letters, digits and hyphens."""
    if len(value) > 120:
        raise ValidationError(f"Must be at most 120 characters long (got {len(value)}).")
    if not SLUG.fullmatch(value):
        raise ValidationError(
            "Must be 1 to 120 characters, each an ASCII letter, digit or hyphen (a-z, 0-9, -)."
        )


class Text(fields.String):
    """A string of valid Unicode, refused before any other rule: what cannot be encoded cannot be stored or sent."""

    default_error_messages = {"surrogate": SURROGATE_MESSAGE}

    def _deserialize(self, value: object, attr: str | None, data: Mapping[str, object] | None,
                     **kwargs: object) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if has_surrogate(text):
            raise self.make_error("surrogate")
        return text


class Slug(Text):
    """A page name: letters, digits and hyphens, folded to lower case so Home is home.

    Checked as sent, then folded: lower() maps some non-ASCII letters to ASCII
    ones (U+212A KELVIN SIGN to k), which the rule must not let through.
    """

    def __init__(self, *, required: bool = False, load_default: object = missing) -> None:
        super().__init__(metadata={"pattern": f"^{SLUG.pattern}$"}, required=required, load_default=load_default)

    def _deserialize(self, value: object, attr: str | None, data: Mapping[str, object] | None,
                     **kwargs: object) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        validate_slug(text)
        return text.lower()


class Prefix(Text):
    """The start of a slug ("": every slug), folded to lower case as slugs are; checked as sent, as a Slug."""

    def __init__(self, *, required: bool = False, load_default: object = missing) -> None:
        super().__init__(metadata={"pattern": f"^{PREFIX.pattern[:-2]}$"}, required=required,
                         load_default=load_default)

    def _deserialize(self, value: object, attr: str | None, data: Mapping[str, object] | None,
                     **kwargs: object) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not PREFIX.match(text):
            raise ValidationError("Must be the start of a slug: at most 120 ASCII letters, digits and hyphens.")
        return text.lower()


class Payload(Text):
    """What a change carries: `full` (html and data too) or `version` (which version exists, without them).

    For large pages and many readers: a `version` event is a few dozen bytes,
    and the client fetches the page itself through GET /changes (`since` the
    version it holds), which nginx's micro-cache answers once a second for
    all of them (public reads): 10,000 readers of a 1 MiB page then cost one
    upstream answer, not 10 GB of events. The one definition of the
    parameter, for every transport.
    """

    def __init__(self, *, load_default: str | None = "full") -> None:
        super().__init__(load_default=load_default, validate=validate.OneOf(PAYLOADS, error=(
            "Must be full or version: full sends each change with its html and data, version only which "
            "version exists (then fetch the page from GET /changes).")))


class Count(fields.Field[int]):
    """A non-negative whole number: a JSON integer, or decimal digits in a form or query."""

    default_error_messages = {
        "invalid": f"Must be a whole number from 0 to {MAX_INTEGER}.",
    }

    def _deserialize(self, value: object, attr: str | None, data: Mapping[str, object] | None,
                     **kwargs: object) -> int:
        # Length first: int() of thousands of digits is refused by Python itself (a 500).
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INTEGER:
            raise self.make_error("invalid")
        return value


class SaveItem(TypedDict):
    """A save as SaveSchema loads it: `data` is compact JSON text by then, as it will be stored."""

    slug: str
    html: str
    data: str
    base_version: int | None


class _SaveFields(TypedDict):
    """A save as its fields load it, before check_sizes: `data` is still the parsed JSON value."""

    slug: str
    html: str
    data: object
    base_version: int | None


class SaveSchema(Schema):
    """The body of POST /save: {slug, html, data?, base_version?}; unknown fields are refused."""

    slug = Slug(required=True)
    html = Text(required=True)
    data = fields.Raw(load_default=None, allow_none=True)
    base_version = Count(load_default=None, allow_none=True)

    FIELDS = frozenset({"slug", "html", "data", "base_version"})

    def __init__(self, max_html_bytes: int, max_data_bytes: int) -> None:
        super().__init__()
        self.max_html_bytes = max_html_bytes
        self.max_data_bytes = max_data_bytes

    def load(self, data: Mapping[str, object], *, many: bool | None = None,  # type: ignore[override]
             partial: bool | None = None, unknown: UnknownOption | None = None) -> SaveItem:
        """Load a save's body (see the class): a plain one the short way, anything else through marshmallow.

        A body of known fields holding a valid slug, text html and a whole
        base_version (or none) is what nearly every save sends; marshmallow
        takes about 30 µs to load it, this about 3. The short way accepts
        only what marshmallow accepts and returns what it returns; for
        anything else, or a body check_sizes refuses, marshmallow loads it,
        so every refusal is marshmallow's own, word for word.
        """
        if many is None and partial is None and unknown is None and self._fast and type(data) is dict:
            item = self._load_plain(data)
            if item is not None:
                return item
        loaded: SaveItem = super().load(data, many=many, partial=partial, unknown=unknown)
        return loaded

    _fast = True  # SaveFormSchema has a pre_load step: always through marshmallow

    def _load_plain(self, body: dict[str, object]) -> SaveItem | None:
        """The loaded save, when the body is plain (see load); None to let marshmallow load it."""
        slug, html = body.get("slug"), body.get("html")
        base = body.get("base_version")
        if (type(slug) is not str or type(html) is not str or not body.keys() <= self.FIELDS
                or not (base is None or (type(base) is int and 0 <= base <= MAX_INTEGER))
                or len(slug) > 120 or not SLUG.fullmatch(slug) or has_surrogate(html)):
            return None
        try:
            return self.check_sizes({"slug": slug.lower(), "html": html, "data": body.get("data"),
                                     "base_version": base})
        except ValidationError:
            return None

    @post_load
    def check_sizes(self, item: _SaveFields, **kwargs: object) -> SaveItem:
        """Enforce the size limits and serialize `data` once, as it will be stored."""
        size = len(item["html"].encode())  # Text refused lone surrogates
        if "\x00" in item["html"]:  # PostgreSQL's text cannot hold it; refused on SQLite too, so both agree
            raise ValidationError({"html": ["Contains a NUL character (U+0000), which cannot be stored; remove it."]})
        if size > self.max_html_bytes:
            raise ValidationError(
                {"html": [f"Must be at most {self.max_html_bytes} bytes of UTF-8 (got {size})."]}
            )
        problem = data_problem(item["data"], MAX_DATA_DEPTH, self.max_data_bytes)
        if problem:
            raise ValidationError({"data": [problem]})
        data = json.dumps(item["data"], ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        size = len(data.encode())  # data_problem refused lone surrogates
        if size > self.max_data_bytes:
            raise ValidationError(
                {"data": [f"Must be at most {self.max_data_bytes} bytes as compact JSON (got {size})."]}
            )
        return {"slug": item["slug"], "html": item["html"], "data": data, "base_version": item["base_version"]}


class SaveFormSchema(SaveSchema):
    """POST /save sent as form fields (curl -d): `data`, when given, is JSON text."""

    _fast = False

    @pre_load
    def parse_data(self, form: Mapping[str, str], **kwargs: object) -> Mapping[str, object]:
        text = form.get("data")
        if text is None:
            return form
        try:
            return {**form, "data": json.loads(text, parse_constant=reject_constant)}
        except ValueError as exc:
            raise ValidationError({"data": [f"Must be JSON text in a form body: {exc}."]}) from None
        except RecursionError:  # nested far deeper than MAX_DATA_DEPTH: the parser itself gave up
            raise ValidationError({"data": [DEPTH_MESSAGE]}) from None


DEPTH_MESSAGE = f"Must be nested at most {MAX_DATA_DEPTH} levels deep (arrays and objects)."


def data_problem(value: object, max_depth: int, max_values: int) -> str | None:
    """What makes a parsed `data` value unfit to store and send back as JSON, or None.

    Refused: a number too large for a float (JSON's 1e400 parses as
    infinity, which JSON cannot say), a lone surrogate in a key or a
    string, nesting deeper than `max_depth`, and more than `max_values`
    values (each is at least one byte of JSON, so that many are over the
    size limit anyway, and the walk stops early). One pass, without
    recursion: a deep value must not exhaust the stack that refuses it.
    """
    pending: list[tuple[Sequence[object], int]] = [((value,), 0)]  # (values, how many arrays and objects hold them)
    seen = 0
    while pending:
        values, depth = pending.pop()
        seen += len(values)
        if seen > max_values:
            return f"Must be at most {max_values} bytes as compact JSON (it holds more than {max_values} values)."
        for item in values:
            if isinstance(item, str):
                if has_surrogate(item):
                    return SURROGATE_MESSAGE
            elif isinstance(item, float):
                if not math.isfinite(item):
                    return "Numbers must be finite: one is too large for a 64-bit float (e.g. 1e400)."
            elif isinstance(item, (dict, list)):
                if depth >= max_depth:
                    return DEPTH_MESSAGE
                if isinstance(item, dict):
                    if any(has_surrogate(key) for key in item):
                        return "A key contains an unpaired surrogate (U+D800 to U+DFFF); send valid Unicode text."
                    item = tuple(item.values())
                pending.append((item, depth + 1))
    return None


class DeleteSchema(Schema):
    """The body of POST /delete: {slug, base_version?} (JSON or form fields); unknown fields are refused."""

    slug = Slug(required=True)
    base_version = Count(load_default=None, allow_none=True)


def validate_name(value: str) -> None:
    """A display name: shown as text only, but still short and free of control characters."""
    if not value.strip():
        raise ValidationError("Must not be blank.")
    if len(value) > MAX_NAME:
        raise ValidationError(f"Must be at most {MAX_NAME} characters long (got {len(value)}).")
    if any(ch < " " or "\x7f" <= ch < "\xa0" or ch in "\u2028\u2029" for ch in value):
        raise ValidationError("Must not contain control characters or line breaks.")


class PresenceSchema(Schema):
    """A heartbeat, POST /presence or a WebSocket `presence` message: {slug, client_id, name?, state}."""

    class Meta:
        unknown = EXCLUDE  # a WebSocket message carries its `type` too

    slug = Slug(required=True)
    client_id = Text(required=True, validate=validate.Regexp(
        CLIENT_ID, error="Must be 8 to 64 letters, digits, - or _, the same for every beat of one tab "
                         "(e.g. a random UUID)."))
    name = Text(load_default=None, allow_none=True, validate=validate_name)
    state = Text(required=True, validate=validate.OneOf(
        ("viewing", "editing", "gone"), error="Must be viewing, editing or gone (the tab closed)."))


class PresenceQuery:
    """The presence parameters of a read: ?presence=V (the version held) and ?presence_form=list|count."""

    presence = Count(load_default=None, allow_none=True)
    presence_form = Text(load_default="list", validate=validate.OneOf(
        PRESENCE_FORMS, error="Must be list (who is here) or count (how many)."))


class ChangesQuerySchema(Schema):
    """The query of GET /changes: ?slug=S&since=N&wait=W[&presence=V]; unknown parameters are ignored."""

    class Meta:
        unknown = EXCLUDE

    slug = Slug(required=True)
    since = Count(load_default=0)
    epoch = Text(load_default=None, validate=validate.Regexp(
        EPOCH, error="Must be the epoch of an earlier answer (letters, digits, - and _)."))
    wait = Count(load_default=0)
    presence = PresenceQuery.presence
    presence_form = PresenceQuery.presence_form

    def __init__(self, max_wait_s: int = MAX_WAIT_S) -> None:
        super().__init__()
        self.max_wait_s = max_wait_s  # CHANGEFEED_MAX_WAIT_S
        self.fields["wait"].validators = [validate.Range(
            max=max_wait_s, error=f"Must be a whole number of seconds from 0 to {max_wait_s}.")]


class EventsQuerySchema(Schema):
    """The query of GET /events: ?slug=S&since=N[&payload=version]; unknown parameters are ignored."""

    class Meta:
        unknown = EXCLUDE

    slug = Slug(required=True)
    since = Count(load_default=0)
    epoch = Text(load_default=None, validate=validate.Regexp(
        EPOCH, error="Must be the epoch of an earlier answer (letters, digits, - and _)."))
    presence = PresenceQuery.presence
    presence_form = PresenceQuery.presence_form
    payload = Payload()


class Cursor(fields.Field[tuple[str | None, tuple[int, str]]]):
    """A feed cursor from an earlier answer's `next` (or an event's id), or 0 for the beginning: (epoch, position)."""

    default_error_messages = {
        "invalid": "Must be 0 (from the beginning) or the `next` of an earlier /feed answer, as it was sent.",
    }

    def _deserialize(self, value: object, attr: str | None, data: Mapping[str, object] | None,
                     **kwargs: object) -> tuple[str | None, tuple[int, str]]:
        try:
            return feed.decode(value if isinstance(value, str) else "")
        except ValueError:
            raise self.make_error("invalid") from None


class SlugList(fields.List):
    """?slug=a&slug=b...: the pages a feed follows (GET /feed, /events), at most MAX_STREAM_SLUGS.

    A bad slug is reported as every field's errors are, a list of reasons
    (marshmallow's own would be an object keyed by the slug's index), each
    naming the slug by its place: never echoed, it may not even encode.
    """

    def __init__(self) -> None:
        super().__init__(Slug(), load_default=None, validate=validate.Length(
            max=MAX_STREAM_SLUGS, error=f"Must name at most {MAX_STREAM_SLUGS} pages; follow a prefix for more."))

    def _deserialize(self, value: object, attr: str | None, data: Mapping[str, object] | None,
                     **kwargs: object) -> list[Any | None]:
        try:
            return super()._deserialize(value, attr, data, **kwargs)
        except ValidationError as exc:
            if not isinstance(exc.messages, dict):
                raise
            raise ValidationError([f"Slug {index + 1} of the list: {reason}"
                                   for index, reasons in sorted(exc.messages.items()) for reason in reasons]) from None


class FeedQuerySchema(Schema):
    """The query of GET /feed: ?since=C&prefix=P (or &slug=a&slug=b...)&limit=N&wait=W&payload=version|full.

    `include=content` is the older spelling of `payload=full`; unknown parameters are ignored.
    """

    class Meta:
        unknown = EXCLUDE

    since = Cursor(load_default=(None, feed.START))
    prefix = Prefix(load_default=None)
    slug = SlugList()
    limit = Count(load_default=FEED_LIMIT, validate=validate.Range(
        min=1, max=MAX_FEED_LIMIT, error=f"Must be a whole number from 1 to {MAX_FEED_LIMIT}."))
    wait = Count(load_default=0)
    include = Text(load_default=None, validate=validate.OneOf(
        ("content",), error="Must be content (each page's html and data with it), or left out."))
    payload = Payload(load_default=None)  # left out: `version`, unless include=content

    def __init__(self, max_wait_s: int = MAX_WAIT_S) -> None:
        super().__init__()
        self.fields["wait"].validators = [validate.Range(
            max=max_wait_s, error=f"Must be a whole number of seconds from 0 to {max_wait_s}.")]

    @validates_schema
    def one_way_each(self, query: Mapping[str, object], **kwargs: object) -> None:
        """Refuse two answers to one question: which pages (prefix or slugs), and whether with content."""
        _pages_named_once(query)
        if query["payload"] == "version" and query["include"] == "content":
            raise ValidationError({"payload": [
                "Contradicts include=content: pick one (payload=full is include=content)."]})


class FeedEventsQuerySchema(Schema):
    """The query of GET /events following many pages: ?prefix=P or ?slug=a&slug=b..., ?since=C (a cursor), ?payload=."""

    class Meta:
        unknown = EXCLUDE

    slug = SlugList()
    prefix = Prefix(load_default=None)
    since = Cursor(load_default=(None, feed.START))
    last_event_id = Cursor(data_key="Last-Event-ID", load_default=None)
    presence = Text(load_default=None, validate=lambda _: _refuse(
        "Presence follows one page: open a stream of that slug alone (or use /ws) to see who is on it."))
    payload = Payload()

    @validates_schema
    def pages_named_once(self, query: Mapping[str, object], **kwargs: object) -> None:
        _pages_named_once(query)


def _pages_named_once(query: Mapping[str, object]) -> None:
    """A feed follows a prefix or a list of slugs, never both: say which to drop."""
    if query["slug"] is not None and query["prefix"] is not None:
        raise ValidationError({"slug": ["Name the pages by `slug` or by `prefix`: use one or the other."]})


class LastEvent(TypedDict):
    """A Last-Event-ID as LastEventId loads it: the epoch it names (None for a bare version), and the version."""

    epoch: str | None
    since: int


class LastEventId(fields.Field[LastEvent]):
    """The id of the last event a reconnecting EventSource got: `<epoch>:<version>`, or a bare version."""

    default_error_messages = {
        "invalid": "Must be the id of an event of this stream: <epoch>:<version>, or a version alone.",
    }

    def _deserialize(self, value: object, attr: str | None, data: Mapping[str, object] | None,
                     **kwargs: object) -> LastEvent:
        if isinstance(value, str) and has_surrogate(value):
            raise ValidationError(SURROGATE_MESSAGE)
        epoch, _, version = value.rpartition(":") if isinstance(value, str) else ("", "", value)
        if epoch and not EPOCH.fullmatch(epoch):
            raise self.make_error("invalid")
        try:
            return {"epoch": epoch or None, "since": Count()._deserialize(version, attr, data)}
        except ValidationError:
            raise self.make_error("invalid") from None


class LastEventIdSchema(Schema):
    """The Last-Event-ID header a reconnecting EventSource sends."""

    last_event_id = LastEventId(data_key="Last-Event-ID", load_default=None)


class IdempotencyKeySchema(Schema):
    """The Idempotency-Key header of POST /save: a client-chosen unique key, quoted or not."""

    key = Text(data_key="Idempotency-Key", load_default=None, validate=validate.Regexp(
        IDEMPOTENCY_KEY, error="Must be 1 to 255 printable ASCII characters without spaces, "
                               'unique per save, e.g. a UUID ("8e03978e-40d5-43e8-bc93-6894a57f9324").'))

    @pre_load
    def unquote(self, headers: Mapping[str, str | None], **kwargs: object) -> Mapping[str, str | None]:
        """Accept the draft's structured-field string ("...") as well as a bare token."""
        key = headers.get("Idempotency-Key")
        if key is not None and len(key) >= 2 and key[0] == key[-1] == '"':
            return {"Idempotency-Key": key[1:-1]}
        return headers


def _transport(default: str) -> Text:
    """A demo page's ?transport=: how its script follows the pages (static/changefeed.js)."""
    return Text(load_default=default, validate=validate.OneOf(TRANSPORTS, error=f"Must be one of {', '.join(TRANSPORTS)}."))


class PageQuerySchema(Schema):
    """The query of the demo page: ?slug=S (`demo` when absent) and ?transport=."""

    class Meta:
        unknown = EXCLUDE

    slug = Slug(load_default="demo")
    transport = _transport("poll")


class DashboardQuerySchema(Schema):
    """The query of the dashboard: ?prefix=P (every page when absent) and ?transport= (`ws` when absent)."""

    class Meta:
        unknown = EXCLUDE

    prefix = Prefix(load_default="")
    transport = _transport("ws")  # presence comes on the one socket too


def _refuse(message: str) -> NoReturn:
    """A validator's answer to a parameter that has no meaning here."""
    raise ValidationError(message)


def reject_constant(name: str) -> NoReturn:
    """Refuse NaN and Infinity, which Python reads but JSON does not allow."""
    raise ValueError(f"{name} is not valid JSON")
