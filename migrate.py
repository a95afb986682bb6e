"""Create or upgrade the changefeed database: `python migrate.py`.

The schema version lives in SQLite's `PRAGMA user_version`. A new database
gets `schema.sql` (the latest schema) at once; an older one gets each pending
upgrade in turn. Each step runs in one transaction together with the bump of
that number, so a failing step leaves the database as it was and stays
pending. Running it again when everything is applied changes nothing and says so.
"""

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
]
LATEST = UPGRADES[-1][0]


def schema_version(conn):
    """Return the schema version recorded in the database (0 when new)."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(path):
    """Bring the database at `path` to the latest schema; return the version it was at."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # WAL is a property of the file: set once here, it holds for every
        # later connection, so readers never block the writer.
        conn.execute("PRAGMA journal_mode=WAL")
        found = schema_version(conn)
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


def main():
    path = from_environ()["CHANGEFEED_DB"]
    found = migrate(path)
    if found == LATEST:
        print(f"{path}: already at schema version {LATEST}; nothing to do.")
    elif found == 0:
        print(f"{path}: created at schema version {LATEST}.")
    else:
        print(f"{path}: upgraded from schema version {found} to {LATEST}.")


if __name__ == "__main__":
    sys.exit(main())
