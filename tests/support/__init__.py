"""What the tests share, in small modules any test imports (`from support.servers import Server`).

- databases: a test's own database (a SQLite file, or a PostgreSQL database
  made for it), and which tests run on which engine;
- servers: the service under gunicorn or werkzeug on a free loopback port,
  nginx in front of it, and letting go of an app;
- clients: what talks to a server: HTTP saves and long-polls, Server-Sent
  Events, WebSockets, JWTs, /metrics scrapes;
- browsers: real headless Chromium.

tests/conftest.py declares the fixtures by calling these; the tests directory
is on the import path (pytest.ini), so this package imports as `support`.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository: where gunicorn, migrate.py and the docs run
