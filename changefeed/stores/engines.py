"""Open the store and notifier the settings ask for: PostgreSQL with a URL, else the SQLite file.

The one place that knows which engines exist. It hands back the contract's
types (stores/contract.py), so nothing above the stores ever names an
engine; mypy checks here that each engine and its notifier satisfy them.

The PostgreSQL modules are imported only when asked for, inside
open_engine: psycopg picks how it waits when first imported, and must be
imported after gevent patched the process (gunicorn's workers build the
app after patching), or one slow query would stall the whole worker.
"""

from collections.abc import Mapping
from typing import Any

from changefeed.stores.base import PageStore
from changefeed.stores.contract import Notifier, Store
from changefeed.stores.sqlite import SQLiteStore
from changefeed.stores.sqlite_notify import SQLiteNotifier


def open_engine(config: Mapping[str, Any]) -> tuple[Store, Notifier]:
    """The store and notifier of the CHANGEFEED_* settings in `config`, their presence limits set."""
    common: dict[str, Any] = dict(
        busy_timeout_ms=config["CHANGEFEED_BUSY_TIMEOUT_MS"], idempotency_ttl_s=config["CHANGEFEED_IDEMPOTENCY_TTL_S"],
        max_pages=config["CHANGEFEED_MAX_PAGES"], max_bytes=config["CHANGEFEED_MAX_STORED_BYTES"])
    heartbeat_s = config["CHANGEFEED_SSE_HEARTBEAT_MS"] / 1000
    if config["CHANGEFEED_DATABASE_URL"]:
        from changefeed.stores.postgres import PostgresStore  # see above: after gevent patched
        from changefeed.stores.postgres_notify import PostgresNotifier

        shared = PostgresStore(config["CHANGEFEED_DATABASE_URL"], pool_size=config["CHANGEFEED_DATABASE_POOL_SIZE"],
                               pool_timeout_ms=config["CHANGEFEED_DATABASE_POOL_TIMEOUT_MS"],
                               poll_memory_bytes=config["CHANGEFEED_POLL_MEMORY_BYTES"], **common)
        _limit_presence(shared, config)
        return shared, PostgresNotifier(shared, heartbeat_s=heartbeat_s)
    local = SQLiteStore(config["CHANGEFEED_DB"], synchronous=config["CHANGEFEED_SQLITE_SYNCHRONOUS"], **common)
    _limit_presence(local, config)
    return local, SQLiteNotifier(local, interval_s=config["CHANGEFEED_WATCH_INTERVAL_MS"] / 1000,
                                 heartbeat_s=heartbeat_s)


def _limit_presence(store: PageStore, config: Mapping[str, Any]) -> None:
    store.configure_presence(ttl_s=config["CHANGEFEED_PRESENCE_TTL_MS"] / 1000,
                             min_interval_s=config["CHANGEFEED_PRESENCE_MIN_INTERVAL_MS"] / 1000,
                             max_per_page=config["CHANGEFEED_PRESENCE_MAX_PER_PAGE"],
                             list_max=config["CHANGEFEED_PRESENCE_LIST_MAX"])
