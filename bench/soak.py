"""changefeed soak test: `make soak` (10 minutes), or `python bench/soak.py --duration 90`.

A benchmark finds the highest rate; a soak looks for what only shows with
time: a leak of memory or descriptors, a version lost once in thousands of
saves, an error once in a hundred thousand requests. So every kind of client
runs at once, for minutes, at moderate rates that leave the 2 cores far from
saturated: every delay measured is then the service's own, not a queue.

The service runs as in production: gunicorn -c gunicorn.conf.py with the
default worker count, synchronous=FULL, a fresh database made by migrate.py
in a temporary folder, listening on 127.0.0.1 only. Its environment is
cleared of CHANGEFEED_* and GUNICORN_CMD_ARGS first, so the caller's shell
cannot change that; the one setting made is a per-client cap on open waits
high enough for a load that all comes from 127.0.0.1.

Clients, on one asyncio event loop:
- savers: 30 saves/s over 200 slugs (half of them on 20 hot ones), each with
  an Idempotency-Key (a broken connection is retried with it, so a version is
  never ambiguous) and some with a base_version, which may be stale (409);
  every acknowledged version is recorded; plus one 64 KiB page a second;
- pollers: GET /changes every 0.5-2 s with If-None-Match;
- SSE and long-poll followers: each follows a slug for 2-60 s and leaves
  (mid-wait, as a closed tab does); half then resume with Last-Event-ID or
  since, the other half start afresh on another slug;
- slow clients: one trickles a request's headers a byte a second, one
  connects and sends nothing, one opens the 64 KiB page's event stream with
  a tiny receive buffer and never reads. The server may answer them 408 or
  drop them: what happened is reported, never counted as an error.

Targets (the exit status is 1 when one is missed): no error (unexpected
status, connection error of a well-behaved client, traceback or ERROR in
the gunicorn log, a worker restarted); no version lost or duplicated (the
acknowledged versions of each slug are exactly 1..N; every subscriber sees
strictly increasing versions and, when still connected at the end, the
final one; a final read of each slug gives its last acknowledged version);
each worker's memory after warm-up and at the end within 10%; each worker's
open descriptors back to their idle count once every client has left.

Prints a table; writes bench/results/soak-<UTC time>.json and the gunicorn
log next to it as soak-<UTC time>.log (bench/results/ is not committed).
"""

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers  # noqa: E402
from run import RESULTS, machine  # noqa: E402

SLUGS = [f"soak-{i}" for i in range(200)]
HOT = SLUGS[:20]  # half the saves and half the subscribers: so subscribers see many saves each
BIG_SLUG = "soak-big"  # a 64 KiB page a second: fills the buffers of the client that never reads in ~45 s
TOUCH_SLUG = "soak-touch"
SAVERS, SAVES_PER_S = 6, 30
STALE_BASE_SHARE = 0.1  # saves sent with the base_version the saver last knew: 409 when another saved since
BIG_HTML_BYTES, BIG_SAVES_PER_S = 64 * 1024, 1
POLLERS, POLL_EVERY_S = 36, (0.5, 2.0)
SSE_FOLLOWERS = LONGPOLL_FOLLOWERS = 24
FOLLOW_S = (2, 60)
RESUME_SHARE = 0.5
LONG_POLL_WAIT_S = 20
TRICKLE_EVERY_S = 1.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)  # a save ends within its 10 s busy timeout + 2 s
SETTLE_S = 20  # above the 15 s heartbeat, which catches up a lost wake-up
# A worker learns that a client left a stream only when a write to it fails
# (the next event or heartbeat: up to two 15 s heartbeats), and a long-poll
# when its wait (20 s) ends: the descriptors of the last clients go by then.
FDS_BACK_S = 45
# Each worker pools its SQLite connections and keeps them: at most one for
# the greenlets (none yields while it holds one) and one for the group-commit
# thread, plus the watcher's own: 3 x (file, wal) + the shared-memory file.
# A pool that grew to this under load is not a leak, whatever it was when idle.
DATABASE_FDS_MAX = 7
SAMPLE_EVERY_S = 10
MAX_MEMORY_GROWTH = 1.10
SERVER_ENV = {"CHANGEFEED_SQLITE_SYNCHRONOUS": "FULL", "CHANGEFEED_MAX_WAITS_PER_CLIENT": "100000"}


def pick_slug():
    return random.choice(HOT) if random.random() < 0.5 else random.choice(SLUGS)


