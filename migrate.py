"""Create or upgrade the changefeed database: `python migrate.py`.

The schema version lives in SQLite's `PRAGMA user_version`. Each migration runs
in one transaction together with the bump of that number, so a failing
migration leaves the database as it was and stays pending. Running it again
when everything is applied changes nothing and says so.
"""

import sqlite3
import sys
from pathlib import Path

from settings import from_environ

HERE = Path(__file__).resolve().parent

# (schema version, SQL). Append new migrations; never edit an applied one.
MIGRATIONS = [
    (1, (HERE / "schema.sql").read_text()),
]
LATEST = MIGRATIONS[-1][0]


def schema_version(conn):
    """Return the schema version recorded in the database (0 when new)."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(path):
    """Apply the pending migrations to the database at `path`; return their versions."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # WAL is a property of the file: set once here, it holds for every
        # later connection, so readers never block the writer.
        conn.execute("PRAGMA journal_mode=WAL")
        applied = []
        for version, sql in MIGRATIONS:
            if version <= schema_version(conn):
                continue
            try:
                conn.executescript(
                    f"BEGIN IMMEDIATE;\n{sql}\n;PRAGMA user_version = {int(version)};\nCOMMIT;"
                )
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            applied.append(version)
        return applied
    finally:
        conn.close()


def main():
    path = from_environ()["CHANGEFEED_DB"]
    applied = migrate(path)
    if applied:
        print(f"{path}: applied migration(s) {', '.join(map(str, applied))}; "
              f"schema version is now {LATEST}.")
    else:
        print(f"{path}: already at schema version {LATEST}; nothing to do.")


if __name__ == "__main__":
    sys.exit(main())
