"""gunicorn settings for changefeed: `gunicorn -c gunicorn.conf.py 'app:create_app()'`.

Each setting can be overridden from the environment (GUNICORN_CMD_ARGS, or
the variables read below) without editing this file.
"""

import multiprocessing
import os

# Loopback by default; put nginx in front (see README) or set CHANGEFEED_BIND.
bind = os.environ.get("CHANGEFEED_BIND", "127.0.0.1:8000")

# Worker processes: every worker serves every slug, and SQLite keeps their saves in order.
workers = int(os.environ.get("CHANGEFEED_WORKERS", multiprocessing.cpu_count() * 2))

# Kill a worker stuck for this long; above any request this service serves.
timeout = 30

# Give in-flight requests this long to finish on SIGTERM.
graceful_timeout = 10

# Reuse connections from nginx or pollers for a few seconds.
keepalive = 5

# Access log to stdout; request bodies (page contents) are never logged.
accesslog = "-"