def percentiles_ms(seconds):
    """p50, p99 and max of a list of durations in seconds, in ms (nearest rank)."""
    if not seconds:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(seconds)
    at = lambda p: ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000  # noqa: E731
    return {"n": len(ordered), "p50_ms": round(at(50), 2), "p99_ms": round(at(99), 2),
            "max_ms": round(ordered[-1] * 1000, 2)}


class Tally:
    """What every client saw: statuses, errors, latencies, acknowledged versions, sessions."""

    def __init__(self):
        self.statuses = Counter()  # "GET /changes 304" -> count
        self.errors = Counter()  # kind -> count
        self.examples = {}  # kind -> the first detail seen
        self.latency = defaultdict(list)  # "poll", "save" -> seconds
        self.acked = defaultdict(list)  # slug -> every acknowledged version, from every saver
        self.saved = {}  # (slug, version) -> (sent, acknowledged), monotonic
        self.conflicts = 0
        self.poll_went_back = 0
        self.sessions = []
        self.slow = defaultdict(list)  # slow client -> [what became of each connection]
        self.samples = []  # [{t, workers: {pid: {rss_mib, fds}}}]
        self.loop_lag = []

    def status(self, request, status):
        self.statuses[f"{request} {status}"] += 1

    def error(self, kind, detail):
        self.errors[kind] += 1
        self.examples.setdefault(kind, str(detail)[:300])


class Session:
    """One SSE stream or long-poll subscription of one slug: the versions it received, in order."""

    def __init__(self, transport, slug, have=0, epoch=None, resumed=False):
        self.transport, self.slug, self.have, self.epoch, self.resumed = transport, slug, have, epoch, resumed
        self.received = []  # (version, monotonic time)
        self.opened = None  # when it was up to date: saves sent later measure propagation
        self.not_increasing = []  # what was wrong, each time a version was not above the one before
        self.at_end = False  # still connected when the saves stopped: must end at the final version

    def receive(self, version):
        if version <= self.have:
            self.not_increasing.append({"transport": self.transport, "slug": self.slug, "resumed": self.resumed,
                                        "had": self.have, "got": version,
                                        "before": [v for v, _ in self.received[-5:]],
                                        "s_after_open": self.opened and round(time.monotonic() - self.opened, 3)})
        self.received.append((version, time.monotonic()))
        self.have = max(self.have, version)


def client_session():
    """The well-behaved clients' connection pool.

    A pooled connection idle for 3 s is not reused: the server closes idle
    kept-alive connections after 5 s (CHANGEFEED_KEEPALIVE_S), and a client
    reusing one at that very moment would see a disconnect of its own making.
    """
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=3),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))


# --- well-behaved clients ----------------------------------------------------------------------

async def save(http, url, tally, slug, html, data, base_version=None):
    """POST one save; return (status, answer). A broken connection or a 503 is an error, and retried.

    The retry carries the same Idempotency-Key, so it stores the save once or
    answers what the first attempt stored: no version is ever left unknown.
    """
    body = {"slug": slug, "html": html, "data": data}
    if base_version is not None:
        body["base_version"] = base_version
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    status, answer = None, None
    for _ in range(3):
        sent = time.monotonic()
        try:
            async with http.post(f"{url}/save", json=body, headers=headers, timeout=REQUEST_TIMEOUT) as response:
                status, answer = response.status, await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            tally.error(f"save: {type(exc).__name__}", repr(exc))
            continue
        acked = time.monotonic()
        tally.status("POST /save", status)
        if status == 200:
            tally.latency["save"].append(acked - sent)
            tally.acked[slug].append(answer["version"])
            tally.saved[(slug, answer["version"])] = (sent, acked)
            return status, answer
        if status == 409:
            tally.conflicts += 1
            return status, answer
        tally.error(f"save: {status}", answer)
        if status != 503:
            return status, answer
        await asyncio.sleep(1)
    return status, answer


async def saver(http, url, tally, stop, per_second, pick, html_bytes):
    """Save at a steady rate until `stop`, on slugs from `pick()`."""
    period, known, n = 1 / per_second, {}, 0
    next_at = time.monotonic() + random.uniform(0, period)
    while not stop.is_set():
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        next_at = max(next_at + period, time.monotonic())
        slug, n = pick(), n + 1
        base = known.get(slug) if random.random() < STALE_BASE_SHARE else None
        html = f"<p>{slug} {n}</p>" + "x" * random.randint(*html_bytes)
        status, answer = await save(http, url, tally, slug, html, {"n": n, "t": time.time()}, base)
        if status in (200, 409):
            known[slug] = answer["version"]


