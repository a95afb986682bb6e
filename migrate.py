"""Create or upgrade the changefeed database: `python migrate.py`.

The schema version lives in SQLite's `PRAGMA user_version`. A new database
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
from pathlib import Path

from settings import from_environ

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
]
LATEST = UPGRADES[-1][0]


def schema_version(conn):
    """Return the schema version recorded in the database (0 when new)."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


class SchemaTooNew(RuntimeError):
    """The database was made by a newer changefeed than this one."""


def too_new_message(path, found):
    return (f"database {path} is at schema version {found}, newer than this code ({LATEST}): "
            "run the changefeed release that created it (or a later one); nothing was changed")


def migrate(path):
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


def new_epoch(path):
    """Give the database at `path` a new epoch; return it."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE epoch SET value = lower(hex(randomblob(8)))")
        (value,) = conn.execute("SELECT value FROM epoch").fetchone()
        conn.execute("COMMIT")
        return value
    finally:
        conn.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Create or upgrade the changefeed database (CHANGEFEED_DB).")
    parser.add_argument("--new-epoch", action="store_true",
                        help="after migrating, give the database a new epoch (run this after restoring a backup)")
    args = parser.parse_args(argv)
    path = from_environ()["CHANGEFEED_DB"]
    try:
        found = migrate(path)
    except SchemaTooNew as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if found == LATEST:
        print(f"{path}: already at schema version {LATEST}; nothing to do.")
    elif found == 0:
        print(f"{path}: created at schema version {LATEST}.")
    else:
        print(f"{path}: upgraded from schema version {found} to {LATEST}.")
    if args.new_epoch:
        print(f"{path}: new epoch {new_epoch(path)}; clients start over from version 0.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
