"""The Flask class of the standalone service (app.py): strict bodies, strict JSON, JSON OPTIONS answers.

A host app that embeds the service (changefeed/extension.py) keeps its own
Flask class: the service's write views read their bodies strictly all the
same (bodies.strict), and its answers go out through the host's JSON.
"""

from typing import Any, cast

from flask import Flask, Response
from flask.json.provider import DefaultJSONProvider

from . import bodies


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's JSON, refusing NaN and Infinity: they are not JSON, and a client's parser would fail on the answer.

    An answer that would hold one fails on the server (a logged 500) instead.
    """

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)


class App(Flask):
    """Flask, reading bodies with bodies.Request, writing strict JSON, and answering its automatic OPTIONS in JSON."""

    request_class = bodies.Request  # a chunked body past MAX_CONTENT_LENGTH is a 413, not cut short
    json_provider_class = StrictJSONProvider

    def make_default_options_response(self) -> Response:
        """200 {"allow": [...]} with the Allow header (Flask's own is an empty text/html body).

        A CORS preflight is this answer too, with flask-cors's headers added.
        """
        allowed = sorted(super().make_default_options_response().allow)
        response = cast(Response, self.json.response({"allow": allowed}))
        response.allow.update(allowed)
        return response
