"""Storage faults under a real gunicorn server: a full disk, a disk gone read-only, a vanished file.

Every fault is real: a 4 MiB tmpfs filled with a filler file, an ext4 image
on a loop device that the kernel forces read-only after an error
(/sys/fs/ext4/<loop>/trigger_fs_error), a database file renamed away or
replaced. In each case a save answers 503 with the JSON error naming the
cause and writes nothing, reads are served while the file can be read, and
saves work again once the cause is fixed, without a restart.

The mounts need root: without it those tests skip with one line, and
CHANGEFEED_REQUIRE_MOUNT=1 (CI) turns that into a failure. The vanished-file
tests need no mount and run everywhere.
"""
import errno
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests

from changefeed.stores.schema import migrate
from changefeed.stores.sqlite import SQLiteStore
from support.databases import read_epoch

MiB = 1024 * 1024
HEARTBEAT_MS = 200  # streams send a comment this often while idle: a live stream shows it quickly
BOOT_S = 3  # a gunicorn worker boots in well under a second here

# Tracebacks a fault may log on purpose: the watcher logs its first failure in a row, then backs off.
EXPECTED_TRACEBACKS = ("watcher failed; retrying with backoff",)


def cannot_mount(reason):
    """Skip the test in one line, or fail it when CHANGEFEED_REQUIRE_MOUNT=1 (as CI sets it)."""
    reason = f"storage fault tests need to mount filesystems as root: {reason}"
    if os.environ.get("CHANGEFEED_REQUIRE_MOUNT") == "1":
        pytest.fail(f"{reason}; CHANGEFEED_REQUIRE_MOUNT=1 makes this a failure", pytrace=False)
    pytest.skip(reason)


def run(*command):
    """Run a system command; return its stdout, or raise CalledProcessError with its stderr."""
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


def mount(*command):
    """Mount as `command` says, or skip/fail the test with the reason it cannot."""
    if os.geteuid() != 0:
        cannot_mount("not running as root")
    try:
        run(*command)
    except (OSError, subprocess.CalledProcessError) as exc:
        cannot_mount(f"`{' '.join(command)}` failed: {getattr(exc, 'stderr', '') or exc}".strip())


def mounted(path):
    """Whether something is mounted at `path`."""
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


