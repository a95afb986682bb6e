"""The do-nothing baseline: a Flask route returning the bytes of an unchanged poll.

Served with the same gunicorn.conf.py as the service, it is the ceiling of
Flask + gunicorn + gevent on this machine; the bench reports our unchanged
poll as a fraction of it. Only the bench uses it; the service never ships it.
"""

from flask import Flask, Response

BODY = b'{"changed":false,"version":1}'


def create_app():
    app = Flask(__name__)

    @app.get("/changes")
    def changes():
        return Response(BODY, mimetype="application/json",
                        headers={"ETag": '"1.0.2026-01-01T00:00:00.000Z"', "Cache-Control": "no-cache"})

    return app
