"""Every setting of the service in one place: name, default, and a line of help.

Each setting is read from the environment variable of the same name, so the
same code runs under `flask run`, gunicorn and the tests; docs/configuration.md lists
them all, and a test keeps that list honest.
"""

import os
from collections.abc import Mapping
from typing import Any

Value = str | int  # a setting's value has its default's type

# The settings as the code reads them: Flask's app.config (a dict[str, Any]) or from_environ()'s
# dict. Each value has its default's type; restating fifty of them in a TypedDict would say no more.
Config = Mapping[str, Any]

KiB = 1024
MiB = 1024 * KiB

# (environment variable, default, help)
SETTINGS: list[tuple[str, Value, str]] = [
    ("CHANGEFEED_DB", "instance/changefeed.sqlite3",
     "Path of the SQLite database file (created by `python migrate.py`)."),
    ("CHANGEFEED_DATABASE_URL", "",
     "PostgreSQL instead of SQLite, for several hosts sharing one database: a libpq URL such as "
     "postgresql://changefeed@db.internal/changefeed (a password is better in PGPASSWORD or ~/.pgpass)."),
    ("CHANGEFEED_DATABASE_POOL_SIZE", 10,
     "PostgreSQL connections each server process may hold open, besides its one listening connection."),
    ("CHANGEFEED_DATABASE_POOL_TIMEOUT_MS", 2_000,
     "How long a read or save waits for a free PostgreSQL connection (or for the database to accept "
     "one) before answering 503 (milliseconds)."),
    ("CHANGEFEED_SQLITE_SYNCHRONOUS", "FULL",
     "SQLite `synchronous` setting: FULL survives power loss, NORMAL only a crash of the process."),
    ("CHANGEFEED_BUSY_TIMEOUT_MS", 10_000,
     "How long a save waits for another writer before answering 503 (milliseconds)."),
    ("CHANGEFEED_IDEMPOTENCY_TTL_S", 86_400,
     "How long a save's Idempotency-Key is remembered, so a retry returns the first answer (seconds)."),
    ("CHANGEFEED_MAX_HTML_BYTES", 1 * MiB,
     "Largest `html` a save accepts, in UTF-8 bytes."),
    ("CHANGEFEED_MAX_DATA_BYTES", 256 * KiB,
     "Largest `data` a save accepts, serialized as compact JSON, in UTF-8 bytes."),
    ("CHANGEFEED_MAX_BODY_BYTES", 8 * MiB,
     "Largest request body; anything bigger is refused with 413 before it is read."),
    ("CHANGEFEED_MAX_WAIT_S", 60,
     "Longest `wait` a long-poll may ask for (seconds); keep it under your proxy's read timeout."),
    ("CHANGEFEED_HEADER_TIMEOUT_S", 10,
     "A request's line and headers must arrive within this, else 408 and the connection ends (gunicorn; seconds)."),
    ("CHANGEFEED_BODY_TIMEOUT_S", 30,
     "A request's body must arrive within this of its headers, else 408 and the connection ends (gunicorn; seconds)."),
    ("CHANGEFEED_KEEPALIVE_S", 5,
     "An idle kept-alive connection is closed after this (gunicorn; seconds)."),
    ("CHANGEFEED_SEND_TIMEOUT_S", 30,
     "A client that reads nothing of an answer or stream for this long is dropped (gunicorn; seconds)."),
    ("CHANGEFEED_MAX_WAITS_PER_WORKER", 10_000,
     "Open event streams and long-polls one server process holds; past it, 503 with Retry-After. "
     "Lowered to fit the process's open-files limit."),
    ("CHANGEFEED_MAX_WAITS_PER_CLIENT", 100,
     "Open event streams and long-polls of one client address in one server process; past it, 429."),
    ("CHANGEFEED_TRUSTED_PROXIES", "127.0.0.1,::1",
     "Addresses or networks (10.0.0.0/8) of proxies whose X-Forwarded-For names the client, comma-separated; "
     "`none`: trust no proxy."),
    ("CHANGEFEED_MAX_PAGES", 100_000,
     "Most pages (slugs) the database holds; a save of a new slug past it gets 507."),
    ("CHANGEFEED_MAX_STORED_BYTES", 1024 * MiB,
     "Most bytes of html and data all pages hold together; a save that would grow them past it gets 507."),
    ("CHANGEFEED_QUERY_CACHE_BYTES", 4 * MiB,
     "Memory each server process may spend remembering validated /changes queries (bytes)."),
    ("CHANGEFEED_POLL_MEMORY_BYTES", 16 * MiB,
     "PostgreSQL: memory each server process may spend remembering the pages it is polled about, so an "
     "unchanged poll (or a changed one for a page read before) needs no database round trip (bytes; 0: off)."),
    ("CHANGEFEED_WATCH_INTERVAL_MS", 10,
     "How often each server process looks for saves made by the others (milliseconds)."),
    ("CHANGEFEED_SSE_HEARTBEAT_MS", 15_000,
     "Idle time after which an event stream sends a comment, so proxies keep it open (milliseconds)."),
    ("CHANGEFEED_CORS_ORIGINS", "",
     "Origins of other sites whose pages may write here (e.g. https://app.example), comma-separated; "
     "none by default: a write from another site's page is refused with 403."),
    ("CHANGEFEED_TRUSTED_HOSTS", "localhost,127.0.0.1",
     "Host names this service answers to, comma-separated (`.example.com` allows its subdomains; `*` any); "
     "other Host headers get 400, so DNS rebinding cannot reach a server on loopback."),
    ("CHANGEFEED_JWT_SECRET", "",
     "Turns access control on: the secret HS256 tokens are signed with (keep it out of the repository)."),
    ("CHANGEFEED_JWT_PUBLIC_KEY", "",
     "Or: the PEM public key of tokens issued elsewhere (RS256, ES256); this service then only verifies."),
    ("CHANGEFEED_JWKS_URL", "",
     "Or: the JWKS URL of an identity provider, whose keys (by the token's `kid`) verify its tokens."),
    ("CHANGEFEED_JWT_ALGORITHMS", "",
     "Accepted algorithms, comma-separated; HS256 with a secret, RS256,ES256 with a public key by default."),
    ("CHANGEFEED_JWT_ISSUER", "", "When set, a token's `iss` must be this."),
    ("CHANGEFEED_JWT_AUDIENCE", "", "When set, a token's `aud` must include this."),
    ("CHANGEFEED_JWT_LEEWAY_S", 30, "Clock skew allowed when checking `exp` (seconds)."),
    ("CHANGEFEED_AUTH_READS", 0,
     "1: /changes and /events need a token with `read` on the slug too (with access control on)."),
    ("CHANGEFEED_METRICS", "on",
     "GET /metrics (Prometheus): `on` (with access control on, it needs a token whose `changefeed` claim "
     "has `\"metrics\": true`), `public` (open even with access control on) or `off` (404)."),
    ("CHANGEFEED_PRESENCE_BEAT_MS", 5_000,
     "How often a tab tells the server it is still on a page (POST /presence), as told to clients (milliseconds)."),
    ("CHANGEFEED_PRESENCE_TTL_MS", 15_000,
     "A tab whose beats stop for this long leaves the page's presence list (milliseconds; three missed beats)."),
    ("CHANGEFEED_PRESENCE_MIN_INTERVAL_MS", 1_000,
     "Least time between two beats of one tab; a faster one gets 429 with Retry-After (milliseconds)."),
    ("CHANGEFEED_PRESENCE_MAX_PER_PAGE", 200,
     "Most tabs one page's presence list holds; a new tab past it gets 429 until some leave."),
    ("CHANGEFEED_PRESENCE_LIST_MAX", 50,
     "Most users named in a presence list (editing ones first); `count` always tells how many there are."),
    ("CHANGEFEED_WS_MAX_SLUGS", 100,
     "Most pages one WebSocket may follow at once; a subscribe past it gets an error frame."),
    ("CHANGEFEED_WS_PING_S", 25,
     "How often the server pings each WebSocket; a peer that does not answer is dropped (seconds)."),
    ("CHANGEFEED_WS_MAX_MESSAGE_BYTES", 64 * KiB,
     "Largest message a WebSocket client may send; a bigger one closes the socket (1009)."),
    ("CHANGEFEED_SSE_RETRY_MS", 2_000,
     "Reconnection delay an event stream suggests to EventSource (milliseconds)."),
    ("CHANGEFEED_ACCESS_LOG", "off",
     "One line per request on standard output: `json`, `kv` (key=value) or `off` "
     "(nginx in front logs requests, and a line per poll costs throughput)."),
    ("CHANGEFEED_LOG_LEVEL", "info",
     "Least severe level the service logs (to gunicorn's error log, stderr): debug, info, warning, error."),
]