def unmount(path):
    """Unmount whatever is at `path`, lazily when something still holds it (a test failed mid-way)."""
    while mounted(path):
        try:
            run("umount", str(path))
        except subprocess.CalledProcessError:
            run("umount", "-l", str(path))


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, unmounted afterwards (after the servers using it stopped: fixtures end in reverse)."""
    path = tmp_path / "disk"
    path.mkdir()
    mount("mount", "-t", "tmpfs", "-o", "size=4m,mode=700", "tmpfs", str(path))
    yield path
    unmount(path)


class Ext4Image:
    """An ext4 image on a loop device, mounted with errors=remount-ro, as a disk that can fail."""

    def __init__(self, folder):
        self.image, self.path = folder / "disk.ext4", folder / "disk"
        self.loops = []  # every loop device attached, the first one the kernel made read-only

    def attach_and_mount(self):
        """Attach the image to a free loop device and mount it at self.path."""
        loop = run("losetup", "--find", "--show", str(self.image))
        self.loops.append(loop)
        run("mount", "-t", "ext4", "-o", "errors=remount-ro", loop, str(self.path))
        return loop

    def fail(self):
        """Have the kernel record an error on the filesystem: errors=remount-ro makes it read-only."""
        Path(f"/sys/fs/ext4/{os.path.basename(self.loops[-1])}/trigger_fs_error").write_text("test fault\n")

    def options(self):
        """The mount options of self.path, as the kernel reports them."""
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if fields[1] == str(self.path):
                return set(fields[3].split(","))
        return set()

    def fsck(self, *flags):
        """Run e2fsck on the image file; return its exit status (0: clean, 1: errors fixed)."""
        return subprocess.run(["e2fsck", *flags, str(self.image)], capture_output=True, text=True,
                              timeout=60).returncode

    def clean_up(self):
        unmount(self.path)
        for loop in self.loops:
            subprocess.run(["losetup", "-d", loop], capture_output=True)


@pytest.fixture
def ext4_disk(tmp_path):
    """A 16 MiB ext4 image mounted from a loop device; unmounted and detached afterwards."""
    disk = Ext4Image(tmp_path)
    disk.path.mkdir()
    if os.geteuid() != 0:
        cannot_mount("not running as root")
    try:
        run("truncate", "-s", "16M", str(disk.image))
        run("mkfs.ext4", "-q", "-F", str(disk.image))
        loop = disk.attach_and_mount()
    except (OSError, subprocess.CalledProcessError) as exc:
        disk.clean_up()
        cannot_mount(f"an ext4 image on a loop device: {getattr(exc, 'stderr', '') or exc}".strip())
    if not Path(f"/sys/fs/ext4/{os.path.basename(loop)}/trigger_fs_error").exists():
        disk.clean_up()
        cannot_mount("this kernel has no /sys/fs/ext4/<device>/trigger_fs_error")
    try:
        yield disk
    finally:
        disk.clean_up()


def serve(make_server, path, workers=2, migrated=False, args=(), **env):
    """Migrate a database at `path`, serve it with gunicorn, and wait until every worker opened it.

    make_server returns once one worker answers; a fault must not meet a
    worker still booting (a worker that cannot open the database at boot
    takes the whole server down, as gunicorn does with a worker that fails to boot).
    """
    if not migrated:
        migrate(path)
    server = make_server(workers=workers, args=args,
                         env={"CHANGEFEED_DB": path, "CHANGEFEED_SSE_HEARTBEAT_MS": str(HEARTBEAT_MS), **env})
    deadline = time.monotonic() + 20
    while len(workers_holding(server, path)) < workers:
        assert time.monotonic() < deadline, f"not every worker opened {path}: {server.log()[-2000:]}"
        time.sleep(0.05)
    return server


def workers_holding(server, path):
    """The pids of the server's workers that have the file at `path` open."""
    target = os.stat(path)
    pids = set()
    for worker in psutil.Process(server.process.pid).children():
        try:
            fds = os.listdir(f"/proc/{worker.pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                found = os.stat(f"/proc/{worker.pid}/fd/{fd}")
            except OSError:
                continue
            if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
                pids.add(worker.pid)
    return pids


def http(method, url, **kwargs):
    """One request on a connection of its own, closed after it.

    A client's idle keep-alive connection holds a gevent worker for the whole
    graceful timeout (10 s) when the server stops; closing it keeps each test short.
    """
    return requests.request(method, url, headers={"Connection": "close"}, timeout=30, **kwargs)


def post_save(server, slug="home", html="<p>hi</p>", data=None):
    return http("POST", f"{server.url}/save", json={"slug": slug, "html": html, "data": data})


def saved(server, slug, html, data=None):
    """Save and return the new version; the save must succeed."""
    response = post_save(server, slug, html, data)
    assert response.status_code == 200, response.text
    return response.json()["version"]


def stored(server, slug="home"):
    """The page as GET /changes?since=0 serves it: (version, html, data)."""
    response = http("GET", f"{server.url}/changes?slug={slug}&since=0")
    assert response.status_code == 200, response.text
    body = response.json()
    return body["version"], body.get("html"), body.get("data")


def assert_not_saved(response, *words):
    """The save was refused with 503 "not saved", and its message names the cause in `words`."""
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "not saved", body
    message = body["message"].lower()
    assert all(word in message for word in words), body
    assert response.headers["Retry-After"]
    return body


def assert_stream_alive(stream, version=None):
    """The stream is still open: it sends a heartbeat, or the event of `version` when given."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        item = stream.next(timeout=5, skip_comments=False)
        if version is None and "comment" in item:
            return
        if version is not None and item.get("data", {}).get("version") == version:
            return item["data"]
    pytest.fail(f"the event stream sent neither a heartbeat nor version {version}")


def fill(path, leave=0):
    """Grow the filler file at `path` until its filesystem has at most `leave` bytes free."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (MiB, 64 * 1024, 4096, 512):
            while True:
                stat = os.statvfs(path)
                if stat.f_bavail * stat.f_frsize - chunk < leave:
                    break
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)


