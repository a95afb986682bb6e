"""A save that was acknowledged survives kill -9 of the server."""

import json
import os
import queue
import random
import signal
import threading
import time
from collections import Counter

import psutil
import pytest
import requests
import urllib3

from changefeed_client import ChangefeedError, Client, Unavailable

pytestmark = pytest.mark.engines


def test_acknowledged_saves_survive_kill_9(make_server):
    server = make_server(workers=2)
    session = requests.Session()
    acknowledged = {}
    for n in range(50):
        slug = f"page-{n % 5}"
        response = session.post(f"{server.url}/save",
                                json={"slug": slug, "html": f"<p>{n}</p>", "data": {"n": n}}, timeout=10)
        assert response.status_code == 200
        acknowledged[slug] = (response.json()["version"], f"<p>{n}</p>", {"n": n})
    session.close()

    server.kill()
    server.start()

    for slug, (version, html, data) in acknowledged.items():
        change = requests.get(f"{server.url}/changes?slug={slug}&since=0", timeout=10).json()
        assert (change["version"], change["html"], change["data"]) == (version, html, data)
    next_save = requests.post(f"{server.url}/save", json={"slug": "page-0", "html": "after"}, timeout=10)
    assert next_save.json()["version"] == acknowledged["page-0"][0] + 1


def test_kill_9_in_the_middle_of_saves_keeps_every_acknowledged_one(make_server):

    server = make_server(workers=2)
    acknowledged = []

    def keep_saving():
        session = requests.Session()
        while True:
            try:
                response = session.post(f"{server.url}/save", json={"slug": "busy", "html": "x"}, timeout=5)
            except requests.RequestException:
                return  # the server is gone: this save was never acknowledged
            acknowledged.append(response.json()["version"])

    writers = [threading.Thread(target=keep_saving) for _ in range(4)]
    for writer in writers:
        writer.start()
    time.sleep(0.5)
    server.kill()
    for writer in writers:
        writer.join(timeout=10)

    assert len(acknowledged) > 10
    server.start()
    stored = requests.get(f"{server.url}/changes?slug=busy&since=0", timeout=10).json()["version"]
    assert stored >= max(acknowledged)
    assert stored <= len(acknowledged) + len(writers)  # at most the in-flight saves beyond those acknowledged


# --- kill -9 at random moments, looped -------------------------------------------------------------
#
# Several writers save to several slugs while SSE streams and long-polls follow them; in each round,
# after a random delay, one worker or the whole server is killed with SIGKILL (the server is then
# started again on the same database). Every save's html and data name its slug, writer and
# sequence number, so any row seen anywhere (a /changes answer, an event, the database) can be
# checked whole and traced back to the request that sent it.

CRASH_SLUGS = [f"crash-{n}" for n in range(4)]
CRASH_WRITERS = 6
CRASH_CLIENT_WRITERS = 2  # writers through the Python client (client/), numbered after the post-crash saves
CRASH_ROUNDS = 16
KEY_ROW_BYTES = 200  # what the storage triggers count for an idempotency key, beyond its text and slug  # the last one always kills the whole server, and the saves stop there
SAVE_TIMEOUT = (2, 10)  # connect, read (s): a read timeout while the server is up is reported


