"""Create or upgrade the changefeed database: `python migrate.py` (or `flask changefeed migrate`).

It works on SQLite (CHANGEFEED_DB, the default) or, when
CHANGEFEED_DATABASE_URL is set, on PostgreSQL. On SQLite the schema version
lives in `PRAGMA user_version`; on PostgreSQL in the table `schema_version`,
and hosts migrating at once take turns on an advisory lock. A new database
gets `schema.sql` (the latest schema) at once; an older one gets each pending
upgrade in turn. Each step runs in one transaction together with the bump of
that number, so a failing step leaves the database as it was and stays
pending. Running it again when everything is applied changes nothing and says so.
A database newer than this code is refused, never "upgraded" backwards.

`python migrate.py --new-epoch` gives the database a new identity (epoch):
run it after restoring a backup, so clients that saw later versions of the
old one start over instead of waiting for versions that went backwards.
"""

import argparse
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # psycopg itself is imported only to reach PostgreSQL: `migrate.py` on SQLite never loads it
    import psycopg

from changefeed.core.settings import from_environ

HERE = Path(__file__).resolve().parent

SCHEMA = (HERE / "schema.sql").read_text()

# (schema version, SQL that upgrades the version before it). Append new
# upgrades and change schema.sql to match; never edit an applied upgrade.
UPGRADES = [
    (2, """
        ALTER TABLE page_versions ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
        UPDATE page_versions SET seq = rowid;
        CREATE INDEX page_versions_seq ON page_versions (seq);
    """),
    (3, """
        CREATE TABLE epoch (value TEXT NOT NULL);
        INSERT INTO epoch (value) VALUES (lower(hex(randomblob(8))));
        CREATE TABLE idempotency_keys (
            key TEXT PRIMARY KEY NOT NULL, fingerprint TEXT NOT NULL, slug TEXT NOT NULL,
            version INTEGER NOT NULL, updated_at TEXT NOT NULL, created_at REAL NOT NULL
        );
        CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
    """),
    (4, """
        CREATE TABLE storage (pages INTEGER NOT NULL, bytes INTEGER NOT NULL);
        INSERT INTO storage SELECT count(*),
            coalesce(sum(length(CAST(html AS BLOB)) + length(CAST(data AS BLOB))), 0) FROM page_versions;
        CREATE TRIGGER storage_insert AFTER INSERT ON page_versions BEGIN
            UPDATE storage SET pages = pages + 1,
                bytes = bytes + length(CAST(new.html AS BLOB)) + length(CAST(new.data AS BLOB));
        END;
        CREATE TRIGGER storage_update AFTER UPDATE OF html, data ON page_versions BEGIN
            UPDATE storage SET bytes = bytes
                + length(CAST(new.html AS BLOB)) + length(CAST(new.data AS BLOB))
                - length(CAST(old.html AS BLOB)) - length(CAST(old.data AS BLOB));
        END;
        CREATE TRIGGER storage_delete AFTER DELETE ON page_versions BEGIN
            UPDATE storage SET pages = pages - 1,
                bytes = bytes - length(CAST(old.html AS BLOB)) - length(CAST(old.data AS BLOB));
        END;
    """),
    (5, """
        CREATE TABLE page_editors (
            slug TEXT NOT NULL, user_key TEXT NOT NULL, client_id TEXT NOT NULL, name TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('viewing', 'editing')), seen_at REAL NOT NULL,
            PRIMARY KEY (slug, user_key, client_id)
        );
        CREATE INDEX page_editors_seen_at ON page_editors (seen_at);
        CREATE TABLE presence (slug TEXT PRIMARY KEY NOT NULL, version INTEGER NOT NULL, changed_at REAL NOT NULL);
        CREATE INDEX presence_version ON presence (version);
        CREATE TABLE presence_clock (value INTEGER NOT NULL);
        INSERT INTO presence_clock (value) VALUES (0);
    """),
    # Deletes are tombstones; Idempotency-Keys count against CHANGEFEED_MAX_STORED_BYTES; a tab that
    # said "gone" keeps a row till the TTL (presence entries are a few seconds' state: they start over).
    (6, """
        ALTER TABLE page_versions ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
        CREATE TRIGGER page_versions_keep BEFORE DELETE ON page_versions BEGIN
            SELECT RAISE(ABORT, 'changefeed pages are deleted with POST /delete or `flask delete-page SLUG` (a tombstone), not by removing their row');
        END;
        DROP TRIGGER storage_insert;
        DROP TRIGGER storage_update;
        DROP TRIGGER storage_delete;
        CREATE TRIGGER storage_insert AFTER INSERT ON page_versions BEGIN
            UPDATE storage SET pages = pages + 1 - new.deleted,
                bytes = bytes + length(CAST(new.html AS BLOB)) + length(CAST(new.data AS BLOB));
        END;
        CREATE TRIGGER storage_update AFTER UPDATE OF html, data, deleted ON page_versions BEGIN
            UPDATE storage SET pages = pages + old.deleted - new.deleted, bytes = bytes
                + length(CAST(new.html AS BLOB)) + length(CAST(new.data AS BLOB))
                - length(CAST(old.html AS BLOB)) - length(CAST(old.data AS BLOB));
        END;
        CREATE TRIGGER storage_delete AFTER DELETE ON page_versions BEGIN
            UPDATE storage SET pages = pages - 1 + old.deleted,
                bytes = bytes - length(CAST(old.html AS BLOB)) - length(CAST(old.data AS BLOB));
        END;
        CREATE TRIGGER storage_key_insert AFTER INSERT ON idempotency_keys BEGIN
            UPDATE storage SET bytes = bytes + 200 + length(CAST(new.key AS BLOB)) + length(CAST(new.slug AS BLOB));
        END;
        CREATE TRIGGER storage_key_update AFTER UPDATE OF key, slug ON idempotency_keys BEGIN
            UPDATE storage SET bytes = bytes + length(CAST(new.key AS BLOB)) + length(CAST(new.slug AS BLOB))
                - length(CAST(old.key AS BLOB)) - length(CAST(old.slug AS BLOB));
        END;
        CREATE TRIGGER storage_key_delete AFTER DELETE ON idempotency_keys BEGIN
            UPDATE storage SET bytes = bytes - 200 - length(CAST(old.key AS BLOB)) - length(CAST(old.slug AS BLOB));
        END;
        UPDATE storage SET bytes = bytes + (SELECT coalesce(sum(200 + length(CAST(key AS BLOB))
                                                               + length(CAST(slug AS BLOB))), 0) FROM idempotency_keys);
        DROP TABLE page_editors;
        CREATE TABLE page_editors (
            slug TEXT NOT NULL, user_key TEXT NOT NULL, client_id TEXT NOT NULL, name TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('viewing', 'editing', 'gone')), seen_at REAL NOT NULL,
            PRIMARY KEY (slug, user_key, client_id)
        );
        CREATE INDEX page_editors_seen_at ON page_editors (seen_at);
    """),
    # Version 7 changed PostgreSQL's tables only (storage shards, the writing transaction of each version):
    # SQLite has one writer at a time, and its `seq` is already in commit order.
    (7, "SELECT 1;"),
]
LATEST = UPGRADES[-1][0]