async def poller(http, url, tally, stop, slug):
    """Poll a slug every 0.5-2 s, revalidating with If-None-Match as a browser does."""
    since, etag = 0, None
    await asyncio.sleep(random.uniform(*POLL_EVERY_S))
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with http.get(f"{url}/changes?slug={slug}&since={since}", timeout=REQUEST_TIMEOUT,
                                headers={"If-None-Match": etag} if etag else {}) as response:
                status, body, etag = response.status, await response.read(), response.headers.get("ETag", etag)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            tally.error(f"poll: {type(exc).__name__}", repr(exc))
        else:
            tally.latency["poll"].append(time.monotonic() - started)
            tally.status("GET /changes", status)
            if status == 200:
                answer = json.loads(body)
                if answer["changed"]:
                    tally.poll_went_back += answer["version"] <= since
                    since = answer["version"]
            elif status != 304:
                tally.error(f"poll: {status}", body)
        await asyncio.sleep(random.uniform(*POLL_EVERY_S))


async def follow_events(http, url, tally, session):
    """Hold /events open, recording the version of each `id: <epoch>:<version>` line."""
    headers = {"Accept": "text/event-stream"}
    query = f"slug={session.slug}"
    if session.resumed and session.epoch:  # as EventSource does, once it has had an event id
        headers["Last-Event-ID"] = f"{session.epoch}:{session.have}"
    else:
        query += f"&since={session.have}"
    try:
        async with http.get(f"{url}/events?{query}", headers=headers) as response:
            tally.status("GET /events", response.status)
            if response.status != 200:
                tally.error(f"sse: {response.status}", await response.text())
                return
            async for line in response.content:
                if line.startswith(b"retry:"):
                    session.opened = time.monotonic()
                elif line.startswith(b"id: "):
                    epoch, _, version = line[4:].strip().decode().rpartition(":")
                    session.epoch = epoch
                    session.receive(int(version))
        tally.error("sse: stream ended by the server", session.slug)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        tally.error(f"sse: {type(exc).__name__}", repr(exc))


async def follow_long_poll(http, url, tally, session):
    """Ask /changes with wait=20, again as soon as each answer comes."""
    timeout = aiohttp.ClientTimeout(total=LONG_POLL_WAIT_S + 15)
    while True:
        query = f"slug={session.slug}&since={session.have}&wait={LONG_POLL_WAIT_S}"
        if session.epoch:
            query += f"&epoch={session.epoch}"
        try:
            async with http.get(f"{url}/changes?{query}", timeout=timeout) as response:
                status, body = response.status, await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            tally.error(f"long-poll: {type(exc).__name__}", repr(exc))
            return
        tally.status("GET /changes?wait", status)
        if status != 200:
            tally.error(f"long-poll: {status}", body)
            return
        answer = json.loads(body)
        session.epoch = answer["epoch"]
        if answer["changed"]:
            session.receive(answer["version"])
        if session.opened is None:
            session.opened = time.monotonic()


FOLLOW = {"sse": follow_events, "longpoll": follow_long_poll}