def crash_save_body(slug, writer, seq):
    """The html and data of one save: both name it, and their sizes vary (some spill out of a page)."""
    tag = f"{slug}/{writer}/{seq}"
    size = (writer * 7919 + seq * 104729) % 6000
    html = f'<p data-save="{tag}">' + "h" * size + "</p>"
    return html, {"save": tag, "writer": writer, "seq": seq, "pad": "d" * (size // 2)}


def crash_save_of(slug, html, data):
    """Return ((writer, seq), None) for a whole row of one save of `slug`, or (None, what is wrong)."""
    try:
        prefix = '<p data-save="'
        tag = html[len(prefix):html.index('"', len(prefix))] if html.startswith(prefix) else ""
        row_slug, writer, seq = tag.split("/")
        key = (int(writer), int(seq))
    except (AttributeError, ValueError):
        return None, f"html does not name a save: {str(html)[:80]!r}"
    if row_slug != slug:
        return None, f"row of {slug} holds a save of {row_slug}: {tag}"
    if (html, data) != crash_save_body(slug, *key):
        return None, (f"half-written or mixed row for save {tag}: html {len(html)} chars "
                      f"{html[:40]!r}...{html[-10:]!r}, data {str(data)[:80]!r}")
    return key, None


class CrashLog:
    """What the clients saw, appended from many threads (list.append is atomic)."""

    def __init__(self):
        self.attempts = []      # dicts: slug, writer, seq, started, ended, outcome, version, detail
        self.disruptions = []   # (started, ended, action, round)
        self.problems = []      # strings: anything that must not happen
        self.epochs = set()     # every "epoch" any answer carried (if the server sends one)

    def note_epoch(self, body):
        if isinstance(body, dict) and "epoch" in body:
            self.epochs.add(body["epoch"])


def next_save(rng, writer, seq):
    """A writer's next save: a random slug, the body naming the save, and the log entry of its attempt."""
    slug = rng.choice(CRASH_SLUGS)
    html, data = crash_save_body(slug, writer, seq)
    return slug, html, data, {"slug": slug, "writer": writer, "seq": seq, "started": time.monotonic(),
                              "version": None, "detail": None}


def crash_writer(url, writer, seed, log, stop):
    """Save to random slugs until `stop`; log each attempt with its outcome."""
    rng = random.Random(f"{seed}-writer-{writer}")
    session = requests.Session()
    seq = 0
    while not stop.is_set():
        seq += 1
        slug, html, data, attempt = next_save(rng, writer, seq)
        try:
            response = session.post(f"{url}/save", json={"slug": slug, "html": html, "data": data},
                                    timeout=SAVE_TIMEOUT)
        except requests.ConnectTimeout as exc:  # never connected: never sent
            attempt.update(outcome="not sent", detail=repr(exc)[:300])
        except requests.ConnectionError as exc:
            reason = getattr(exc.args[0], "reason", None) if exc.args else None
            refused = isinstance(reason, urllib3.exceptions.NewConnectionError)
            attempt.update(outcome="not sent" if refused else "unknown", detail=repr(exc)[:300])
        except requests.RequestException as exc:  # sent, answer cut or late: it may or may not have landed
            attempt.update(outcome="unknown", detail=repr(exc)[:300])
        else:
            if response.status_code == 200:
                body = response.json()
                log.note_epoch(body)
                attempt.update(outcome="acked", version=body["version"])
                if body.get("slug") != slug:
                    log.problems.append(f"save of {slug} answered for slug {body.get('slug')!r}: {body}")
            else:
                attempt.update(outcome="http", version=response.status_code,
                               detail=f"{response.status_code} {response.text[:300]}")
        attempt["ended"] = time.monotonic()
        log.attempts.append(attempt)
        if attempt["outcome"] != "acked":
            time.sleep(0.02)  # the server is down or restarting: do not spin
        else:
            time.sleep(rng.uniform(0, 0.004))
    session.close()


def client_writer(url, writer, seed, log, stop):
    """Save to random slugs through the Python client until `stop`: its retries must never store a save twice.

    Each save is retried with one Idempotency-Key across the crashes, so it
    ends acknowledged (once) or, past `retry_for`, in doubt ("unknown").
    """
    rng = random.Random(f"{seed}-client-writer-{writer}")
    seq = 0
    with Client(url, retry_for=8) as client:
        while not stop.is_set():
            seq += 1
            slug, html, data, attempt = next_save(rng, writer, seq)
            try:
                saved = client.save(slug, html, data)
            except Unavailable as exc:
                attempt.update(outcome="unknown", detail=repr(exc)[:300])
            except ChangefeedError as exc:
                attempt.update(outcome="http", version=exc.status, detail=repr(exc)[:300])
            else:
                log.epochs.add(saved.epoch)
                attempt.update(outcome="acked", version=saved.version)
            attempt["ended"] = time.monotonic()
            log.attempts.append(attempt)
            time.sleep(rng.uniform(0, 0.004))


class CrashFollower:
    """One subscriber of one slug: an SSE stream (resuming with Last-Event-ID or since=) or a long-poll."""

    def __init__(self, url, slug, kind, log, open_stream):
        self.url, self.slug, self.kind, self.log, self.open_stream = url, slug, kind, log, open_stream
        self.version = 0
        self.last_event_id = None
        self.seen = []  # (version, key, at) in the order received
        self.connects = 0
        self.client = None  # the Python client of a "client" follower, once it runs
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"{kind}-{slug}", daemon=True)

    def __repr__(self):
        return f"<{self.kind} follower of {self.slug} at version {self.version}, {self.connects} connects>"

    def receive(self, body):
        self.log.note_epoch(body)
        if not body.get("changed"):
            if body.get("version", 0) < self.version:
                self.log.problems.append(f"{self!r}: told the page is at version {body.get('version')}, "
                                         f"below the version {self.version} it already had")
            return
        version = body["version"]
        key, wrong = crash_save_of(self.slug, body.get("html"), body.get("data"))
        if wrong:
            self.log.problems.append(f"{self!r}: version {version}: {wrong}")
        if version <= self.version:
            self.log.problems.append(f"{self!r}: got version {version} after version {self.version}")
        self.seen.append((version, key, time.monotonic()))
        self.version = max(self.version, version)

    def run(self):
        if self.kind == "client":
            return self.watch_with_the_client()
        while not self.stop.is_set():
            try:
                if self.kind == "longpoll":
                    self.long_poll()
                else:
                    self.follow_stream()
            except (OSError, requests.RequestException):
                pass  # the server or the worker went away: reconnect from where we are
            except Exception as exc:  # noqa: BLE001 (a bad answer: keep it for the report)
                self.log.problems.append(f"{self!r}: {exc!r}")
            time.sleep(0.05)

    def long_poll(self):
        with requests.Session() as session:
            while not self.stop.is_set():
                self.connects += 1
                response = session.get(f"{self.url}/changes",
                                       params={"slug": self.slug, "since": self.version, "wait": 5},
                                       timeout=(2, 15))
                if response.status_code != 200:
                    self.log.problems.append(f"{self!r}: long-poll answered {response.status_code} "
                                             f"{response.text[:300]}")
                    return
                self.receive(response.json())

    def watch_with_the_client(self):
        """The Python client's watch: its own reconnects, backoff and Last-Event-ID, nothing done here."""
        with Client(self.url, reconnect_cap=2) as client:  # the check below gives a subscriber 15 s
            self.client = client
            try:
                for page in client.watch(self.slug):
                    self.receive({"changed": True, "version": page.version, "html": page.html, "data": page.data,
                                  "epoch": page.epoch})
                    if self.stop.is_set():
                        return
            except Exception as exc:  # noqa: BLE001
                if not self.stop.is_set():  # closed under it at the end: not a problem
                    self.log.problems.append(f"{self!r}: {exc!r}")

    def follow_stream(self):
        self.connects += 1
        if self.kind == "sse-last-event-id":
            headers = {} if self.last_event_id is None else {"Last-Event-ID": self.last_event_id}
            stream = self.open_stream(f"{self.url}/events?slug={self.slug}", headers)
        else:
            stream = self.open_stream(f"{self.url}/events?slug={self.slug}&since={self.version}")
        try:
            if stream.response.status != 200:
                self.log.problems.append(f"{self!r}: /events answered {stream.response.status} "
                                         f"{stream.response.read()[:300]!r}")
                return
            while not self.stop.is_set():
                try:
                    event = stream.next(timeout=0.5)
                except queue.Empty:
                    if stream.ended.is_set() and stream.events.empty():
                        return  # the stream ended (a crash): reconnect
                    continue
                if "data" in event:
                    self.receive(event["data"])
                    self.last_event_id = event.get("id")  # sent back verbatim, as EventSource does
        finally:
            stream.close()


def live_workers(server):
    """The worker processes of the running gunicorn master (zombies not counted)."""
    workers = []
    for child in psutil.Process(server.process.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                workers.append(child)
        except psutil.NoSuchProcess:
            pass
    return workers


def stored_rows(database):
    """{slug: (version, html, data)} of the crash loop's pages, and what is wrong with the database as a whole.

    The storage counters, kept by triggers in each save's transaction, must
    match the pages and the idempotency keys stored (a key counts as its
    text and slug and KEY_ROW_BYTES more, as the triggers of schema.sql
    say); a SQLite file must also pass its integrity check.
    """
    every = database.query("SELECT slug, version, html, data FROM page_versions")
    rows = {slug: (version, html, json.loads(data)) for slug, version, html, data in every
            if slug.startswith("crash-")}
    keys = database.query("SELECT key, slug FROM idempotency_keys")  # the client writers' keys count too
    counted = (len(every), sum(len(html.encode()) + len(data.encode()) for _, _, html, data in every)
               + sum(KEY_ROW_BYTES + len(key.encode()) + len(slug.encode()) for key, slug in keys))
    problems = []
    storage = database.query("SELECT pages, bytes FROM storage")
    if storage != [counted]:
        problems.append(f"the storage counters {storage} do not match the pages stored {counted}")
    if database.engine == "sqlite":
        integrity = database.query("PRAGMA integrity_check")
        if integrity != [("ok",)]:
            problems.append(f"PRAGMA integrity_check: {integrity}")
    return rows, problems


def test_kill_9_of_workers_and_server_looped_loses_nothing_and_subscribers_catch_up(
        make_server, open_stream, database):
    seed = int(os.environ.get("CHANGEFEED_CRASH_SEED") or random.SystemRandom().randrange(1, 10**9))
    print(f"crash loop seed {seed} (rerun its choices with CHANGEFEED_CRASH_SEED={seed})")
    rng = random.Random(seed)
    test_started = time.monotonic()
    server = make_server(workers=2)
    log = CrashLog()

    followers = [CrashFollower(server.url, slug, kind, log, open_stream)
                 for slug in CRASH_SLUGS for kind in ("sse-last-event-id", "sse-since", "longpoll", "client")]
    for follower in followers:
        follower.thread.start()
    stop_writers = threading.Event()
    writers = [threading.Thread(target=crash_writer, args=(server.url, n, seed, log, stop_writers), daemon=True)
               for n in range(CRASH_WRITERS)]
    writers += [threading.Thread(target=client_writer, args=(server.url, n, seed, log, stop_writers), daemon=True)
                for n in range(CRASH_WRITERS + 1, CRASH_WRITERS + 1 + CRASH_CLIENT_WRITERS)]
    for writer in writers:
        writer.start()

    killed, all_killed, behind_at_last_crash = set(), set(), []
    actions = ["worker"] * (CRASH_ROUNDS // 2) + ["server"] * (CRASH_ROUNDS - CRASH_ROUNDS // 2 - 1)
    rng.shuffle(actions)
    actions.append("server")
    for round_no, action in enumerate(actions, 1):
        # Mostly mid-stream; now and then right after the last restart, while workers still boot.
        delay = rng.uniform(0.0, 0.15) if rng.random() < 0.25 else rng.uniform(0.15, 1.2)
        time.sleep(delay)
        acked_before = sum(a["outcome"] == "acked" for a in log.attempts)
        started = time.monotonic()
        if action == "worker":
            workers = sorted(live_workers(server), key=lambda process: process.create_time())
            victim = workers[rng.randrange(len(workers))] if workers else None
            if victim is not None:
                os.kill(victim.pid, signal.SIGKILL)
                killed.add(victim.pid)
                all_killed.add(victim.pid)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                back = [w for w in live_workers(server) if victim is None or w.pid != victim.pid]
                if len(back) == 2:
                    break
                time.sleep(0.02)
            else:
                raise AssertionError(f"seed {seed}, round {round_no}: gunicorn did not bring a killed worker "
                                     f"back within 15 s; workers now {live_workers(server)}; log tail:\n"
                                     f"{server.log()[-2000:]}")
        else:
            server.kill()
            if round_no == len(actions):
                # Saves stop with this crash: whatever landed meanwhile, the subscribers (some of
                # them behind) must now get by reconnecting, not from a later save.
                stop_writers.set()
                for writer in writers:
                    writer.join(timeout=15)
                    assert not writer.is_alive(), f"seed {seed}: a writer hung"
                behind_at_last_crash = [f for f in followers if f.version < max(
                    [a["version"] for a in log.attempts if a["slug"] == f.slug and a["outcome"] == "acked"],
                    default=0)]
            server.start()
            killed.clear()
        ended = time.monotonic()
        log.disruptions.append((started, ended, action, round_no))
        print(f"round {round_no:2}: +{delay:.2f} s, kill -9 {action}"
              f"{f' {victim.pid}' if action == 'worker' and victim else ''}, back in {ended - started:.2f} s, "
              f"{acked_before} saves acknowledged so far")

    print(f"{len(behind_at_last_crash)} of {len(followers)} subscribers were behind the last acknowledged "
          f"save at the last crash")
    final = {}
    for slug in CRASH_SLUGS:
        body = requests.get(f"{server.url}/changes", params={"slug": slug, "since": 0}, timeout=10).json()
        log.note_epoch(body)
        final[slug] = body

    # Every subscriber, reconnected after the last restart, ends at the newest version of its slug.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(f.version != final[f.slug]["version"] for f in followers):
        time.sleep(0.05)
    behind = [f for f in followers if f.version != final[f.slug]["version"]]
    # So does a new subscriber, from scratch.
    for slug in CRASH_SLUGS:
        stream = open_stream(f"{server.url}/events?slug={slug}&since=0")
        try:
            event = stream.next(timeout=10)
            while "data" not in event:
                event = stream.next(timeout=10)
        except queue.Empty:
            log.problems.append(f"a new stream of {slug} got no event in 10 s")
        else:
            log.note_epoch(event["data"])
            if event["data"].get("version") != final[slug]["version"]:
                log.problems.append(f"a new stream of {slug} began at {event['data'].get('version')}, "
                                    f"not at the stored {final[slug]['version']}")
        stream.close()

    # The next save of each slug follows on without a gap, and reaches every subscriber.
    for slug in CRASH_SLUGS:
        html, data = crash_save_body(slug, CRASH_WRITERS, 1)
        response = requests.post(f"{server.url}/save", json={"slug": slug, "html": html, "data": data}, timeout=10)
        answered = response.json().get("version") if response.status_code == 200 else None
        if answered != final[slug]["version"] + 1:
            log.problems.append(f"the save after the crashes of {slug} (stored: version {final[slug]['version']}) "
                                f"answered {response.status_code} {response.text[:200]}")
        log.attempts.append({"slug": slug, "writer": CRASH_WRITERS, "seq": 1, "outcome": "acked",
                             "version": answered, "started": time.monotonic(), "ended": time.monotonic(),
                             "detail": None})
        final[slug] = requests.get(f"{server.url}/changes", params={"slug": slug, "since": 0}, timeout=10).json()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(f.version != final[f.slug]["version"] for f in followers):
        time.sleep(0.02)
    behind += [f for f in followers if f.version != final[f.slug]["version"]]
    for follower in followers:
        follower.stop.set()
        if follower.client is not None:
            follower.client.close()  # ends its watch, which waits for the next event

    # One last crash, then the database itself: consistent, and holding exactly what /changes said.
    server.kill()
    for follower in followers:
        follower.thread.join(timeout=5)
    rows, problems = stored_rows(database)

    # ---- the checks ----
    problems += log.problems
    attempts = log.attempts
    outcomes = Counter(a["outcome"] for a in attempts)
    print(f"{len(attempts)} saves sent: {dict(outcomes)}; "
          f"followers: {[(f.kind, f.slug, f.version, f.connects) for f in followers]}")
    for attempt in attempts:
        if attempt["outcome"] == "http":
            problems.append(f"save {attempt['slug']}/{attempt['writer']}/{attempt['seq']} answered "
                            f"{attempt['detail']}")
    if len(log.epochs) > 1:
        problems.append(f"the epoch changed across crash restarts of the same database: {sorted(log.epochs)}")
    if behind:
        problems.append(f"subscribers not at the newest version after the last restart (15 s) or after "
                        f"the save that followed it (10 s): {behind} "
                        f"(newest: { {slug: body['version'] for slug, body in final.items()} })")

    for slug in CRASH_SLUGS:
        mine = [a for a in attempts if a["slug"] == slug]
        acked = [a for a in mine if a["outcome"] == "acked"]
        unknown = {(a["writer"], a["seq"]) for a in mine if a["outcome"] == "unknown"}
        acked_keys = {(a["writer"], a["seq"]) for a in acked}
        stored = final[slug]
        version = stored.get("version", 0)
        final_key, wrong = crash_save_of(slug, stored.get("html"), stored.get("data"))
        if wrong:
            problems.append(f"{slug}: stored row after the crashes: {wrong}")

        # Acknowledged versions: each exactly once, none beyond what is stored.
        duplicates = {v: n for v, n in Counter(a["version"] for a in acked).items() if n > 1}
        if duplicates:
            problems.append(f"{slug}: versions acknowledged more than once: {duplicates}")
        if acked and max(a["version"] for a in acked) > version:
            lost = sorted(a["version"] for a in acked if a["version"] > version)
            problems.append(f"{slug}: acknowledged versions {lost[:20]} lost: stored version is {version}")

        # Which save each version holds, from the acknowledgements and from every row seen.
        holder = {a["version"]: (a["writer"], a["seq"]) for a in acked}
        seen = [(v, key, f"{f!r}") for f in followers if f.slug == slug for v, key, _ in f.seen if key]
        seen.append((version, final_key, "the stored row"))
        version_of = {key: v for v, key in holder.items()}
        for v, key, who in seen:
            if key is None:
                continue
            if v > version:
                problems.append(f"{slug}: {who} saw version {v} (save {key}), but only {version} survived")
            if holder.setdefault(v, key) != key:
                problems.append(f"{slug}: version {v} is save {holder[v]} and, to {who}, save {key}")
            if version_of.setdefault(key, v) != v:
                problems.append(f"{slug}: save {key} landed as version {version_of[key]} and as {v} ({who})")
            if key not in acked_keys and key not in unknown:
                problems.append(f"{slug}: {who} saw save {key} at version {v}, which was never sent or "
                                "was answered with an error")
        if final_key and version in holder and holder[version] != final_key:
            problems.append(f"{slug}: stored row is save {final_key}, version {version} was save {holder[version]}")

        # No gap: every landed save bumped the version by one, so the stored version counts them.
        landed_unacked = {key for key in version_of if key not in acked_keys}
        low, high = len(acked) + len(landed_unacked), len(acked) + len(unknown)
        print(f"{slug}: stored {version}, acknowledged {len(acked)}, in flight at crashes {len(unknown)} "
              f"(seen landed: {len(landed_unacked)})")
        if not low <= version <= high:
            problems.append(f"{slug}: stored version {version} is not between acknowledged + seen-landed "
                            f"({low}) and acknowledged + in flight ({high}): a version was skipped or lost")
        if rows.get(slug) != (version, stored.get("html"), stored.get("data")):
            got = rows.get(slug)
            problems.append(f"{slug}: the database holds {got and (got[0], got[1][:40], str(got[2])[:60])} "
                            f"after kill -9, /changes said version {version}")

    # Connection errors while nothing was being killed or restarted (1 s of slack after each).
    quiet_errors = [a for a in attempts if a["outcome"] in ("unknown", "not sent") and not any(
        a["started"] <= end + 1.0 and a["ended"] >= start for start, end, _, _ in log.disruptions)]
    for attempt in quiet_errors[:10]:
        problems.append(f"save failed while the server was up and nothing was killed: "
                        f"{attempt['detail']} at +{attempt['started'] - test_started:.2f} s")

    # The server logged no error but the deaths of the workers killed here.
    for line in server.log().splitlines():
        if ("Traceback" in line or "[ERROR]" in line or "[CRITICAL]" in line) and not any(
                f"Worker (pid:{pid}) was sent SIGKILL" in line for pid in all_killed):
            problems.append(f"gunicorn log: {line}")

    # The test must have exercised something: saves in flight at crashes, and plenty acknowledged.
    assert outcomes["acked"] > 200, f"seed {seed}: too few saves acknowledged to prove anything: {outcomes}"
    assert outcomes["unknown"] > 0, f"seed {seed}: no crash ever caught a save in flight: {outcomes}"
    assert not problems, f"seed {seed}: {len(problems)} problems:\n" + "\n".join(problems[:40])
    print(f"crash loop took {time.monotonic() - test_started:.1f} s")