# PostgreSQL's schema began at SQLite's version 4: the same number means the
# same tables. A new version appends an upgrade here too, with the same number.
POSTGRES_SCHEMA = (HERE / "schema_postgres.sql").read_text()
POSTGRES_UPGRADES = [
    (5, """
        CREATE TABLE page_editors (
            slug text NOT NULL, user_key text NOT NULL, client_id text NOT NULL, name text NOT NULL,
            state text NOT NULL CHECK (state IN ('viewing', 'editing')), seen_at double precision NOT NULL,
            PRIMARY KEY (slug, user_key, client_id)
        );
        CREATE INDEX page_editors_seen_at ON page_editors (seen_at);
        CREATE TABLE presence (slug text PRIMARY KEY, version bigint NOT NULL, changed_at double precision NOT NULL);
        CREATE SEQUENCE presence_clock;
    """),
    (6, """
        ALTER TABLE page_versions ADD COLUMN deleted boolean NOT NULL DEFAULT false;
        CREATE FUNCTION changefeed_keep_pages() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'changefeed pages are deleted with POST /delete or `flask delete-page SLUG` (a tombstone), not by removing their row';
        END
        $$;
        CREATE TRIGGER page_versions_keep BEFORE DELETE ON page_versions
            FOR EACH ROW EXECUTE FUNCTION changefeed_keep_pages();
        DROP TRIGGER storage_count ON page_versions;
        CREATE OR REPLACE FUNCTION changefeed_count_storage() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                UPDATE storage SET pages = pages + (NOT NEW.deleted)::int,
                                   bytes = bytes + octet_length(NEW.html) + octet_length(NEW.data);
            ELSIF TG_OP = 'UPDATE' THEN
                UPDATE storage SET pages = pages + (NOT NEW.deleted)::int - (NOT OLD.deleted)::int,
                                   bytes = bytes + octet_length(NEW.html) + octet_length(NEW.data)
                                                 - octet_length(OLD.html) - octet_length(OLD.data);
            ELSE
                UPDATE storage SET pages = pages - (NOT OLD.deleted)::int,
                                   bytes = bytes - octet_length(OLD.html) - octet_length(OLD.data);
            END IF;
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER storage_count AFTER INSERT OR DELETE OR UPDATE OF html, data, deleted ON page_versions
            FOR EACH ROW EXECUTE FUNCTION changefeed_count_storage();
        CREATE FUNCTION changefeed_count_keys() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                UPDATE storage SET bytes = bytes + 200 + octet_length(NEW.key) + octet_length(NEW.slug);
            ELSIF TG_OP = 'UPDATE' THEN
                UPDATE storage SET bytes = bytes + octet_length(NEW.key) + octet_length(NEW.slug)
                                                 - octet_length(OLD.key) - octet_length(OLD.slug);
            ELSE
                UPDATE storage SET bytes = bytes - 200 - octet_length(OLD.key) - octet_length(OLD.slug);
            END IF;
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER storage_count_keys AFTER INSERT OR DELETE OR UPDATE OF key, slug ON idempotency_keys
            FOR EACH ROW EXECUTE FUNCTION changefeed_count_keys();
        UPDATE storage SET bytes = bytes + (SELECT coalesce(sum(200 + octet_length(key) + octet_length(slug)), 0)
                                            FROM idempotency_keys);
        ALTER TABLE page_editors DROP CONSTRAINT page_editors_state_check;
        ALTER TABLE page_editors ADD CONSTRAINT page_editors_state_check
            CHECK (state IN ('viewing', 'editing', 'gone'));
    """),
    # Saves of different pages never wait for each other: the storage counters in 16 shards (a save
    # transaction takes one nobody holds), and each version names the transaction that wrote it.
    (7, """
        ALTER TABLE storage RENAME TO storage_shards;
        ALTER TABLE storage_shards ADD COLUMN shard integer NOT NULL DEFAULT 0;
        ALTER TABLE storage_shards ALTER COLUMN shard DROP DEFAULT;
        ALTER TABLE storage_shards ADD PRIMARY KEY (shard);
        INSERT INTO storage_shards (shard, pages, bytes) SELECT s, 0, 0 FROM generate_series(1, 15) s;
        CREATE VIEW storage AS SELECT sum(pages)::bigint AS pages, sum(bytes)::bigint AS bytes FROM storage_shards;

        CREATE FUNCTION changefeed_shard() RETURNS integer LANGUAGE sql STABLE AS $$
            SELECT coalesce(nullif(current_setting('changefeed.shard', true), '')::integer, 0)
        $$;

        CREATE OR REPLACE FUNCTION changefeed_count_storage() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                UPDATE storage_shards SET pages = pages + (NOT NEW.deleted)::int,
                                          bytes = bytes + octet_length(NEW.html) + octet_length(NEW.data)
                    WHERE shard = changefeed_shard();
            ELSIF TG_OP = 'UPDATE' THEN
                UPDATE storage_shards SET pages = pages + (NOT NEW.deleted)::int - (NOT OLD.deleted)::int,
                                          bytes = bytes + octet_length(NEW.html) + octet_length(NEW.data)
                                                        - octet_length(OLD.html) - octet_length(OLD.data)
                    WHERE shard = changefeed_shard();
            ELSE
                UPDATE storage_shards SET pages = pages - (NOT OLD.deleted)::int,
                                          bytes = bytes - octet_length(OLD.html) - octet_length(OLD.data)
                    WHERE shard = changefeed_shard();
            END IF;
            RETURN NULL;
        END
        $$;

        CREATE OR REPLACE FUNCTION changefeed_count_keys() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                UPDATE storage_shards SET bytes = bytes + 200 + octet_length(NEW.key) + octet_length(NEW.slug)
                    WHERE shard = changefeed_shard();
            ELSIF TG_OP = 'UPDATE' THEN
                UPDATE storage_shards SET bytes = bytes + octet_length(NEW.key) + octet_length(NEW.slug)
                                                        - octet_length(OLD.key) - octet_length(OLD.slug)
                    WHERE shard = changefeed_shard();
            ELSE
                UPDATE storage_shards SET bytes = bytes - 200 - octet_length(OLD.key) - octet_length(OLD.slug)
                    WHERE shard = changefeed_shard();
            END IF;
            RETURN NULL;
        END
        $$;
        ALTER TABLE page_versions ADD COLUMN xact xid8 NOT NULL DEFAULT pg_current_xact_id();
        CREATE INDEX page_versions_xact ON page_versions (xact);
        CREATE FUNCTION changefeed_stamp_xact() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.xact := pg_current_xact_id();
            RETURN NEW;
        END
        $$;
        CREATE TRIGGER page_versions_xact BEFORE UPDATE ON page_versions
            FOR EACH ROW EXECUTE FUNCTION changefeed_stamp_xact();
    """),
]
POSTGRES_CHANNEL = "changefeed"  # what saves NOTIFY and every host's listener LISTENs to
POSTGRES_PRESENCE_CHANNEL = "changefeed_presence"  # what presence changes NOTIFY: [slug, ...]
MIGRATE_LOCK = 0x63686e66  # pg_advisory_lock key: "chnf"