def integrity(path):
    """PRAGMA integrity_check of the database at `path`."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def unexpected_tracebacks(log):
    """Tracebacks in a gunicorn log other than those a fault logs on purpose (EXPECTED_TRACEBACKS)."""
    lines = log.splitlines()
    found = []
    for n, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            before = lines[n - 1] if n else ""
            if not any(expected in before for expected in EXPECTED_TRACEBACKS):
                found.append("\n".join(lines[max(0, n - 1):n + 30]))
    return found


def files_on(server, device):
    """The files the server's workers hold open on filesystem `device`: [(pid, path)]."""
    found = []
    for worker in psutil.Process(server.process.pid).children():
        for fd in os.listdir(f"/proc/{worker.pid}/fd"):
            try:
                if os.stat(f"/proc/{worker.pid}/fd/{fd}").st_dev == device:
                    found.append((worker.pid, os.readlink(f"/proc/{worker.pid}/fd/{fd}")))
            except OSError:
                continue
    return found


def wait_ready(server, timeout=5):
    """Poll /readyz until it answers 200; return whether it did within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http("GET", f"{server.url}/readyz").status_code == 200:
            return True
        time.sleep(0.1)
    return False


def page_row(path, slug):
    """(version, html) of `slug` in the database file at `path`, read directly."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT version, html FROM page_versions WHERE slug = ?", (slug,)).fetchone()
    finally:
        conn.close()


# --- a full disk --------------------------------------------------------------------------------


def test_a_full_disk_refuses_saves_keeps_serving_reads_and_recovers_once_space_is_freed(
        small_disk, make_server, open_stream):
    path = str(small_disk / "changefeed.sqlite3")
    server = serve(make_server, path)
    page = (saved(server, "home", "<p>before</p>", {"n": 0}), "<p>before</p>", {"n": 0})
    stream = open_stream(f"{server.url}/events?slug=home&since=0")
    assert_stream_alive(stream, version=page[0])

    # Fill the disk; a save may still fit in space SQLite already holds, so top up and try again.
    filler = small_disk / "filler"
    for attempt in range(1, 31):
        fill(filler)
        html, data = f"<p>{attempt}</p>" + "x" * 20_000, {"n": attempt}
        response = post_save(server, "home", html, data)
        if response.status_code != 200:
            break
        page = (response.json()["version"], html, data)
    else:
        pytest.fail("30 saves in a row succeeded on a full disk")
    assert_not_saved(response, "disk", "full")

    for _ in range(4):  # a connection each, so either worker may answer
        assert stored(server) == page  # the version before, and the row whole
    assert_stream_alive(stream)
    assert http("GET", f"{server.url}/readyz").status_code == 200  # reads are served

    os.remove(filler)
    assert saved(server, "home", "<p>after</p>", {"n": "after"}) == page[0] + 1
    assert stored(server) == (page[0] + 1, "<p>after</p>", {"n": "after"})
    assert_stream_alive(stream, version=page[0] + 1)
    assert integrity(path) == [("ok",)]
    assert unexpected_tracebacks(server.log()) == []


