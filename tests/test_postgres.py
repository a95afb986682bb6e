"""What only PostgreSQL does: NOTIFY per transaction, the listener's reconnection, the database going away.

Every test runs gunicorn on a PostgreSQL database of its own (the contract
itself runs on both engines in the modules marked `engines`). The database
"goes away" by refusing new connections and terminating the service's
backends, which is what a restart or failover looks like from the service.
"""

import json
import queue
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest
import requests

from app import create_app
from changefeed.stores import schema as migrate
from changefeed.stores.postgres import EVERYTHING, notify_payload
from support import ROOT
from support.clients import http_save, start_long_poll
from support.databases import TEST_DATABASE_URL
from support.servers import close_app, streams_per_worker

QUIET = {"CHANGEFEED_SSE_HEARTBEAT_MS": "600000"}  # no heartbeat re-read: only a wake-up can deliver


pytestmark = pytest.mark.postgres_only


def database_name(database):
    return psycopg.conninfo.conninfo_to_dict(database.url)["dbname"]


def admin(sql, params=()):
    """Run SQL as the test server's administrator, outside any test database."""
    with psycopg.connect(TEST_DATABASE_URL, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def backends(database, application_name):
    return admin("SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                 (database_name(database), application_name))


def cut_off(database, *application_names):
    """Refuse new connections to the test's database and end the service's open ones."""
    name = database_name(database)
    admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND application_name = ANY(%s)",
          (name, list(application_names)))


def restore(database):
    admin(f"ALTER DATABASE {database_name(database)} ALLOW_CONNECTIONS true")


def test_each_serving_process_listens_on_one_connection_operators_can_name(make_server, open_stream, database):
    server = make_server(workers=2)
    streams = []
    while len(streams) < 8 or min(streams_per_worker(server)) == 0:
        assert len(streams) < 200, "the streams all went to one worker"
        stream = open_stream(f"{server.url}/events?slug=seen")
        stream.next()
        streams.append(stream)
    assert len(backends(database, "changefeed-listener")) == 2  # one per worker, however many streams


def test_a_save_sends_one_notify_naming_slugs_and_versions_never_the_page(make_server, database):
    server = make_server(workers=1)
    heard = []
    with psycopg.connect(database.url, autocommit=True) as listener:
        listener.execute("LISTEN changefeed")
        secret = f"page-body-{uuid.uuid4().hex}"
        threads = [threading.Thread(target=http_save, args=(server, f"s{n % 3}", secret)) for n in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        heard = [n.payload for n in listener.notifies(timeout=1.0)]
    pairs = [tuple(pair) for payload in heard for pair in json.loads(payload)]
    assert sorted(pairs) == sorted((f"s{s}", v) for s in range(3) for v in range(1, 11))  # each save once
    assert not any(secret in payload for payload in heard)
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    transactions = next(float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("changefeed_commit_batch_saves_count"))
    assert len(heard) == transactions  # one NOTIFY per transaction, however many saves it holds


def test_a_notification_too_long_for_postgresql_asks_every_listener_to_re_read():
    saved = [type("Saved", (), {"slug": "x" * 120 + str(n), "version": n})() for n in range(200)]
    assert notify_payload(saved) == EVERYTHING
    assert json.loads(notify_payload(saved[:3])) == [[s.slug, s.version] for s in saved[:3]]


def test_everything_makes_streams_re_read_their_pages(make_server, open_stream, database, epoch):
    server = make_server(workers=1, env=QUIET)
    stream = open_stream(f"{server.url}/events?slug=bulk")
    stream.next()  # retry: subscribed
    http_save(server, slug="bulk", html="one")
    assert stream.next()["id"] == f"{epoch}:1"
    # A change this process was never told about, then the catch-all notification.
    database.query("UPDATE page_versions SET version = 2, html = 'two' WHERE slug = 'bulk'")
    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute("NOTIFY changefeed, '*'")
    event = stream.next(timeout=5)
    assert (event["id"], event["data"]["html"]) == (f"{epoch}:2", "two")


def test_a_new_epoch_reaches_open_streams_and_long_polls_at_once(make_server, open_stream, database, epoch):
    """After a restore, `migrate.py --new-epoch`: every host's subscribers start over, without a heartbeat."""
    server = make_server(workers=2, env=QUIET)
    for n in range(1, 4):
        http_save(server, slug="restored", html=f"v{n}")
    stream = open_stream(f"{server.url}/events?slug=restored&since=3&epoch={epoch}")
    stream.next()  # retry: subscribed, nothing newer than 3
    finish = start_long_poll(server, "restored", 3, wait=30)
    time.sleep(0.3)
    renewed = subprocess.run([sys.executable, "migrate.py", "--new-epoch"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, env={"CHANGEFEED_DATABASE_URL": database.url, "PATH": "/usr/bin:/bin"})
    assert renewed.returncode == 0, renewed.stderr
    new_epoch = database.epoch()
    event = stream.next(timeout=5)  # the whole page again, under the new epoch, though its version is not newer
    assert (event["id"], event["data"]["html"]) == (f"{new_epoch}:3", "v3")
    answer = finish()["answer"]
    assert answer["epoch"] == new_epoch and answer["version"] == 3


def test_a_save_made_while_the_listener_is_cut_off_is_delivered_once_it_listens_again(
        make_server, open_stream, database, epoch):
    server = make_server(workers=1, env=QUIET)
    stream = open_stream(f"{server.url}/events?slug=gap")
    stream.next()  # retry: subscribed
    http_save(server, slug="gap", html="before")
    assert stream.next()["id"] == f"{epoch}:1"
    (listener,) = backends(database, "changefeed-listener")
    cut_off(database, "changefeed-listener")  # its pooled connections stay: saves still land
    try:
        assert not admin("SELECT 1 FROM pg_stat_activity WHERE pid = %s", listener)
        http_save(server, slug="gap", html="while deaf")  # notified to nobody
        with pytest.raises(queue.Empty):
            stream.next(timeout=1.5)
        ready = requests.get(f"{server.url}/readyz", timeout=10)
        assert ready.status_code == 503 and "watcher" in ready.json()["checks"]
    finally:
        restore(database)
    event = stream.next(timeout=10)  # backoff at most 5 s, then it re-reads every watched page
    assert (event["id"], event["data"]["html"]) == (f"{epoch}:2", "while deaf")
    assert len(backends(database, "changefeed-listener")) == 1
    http_save(server, slug="gap", html="after")
    assert stream.next(timeout=5)["id"] == f"{epoch}:3"


def test_a_save_whose_notification_never_came_is_delivered_by_the_catch_up_read(make_server, open_stream, database,
                                                                              epoch):
    """A NOTIFY goes after its commit: a process dying in between sends none, and the listeners still deliver."""
    server = make_server(workers=1, env=QUIET)
    stream = open_stream(f"{server.url}/events?slug=unannounced")
    stream.next()  # retry: subscribed
    http_save(server, slug="unannounced", html="one")
    assert stream.next()["id"] == f"{epoch}:1"
    database.query("UPDATE page_versions SET version = 2, html = 'two' WHERE slug = 'unannounced'")  # no NOTIFY
    event = stream.next(timeout=5)  # the catch-up reads once a second; the heartbeat re-read is minutes away
    assert (event["id"], event["data"]["html"]) == (f"{epoch}:2", "two")


def test_the_database_going_away_is_a_503_and_the_service_recovers_by_itself(make_server, open_stream, database):
    server = make_server(workers=2)
    answers, stop = [], threading.Event()

    def keep_saving():
        session = requests.Session()
        while not stop.is_set():
            response = session.post(f"{server.url}/save", json={"slug": "flow", "html": "x"}, timeout=30)
            answers.append((response.status_code, response.json(), response.headers.get("Retry-After")))

    saver = threading.Thread(target=keep_saving)
    saver.start()
    try:
        time.sleep(0.5)
        cut_off(database, "changefeed", "changefeed-listener")
        time.sleep(1.5)
        poll = requests.get(f"{server.url}/changes?slug=flow&since=0", timeout=10)
        ready = requests.get(f"{server.url}/readyz", timeout=10)
        restore(database)
        restored_at, deadline = len(answers), time.monotonic() + 30  # the pool retries with backoff
        while not any(a[0] == 200 for a in answers[restored_at:]):
            assert time.monotonic() < deadline, f"saves did not recover: {answers[-3:]}"
            time.sleep(0.1)
    finally:
        stop.set()
        saver.join()
    assert poll.status_code == 503 and poll.headers["Retry-After"] and poll.json()["error"] == "unavailable"
    assert ready.status_code == 503 and "database" in ready.json()["checks"]
    refused = [a for a in answers if a[0] != 200]
    assert refused, "the saves never met the missing database"
    assert {a[0] for a in refused} == {503} and all(a[2] for a in refused)
    assert {a[1]["error"] for a in refused} <= {"not saved", "outcome unknown", "busy"}
    acknowledged = [a[1]["version"] for a in answers if a[0] == 200]
    assert acknowledged == sorted(set(acknowledged))  # one client, in order: no version given twice
    (stored,) = database.query("SELECT version FROM page_versions WHERE slug = 'flow'")[0]
    unknown = sum(a[1]["error"] == "outcome unknown" for a in refused)
    assert len(acknowledged) <= stored <= len(acknowledged) + unknown  # nothing lost, nothing invented
    # The listener reconnects on its own backoff (full jitter, at most 5 s), which may end after the pool's.
    deadline = time.monotonic() + 5 + 5
    while (ready_after := requests.get(f"{server.url}/readyz", timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, ready_after.text
        time.sleep(0.2)
    stream = open_stream(f"{server.url}/events?slug=flow")
    stream.next()  # retry
    assert stream.next()["data"]["version"] == stored
    finish = start_long_poll(server, "flow", stored, wait=20)
    time.sleep(0.3)
    http_save(server, slug="flow", html="after")
    assert finish()["answer"]["version"] == stored + 1
    assert "Traceback" not in server.log()


def test_migrate_creates_then_leaves_a_postgresql_database_alone_and_records_its_version(tmp_path):
    name = f"changefeed_migrate_{uuid.uuid4().hex[:12]}"
    admin(f"CREATE DATABASE {name}")
    try:
        url = psycopg.conninfo.make_conninfo(TEST_DATABASE_URL, dbname=name)
        env = {"CHANGEFEED_DATABASE_URL": url, "PATH": "/usr/bin:/bin"}

        def run(*args):
            return subprocess.run([sys.executable, "migrate.py", *args], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=60)

        check = run("--check")
        assert check.returncode == 1 and "run `python migrate.py`" in check.stderr
        first, second = run(), run()
        assert "created at schema version" in first.stdout and "nothing to do" in second.stdout
        assert run("--check").returncode == 0
        with psycopg.connect(url) as conn:
            assert migrate.postgres_schema_version(conn) == migrate.LATEST
            before = conn.execute("SELECT value FROM epoch").fetchone()[0]
        renewed = run("--new-epoch")
        assert renewed.returncode == 0 and before not in renewed.stdout
    finally:
        admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_database_url_password_never_shows_in_messages():
    url = "postgresql://someone:hunter2@127.0.0.1:1/nowhere"
    assert "hunter2" not in migrate.describe(url)
    failed = subprocess.run([sys.executable, "migrate.py"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"CHANGEFEED_DATABASE_URL": url, "PATH": "/usr/bin:/bin"})
    assert failed.returncode == 1 and "cannot migrate postgresql://someone@127.0.0.1:1/nowhere" in failed.stderr
    assert "hunter2" not in failed.stderr + failed.stdout


def test_pages_imported_from_sqlite_keep_their_versions_and_epoch_so_clients_go_on(database, client, tmp_path):
    path = str(tmp_path / "old.sqlite3")
    migrate.migrate(path)
    old = create_app({"CHANGEFEED_DB": path, "CHANGEFEED_DATABASE_URL": "", "TESTING": True})
    for n in range(3):
        old.test_client().post("/save", json={"slug": "moved", "html": f"v{n + 1}", "data": {"n": n + 1}})
    before = old.test_client().get("/changes?slug=moved&since=0").get_json()
    close_app(old)
    env = {"CHANGEFEED_DATABASE_URL": database.url, "PATH": "/usr/bin:/bin"}
    imported = subprocess.run([sys.executable, "migrate.py", "--import-sqlite", path], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0 and "imported 1 page(s)" in imported.stdout, imported.stderr
    assert client.get("/changes?slug=moved&since=0").get_json() == before
    position = f"since=3&epoch={before['epoch']}"
    assert client.get(f"/changes?slug=moved&{position}").get_json()["changed"] is False  # nothing to start over
    assert client.post("/save", json={"slug": "moved", "html": "v4"}).get_json()["version"] == 4
    again = subprocess.run([sys.executable, "migrate.py", "--import-sqlite", path], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already holds pages" in again.stderr


@pytest.mark.parametrize("args", [[], ["--preload"]], ids=["", "preload"])
def test_a_save_waiting_for_a_lock_never_stalls_the_other_requests_of_its_worker(make_server, database, args):
    server = make_server(workers=1, args=args)
    http_save(server, slug="held")
    with psycopg.connect(database.url) as blocker:  # a transaction holding the page's row
        blocker.execute("UPDATE page_versions SET version = version WHERE slug = 'held'")
        saving = threading.Thread(target=requests.post, args=(f"{server.url}/save",),
                                  kwargs={"json": {"slug": "held", "html": "waits"}, "timeout": 30})
        saving.start()
        time.sleep(0.5)  # the save now waits on PostgreSQL's lock, in this one worker
        started = time.monotonic()
        for _ in range(5):
            assert requests.get(f"{server.url}/changes?slug=held&since=0", timeout=5).status_code == 200
        assert time.monotonic() - started < 2.0
        assert saving.is_alive()
    saving.join(timeout=10)
    assert requests.get(f"{server.url}/changes?slug=held&since=0", timeout=5).json()["version"] == 2


# What schema 7 (storage shards, the writing transaction of each version) added, taken away again: schema 6.
BACK_TO_SCHEMA_6 = """
    DROP TRIGGER page_versions_xact ON page_versions; DROP FUNCTION changefeed_stamp_xact();
    ALTER TABLE page_versions DROP COLUMN xact;
    DROP VIEW storage;
    DELETE FROM storage_shards WHERE shard <> 0;
    ALTER TABLE storage_shards DROP COLUMN shard;
    ALTER TABLE storage_shards RENAME TO storage;
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
    CREATE OR REPLACE FUNCTION changefeed_count_keys() RETURNS trigger LANGUAGE plpgsql AS $$
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
    DROP FUNCTION changefeed_shard();
    UPDATE schema_version SET version = 6;
"""

# What schema 6 (tombstones, keys counted in storage, "gone" entries) added, taken away again: schema 5.
BACK_TO_SCHEMA_5 = BACK_TO_SCHEMA_6 + """
    DROP TRIGGER page_versions_keep ON page_versions; DROP FUNCTION changefeed_keep_pages();
    DROP TRIGGER storage_count_keys ON idempotency_keys; DROP FUNCTION changefeed_count_keys();
    DROP TRIGGER storage_count ON page_versions;
    ALTER TABLE page_versions DROP COLUMN deleted;
    CREATE OR REPLACE FUNCTION changefeed_count_storage() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            UPDATE storage SET pages = pages + 1, bytes = bytes + octet_length(NEW.html) + octet_length(NEW.data);
        ELSIF TG_OP = 'UPDATE' THEN
            UPDATE storage SET bytes = bytes + octet_length(NEW.html) + octet_length(NEW.data)
                                             - octet_length(OLD.html) - octet_length(OLD.data);
        ELSE
            UPDATE storage SET pages = pages - 1, bytes = bytes - octet_length(OLD.html) - octet_length(OLD.data);
        END IF;
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER storage_count AFTER INSERT OR DELETE OR UPDATE OF html, data ON page_versions
        FOR EACH ROW EXECUTE FUNCTION changefeed_count_storage();
    ALTER TABLE page_editors DROP CONSTRAINT page_editors_state_check;
    ALTER TABLE page_editors ADD CONSTRAINT page_editors_state_check CHECK (state IN ('viewing', 'editing'));
    UPDATE schema_version SET version = 5;
"""


def _shape(database):
    return database.query(
        "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_schema = 'public' ORDER BY table_name, column_name")


def test_the_upgrades_from_schema_4_match_a_fresh_database_and_keep_pages(database):
    """Schema 4 to 5 (presence) to 6 (tombstones) to 7 (shards) on PostgreSQL: the tables and columns of a new one."""
    fresh = _shape(database)
    database.query(BACK_TO_SCHEMA_5)
    database.query("INSERT INTO page_versions (slug, html, data, version, updated_at) VALUES"
                   " ('kept', 'x', '{}', 3, '2026-11-24T00:00:00.000Z')")
    database.query("DROP TABLE page_editors; DROP TABLE presence; DROP SEQUENCE presence_clock;"
                   " UPDATE schema_version SET version = 4")
    migrate.migrate_postgres(database.url)
    assert _shape(database) == fresh
    assert database.query("SELECT version FROM schema_version") == [(migrate.LATEST,)]
    assert database.query("SELECT version, deleted FROM page_versions WHERE slug = 'kept'") == [(3, False)]
    assert database.query("SELECT pages, bytes FROM storage") == [(1, 3)]


def test_the_upgrade_to_tombstones_counts_kept_keys_and_takes_gone_entries(database):
    """Schema 5 to 6 on PostgreSQL: keys already kept count against the byte limit; an entry may say "gone"."""
    database.query(BACK_TO_SCHEMA_5)
    database.query("INSERT INTO page_versions (slug, html, data, version, updated_at) VALUES"
                   " ('kept', 'x', '{}', 3, '2026-11-24T00:00:00.000Z');"
                   " INSERT INTO idempotency_keys VALUES ('k-1', 'f', 'kept', 3, 't', 0)")
    migrate.migrate_postgres(database.url)
    assert database.query("SELECT pages, bytes FROM storage") == [(1, 3 + 200 + len("k-1") + len("kept"))]
    database.query("INSERT INTO page_editors VALUES ('kept', 'client:x', 'x', 'Ada', 'gone', 0)")
    assert database.query("SELECT state FROM page_editors") == [("gone",)]


def test_the_upgrade_to_storage_shards_keeps_the_counts_and_saves_go_on(database, client):
    """Schema 6 to 7 on PostgreSQL: the one storage row becomes shard 0, its counts kept; later saves add to them."""
    client.post("/save", json={"slug": "kept", "html": "x"}, headers={"Idempotency-Key": "k-1"})
    counted = database.query("SELECT pages, bytes FROM storage")
    database.query(BACK_TO_SCHEMA_6)
    assert database.query("SELECT pages, bytes FROM storage") == counted
    migrate.migrate_postgres(database.url)
    assert database.query("SELECT shard, pages, bytes FROM storage_shards WHERE shard = 0") == [(0, *counted[0])]
    assert database.query("SELECT count(*) FROM storage_shards") == [(16,)]
    assert client.post("/save", json={"slug": "new", "html": "yy"}).status_code == 200
    assert database.query("SELECT pages, bytes FROM storage") == [(2, counted[0][1] + len("yy") + len("null"))]