def schema_version(conn: sqlite3.Connection) -> int:
    """Return the schema version recorded in the database (0 when new)."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version


class CannotMigrate(RuntimeError):
    """The database cannot be brought to this code's schema; the message says why and what to do."""


class SchemaTooNew(CannotMigrate):
    """The database was made by a newer changefeed than this one."""


def too_new_message(path: str, found: int) -> str:
    """What to say of a database newer than this code."""
    return (f"database {path} is at schema version {found}, newer than this code ({LATEST}): "
            "run the changefeed release that created it (or a later one); nothing was changed")


def migrate(path: str) -> int:
    """Bring the database at `path` to the latest schema; return the version it was at."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # WAL is a property of the file: set once here, it holds for every
        # later connection, so readers never block the writer.
        conn.execute("PRAGMA journal_mode=WAL")
        found = schema_version(conn)
        if found > LATEST:
            raise SchemaTooNew(too_new_message(path, found))
        steps = [(LATEST, SCHEMA)] if found == 0 else [(v, sql) for v, sql in UPGRADES if v > found]
        for version, sql in steps:
            try:
                conn.executescript(
                    f"BEGIN IMMEDIATE;\n{sql}\n;PRAGMA user_version = {int(version)};\nCOMMIT;"
                )
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return found
    finally:
        conn.close()


def describe(url: str) -> str:
    """Name a PostgreSQL database for messages and logs, without its password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - an unreadable URL is named as such, never echoed
        return "PostgreSQL (CHANGEFEED_DATABASE_URL cannot be parsed)"
    host = info.get("host", "localhost")
    port = info.get("port", "5432")
    user = f"{info['user']}@" if info.get("user") else ""
    return f"postgresql://{user}{host}:{port}/{info.get('dbname', '')}"