async def follower(http, url, tally, stop, leave, transport):
    """Follow a slug for 2-60 s, leave, and again; half the time resume the slug where it was left.

    Connected when the saves stop, a session stays until `leave`, so the
    check at the end can ask it for the final version.
    """
    previous = None
    await asyncio.sleep(random.uniform(0, 2))
    while not stop.is_set():
        if previous and random.random() < RESUME_SHARE:
            session = Session(transport, previous.slug, previous.have, previous.epoch, resumed=True)
        else:
            session = Session(transport, pick_slug())
        tally.sessions.append(session)
        run = asyncio.create_task(FOLLOW[transport](http, url, tally, session))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({run, stopping}, timeout=random.uniform(*FOLLOW_S),
                           return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and not run.done():
            session.at_end = True
            await leave.wait()
        ended_by_itself = run.done()
        for task in (run, stopping):
            task.cancel()
        await asyncio.gather(run, stopping, return_exceptions=True)
        previous = session
        await asyncio.sleep(random.uniform(1, 2) if ended_by_itself else random.uniform(0, 0.5))


# --- slow clients ------------------------------------------------------------------------------

async def first_line(reader):
    """What the server did with a slow connection: its status line, or how it closed it."""
    try:
        data = await reader.read(200)
    except ConnectionError as exc:
        return f"reset ({type(exc).__name__})"
    return data.split(b"\r\n", 1)[0].decode(errors="replace") if data else "closed without an answer"


async def trickler(host, port, tally, leave):
    """Send a request's headers a byte a second, over and over."""
    request = (f"GET /changes?slug={SLUGS[0]}&since=0 HTTP/1.1\r\nHost: {host}\r\n"
               "User-Agent: changefeed-soak-trickle\r\n\r\n").encode()
    while not leave.is_set():
        reader, writer = await asyncio.open_connection(host, port)
        started, sent, outcome = time.monotonic(), 0, None
        answer = asyncio.create_task(first_line(reader))
        try:
            for byte in request:
                writer.write(bytes([byte]))
                await writer.drain()
                sent += 1
                await asyncio.wait({answer}, timeout=TRICKLE_EVERY_S)
                if answer.done() or leave.is_set():
                    break
            if not answer.done() and not leave.is_set():
                await asyncio.wait({answer}, timeout=30)
        except ConnectionError as exc:
            outcome = f"send failed ({type(exc).__name__})"
        if answer.done():
            outcome = answer.result()
        answer.cancel()
        writer.close()
        tally.slow["trickle headers"].append({"seconds": round(time.monotonic() - started, 1),
                                              "bytes_sent": f"{sent}/{len(request)}",
                                              "outcome": outcome or "still open at the end"})


async def silent(host, port, tally, leave):
    """Connect and send nothing, over and over."""
    while not leave.is_set():
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        answer, leaving = asyncio.create_task(first_line(reader)), asyncio.create_task(leave.wait())
        await asyncio.wait({answer, leaving}, return_when=asyncio.FIRST_COMPLETED)
        outcome = answer.result() if answer.done() else "still open at the end"
        answer.cancel()
        leaving.cancel()
        writer.close()
        tally.slow["connect, send nothing"].append({"seconds": round(time.monotonic() - started, 1),
                                                    "outcome": outcome})


async def never_reads(service, host, port, tally, leave):
    """Open the big page's event stream with a 4 KiB receive buffer and never read it.

    The server's writes to it then block once the buffers are full. Whether
    the server still holds the connection, and how much it has queued for
    it, is seen from the server's side (psutil, /proc/net/tcp): reading
    would defeat the point of this client.
    """
    loop = asyncio.get_running_loop()
    request = f"GET /events?slug={BIG_SLUG}&since=0 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    while not leave.is_set():
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        await loop.sock_sendall(sock, request)
        own_port, started, outcome = sock.getsockname()[1], time.monotonic(), "still held at the end"
        queued = 0
        while not leave.is_set():
            try:
                await asyncio.wait_for(leave.wait(), 2)
            except asyncio.TimeoutError:
                pass
            queued = max(queued, await asyncio.to_thread(send_queue, port, own_port))
            if not leave.is_set() and not await asyncio.to_thread(server_holds, service, own_port):
                outcome = "dropped by the server"
                break
        try:
            answered = sock.recv(100).split(b"\r\n", 1)[0].decode(errors="replace")
        except OSError as exc:
            answered = type(exc).__name__
        sock.close()
        tally.slow["SSE, never reads"].append({"seconds": round(time.monotonic() - started, 1), "outcome": outcome,
                                               "answer": answered, "server_queued_kib": queued // 1024})


def send_queue(server_port, client_port):
    """Bytes the server's side of a loopback connection has sent but the client not taken."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{server_port:04X}") and fields[2].endswith(f":{client_port:04X}"):
            return int(fields[4].split(":")[0], 16)
    return 0


def server_holds(service, client_port):
    """Whether a worker still has the connection from `client_port` open."""
    for proc in service.workers():
        try:
            if any(c.raddr and c.raddr.port == client_port for c in proc.net_connections(kind="tcp")):
                return True
        except psutil.NoSuchProcess:
            pass
    return False


# --- the server's side -------------------------------------------------------------------------

def snapshot(service):
    """Memory (RSS, MiB) and open descriptors of each worker, by pid."""
    workers = {}
    for proc in service.workers():
        try:
            workers[proc.pid] = {"rss_mib": round(proc.memory_info().rss / 2**20, 2), "fds": proc.num_fds()}
        except psutil.NoSuchProcess:
            pass
    return workers


def fd_kinds(service, folder):
    """What each worker's descriptors are (socket, pipe, the database files...), by pid."""
    kinds = {}
    for proc in service.workers():
        counts = Counter()
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
            except OSError:
                continue
            counts[re.sub(r"\[\d+\]$", "", target.replace(folder, "<tmp>"))] += 1
        kinds[proc.pid] = dict(counts)
    return kinds


def fds_back(idle, after):
    """Per worker: every descriptor but the database's back to its idle count, the database's within the pool."""
    def split(kinds):
        database = sum(n for kind, n in kinds.items() if kind.startswith("<tmp>/bench.sqlite3"))
        return sum(kinds.values()) - database, database

    verdicts = {}
    for pid, kinds in idle.items():
        (other_idle, db_idle), (other, db) = split(kinds), split(after.get(pid, {}))
        verdicts[pid] = pid in after and other <= other_idle and db <= max(db_idle, DATABASE_FDS_MAX)
    return verdicts


async def sample(service, tally, started):
    """Memory and descriptors of the workers every 10 s, for the trend."""
    while True:
        workers = await asyncio.to_thread(snapshot, service)  # off the event loop: it times the clients
        tally.samples.append({"t": round(time.monotonic() - started), "workers": workers})
        await asyncio.sleep(SAMPLE_EVERY_S)


async def loop_lag(tally):
    """How late the event loop wakes: the error bar of every latency measured here."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(0.1)
        tally.loop_lag.append(time.monotonic() - before - 0.1)


def scan_log(path):
    """The gunicorn log: lines that say something broke, and other lines that are not INFO."""
    problems, other = [], []
    for line in path.read_text(errors="replace").splitlines():
        if re.search(r"Traceback|\bERROR\b|\bCRITICAL\b|WORKER TIMEOUT|failed with", line):
            problems.append(line)
        elif line.strip() and "[INFO]" not in line and not line.startswith((" ", "\t")):
            other.append(line)
    return {"problems": len(problems), "problem_lines": problems[:40], "other_lines": len(other),
            "other_excerpt": other[:40]}


async def server_metrics(url):
    """The service's own counts of refusals and open waits, from GET /metrics when it has one."""
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            async with http.get(f"{url}/metrics", timeout=REQUEST_TIMEOUT) as response:
                if response.status != 200:
                    return {"unavailable": response.status}
                text = await response.text()
    except aiohttp.ClientError as exc:
        return {"unavailable": repr(exc)}
    return {name: float(value) for name, value in re.findall(
        r"^(changefeed_(?:refusals|open_waits|subscribers)\S*) (\S+)$", text, re.M)}


# --- the run -----------------------------------------------------------------------------------

async def touch(url, tally):
    """Use every path on each worker once before the idle count of descriptors.

    A worker opens its database connections, commit thread and watcher on
    first use and keeps them: counted after that, its descriptors at the end
    must be back to these. New connections each time, so both workers get some;
    three saves at the end make the workers write to the streams left behind,
    which is how they learn those are gone.
    """
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async def once():
            _, answer = await save(http, url, tally, TOUCH_SLUG, "<p>touch</p>", None)
            session = Session("sse", TOUCH_SLUG)
            reading = asyncio.create_task(follow_events(http, url, Tally(), session))
            while session.have < answer["version"] and not reading.done():
                await asyncio.sleep(0.01)
            reading.cancel()
            async with http.get(f"{url}/changes?slug={TOUCH_SLUG}&since={answer['version']}&wait=1") as response:
                await response.read()

        await asyncio.gather(*(once() for _ in range(16)))
        for _ in range(3):
            await save(http, url, tally, TOUCH_SLUG, "<p>touch</p>", None)
            await asyncio.sleep(0.5)


async def soak(service, args, folder):
    """Idle figures, then the load for --duration, then the checks once every client has left."""
    tally, url = Tally(), service.url
    host, port = "127.0.0.1", service.port
    await touch(url, tally)
    await asyncio.sleep(3)
    idle, idle_kinds = snapshot(service), fd_kinds(service, folder)
    stop, leave = asyncio.Event(), asyncio.Event()
    warmup = min(args.warmup, args.duration / 3)
    started, cpu, own = time.monotonic(), service.cpu_seconds(), time.process_time()
    async with client_session() as http:
        load = [asyncio.create_task(saver(http, url, tally, stop, SAVES_PER_S / SAVERS, pick_slug, (50, 4000)))
                for _ in range(SAVERS)]
        load.append(asyncio.create_task(saver(http, url, tally, stop, BIG_SAVES_PER_S, lambda: BIG_SLUG,
                                              (BIG_HTML_BYTES, BIG_HTML_BYTES))))
        load += [asyncio.create_task(poller(http, url, tally, stop, pick_slug())) for _ in range(POLLERS)]
        followers = [asyncio.create_task(follower(http, url, tally, stop, leave, transport))
                     for transport, count in (("sse", SSE_FOLLOWERS), ("longpoll", LONGPOLL_FOLLOWERS))
                     for _ in range(count)]
        slow = [asyncio.create_task(trickler(host, port, tally, leave)),
                asyncio.create_task(silent(host, port, tally, leave)),
                asyncio.create_task(never_reads(service, host, port, tally, leave))]
        watch = [asyncio.create_task(sample(service, tally, started)), asyncio.create_task(loop_lag(tally))]

        await asyncio.sleep(warmup)
        warm = snapshot(service)
        print(f"  warm-up done ({warmup:.0f} s): {warm}", flush=True)
        await asyncio.sleep(max(0.0, started + args.duration - time.monotonic()))
        end = snapshot(service)
        wall = time.monotonic() - started
        server_cpu, own_cpu = service.cpu_seconds() - cpu, time.process_time() - own
        print(f"  load done ({wall:.0f} s): {end}", flush=True)

        stop.set()
        await asyncio.gather(*load)
        final = {slug: max(versions) for slug, versions in tally.acked.items()}
        settle_started = time.monotonic()
        while time.monotonic() - settle_started < SETTLE_S and any(
                s.at_end and s.have != final.get(s.slug, 0) for s in tally.sessions):
            await asyncio.sleep(0.1)
        settled_s = time.monotonic() - settle_started
        leave.set()
        await asyncio.gather(*followers, *slow)
        for task in watch:
            task.cancel()

        reads = {}
        for slug in sorted({*SLUGS, *final}):
            async with http.get(f"{url}/changes?slug={slug}&since=0", timeout=REQUEST_TIMEOUT) as response:
                reads[slug] = (await response.json())["version"]
    left = await server_metrics(url)
    # Every client has left: the workers' descriptors must go back to their idle count.
    back_started = time.monotonic()
    while True:
        after, after_kinds = snapshot(service), fd_kinds(service, folder)
        back = fds_back(idle_kinds, after_kinds)
        if all(back.values()) or time.monotonic() - back_started > FDS_BACK_S:
            break
        await asyncio.sleep(0.5)
    fds_wait_s = time.monotonic() - back_started
    return {
        "tally": tally, "final": final, "reads": reads, "settled_s": settled_s,
        "metrics": {"when_clients_left": left, "after_fds_wait": await server_metrics(url)},
        "idle": idle, "warm": warm, "end": end, "after": after, "fds_wait_s": fds_wait_s, "fds_back": back,
        "idle_fd_kinds": idle_kinds, "after_fd_kinds": after_kinds,
        "wall_s": wall, "server_cpu_pct": server_cpu / wall * 100, "loadgen_cpu_pct": own_cpu / wall * 100,
    }


# --- the report --------------------------------------------------------------------------------

def propagation(sessions, saved, transport):
    """Seconds from each save's answer to a subscriber having it, for saves sent once it was up to date."""
    delays = []
    for session in sessions:
        if session.transport != transport or session.opened is None:
            continue
        for version, at in session.received:
            sent_acked = saved.get((session.slug, version))
            if sent_acked and sent_acked[0] > session.opened:
                delays.append(at - sent_acked[1])
    return delays


def summarize(run, log):
    """The report: every figure, and whether each target was met."""
    tally, final, reads = run["tally"], run["final"], run["reads"]
    lost = sum(max(v) - len(set(v)) for v in tally.acked.values())
    duplicated = sum(len(v) - len(set(v)) for v in tally.acked.values())
    at_end = [s for s in tally.sessions if s.at_end]
    behind = [f"{s.transport} {s.slug}: {s.have} of {final.get(s.slug, 0)}" for s in at_end
              if s.have != final.get(s.slug, 0)]
    not_increasing = [wrong for s in tally.sessions for wrong in s.not_increasing]
    misread = {slug: [version, final.get(slug, 0)] for slug, version in reads.items() if version != final.get(slug, 0)}
    restarted = sorted(run["end"].keys() ^ run["idle"].keys() | run["after"].keys() ^ run["idle"].keys())
    workers = {}
    for pid, idle in run["idle"].items():
        warm, end, after = (run[k].get(pid, {}) for k in ("warm", "end", "after"))
        workers[pid] = {"rss_warm_mib": warm.get("rss_mib"), "rss_end_mib": end.get("rss_mib"),
                        "rss_ratio": round(end["rss_mib"] / warm["rss_mib"], 3) if warm and end else None,
                        "fds_idle": idle["fds"], "fds_end_of_load": end.get("fds"), "fds_after": after.get("fds")}
    ratios = [w["rss_ratio"] for w in workers.values() if w["rss_ratio"] is not None]
    fds_back = not restarted and all(run["fds_back"].values())
    unexpected = [k for k in tally.statuses if not re.search(r" (200|304)$|^POST /save 409$", k)]
    errors = sum(tally.errors.values()) + tally.poll_went_back + log["problems"] + len(restarted)
    slow = {kind: {"connections": len(attempts), "outcomes": dict(Counter(a["outcome"] for a in attempts)),
                   "seconds_min_max": [min(a["seconds"] for a in attempts), max(a["seconds"] for a in attempts)],
                   "attempts": attempts[:50]}
            for kind, attempts in tally.slow.items()}
    sessions = Counter(s.transport for s in tally.sessions)
    summary = {
        "errors": errors,
        "errors_by_kind": dict(tally.errors), "error_examples": tally.examples,
        "unexpected_statuses": {k: tally.statuses[k] for k in unexpected},
        "polls_that_went_back": tally.poll_went_back,
        "log_problems": log["problems"], "log_problem_lines": log["problem_lines"],
        "log_other_lines": log["other_lines"], "log_other_excerpt": log["other_excerpt"][:10],
        "workers_restarted": restarted,
        "lost_or_duplicated": lost + duplicated + len(not_increasing) + len(behind) + len(misread),
        "saves_lost": lost, "saves_duplicated": duplicated,
        "subscriber_versions_not_increasing": len(not_increasing), "not_increasing_examples": not_increasing[:20],
        "subscribers_connected_at_end": len(at_end), "subscribers_not_at_final_version": behind[:20],
        "settled_s": round(run["settled_s"], 2), "final_reads_wrong": misread,
        "memory_ratio_max": max(ratios, default=None), "workers": workers, "fds_back": fds_back,
        "fd_differences": {pid: {kind: [kinds.get(kind, 0), after.get(kind, 0)]
                                 for kind in {*kinds, *after} if kinds.get(kind, 0) != after.get(kind, 0)}
                           for pid, kinds in run["idle_fd_kinds"].items()
                           for after in [run["after_fd_kinds"].get(pid, {})]},
        "fds_wait_s": round(run["fds_wait_s"], 1),
        "poll": percentiles_ms(tally.latency["poll"]), "save": percentiles_ms(tally.latency["save"]),
        "sse_propagation": percentiles_ms(propagation(tally.sessions, tally.saved, "sse")),
        "longpoll_propagation": percentiles_ms(propagation(tally.sessions, tally.saved, "longpoll")),
        "requests": sum(tally.statuses.values()), "statuses": dict(tally.statuses),
        "saves": sum(map(len, tally.acked.values())), "conflicts": tally.conflicts,
        "slugs_saved": len(tally.acked),
        "sse_sessions": sessions["sse"], "longpoll_sessions": sessions["longpoll"],
        "resumed_sessions": sum(s.resumed for s in tally.sessions),
        "slow_clients": slow, "server_metrics": run["metrics"],
        "server_cpu_pct": round(run["server_cpu_pct"], 1), "loadgen_cpu_pct": round(run["loadgen_cpu_pct"], 1),
        "loop_lag": percentiles_ms(tally.loop_lag), "wall_s": round(run["wall_s"], 1),
    }
    summary["targets"] = {
        "errors": summary["errors"] == 0,
        "lost_or_duplicated": summary["lost_or_duplicated"] == 0,
        "memory": bool(ratios) and max(ratios) <= MAX_MEMORY_GROWTH and not restarted,
        "fds_back": fds_back,
    }
    return summary


def print_table(s):
    met = lambda key: "met" if s["targets"][key] else "MISSED"  # noqa: E731
    ms = lambda d: f"{d['p50_ms']} / {d['p99_ms']} / {d['max_ms']} (n={d['n']:,})"  # noqa: E731
    rows = [
        ("errors (status, connection, log, restarts)", f"{s['errors']:,}", f"0: {met('errors')}"),
        ("  gunicorn log: problems / other lines", f"{s['log_problems']} / {s['log_other_lines']} "
                                                  "(neither INFO nor a problem)", ""),
        ("lost or duplicated versions", f"{s['lost_or_duplicated']:,}", f"0: {met('lost_or_duplicated')}"),
        ("  saves lost / duplicated", f"{s['saves_lost']} / {s['saves_duplicated']}", ""),
        ("  subscriber versions not increasing", f"{s['subscriber_versions_not_increasing']}", ""),
        ("  connected at end not at final / of", f"{len(s['subscribers_not_at_final_version'])} / "
                                                f"{s['subscribers_connected_at_end']} (in {s['settled_s']} s)", ""),
        ("  final reads wrong", f"{len(s['final_reads_wrong'])}", ""),
        ("worker RSS end / after warm-up", f"{s['memory_ratio_max']}", f"<= {MAX_MEMORY_GROWTH}: {met('memory')}"),
    ]
    for pid, w in s["workers"].items():
        rows.append((f"  worker {pid} RSS MiB warm / end", f"{w['rss_warm_mib']} / {w['rss_end_mib']}", ""))
        rows.append((f"  worker {pid} fds idle / load / after", f"{w['fds_idle']} / {w['fds_end_of_load']} / "
                                                                 f"{w['fds_after']}", ""))
    rows += [
        ("fds back to idle", "yes" if s["fds_back"] else "NO", f"met in {s['fds_wait_s']} s" if s["fds_back"]
         else "MISSED"),
        ("poll latency p50 / p99 / max ms", ms(s["poll"]), ""),
        ("save latency p50 / p99 / max ms", ms(s["save"]), ""),
        ("SSE propagation p50 / p99 / max ms", ms(s["sse_propagation"]), ""),
        ("long-poll propagation p50 / p99 / max ms", ms(s["longpoll_propagation"]), ""),
        ("requests / saves / conflicts (409)", f"{s['requests']:,} / {s['saves']:,} / {s['conflicts']:,}", ""),
        ("SSE / long-poll sessions (resumed)", f"{s['sse_sessions']:,} / {s['longpoll_sessions']:,} "
                                               f"({s['resumed_sessions']:,})", ""),
        ("server / load generator CPU %", f"{s['server_cpu_pct']} / {s['loadgen_cpu_pct']}", ""),
        ("event loop lag p99 / max ms", f"{s['loop_lag']['p99_ms']} / {s['loop_lag']['max_ms']}", ""),
    ]
    for kind, slow in s["slow_clients"].items():
        outcomes = ", ".join(f"{n}x {o}" for o, n in slow["outcomes"].items())
        outcomes += " after {} - {} s".format(*slow["seconds_min_max"])
        rows.append((f"slow: {kind}", f"{slow['connections']} connections", outcomes))
    print(f"\n{'measure':<44} {'value':<42} target")
    for label, value, target in rows:
        print(f"{label:<44} {value:<42} {target}")
    for key in ("errors_by_kind", "unexpected_statuses", "log_problem_lines", "log_other_excerpt",
                "not_increasing_examples", "final_reads_wrong", "fd_differences", "server_metrics"):
        if s[key]:
            print(f"{key}: {json.dumps(s[key])}")


def source():
    """The commit the service ran from, and the files that differed from it (others edit the tree too)."""
    git = lambda *argv: subprocess.run(["git", *argv], cwd=servers.ROOT, capture_output=True,  # noqa: E731
                                       text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"), "changed_files": git("status", "--porcelain").splitlines()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--warmup", type=float, default=60,
                        help="seconds before the first memory reading (at most a third of --duration)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the JSON and the log")
    args = parser.parse_args()
    for name in [n for n in os.environ if n.startswith("CHANGEFEED_") or n == "GUNICORN_CMD_ARGS"]:
        del os.environ[name]  # the production configuration, whatever the calling shell set
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
    print(f"changefeed soak, {args.duration:.0f} s, on {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="changefeed-soak-") as tmp:
        log = Path(tmp) / "gunicorn.log"
        with servers.gunicorn("app:create_app()", servers.migrated_db(tmp), str(log), env=SERVER_ENV) as service:
            run = asyncio.run(soak(service, args, tmp))
        shutil.copy(log, args.results / f"soak-{stamp}.log")
        summary = summarize(run, scan_log(log))
    report = {"date": stamp, "machine": machine(), "source": source(), "duration_s": args.duration,
              "config": {k: v for k, v in globals().items() if k.isupper() and isinstance(v, (int, float, tuple))},
              "server_env": SERVER_ENV, "summary": summary,
              "samples": run["tally"].samples,
              "fd_kinds": {"idle": run["idle_fd_kinds"], "after": run["after_fd_kinds"]}}
    print_table(summary)
    out = args.results / f"soak-{stamp}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\nresults: {out}\ngunicorn log: {args.results / f'soak-{stamp}.log'}")
    return 0 if all(summary["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
