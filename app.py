"""changefeed: save a page, and every open tab learns of the new version.

    POST /save       upsert a page; its version goes up by exactly 1
    POST /delete     delete a page: a tombstone, one version up, that every subscriber hears of
    GET  /changes    anything newer than version `since`? then here it is
                     (with `wait`, held until there is: long-poll)
    GET  /events     the same, pushed as Server-Sent Events
    GET  /ws         the same for many pages at once, over one WebSocket
    POST /presence   this tab is on a page; GET /changes, /events and /ws say who else is
    GET  /           the two-pane demo (editor and viewer)
    GET  /healthz    the process answers; /readyz: and its database and watcher work; /metrics

Run it with `python migrate.py && flask run`, or in production with
`gunicorn -c gunicorn.conf.py 'app:create_app()'`. The views are blueprints
in changefeed/http/; the same service embeds in another Flask app as the
extension changefeed.Changefeed, which this app uses too, at the root.
"""

from collections.abc import Mapping
from typing import Any

from changefeed.core import settings
from changefeed.extension import Changefeed
from changefeed.http import cli
from changefeed.http.demo import STATIC, TEMPLATES
from changefeed.http.errors import register as json_errors
from changefeed.http.standalone import App
from changefeed.ops import logs
from changefeed.security.origins import parse_list


def create_app(test_config: Mapping[str, Any] | None = None) -> App:
    """Build the app from the environment's settings, overridden by `test_config`."""
    # Settings: the environment's, then the test's; the body limit and the host names are the app's own.
    app = App(__name__, static_folder=str(STATIC), template_folder=str(TEMPLATES), instance_relative_config=True)
    app.config.from_mapping(settings.from_environ())
    app.config.from_mapping(test_config or {})
    app.config["MAX_CONTENT_LENGTH"] = app.config["CHANGEFEED_MAX_BODY_BYTES"]
    hosts = parse_list(app.config["CHANGEFEED_TRUSTED_HOSTS"])
    app.config["TRUSTED_HOSTS"] = None if "*" in hosts else sorted(hosts)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # the default provider has it
    logs.register(app)  # first, so whatever follows logs with a level and a name; the access log if asked

    # The store, the notifier and every blueprint, at the root: the extension a host app uses too.
    Changefeed(app, url_prefix="").open()  # now: a missing or out-of-date database stops the start
    json_errors(app)  # the one JSON error shape for the whole app: unknown paths and methods too

    # The commands of before the `flask changefeed` group: `flask delete-page`, `flask token create`.
    app.cli.add_command(cli.delete_page)
    app.cli.add_command(cli.token)
    return app
