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

from urllib.parse import parse_qsl

from flask import Request as FlaskRequest
from marshmallow import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser, MultiPartParser
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream

NOT_UTF8 = "Is not UTF-8 (once percent-decoded, its bytes are not valid UTF-8): send the form's text as UTF-8."


class CappedStream(LimitedStream):
    """A body read up to `limit` bytes: a 413 once it goes on past them, however much is read at once."""

    def __init__(self, stream, limit):
        super().__init__(stream, limit, is_max=True)
        self._body = stream

    def on_exhausted(self):
        # werkzeug's refuses any read at the limit, even when the body ends there: look.
        if self._body.read(1):
            raise RequestEntityTooLarge()

    def readall(self):
        data = super().readall()  # werkzeug's stops at the limit without a word (get_data, forms)
        if self.is_exhausted:
            self.on_exhausted()
        return data


def utf8_fields(pairs, cls):
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

    def get_part_charset(self, headers):
        return "latin-1"  # not UTF-8 with errors replaced: utf8_fields decodes them, strictly


class FormParser(FormDataParser):
    """werkzeug's form parser, but every field UTF-8 or refused (utf8_fields); a part's own charset is ignored."""

    def _parse_urlencoded(self, stream, mimetype, content_length, options):
        pairs = parse_qsl(stream.read().decode("latin-1"), keep_blank_values=True, encoding="latin-1")
        return stream, utf8_fields(pairs, self.cls), self.cls()

    def _parse_multipart(self, stream, mimetype, content_length, options):
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
    def stream(self):
        stream = super().stream  # werkzeug's: a 413 for a Content-Length over the limit, else a capped stream
        if isinstance(stream, LimitedStream) and "wsgi.input_terminated" in self.environ:
            return CappedStream(self.environ["wsgi.input"], stream.limit)
        return stream