@pytest.mark.parametrize("html_mib", [2.5, 6], ids=["fails at COMMIT", "fails mid-statement"])
def test_a_save_that_overflows_the_disk_mid_transaction_writes_nothing(small_disk, make_server, html_mib):
    """A big save runs out of space after writing part of its transaction to the WAL.

    2.5 MiB fits SQLite's page cache: COMMIT writes about 1 MiB of its WAL
    frames, then meets ENOSPC before the commit frame. 6 MiB overflows the
    cache: the UPDATE spills pages to the WAL and fails mid-statement.
    """
    path = str(small_disk / "changefeed.sqlite3")
    server = serve(make_server, path, CHANGEFEED_MAX_HTML_BYTES=str(7 * MiB))
    saved(server, "home", "<p>before</p>", {"n": 0})
    filler = small_disk / "filler"
    fill(filler, leave=MiB)

    big = post_save(server, "home", "y" * int(html_mib * MiB), {"n": "big"})
    assert_not_saved(big, "disk", "full")

    assert stored(server) == (1, "<p>before</p>", {"n": 0})
    os.remove(filler)
    assert saved(server, "home", "<p>after</p>", {"n": 1}) == 2
    assert stored(server) == (2, "<p>after</p>", {"n": 1})
    server.stop()
    assert integrity(path) == [("ok",)]
    assert unexpected_tracebacks(server.log()) == []


# --- a disk the kernel forces read-only ---------------------------------------------------------


def test_a_disk_forced_read_only_refuses_saves_and_recovers_after_fsck_and_remount_without_restart(
        ext4_disk, make_server, open_stream):
    """One worker, so what it holds open at each step is known; no heartbeat, so only the test reads."""
    path = str(ext4_disk.path / "changefeed.sqlite3")
    server = serve(make_server, path, workers=1, CHANGEFEED_SSE_HEARTBEAT_MS="60000")
    page = (saved(server, "home", "<p>before</p>", {"n": 0}), "<p>before</p>", {"n": 0})
    stream = open_stream(f"{server.url}/events?slug=home&since=0")
    assert_stream_alive(stream, version=1)

    failed_device = os.stat(path).st_dev
    ext4_disk.fail()
    assert "emergency_ro" in ext4_disk.options() or "ro" in ext4_disk.options()
    for _ in range(3):  # the first meets the failed write (I/O error), the next a read-only file
        body = assert_not_saved(post_save(server, "home", "<p>lost</p>", {"n": 1}))
        assert "read-only" in body["message"] or "i/o error" in body["message"].lower(), body
        assert stored(server) == page  # read from the failed disk: it still reads
    assert not stream.ended.is_set()

    # What an operator does: a plain umount is refused (the server holds the files open), so
    # detach it lazily, check the image, and mount it again at the same path from a new loop device.
    assert subprocess.run(["umount", str(ext4_disk.path)], capture_output=True).returncode != 0
    assert_not_saved(post_save(server, "home", "<p>lost</p>", {"n": 2}))  # closes the last open connection
    run("umount", "-l", str(ext4_disk.path))
    assert_not_saved(post_save(server, "home", "<p>lost</p>", {"n": 3}), "missing", "restore")
    missing = http("GET", f"{server.url}/changes?slug=home&since=0")
    if missing.status_code == 200:
        # A second pooled connection was open (two requests overlapped earlier): reads go on from it, by design
        # (SQLiteStore.changes), and can only show the page as it was.
        assert (missing.json()["version"], missing.json()["html"]) == (1, "<p>before</p>"), missing.text
    else:  # nothing open to read from
        assert missing.status_code == 503 and missing.json()["error"] == "unavailable", missing.text
        assert "missing" in missing.json()["message"]
    assert ext4_disk.fsck("-f", "-y") in (0, 1)  # 1: errors were found and fixed
    ext4_disk.attach_and_mount()

    assert saved(server, "home", "<p>after</p>", {"n": 4}) == 2
    assert stored(server) == (2, "<p>after</p>", {"n": 4})
    assert_stream_alive(stream, version=2)
    assert wait_ready(server)
    assert files_on(server, failed_device) == []  # the failed disk is let go: its loop device can go
    assert integrity(path) == [("ok",)]
    stream.close()
    server.stop()
    ext4_disk.clean_up()
    assert ext4_disk.fsck("-f", "-n") == 0  # nothing of the failed mount was written after the check
    assert unexpected_tracebacks(server.log()) == []