DEFAULTS = {name: default for name, default, _ in SETTINGS}


def from_environ(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:  # Config: each value its default's type
    """Return the settings, each from its environment variable or its default."""
    values: dict[str, Value] = {}
    for name, default, _ in SETTINGS:
        raw = environ.get(name)
        if raw is None or raw == "":
            values[name] = default
        elif isinstance(default, int):
            try:
                values[name] = int(raw)
            except ValueError:
                raise SystemExit(f"{name} must be an integer, got {raw!r}") from None
        else:
            values[name] = raw
    return values


def markdown() -> str:
    """Return docs/configuration.md: the settings table above as the manual's page.

    The page is generated so it cannot drift from the code; tests/test_docs.py
    fails when the committed page differs, and says to run
    `python -m changefeed.core.settings > docs/configuration.md`.
    """
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from changefeed/core/settings.py: do not edit by hand. After changing a setting, run",
        "     python -m changefeed.core.settings > docs/configuration.md -->",
        "",
        "Environment variables, read at start-up (`python migrate.py` reads the database ones); an empty",
        "value means the default. A Flask application that embeds the service takes the same",
        "names from its `app.config` (see [Embedding](embedding.md)).",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    for name, default, *_, help_ in SETTINGS:
        shown = f"`{default}`" if default != "" else ""  # an empty cell: no default
        lines.append(f"| `{name}` | {shown} | {help_.replace('|', chr(92) + '|')} |")
    lines += [
        "",
        "`gunicorn.conf.py` reads three more, for the server itself (`CHANGEFEED_BIND`,",
        "`CHANGEFEED_WORKERS`, `CHANGEFEED_WORKER_CONNECTIONS`): see [Production](production.md).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