def postgres_schema_version(conn: "psycopg.Connection[Any]") -> int:
    """Return the schema version recorded in a PostgreSQL database (0 when new)."""
    (table,) = _one(conn.execute("SELECT to_regclass('schema_version')").fetchone())
    if table is None:
        return 0
    (version,) = _one(conn.execute("SELECT max(version) FROM schema_version").fetchone())
    return int(version or 0)


def _one(row: Sequence[Any] | None) -> Sequence[Any]:
    """The row of a statement that always returns one (an aggregate, RETURNING of a one-row table)."""
    assert row is not None, "the statement returns exactly one row"
    return row


@contextmanager
def _postgres(url: str) -> Iterator["psycopg.Connection[Any]"]:
    """A connection for one migration step, imported here only: see TYPE_CHECKING above."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="changefeed-migrate") as conn:
        yield conn


def migrate_postgres(url: str) -> int:
    """Bring the PostgreSQL database at `url` to the latest schema; return the version it was at.

    Each step and the record of its version commit together (PostgreSQL's
    DDL is transactional), so a failed step leaves the database as it was.
    """
    with _postgres(url) as conn:
        (encoding,) = _one(conn.execute("SHOW server_encoding").fetchone())
        if encoding != "UTF8":
            raise CannotMigrate(f"database {describe(url)} has encoding {encoding}: changefeed needs UTF8 "
                               "(CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0); nothing was changed")
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))  # held until the connection ends
        found = postgres_schema_version(conn)
        if found > LATEST:
            raise SchemaTooNew(too_new_message(describe(url), found))
        if found == 0:
            steps = [(LATEST, POSTGRES_SCHEMA)]
        else:
            steps = [(v, sql) for v, sql in POSTGRES_UPGRADES if v > found]
        for version, sql in steps:
            with conn.transaction():
                conn.execute(sql)
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        return found


def new_epoch_postgres(url: str) -> str:
    """Give the PostgreSQL database a new epoch, and wake every host's listener to re-read its pages."""
    with _postgres(url) as conn, conn.transaction():
        (value,) = _one(conn.execute(
            "UPDATE epoch SET value = substr(md5(random()::text || clock_timestamp()::text), 1, 16)"
            " RETURNING value").fetchone())
        conn.execute("SELECT pg_notify(%s, '*')", (POSTGRES_CHANNEL,))
        return str(value)


