"""Asyncio load: subscribers that hold connections open, and a saver at a steady rate.

One event loop drives thousands of connections, so the load generator is not
the limit; it reports its own CPU so a reader can check.
"""

import asyncio
import json
import re
import time
from urllib.parse import urlsplit

import aiohttp

LONG_POLL_WAIT_S = 25
HANDSHAKE_S = 60
POLL_INTERVAL_S = 2.0
FEED_VERSION = re.compile(rb'\ndata: \{"slug":"[^"]*","version":(\d+)')  # a feed event's page version
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
CHANGES_ANSWER = re.compile(rb'\{"changed":(true|false),"version":(\d+)')  # how every /changes answer begins


class Seen:
    """When this subscriber first had each version (or a newer one)."""

    def __init__(self, since):
        self.version = since
        self.at = {}  # version -> monotonic time it was first covered
        self.failed = None  # why the subscription ended early, if it did
        self.opened = asyncio.Event()

    def record(self, version):
        now = time.monotonic()
        for v in range(self.version + 1, version + 1):
            self.at.setdefault(v, now)
        self.version = max(self.version, version)


def session(connections, source=None):
    """An HTTP session for `connections` subscribers, from the loopback address `source` (None: the kernel's)."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False, local_addr=(source, 0) if source else None)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


class _EventStream(asyncio.Protocol):
    """A lean reader of /events: finds each `id:` line in the bytes as they arrive.

    A general HTTP client spends tens of microseconds per line; with a
    thousand streams that would make the load generator, not the server,
    the source of the delay being measured.
    """

    def __init__(self, seen, counter, request, feed=False):
        self.seen, self.counter, self.request, self.buffer, self.answered = seen, counter, request, b"", False
        self.feed = feed  # a feed stream (?prefix=): ids are cursors, the version is in the data
        self.ended = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)
        self.counter["requests"] += 1

    def data_received(self, data):
        if not self.answered:
            self.answered = True
            if not data.startswith(b"HTTP/1.1 200"):
                self.seen.failed = data.split(b"\r\n", 1)[0].decode()
                self.transport.close()
                return
        data = self.buffer + data
        end = data.rfind(b"\n") + 1  # parse whole lines; keep the rest for the next read
        lines, self.buffer = data[:end], data[end:]
        if not self.seen.opened.is_set() and b"\nretry:" in lines:
            self.seen.opened.set()
        if self.feed:
            for version in FEED_VERSION.findall(lines):
                self.seen.record(int(version))
            return
        start = lines.find(b"\nid: ")
        while start >= 0:
            stop = lines.index(b"\n", start + 1)
            self.seen.record(int(lines[start + 5:stop].rpartition(b":")[2]))  # id: <epoch>:<version>
            start = lines.find(b"\nid: ", stop)

    def connection_lost(self, exc):
        if not self.ended.done():
            self.ended.set_result(exc)


async def sse(url, slug, seen, counter, prefix=False, source=None):
    """Hold /events open, recording each version as its event arrives (`prefix`: the feed of the slug as a prefix).

    From the loopback address `source` when given: one address has about
    28,000 ports toward one server port (the local port range).
    """
    parts = urlsplit(url)
    query = f"prefix={slug}&since=0" if prefix else f"slug={slug}&since={seen.version}"
    request = (f"GET /events?{query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
               "Accept: text/event-stream\r\n\r\n").encode()
    await _hold(lambda: _EventStream(seen, counter, request, feed=prefix), parts, seen, source, "stream")


async def _hold(protocol, parts, seen, source, what):
    """Connect a lean reader (`protocol()`, with its `ended` future) to `parts`' host; hold it until it ends.

    From the loopback address `source` when given. However it ends, the
    subscriber is marked open (its wait is over) and, unless it says why
    already, failed with the reason.
    """
    try:
        transport, reader = await asyncio.get_running_loop().create_connection(
            protocol, parts.hostname, parts.port, local_addr=(source, 0) if source else None)
    except OSError as exc:
        seen.failed = repr(exc)
        seen.opened.set()
        return
    try:
        exc = await reader.ended
        seen.failed = seen.failed or f"{what} closed by the server ({exc!r})"
    finally:
        transport.close()
        seen.opened.set()


async def ws(http, url, slug, seen, counter):
    """Hold a WebSocket on /ws subscribed to `slug`, recording each version as its `change` frame arrives.

    One socket per subscriber, as each browser tab holds one; aiohttp answers the
    server's pings. An `error` frame or a close ends it as a failed subscriber.
    """
    try:
        # A handshake not answered within the minute is a failure: a server out of descriptors leaves
        # the connection in its accept queue, unanswered, and the session reads without a time limit.
        connecting = http.ws_connect(url.replace("http", "ws", 1) + "/ws", autoping=True, max_msg_size=0)
        async with await asyncio.wait_for(connecting, HANDSHAKE_S) as socket:
            counter["requests"] += 1
            await socket.send_str(json.dumps({"type": "subscribe", "slug": slug, "since": seen.version}))
            async for message in socket:
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                frame = json.loads(message.data)
                kind = frame.get("type")
                if kind == "change" and frame.get("changed"):
                    seen.record(frame["version"])
                elif kind == "subscribed":
                    seen.opened.set()
                elif kind == "error":
                    seen.failed = f"error frame: {frame}"
                    break
            seen.failed = seen.failed or f"socket closed by the server (close {socket.close_code})"
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
        seen.failed = repr(exc)
    finally:
        seen.opened.set()


async def ask(http, url, slug, seen, counter, wait=0):
    """One GET /changes for the version this subscriber has; record what it brings."""
    async with http.get(f"{url}/changes?slug={slug}&since={seen.version}&wait={wait}") as response:
        body = await response.json()
    counter["requests"] += 1
    seen.opened.set()
    if body["changed"]:
        seen.record(body["version"])


class _LongPoll(asyncio.Protocol):
    """A lean long-poller of /changes on one kept-alive connection: asks, reads the answer, asks again at once.

    As `_EventStream`, for the same reason: with aiohttp's client a request
    and its answer took 140-160 µs of the load generator's one core, so a
    thousand subscribers re-asking after each of 10 saves a second (10,000
    requests/s) were more than it could send: through Varnish it sent about
    5,700/s at 80-90% of a core, and the delays measured were its own queue.
    This takes about 22 µs: it reads the status line, Content-Length and the
    body's first bytes, nothing else. Anything else (a status other than 200,
    no Content-Length, the connection closed) ends the subscriber with
    `seen.failed` saying why.
    """

    def __init__(self, seen, counter, host, slug):
        self.seen, self.counter, self.buffer = seen, counter, b""
        self.request = b"GET /changes?slug=%s&since=%%d&wait=%%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (
            slug.encode(), host.encode())
        self.ended = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.ask(0)  # the first answer at once: the version the subscriber starts from

    def ask(self, wait):
        self.transport.write(self.request % (self.seen.version, wait))

    def fail(self, reason):
        self.seen.failed = self.seen.failed or reason
        self.transport.close()

    def data_received(self, data):
        data = self.buffer + data if self.buffer else data
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            self.buffer = data
            return
        head = data[:head_end]
        if not head.startswith(b"HTTP/1.1 200 "):
            status = head.partition(b"\r\n")[0].decode(errors="replace")
            return self.fail(f"answer: {status}")
        length = CONTENT_LENGTH.search(head)
        if length is None:  # chunked, or no length: not what /changes answers
            return self.fail(f"answer without Content-Length: {head.decode(errors='replace')!r}")
        end = head_end + 4 + int(length[1])
        if len(data) < end:
            self.buffer = data
            return
        if len(data) > end:  # one request at a time: nothing may follow its answer
            return self.fail(f"bytes after the answer: {data[end:end + 80]!r}")
        self.buffer = b""
        answer = CHANGES_ANSWER.match(data, head_end + 4)
        if answer is None:
            return self.fail(f"not a /changes answer: {data[head_end + 4:end][:80]!r}")
        self.counter["requests"] += 1
        if answer[1] == b"true":
            self.seen.record(int(answer[2]))
        self.ask(LONG_POLL_WAIT_S)  # before anything else: the next ask leaves at once
        self.seen.opened.set()

    def connection_lost(self, exc):
        if not self.ended.done():
            self.ended.set_result(exc)


async def long_poll(url, slug, seen, counter, source=None):
    """Ask with wait=25 and ask again as soon as an answer comes (the first answer at once), on one connection.

    From the loopback address `source` when given, as `sse`.
    """
    parts = urlsplit(url)
    await _hold(lambda: _LongPoll(seen, counter, parts.netloc, slug), parts, seen, source, "connection")


async def poll(http, url, slug, seen, counter, offset):
    """Ask every 2 s, starting at `offset` into the interval, as a crowd of tabs does."""
    await asyncio.sleep(offset)
    try:
        while True:
            started = time.monotonic()
            await ask(http, url, slug, seen, counter)
            await asyncio.sleep(max(0.0, POLL_INTERVAL_S - (time.monotonic() - started)))
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
        seen.failed = repr(exc)
        seen.opened.set()


async def subscribe_all(http, url, transport, slugs, since, counter, batch=500, source=None):
    """Start one subscriber per slug in `slugs` (repeat a slug for more); wait until all are open.

    `source`: the loopback address SSE streams and long-polls come from (a WebSocket's is its session's).
    """
    seens, tasks = [], []
    for start in range(0, len(slugs), batch):
        for i, slug in enumerate(slugs[start:start + batch], start):
            seen = Seen(since)
            if transport in ("sse", "sse_prefix"):
                job = sse(url, slug, seen, counter, prefix=transport == "sse_prefix", source=source)
            elif transport == "ws":
                job = ws(http, url, slug, seen, counter)
            elif transport == "longpoll":
                job = long_poll(url, slug, seen, counter, source=source)
            else:
                spread = min(len(slugs), 1000)
                job = poll(http, url, slug, seen, counter, offset=(i % spread) / spread * POLL_INTERVAL_S)
            seens.append(seen)
            tasks.append(asyncio.create_task(job))
        await asyncio.gather(*(s.opened.wait() for s in seens[start:start + batch]))
    return seens, tasks


async def save(http, url, slug, n):
    """POST one save; return (version, monotonic time of its answer)."""
    body = json.dumps({"slug": slug, "html": f"<p>save {n}</p>", "data": {"n": n}})
    async with http.post(f"{url}/save", data=body, headers={"Content-Type": "application/json"}) as response:
        answer = await response.json()
        if response.status != 200:
            raise RuntimeError(f"save failed: {response.status} {answer}")
    return answer["version"], time.monotonic()


async def save_steadily(http, url, slugs, per_second, seconds):
    """Save at a steady rate, cycling over `slugs`; return [(slug, version, answered_at, took_s)]."""
    results, pending = [], []
    interval = 1 / per_second
    start = time.monotonic()
    for n in range(int(per_second * seconds)):
        await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
        slug = slugs[n % len(slugs)]

        async def one(slug=slug, n=n):
            sent = time.monotonic()
            version, answered = await save(http, url, slug, n)
            results.append((slug, version, answered, answered - sent))

        pending.append(asyncio.create_task(one()))
    await asyncio.gather(*pending)
    return results


def delays_ms(seens_by_slug, saves):
    """For every (subscriber, save) pair: ms from the save's answer to the subscriber having it."""
    delays, missed = [], 0
    for slug, version, answered, _ in saves:
        for seen in seens_by_slug.get(slug, ()):
            at = seen.at.get(version)
            if at is None:
                missed += 1
            else:
                delays.append((at - answered) * 1000)
    return delays, missed


async def cancel(tasks):
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
