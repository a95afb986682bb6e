"""Request bodies: read whole, or refused with a reason; never cut short.

werkzeug, which Flask reads bodies with, caps a body of no stated length
(`Transfer-Encoding: chunked`, which a server marks with
`wsgi.input_terminated`) at MAX_CONTENT_LENGTH by reading up to it and
stopping there: what it read is handed on as if it were the whole body. A
JSON body past the limit then got `400 malformed json`, and one whose end was
only padding (or a form, whose end was simply lost) was saved. Here such a
body is a 413, as it is with a `Content-Length` over the limit.
"""

from flask import Request as FlaskRequest
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream


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


class Request(FlaskRequest):
    """Flask's request, whose body past the limit is refused however it is sent."""

    @cached_property
    def stream(self):
        stream = super().stream  # werkzeug's: a 413 for a Content-Length over the limit, else a capped stream
        if isinstance(stream, LimitedStream) and "wsgi.input_terminated" in self.environ:
            return CappedStream(self.environ["wsgi.input"], stream.limit)
        return stream