def import_sqlite(path: str, url: str) -> int:
    """Copy every page of the SQLite database at `path` into the empty PostgreSQL one at `url`; return how many.

    Versions, times and the epoch come along, so a client that knew a page
    at some version goes on from there against the new database, as if
    nothing had moved. Idempotency keys do not: a retry after the move is
    a new save. Refuses a database that already holds pages.
    """
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if schema_version(source) != LATEST:
            raise CannotMigrate(f"{path} is not at schema version {LATEST}: run `python migrate.py` on it first "
                                "(with CHANGEFEED_DB set and CHANGEFEED_DATABASE_URL unset)")
        (epoch,) = source.execute("SELECT value FROM epoch").fetchone()
        pages = ((slug, html, data, version, updated_at, bool(deleted)) for slug, html, data, version, updated_at, deleted
                 in source.execute("SELECT slug, html, data, version, updated_at, deleted FROM page_versions ORDER BY seq"))
        with _postgres(url) as conn, conn.transaction():
            if conn.execute("SELECT 1 FROM page_versions LIMIT 1").fetchone():
                raise CannotMigrate(f"{describe(url)} already holds pages; import into an empty database only")
            conn.execute("UPDATE epoch SET value = %s", (epoch,))
            with conn.cursor() as cursor:
                cursor.executemany("INSERT INTO page_versions (slug, html, data, version, updated_at, deleted)"
                                   " VALUES (%s, %s, %s, %s, %s, %s)", pages)
            (count,) = _one(conn.execute("SELECT count(*) FROM page_versions").fetchone())
            conn.execute("SELECT pg_notify(%s, '*')", (POSTGRES_CHANNEL,))
        return int(count)
    finally:
        source.close()


