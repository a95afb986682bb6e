"""The do-nothing baseline: a Flask route returning the bytes of an unchanged poll.

Served with the same gunicorn.conf.py as the service, it is the ceiling of
Flask + gunicorn + gevent on this machine; the bench reports our unchanged
poll as a fraction of it. Only the bench uses it; the service never ships it.
"""

import os
import sqlite3

from flask import Flask, Response


def create_app():
    app = Flask(__name__)
    # The same bytes as the service's answer, epoch included: read once here, never per request.
    epoch = sqlite3.connect(os.environ["CHANGEFEED_DB"]).execute("SELECT value FROM epoch").fetchone()[0]
    body = f'{{"changed":false,"version":1,"epoch":"{epoch}"}}'.encode()

    @app.get("/changes")
    def changes():
        return Response(body, mimetype="application/json",
                        headers={"ETag": '"1.0.2026-01-01T00:00:00.000Z"', "Cache-Control": "no-cache"})

    return app
