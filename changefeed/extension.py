"""The service as a Flask extension: the way the standalone app (app.py) runs it, and any host app embeds it.

    from changefeed import Changefeed
    feed = Changefeed(app, url_prefix="/feed")   # or Changefeed(), then feed.init_app(app, url_prefix="/feed")
    feed.migrate()                               # create or upgrade its database (also: flask changefeed migrate)
    feed.save("home", "<h1>Hi</h1>", {"title": "Hi"})   # the saved version; subscribers hear of it

Its settings are the app's CHANGEFEED_* keys (changefeed/core/settings.py's
defaults for those missing). Every endpoint, the demo page and its static
files answer under the prefix, and nothing outside it; the read cookie's
path is the prefix. What is left to the host: its Flask class (the
service's write views read their bodies strictly all the same; answers use
the host's JSON provider), its logging (ops/logs.py configures the
standalone app's), its MAX_CONTENT_LENGTH and TRUSTED_HOSTS. Errors of the
service's own views answer in the service's JSON shape; an unknown path
under the prefix is the host's 404. One Changefeed per app.
"""

import re
import threading
from pathlib import Path
from typing import Any

from flask import Flask, current_app, has_app_context, has_request_context
from flask_cors import CORS

from changefeed.core import settings
from changefeed.ops import logs, metrics
from changefeed.security.origins import parse_origins
from changefeed.stores.engines import open_engine

from .http import cli, demo, health, openapi, service, ws
from .http.services import KEY, OPENER, Services

# What a page of an allowed origin may send, and read of the answers.
CORS_REQUEST_HEADERS = ["Content-Type", "Idempotency-Key", "Authorization", "If-None-Match", "Last-Event-ID"]
CORS_RESPONSE_HEADERS = ["ETag", "Retry-After", "Idempotent-Replayed"]


class Changefeed:
    """The change feed of one Flask app: its blueprints under a prefix, its store and notifier, its commands."""

    def __init__(self, app: Flask | None = None, url_prefix: str = "") -> None:
        self.app: Flask | None = None
        self.url_prefix = url_prefix
        if app is not None:
            self.init_app(app, url_prefix)

    def init_app(self, app: Flask, url_prefix: str | None = None) -> None:
        """Serve the service on `app` under `url_prefix`; its store and notifier open on first use (or open())."""
        prefix = _prefix(self.url_prefix if url_prefix is None else url_prefix)
        for name, default in settings.DEFAULTS.items():
            app.config.setdefault(name, default)
        config = app.config
        if config["CHANGEFEED_METRICS"] not in metrics.ACCESS:
            raise SystemExit(f"CHANGEFEED_METRICS must be one of {', '.join(metrics.ACCESS)}, "
                             f"got {config['CHANGEFEED_METRICS']!r}")
        config.setdefault("SOCK_SERVER_OPTIONS", ws.server_options(config["CHANGEFEED_WS_PING_S"],
                                                                   config["CHANGEFEED_WS_MAX_MESSAGE_BYTES"]))
        own_static = _serves_static(app, prefix)
        lock = threading.Lock()

        def opener() -> Services:
            with lock:  # two first requests at once open one store
                return app.extensions.get(KEY) or self._open(app, prefix, own_static)

        app.extensions[OPENER] = opener
        app.register_blueprint(service.blueprint, url_prefix=prefix)
        if config["CHANGEFEED_METRICS"] != "off":
            app.register_blueprint(health.metrics_blueprint, url_prefix=prefix, name="changefeed_metrics")
        if not own_static:
            app.register_blueprint(demo.assets, url_prefix=prefix, name="changefeed_assets")
        allowed_origins = parse_origins(config["CHANGEFEED_CORS_ORIGINS"])
        if allowed_origins:  # none by default: no page of another site may call the API
            # flask-cors matches these as regular expressions, from the start of the path.
            paths = rf"{re.escape(prefix)}/.*" if prefix else r"/*"
            CORS(app, resources={paths: {}}, origins=sorted(allowed_origins), supports_credentials=True,
                 max_age=600, allow_headers=CORS_REQUEST_HEADERS, expose_headers=CORS_RESPONSE_HEADERS)
        app.cli.add_command(cli.group)
        self.app = app

    def open(self) -> Services:
        """Open the store and the notifier now, not at the first request (the standalone app refuses to
        start on a missing or out-of-date database this way); return the services the views use."""
        return self._services()

    def _open(self, app: Flask, prefix: str, own_static: bool) -> Services:
        store, notifier = open_engine(app.config)
        document = openapi.build(app)
        if prefix:
            document["servers"] = [{"url": prefix}]
        feed = Services.build(app, store, notifier, prefix, "static" if own_static else "changefeed_assets.static",
                              document)
        # The keys of before the extension, which gunicorn.conf.py and tests read.
        app.extensions.update({"changefeed.store": store, "changefeed.notifier": notifier,
                               "changefeed.queries": feed.queries, "changefeed.waits": feed.waits,
                               "changefeed.auth": feed.verifier})
        app.extensions[KEY] = feed
        return feed

    def migrate(self) -> int:
        """Create or upgrade the database of the app's settings; return the schema version it was at (0: new)."""
        config = self._app().config
        return cli.migrate_version(config["CHANGEFEED_DATABASE_URL"], config["CHANGEFEED_DB"])

    def save(self, slug: str, html: str, data: Any = None, base_version: int | None = None) -> int:
        """Save a page from the host's own code, checked as POST /save checks it; return the version saved.

        Its subscribers hear of it as of any save. Raises marshmallow's
        ValidationError for a bad slug or a body over the limits, and the
        outcomes of core/outcomes.py (Conflict for a stale base_version, ...).
        """
        feed = self._services()
        item = feed.schemas.save.load({"slug": slug, "html": html, "data": data, "base_version": base_version})
        saved = metrics.timed_save(feed.store.save, item["slug"], item["html"], item["data"],
                                   item["base_version"], None)
        if has_request_context():  # the save log line names the request
            logs.saved(saved)
        version: int = saved.version
        return version

    def _app(self) -> Flask:
        """The app of the current app context when it has a change feed, else the one init_app saw last."""
        if has_app_context() and OPENER in current_app.extensions:
            return current_app._get_current_object()  # type: ignore[attr-defined]
        if self.app is None:
            raise RuntimeError("this Changefeed is not bound to an app: call init_app(app) first")
        return self.app

    def _services(self) -> Services:
        extensions = self._app().extensions
        found: Services = extensions.get(KEY) or extensions[OPENER]()
        return found


def _prefix(url_prefix: str) -> str:
    """"/feed" for "feed", "/feed/" or "/feed"; "" for "" or "/" (the root)."""
    stripped = url_prefix.strip("/")
    return f"/{stripped}" if stripped else ""


def _serves_static(app: Flask, prefix: str) -> bool:
    """Whether the app serves the demo's static folder at <prefix>/static already (the standalone app does)."""
    return (not prefix and app.has_static_folder and app.static_url_path == "/static"
            and Path(app.static_folder or "").resolve() == demo.STATIC)