def new_epoch(path: str) -> str:
    """Give the database at `path` a new epoch; return it."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE epoch SET value = lower(hex(randomblob(8)))")
        (value,) = conn.execute("SELECT value FROM epoch").fetchone()
        conn.execute("COMMIT")
        return str(value)
    finally:
        conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    """`python migrate.py [--new-epoch] [--import-sqlite PATH] [--check]`; return the exit status."""
    parser = argparse.ArgumentParser(description="Create or upgrade the changefeed database (CHANGEFEED_DB).")
    parser.add_argument("--new-epoch", action="store_true",
                        help="after migrating, give the database a new epoch (run this after restoring a backup)")
    parser.add_argument("--import-sqlite", metavar="PATH",
                        help="after migrating the PostgreSQL database (CHANGEFEED_DATABASE_URL), copy into it "
                             "every page of the SQLite database at PATH, with its versions and epoch")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1, saying what to do, unless the database is at the latest schema")
    args = parser.parse_args(argv)
    settings = from_environ()
    url = settings["CHANGEFEED_DATABASE_URL"]
    path = describe(url) if url else settings["CHANGEFEED_DB"]
    if args.check:
        return check(url, path)
    try:
        found = migrate_postgres(url) if url else migrate(path)
    except CannotMigrate as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the database cannot be reached: say so in one line, no traceback
        if not url:
            raise
        print(f"error: cannot migrate {path}: {exc}".rstrip(), file=sys.stderr)
        return 1
    if found == LATEST:
        print(f"{path}: already at schema version {LATEST}; nothing to do.")
    elif found == 0:
        print(f"{path}: created at schema version {LATEST}.")
    else:
        print(f"{path}: upgraded from schema version {found} to {LATEST}.")
    if args.import_sqlite:
        if not url:
            print("error: --import-sqlite copies into PostgreSQL: set CHANGEFEED_DATABASE_URL", file=sys.stderr)
            return 1
        try:
            count = import_sqlite(args.import_sqlite, url)
        except (CannotMigrate, sqlite3.Error) as exc:
            print(f"error: {exc}; nothing was imported", file=sys.stderr)
            return 1
        print(f"{path}: imported {count} page(s) from {args.import_sqlite}, with their versions and epoch.")
    if args.new_epoch:
        value = new_epoch_postgres(url) if url else new_epoch(path)
        print(f"{path}: new epoch {value}; clients start over from version 0.")
    return 0


def check(url: str, path: str) -> int:
    """Say whether the service can start on this database (gunicorn's master asks, before forking)."""
    try:
        if url:
            with _postgres(url) as conn:
                found = postgres_schema_version(conn)
        else:
            if not Path(path).exists():
                found = 0
            else:
                lite = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                try:
                    found = schema_version(lite)
                finally:
                    lite.close()
    except Exception as exc:  # noqa: BLE001 - unreachable or unreadable: one line saying what
        print(f"error: cannot read {path}: {exc}".rstrip(), file=sys.stderr)
        return 1
    if found > LATEST:
        print(f"error: {too_new_message(path, found)}", file=sys.stderr)
        return 1
    if found < LATEST:
        print(f"error: database {path} is at schema version {found}, this code needs {LATEST}: "
              "run `python migrate.py` (with the same settings)", file=sys.stderr)
        return 1
    return 0

