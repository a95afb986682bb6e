"""python migrate.py: creates the database, records its schema version, and is idempotent."""

import os
import sqlite3
import subprocess
import sys

import pytest

from app import create_app
from changefeed.core.outcomes import SchemaOutOfDate
from changefeed.stores import schema as migrate
from support import ROOT


def run_migrate(db):
    env = {**os.environ, "CHANGEFEED_DB": db}
    return subprocess.run([sys.executable, "migrate.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True).stdout


def dump(db):
    conn = sqlite3.connect(db)
    return (list(conn.iterdump()), conn.execute("PRAGMA user_version").fetchone()[0])


def test_migrate_creates_the_table_wal_and_schema_version(tmp_path):
    db = str(tmp_path / "sub" / "new.sqlite3")
    out = run_migrate(db)
    assert f"created at schema version {migrate.LATEST}" in out
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrate.LATEST
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    columns = [row[1] for row in conn.execute("PRAGMA table_info(page_versions)")]
    assert columns == ["slug", "html", "data", "version", "updated_at", "seq", "deleted"]


def test_second_run_changes_nothing_and_says_so(tmp_path, save, db_path):
    save(), save(slug="other")
    before = dump(db_path)
    out = run_migrate(db_path)
    assert "nothing to do" in out
    assert dump(db_path) == before


def test_failing_migration_rolls_back_and_stays_pending(tmp_path, monkeypatch, db_path):
    monkeypatch.setattr(migrate, "UPGRADES", migrate.UPGRADES + [
        (99, "CREATE TABLE half_done (x); INSERT INTO no_such_table VALUES (1);"),
    ])
    with pytest.raises(sqlite3.OperationalError):
        migrate.migrate(db_path)
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrate.LATEST
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchone() is None


def test_app_refuses_a_missing_database_and_says_to_migrate(tmp_path):
    missing = str(tmp_path / "missing.sqlite3")
    with pytest.raises(SchemaOutOfDate, match="python migrate.py"):
        create_app({"CHANGEFEED_DB": missing})
    assert not os.path.exists(missing)


def test_app_refuses_an_unmigrated_database_and_says_to_migrate(tmp_path):
    empty = str(tmp_path / "empty.sqlite3")
    sqlite3.connect(empty).close()
    with pytest.raises(SchemaOutOfDate, match="schema version 0.*python migrate.py"):
        create_app({"CHANGEFEED_DB": empty})


V1_SCHEMA = """
CREATE TABLE page_versions (
    slug TEXT PRIMARY KEY NOT NULL, html TEXT NOT NULL, data TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1), updated_at TEXT NOT NULL
);
PRAGMA user_version = 1;
"""


def shape(db):
    """Columns and indexes of page_versions: what a fresh and an upgraded database must share."""
    conn = sqlite3.connect(db)
    columns = [row[1:] for row in conn.execute("PRAGMA table_info(page_versions)")]
    indexes = sorted((row[1], row[2]) for row in conn.execute("PRAGMA index_list(page_versions)"))
    objects = conn.execute("SELECT type, name, tbl_name FROM sqlite_master ORDER BY type, name").fetchall()
    return columns, indexes, objects


def test_upgrade_from_version_1_matches_a_fresh_database_and_keeps_pages(tmp_path):
    old, fresh = str(tmp_path / "old.sqlite3"), str(tmp_path / "fresh.sqlite3")
    conn = sqlite3.connect(old)
    conn.executescript(V1_SCHEMA)
    conn.executemany("INSERT INTO page_versions VALUES (?, '<p>', 'null', ?, '2026-01-01T00:00:00.000Z')",
                     [("a", 3), ("b", 1)])
    conn.commit()
    conn.close()
    assert f"upgraded from schema version 1 to {migrate.LATEST}" in run_migrate(old)
    migrate.migrate(fresh)
    assert shape(old) == shape(fresh)
    rows = sqlite3.connect(old).execute("SELECT slug, version, seq FROM page_versions ORDER BY slug").fetchall()
    assert [(slug, version) for slug, version, _ in rows] == [("a", 3), ("b", 1)]
    assert len({seq for _, _, seq in rows}) == 2  # each page has its own place in the save order
    assert sqlite3.connect(old).execute("SELECT pages, bytes FROM storage").fetchone() == (2, 2 * len("<p>null"))


def test_upgrade_to_tombstones_counts_kept_keys_and_refuses_removing_a_page_row(tmp_path):
    """Schema 5 to 6 (and on): keys already kept count against the byte limit; a page row can no longer be deleted."""
    db = str(tmp_path / "v5.sqlite3")
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(V1_SCHEMA)
    conn.executescript("".join(f"BEGIN; {sql}; PRAGMA user_version = {v}; COMMIT;"
                               for v, sql in migrate.UPGRADES if v <= 5))
    conn.execute("INSERT INTO page_versions (slug, html, data, version, updated_at, seq)"
                 " VALUES ('kept', 'x', '{}', 3, 't', 1)")
    conn.execute("INSERT INTO idempotency_keys VALUES ('k-1', 'f', 'kept', 3, 't', 0)")
    conn.close()
    assert f"upgraded from schema version 5 to {migrate.LATEST}" in run_migrate(db)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT pages, bytes FROM storage").fetchone() == (1, 3 + 200 + len("k-1") + len("kept"))
    with pytest.raises(sqlite3.IntegrityError, match="POST /delete"):
        conn.execute("DELETE FROM page_versions WHERE slug = 'kept'")
    conn.execute("INSERT INTO page_editors VALUES ('kept', 'client:x', 'x', 'Ada', 'gone', 0)")  # allowed now


def test_a_newer_schema_is_refused_by_migrate_and_by_the_app_and_left_alone(tmp_path, db_path):
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {migrate.LATEST + 1}")
    conn.close()
    before = dump(db_path)
    result = subprocess.run([sys.executable, "migrate.py"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "CHANGEFEED_DB": db_path})
    assert result.returncode == 1
    assert f"schema version {migrate.LATEST + 1}, newer than this code ({migrate.LATEST})" in result.stderr
    assert "upgraded" not in result.stdout
    with pytest.raises(migrate.SchemaTooNew, match="newer than this code"):
        create_app({"CHANGEFEED_DB": db_path})
    assert dump(db_path) == before


def test_new_epoch_gives_the_database_a_new_identity_and_keeps_its_pages(db_path, save, epoch):
    save(), save()
    env = {**os.environ, "CHANGEFEED_DB": db_path}
    out = subprocess.run([sys.executable, "migrate.py", "--new-epoch"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    new = sqlite3.connect(db_path).execute("SELECT value FROM epoch").fetchall()
    assert len(new) == 1 and new[0][0] != epoch and new[0][0] in out
    answer = create_app({"CHANGEFEED_DB": db_path}).test_client().get("/changes?slug=home").get_json()
    assert answer["epoch"] == new[0][0] and answer["version"] == 2


def test_gunicorn_refuses_to_start_on_a_missing_database_and_says_to_migrate(tmp_path):
    missing = str(tmp_path / "missing.sqlite3")
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", "127.0.0.1:0",
                             "app:create_app()"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                            env={**os.environ, "CHANGEFEED_DB": missing})
    assert result.returncode != 0
    assert "python migrate.py" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(missing)
