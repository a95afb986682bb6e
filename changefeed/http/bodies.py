"""Request bodies: read whole and as sent, or refused with a reason; never cut short or altered.

werkzeug, which Flask reads bodies with, is lenient twice where this API
must not be:

- It caps a body of no stated length (`Transfer-Encoding: chunked`, which a
  server marks with `wsgi.input_terminated`) at MAX_CONTENT_LENGTH by reading
  up to it and stopping there: what it read is handed on as if it were the
  whole body. A JSON body past the limit then got `400 malformed json`, and
  one whose end was only padding (or a form, whose end was simply lost) was
  saved. Here such a body is a 413, as it is with a `Content-Length` over
  the limit.
- It alters a form field that is not UTF-8 instead of refusing it: `%FF`
  stays the text "%FF" (urlencoded), a raw byte becomes U+FFFD (multipart),
  and a raw byte in an urlencoded body empties the whole form. Here each
  such field is a 422 naming it, as a JSON body that is not UTF-8 is a 400.
"""

import json
from collections.abc import Iterable
from typing import IO, Any
from urllib.parse import parse_qsl

from flask import Request as FlaskRequest
from flask import request
from marshmallow import Schema, ValidationError
from werkzeug.datastructures import Headers, MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser, MultiPartParser
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream

from changefeed.core.errors import ApiError
from changefeed.core.schemas import reject_constant

JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
SAVE_EXAMPLE = '{"slug": "home", "html": "<h1>Hi</h1>", "data": {}}'
DELETE_EXAMPLE = '{"slug": "home"}'
PRESENCE_EXAMPLE = '{"slug": "home", "client_id": "tab-5f0c2a9e", "name": "Ada", "state": "viewing"}'

NOT_UTF8 = "Is not UTF-8 (once percent-decoded, its bytes are not valid UTF-8): send the form's text as UTF-8."


class CappedStream(LimitedStream):
    """A body read up to `limit` bytes: a 413 once it goes on past them, however much is read at once."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        super().__init__(stream, limit, is_max=True)
        self._body = stream

    def on_exhausted(self) -> None:
        # werkzeug's refuses any read at the limit, even when the body ends there: look.
        if self._body.read(1):
            raise RequestEntityTooLarge()

    def readall(self) -> bytes:
        data = super().readall()  # werkzeug's stops at the limit without a word (get_data, forms)
        if self.is_exhausted:
            self.on_exhausted()
        return data


def utf8_fields(pairs: Iterable[tuple[str, str]], cls: type[MultiDict[str, str]]) -> MultiDict[str, str]:
    """The (name, value) `pairs` read one character per byte (latin-1), as UTF-8 text: or a 422 naming each
    field that is not UTF-8 (marshmallow's ValidationError: werkzeug's parser swallows a ValueError)."""
    fields, bad = [], {}
    for name, value in pairs:
        name = name.encode("latin-1").decode(errors="replace")
        try:
            fields.append((name, value.encode("latin-1").decode()))
        except UnicodeDecodeError:
            bad[name] = [NOT_UTF8]
    if bad:
        raise ValidationError(bad)
    return cls(fields)


class BytesAsSent(MultiPartParser):
    """werkzeug's multipart parser, each field's bytes kept as they came, one character each (latin-1)."""

    def get_part_charset(self, headers: Headers) -> str:
        return "latin-1"  # not UTF-8 with errors replaced: utf8_fields decodes them, strictly


class FormParser(FormDataParser):
    """werkzeug's form parser, but every field UTF-8 or refused (utf8_fields); a part's own charset is ignored."""

    def _parse_urlencoded(self, stream: IO[bytes], mimetype: str, content_length: int | None,
                          options: dict[str, str]) -> Any:
        pairs = parse_qsl(stream.read().decode("latin-1"), keep_blank_values=True, encoding="latin-1")
        return stream, utf8_fields(pairs, self.cls), self.cls()

    def _parse_multipart(self, stream: IO[bytes], mimetype: str, content_length: int | None,
                         options: dict[str, str]) -> Any:
        boundary = options.get("boundary", "").encode("ascii")
        if not boundary:
            raise ValueError("Missing boundary")
        parser = BytesAsSent(stream_factory=self.stream_factory, max_form_memory_size=self.max_form_memory_size,
                             max_form_parts=self.max_form_parts, cls=self.cls)
        form, files = parser.parse(stream, boundary, content_length)
        return stream, utf8_fields(form.items(multi=True), self.cls), files


class Request(FlaskRequest):
    """Flask's request, whose body past the limit is refused however it is sent, and whose form is UTF-8."""

    form_data_parser_class = FormParser

    @cached_property
    def stream(self) -> IO[bytes]:
        stream = super().stream  # werkzeug's: a 413 for a Content-Length over the limit, else a capped stream
        if isinstance(stream, LimitedStream) and "wsgi.input_terminated" in self.environ:
            return CappedStream(self.environ["wsgi.input"], stream.limit)  # type: ignore[return-value]
        return stream


def strict(limit: int) -> Request:
    """This request, its body read as above and capped at `limit` bytes, whatever the app's request class.

    Under the standalone app every request is a bodies.Request already. Under a
    host app (the extension) the host's own views keep the host's request
    class; the service's write views read their body through a bodies.Request
    over the same environ instead (nothing has read the body before them).
    """
    current = request._get_current_object()  # type: ignore[attr-defined]  # werkzeug's LocalProxy
    current.max_content_length = limit  # also what the 413 message names
    if isinstance(current, Request):
        return current
    own = Request(current.environ)
    own.max_content_length = limit
    return own


def load_body(schema: Schema, form_schema: Schema, limit: int, example: str = SAVE_EXAMPLE) -> dict[str, Any]:
    """Validate a write's body, sent as JSON or as form fields (curl -d), with the schema for that form."""
    body = strict(limit)
    if body.mimetype == "application/json":
        loaded: dict[str, Any] = schema.load(json_object(body, example))
        return loaded
    if body.mimetype in FORM_TYPES:
        loaded = form_schema.load(body.form.to_dict())
        return loaded
    raise ApiError(
        415, "unsupported media type",
        f"Send the body as application/json or as form fields "
        f"(application/x-www-form-urlencoded, multipart/form-data), "
        f"not {body.mimetype or 'without a Content-Type'}.",
    )


def json_body(limit: int, example: str = SAVE_EXAMPLE) -> dict[str, Any]:
    """Parse the request body as a JSON object, whatever its content type, or raise a 400 that says why not."""
    return json_object(strict(limit), example)


def json_object(body: FlaskRequest, example: str) -> dict[str, Any]:
    """The JSON object `body` holds, or a 400 (or 422) that says why not."""
    raw = body.get_data(cache=False)
    if not raw.strip():
        raise ApiError(400, "empty body", f"The body is empty; send a JSON object such as {example}.")
    try:
        parsed = json.loads(raw, parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "malformed json", f"The body is not valid JSON: {exc}.") from None
    if not isinstance(parsed, dict):
        raise ValidationError({"_schema": [
            f"The body must be a JSON object such as {example}, not {JSON_TYPES[type(parsed)]}."
        ]})
    return parsed