def test_a_server_restarted_on_a_disk_gone_read_only_serves_reads_and_refuses_saves(ext4_disk, make_server):
    """The server (re)starts on a disk that failed while another process had the database open.

    Its -wal and -shm stay, so SQLite can read. No save ran here, so even the
    turn's file (`<database>.write-turn`) cannot be created.
    """
    path = str(ext4_disk.path / "changefeed.sqlite3")
    migrate(path)
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("INSERT INTO page_versions (slug, html, data, version, updated_at, seq)"
                       " VALUES ('home', '<p>before</p>', '{\"n\":0}', 1, '2026-01-01T00:00:00.000Z', 1)")
        ext4_disk.fail()
        server = serve(make_server, path, migrated=True)
        for _ in range(4):  # both workers
            assert stored(server) == (1, "<p>before</p>", {"n": 0})
            assert_not_saved(post_save(server, "home", "<p>lost</p>"), "read-only")
        assert not os.path.exists(f"{path}.write-turn")
        assert stored(server) == (1, "<p>before</p>", {"n": 0})
        assert unexpected_tracebacks(server.log()) == []
    finally:
        writer.close()


# --- a vanished database file -------------------------------------------------------------------


@pytest.mark.parametrize("files", [("",), ("", "-wal", "-shm")], ids=["db file only", "with -wal and -shm"])
def test_a_vanished_database_file_refuses_saves_until_it_is_renamed_back(
        tmp_path, make_server, open_stream, files):
    """`mv changefeed.sqlite3 elsewhere` while the server runs, then `mv` it back.

    No mount is needed here: the test runs everywhere.
    """
    path = str(tmp_path / "data" / "changefeed.sqlite3")
    server = serve(make_server, path)
    saved(server, "home", "<p>one</p>", {"n": 1})
    page = (saved(server, "home", "<p>two</p>", {"n": 2}), "<p>two</p>", {"n": 2})
    stream = open_stream(f"{server.url}/events?slug=home&since=0")
    assert_stream_alive(stream, version=2)

    for suffix in files:
        os.rename(path + suffix, f"{path}.moved{suffix}")
    body = assert_not_saved(post_save(server, "home", "<p>lost</p>", {"n": 0}), "missing", "restore")
    assert path in body["message"]
    for _ in range(4):  # both workers; one whose watcher never started says it cannot open the file
        ready = http("GET", f"{server.url}/readyz")
        assert ready.status_code == 503 and ready.json()["error"] == "not ready", ready.text
        assert path in ready.json()["message"]
    for _ in range(4):  # both workers: each reads the file it still has open, under its new name
        assert stored(server) == page
    assert_stream_alive(stream)

    for suffix in files:
        os.rename(f"{path}.moved{suffix}", path + suffix)
    assert saved(server, "home", "<p>three</p>", {"n": 3}) == 3
    assert stored(server) == (3, "<p>three</p>", {"n": 3})
    assert_stream_alive(stream, version=3)
    assert wait_ready(server)
    stream.close()
    assert unexpected_tracebacks(server.log()) == []


