"""A Flask app of its own that embeds changefeed under /feed, as any host app would.

    CHANGEFEED_DB=host.db flask --app examples/host.py run        # then open http://127.0.0.1:5000/feed/
    gunicorn -c gunicorn.conf.py 'examples.host:create_app()'     # in production, as the service itself

The host's routes stay its own; the feed's answer under /feed only, and its
settings are the host's app.config CHANGEFEED_* keys (the defaults otherwise).
The host saves pages from its own code with `feed.save()` (here: POST
/publish/<slug>), and every tab following that page hears of it at once.
"""

import os

from flask import Flask, request

from changefeed import Changefeed


def create_app() -> Flask:
    """The host: its own home page, and the feed under /feed, its database created or upgraded at start."""
    app = Flask(__name__)
    app.config["CHANGEFEED_DB"] = os.environ.get("CHANGEFEED_DB", "host.db")
    feed = Changefeed(app, url_prefix="/feed")
    feed.migrate()

    @app.get("/")
    def home() -> str:
        """The host's own page, which links to the demo of the embedded feed."""
        return '<p>The host app. Its change feed: <a href="/feed/?slug=home">/feed/</a></p>'

    @app.post("/publish/<slug>")
    def publish(slug: str) -> dict[str, object]:
        """Save a page from the host's own code: the feed's subscribers hear of it as of any save."""
        version = feed.save(slug, request.form.get("html", ""), {"published_by": "host"})
        return {"slug": slug, "version": version}

    return app