@pytest.mark.parametrize("in_place", [True, False], ids=["migrated in place", "migrated then moved in"])
def test_a_vanished_database_file_replaced_by_a_new_one_starts_over_with_its_epoch(
        tmp_path, make_server, open_stream, in_place):
    """The other way out the refusal names: `python migrate.py` makes a new database.

    At the path itself, or (as a careful operator does) next to it, moved in whole once made.
    """
    path = str(tmp_path / "data" / "changefeed.sqlite3")
    server = serve(make_server, path)
    old_epoch = http("GET", f"{server.url}/readyz").json()["epoch"]
    for n in range(3):
        saved(server, "home", f"<p>{n}</p>", {"n": n})
    stream = open_stream(f"{server.url}/events?slug=home&since=0")
    assert_stream_alive(stream, version=3)

    for suffix in ("", "-wal", "-shm"):  # what is left of the old database goes with it
        os.rename(path + suffix, f"{path}.old{suffix}")
    assert_not_saved(post_save(server, "home", "<p>lost</p>"), "missing")
    if in_place:
        migrate(path)
    else:
        migrate(f"{path}.new")
        os.rename(f"{path}.new", path)
    new_epoch = read_epoch(path)
    assert new_epoch != old_epoch

    for _ in range(8):  # both workers, before any save: a read answers from the file now at the path
        answer = http("GET", f"{server.url}/changes?slug=home&since=0").json()
        assert (answer["version"], answer["epoch"]) == (0, new_epoch), answer

    response = post_save(server, "home", "<p>new</p>", {"n": "new"})
    assert response.status_code == 200, response.text
    assert (response.json()["version"], response.json()["epoch"]) == (1, new_epoch)
    for _ in range(4):
        answer = http("GET", f"{server.url}/changes?slug=home&since=0").json()
        assert (answer["version"], answer["html"], answer["epoch"]) == (1, "<p>new</p>", new_epoch)
    assert wait_ready(server) and http("GET", f"{server.url}/readyz").json()["epoch"] == new_epoch
    event = assert_stream_alive(stream, version=1)  # the stream starts over on the new database
    assert event["epoch"] == new_epoch
    stream.close()
    assert unexpected_tracebacks(server.log()) == []


def test_a_worker_restarted_while_the_file_is_missing_does_not_take_the_server_down(tmp_path, make_server):
    path = str(tmp_path / "data" / "changefeed.sqlite3")
    server = serve(make_server, path)  # as gunicorn.conf.py configures it: the app is preloaded
    saved(server, "home", "<p>one</p>")
    os.rename(path, f"{path}.moved")
    victim = psutil.Process(server.process.pid).children()[0]
    victim.kill()  # a worker crashes (or is recycled) while the file is away; gunicorn starts another
    deadline = time.monotonic() + BOOT_S
    while time.monotonic() < deadline:  # the new worker has booted (or failed to) well before this
        assert server.process.poll() is None, f"gunicorn stopped: {server.log()[-300:]}"
        time.sleep(0.1)
    workers = [w for w in psutil.Process(server.process.pid).children() if w.pid != victim.pid]
    assert len(workers) == 2 and all(w.is_running() for w in workers)

    os.rename(f"{path}.moved", path)
    assert saved(server, "home", "<p>two</p>") == 2
    assert wait_ready(server)
    assert unexpected_tracebacks(server.log()) == []


# --- a replaced file, in the store itself -------------------------------------------------------


def test_a_save_after_the_file_was_replaced_never_lands_in_the_old_one(tmp_path):
    """Connections pooled before the file was replaced must not take the next save.

    Under gunicorn a worker seldom pools more than one connection, but
    `flask run` serves requests in threads that each hold one: this is the
    store as three such requests leave it. (No server: only the pool matters.)
    """
    path = str(tmp_path / "data" / "changefeed.sqlite3")
    migrate(path)
    store = SQLiteStore(path)
    store.save("home", "<p>old</p>", "null")
    with store._connection(), store._connection(), store._connection():
        pass  # three requests reading at once: three pooled connections of this file

    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.rename(path + suffix, f"{path}.old{suffix}")
    migrate(f"{path}.new")
    os.rename(f"{path}.new", path)

    saved_page = store.save("home", "<p>new</p>", "null")
    assert (saved_page.version, saved_page.epoch) == (1, read_epoch(path))
    assert page_row(path, "home") == (1, "<p>new</p>")
    assert page_row(f"{path}.old", "home") == (1, "<p>old</p>")  # nothing written to the old file
    assert store.changes("home", 0).html == "<p>new</p>"
