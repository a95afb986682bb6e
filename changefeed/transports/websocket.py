"""GET /ws: one WebSocket follows many pages, and who is on them (simple-websocket).

Messages are JSON text; the protocol (docs/api.md):

    client: subscribe {slug, since, epoch?, presence?, presence_form?, payload?} or {prefix, since?, payload?},
            unsubscribe {slug} or {prefix},
            presence {slug, client_id, name?, state} (a heartbeat, as POST /presence), ping {id?}
    server: subscribed, change, presence, beat, unsubscribed, pong, error, reset (a prefix's new database)

A prefix is followed through the database feed (transports/feed.py): each
save under it wakes the socket, which reads the feed after the client's
place and sends each page found, with the cursor that resumes after it.

The route answers the handshake with the socket's life as the body of its
answer (Socket.life), and whatever runs that body is the socket's one
worker: it answers the client's messages, then sends what is new. Under
gunicorn's gevent worker no greenlet holds a waiting socket: each wait is
handed to the server as a Parked, as an event stream's is, and one of its
runners goes on when the socket is woken; the worker reads the socket and
pings the client itself, woken by the server's watch of the connection
(ops/worker.Readable). Under `flask run` the request's thread runs it all,
and the library's reader thread reads. Every page the socket follows has a
notify.Subscription sharing the socket's one wake-up event (the library's,
set for each message read), so a save costs the notifier what it costs for
a stream (set `latest`, wake) and never waits on this client. The worker then sends each
page's newest state, once: a client slower than the saves skips versions
and ends at the newest, as with /events. A wake-up with no news (the
notifier's heartbeat tick) makes it read the store itself, so a missed
wake-up costs at most a heartbeat interval.

What the worker writes goes out whole or not at all within
CHANGEFEED_SEND_TIMEOUT_S: a client that stops reading is dropped (close
1013 when a close frame can still be sent, else the connection just ends);
meanwhile its messages wait unread, and one that sends more than BACKLOG
of them unanswered is dropped as well.

Close codes: 1008 (token missing or invalid when reads need one, or a page
of another site: do not retry), 4001 (the token expired: reconnect with a
fresh one), 1009 (a message over CHANGEFEED_WS_MAX_MESSAGE_BYTES), 1012
(this worker is shutting down: reconnect), 1013 (too slow, or the server is
full: retry later), 1001 (no answer to the last ping: reconnect). The
server pings every CHANGEFEED_WS_PING_S and simple-websocket drops a peer
that has not answered the previous ping.
"""

import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Generator
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Request, Response, request
from marshmallow import ValidationError
from simple_websocket import ConnectionClosed, Server
from wsproto.events import CloseConnection, Ping
from wsproto.utilities import LocalProtocolError

from changefeed.core import presence as presence_module
from changefeed.core.errors import ApiError
from changefeed.core.feed import START, Position
from changefeed.core.outcomes import Change, Unavailable
from changefeed.core.parked import Parked
from changefeed.core.schemas import MAX_NAME, SLUG, PresenceSchema, reject_constant
from changefeed.ops import metrics
from changefeed.security.limits import Held, TooManyWaits, WaitGate
from changefeed.security.origins import parse_origins
from changefeed.security.tokens import AuthError, Rights, TokenVerifier, read_token
from changefeed.stores.contract import Notifier, Store
from changefeed.stores.notify import Subscription
from changefeed.transports.feed import STREAM_LIMIT, FeedReader, entry_frame, next_retry
from changefeed.transports.follow import Follow
from changefeed.transports.ws_protocol import (
    EXPIRED_REASON,
    GOING_AWAY,
    JSON_TYPES,
    PING_TIMEOUT,
    PING_TIMEOUT_REASON,
    POLICY_VIOLATION,
    RESTART_REASON,
    SERVICE_RESTART,
    SLOW_REASON,
    TOKEN_EXPIRED,
    TRY_AGAIN_LATER,
    TYPES,
    FeedSubscribeSchema,
    PingSchema,
    SubscribeSchema,
    UnsubscribeSchema,
    close_reason,
    error_frame,
    text_frame,
)

log = logging.getLogger(__name__)

PATH = "/ws"
READABLE = "changefeed.readable"  # the server's watch of a connection's bytes to read (ops/worker.Readable)
PARK = "changefeed.park"  # the server holds a socket's waits without a greenlet (ops/worker.py)
BACKLOG = 256  # messages read from the client and not yet handled; past it the client floods: dropped
CLOSE_WAIT_S = 1.0  # how long a close frame may take to send, and the client to answer it

def cross_site(req: Request, allowed: Collection[str]) -> bool:
    """Whether the handshake comes from a page of another site that CHANGEFEED_CORS_ORIGINS does not list.

    A browser sends Origin (and Sec-Fetch-Site) on every WebSocket handshake,
    with the visitor's cookies: a page elsewhere must not read through them
    (cross-site WebSocket hijacking). Clients that are not browsers send no
    Origin, or their own, and are not pages.
    """
    origin = req.headers.get("Origin")
    if origin is None or origin in allowed:
        return False
    site = req.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site not in ("same-origin", "none")
    return origin == "null" or urlsplit(origin).netloc != req.host


class Wire:
    """The socket simple-websocket writes through: each frame whole, one at a time, within a time limit.

    The library writes with one send(), which may write part of a frame; under
    `flask run` the route's frames and the library reader's pongs and pings
    come from two threads.
    Here each write is a sendall() under a lock, and one that times out
    leaves the stream torn: nothing more may be written on it.
    """

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self.sock, self.timeout_s = sock, timeout_s
        self.raw: socket.socket = getattr(sock, "_sock", sock)  # gevent's socket: the non-blocking one inside
        self.torn = False
        self._lock = threading.Lock()
        # The library reads only once its selector saw data (it always pings here), so this bounds writes only.
        sock.settimeout(timeout_s)

    def send(self, data: bytes) -> int:
        with self._lock:
            return self._send(data)

    def send_if_idle(self, data: bytes, timeout_s: float) -> bool:
        """Send a last frame (a close) unless a frame is being written; return whether it was sent."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self.sock.settimeout(timeout_s)
            self._send(data)
            return True
        except OSError:
            return False
        finally:
            self._lock.release()

    def _send(self, data: bytes) -> int:
        if self.torn:
            raise BrokenPipeError("the connection is being dropped")
        try:
            self.sock.sendall(data)
        except OSError:
            self.torn = True
            raise
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class Page(Follow):
    """One page a socket follows: the client's position on it, and the notifier's hold on its subscription.

    Without `content` (payload=version) its change frames leave out html and data (schemas.Payload).
    """

    __slots__ = ("held", "count_only", "content")
    subscription: Subscription  # always given

    def __init__(self, store: Store, slug: str, item: dict[str, Any], subscription: Subscription,
                 held: AbstractContextManager[Subscription]) -> None:
        super().__init__(store, slug, item["since"], item["epoch"], item["presence"], subscription)
        self.held = held  # entered: left when the page is unfollowed or the socket ends
        self.count_only = item["presence_form"] == "count"  # presence frames without names
        self.content = item["payload"] == "full"


class Feed:
    """A prefix one socket follows: its reader (whose subscription shares the socket's wake-up), the client's place.

    Its frames are `change` frames as a page's, each with the `cursor` that
    resumes right after it (subscribe again with it as `since`); a cursor of
    another database starts over with a `reset` frame, then every page
    under the prefix as this database holds it.
    """

    def __init__(self, reader: FeedReader, since: tuple[str | None, Position],
                 held: AbstractContextManager[Subscription]) -> None:
        self.reader, self.held = reader, held
        self.epoch, self.position = since
        self.retry: float | None = None  # a save it was told of is not listed yet: look again after this long
        self.look_at: float | None = None  # ... at this time (monotonic)

    @property
    def subscription(self) -> Subscription:
        assert self.reader.subscription is not None
        return self.reader.subscription

    def frames(self) -> list[str]:
        """Read what is new under the prefix since the client's place, as frames; move the place past it."""
        announced, self.subscription.saved = self.subscription.saved, False
        announced = announced and self.reader.store.feed_lags_commits  # SQLite lists a save as it commits
        frames = []
        while True:
            page, full = self.reader.read(self.position, fresh=self.retry is not None, epoch=self.epoch)
            if (self.epoch is not None and page.epoch != self.epoch) or page.ahead:
                frames.append(text_frame("reset", prefix=self.reader.prefix, epoch=page.epoch))
                self.epoch, self.position = page.epoch, START
                continue
            self.epoch, self.position = page.epoch, page.next
            frames += [entry_frame(entry, page.epoch, self.reader.prefix, self.reader.content)
                       for entry in page.entries]
            if not full:
                break
        if frames or not (announced or self.retry):  # found, or nothing was announced: wait for the next save
            self.retry = self.look_at = None
        else:  # announced but not listed yet (PostgreSQL's horizon): look again soon, then less often
            self.retry = next_retry(self.retry)
            self.look_at = None if self.retry is None else time.monotonic() + self.retry
        return frames


class Socket:
    """One open WebSocket, served by one worker at a time (life): the client's messages, then the pages' news."""

    def __init__(self, ws: Server, wire: Wire, service: "Service", rights: Rights | None,
                 environ: dict[str, Any]) -> None:
        self.ws, self.wire, self.service, self.rights, self.environ = ws, wire, service, rights, environ
        # Under gunicorn the worker reads the socket itself when the server's watch says there is something
        # to read: the library starts no reader (reader_thread), and pings are sent from here too.
        readable: Callable[[socket.socket, Callable[[], None]], Any] | None = environ.get(READABLE)
        self.watch = readable(wire.raw, self._readable) if readable is not None else None
        self.release: Callable[[], None] | None = None  # gives the socket's place among the waits back
        self.counted = False  # in OPEN_SOCKETS
        self.finished = False
        self.unread = False  # the watch saw bytes to read (or the end), not read yet
        self.next_ping = None if readable is None else time.monotonic() + service.ping_s
        self.store, self.notifier = service.store, service.notifier
        # The library's wake-up (a message read, the connection ended), shared by every Page's subscription.
        self.woken = ws.event
        self.replies: deque[str | tuple[str, Any]] = deque()  # frames (str) and commands (tuple) to carry out, in the client's order
        self.follows: dict[str, Page] = {}  # the pages followed, by slug
        self.feeds: dict[str, Feed] = {}  # the prefixes followed
        self.beats: dict[tuple[str, str], presence_module.Beat] = {}  # (slug, client_id) -> Beat this socket recorded: "gone" for each at the end
        self.ended = False  # the client went, or the socket is being closed: the worker stops
        self.closed_with: tuple[int, str] | None = None  # (code, reason) of the close frame sent, if one was
        self.ends_at = None if rights is None else time.monotonic() + rights.seconds_left()

    def handle(self, message: str | bytes) -> None:
        """Answer one client message; a bad one gets an error frame, and the socket stays open."""
        slug = None
        try:
            if not isinstance(message, str):
                raise ApiError(400, "invalid message", "Send JSON text messages, not binary ones.")
            try:
                body = json.loads(message, parse_constant=reject_constant)
            except (ValueError, RecursionError) as exc:
                raise ApiError(400, "invalid message", f"The message is not valid JSON: {exc}.") from None
            if not isinstance(body, dict):
                raise ApiError(400, "invalid message", f'A message must be a JSON object with a "type", '
                                                       f"not {JSON_TYPES[type(body)]}.")
            kind = body.get("type")
            if kind not in TYPES or not isinstance(kind, str):
                raise ValidationError({"type": [f"Must be one of {', '.join(TYPES)}."]})
            if isinstance(body.get("slug"), str) and SLUG.fullmatch(body["slug"]):
                slug = body["slug"].lower()  # echoed in an error frame: only a slug as sent, sure to encode
            getattr(self, f"on_{kind}")(body)
        except ValidationError as exc:
            self.queue(error_frame("invalid message", "Fix the fields listed in `fields` and send the message "
                                   "again.", fields=exc.messages, **self._slug(slug, exc)))
        except ApiError as exc:
            self.queue(error_frame(exc.error, exc.message, **{**self._slug(slug), **exc.details}))
        except Unavailable as exc:
            self.queue(error_frame("unavailable", f"The database cannot be read right now ({exc}). Retry in a "
                                   "moment.", **self._slug(slug)))
        except Exception:  # a bug: say so in a frame; the socket, already upgraded, cannot answer a 500
            log.exception("WebSocket message failed")
            self.queue(error_frame("internal error", "The server failed to answer this message; the error "
                                   "is logged.", **self._slug(slug)))

    @staticmethod
    def _slug(slug: str | None, invalid: ValidationError | None = None) -> dict[str, str]:
        """The `slug` member of an error frame: the message's, unless that is what was wrong with it."""
        if slug is None or (invalid is not None and "slug" in invalid.messages):
            return {}
        return {"slug": slug}

    def on_subscribe(self, body: dict[str, Any]) -> None:
        if "prefix" in body and "slug" not in body:
            feed = self.service.feed_subscribe_schema.load(body)
            if self.service.verifier.reads and feed["prefix"]:
                assert self.rights is not None
                self.rights.require_prefix("read", feed["prefix"])
            self.queue(("subscribe_prefix", feed))
            return
        item = self.service.subscribe_schema.load(body)
        if self.service.verifier.reads:
            assert self.rights is not None  # admit() lets no socket without a token in when reads need one
            self.rights.require("read", item["slug"])
        self.queue(("subscribe", item))

    def on_unsubscribe(self, body: dict[str, Any]) -> None:
        item = self.service.unsubscribe_schema.load(body)
        if ("slug" in item) == ("prefix" in item):
            raise ValidationError({"slug": ["Name the `slug` (or the `prefix`) of a subscription of this socket."]})
        self.queue(("unsubscribe", item["slug"]) if "slug" in item else ("unsubscribe_prefix", item["prefix"]))

    def on_ping(self, body: dict[str, Any]) -> None:
        self.queue(text_frame("pong", id=self.service.ping_schema.load(body)["id"]))

    def on_presence(self, body: dict[str, Any]) -> None:
        item = self.service.presence_schema.load(body)
        if self.service.verifier.enabled and self.rights is None:
            raise AuthError(401, "invalid_token", "Presence needs a token here (access control is on): connect "
                                                  "with one (Authorization: Bearer, or the cookie of POST /session).")
        beat = presence_module.beat_of(item, self.rights, MAX_NAME)
        self.notifier.start()  # its look-out also sweeps presence entries past their TTL
        answer = presence_module.record(self.store, beat, self.service.config)
        key = (beat.slug, beat.client_id)
        if beat.state == presence_module.GONE:
            self.beats.pop(key, None)
        else:
            self.beats[key] = beat
        self.queue(text_frame("beat", **answer))

    def queue(self, item: str | tuple[str, Any]) -> None:
        """A frame or command to carry out once the messages read so far are handled, in their order."""
        if not self.ended:
            self.replies.append(item)

    def drop(self) -> None:
        """End a client that does not read: a close frame if the stream is whole, then the connection."""
        metrics.refused("send_timeout")
        self.close(TRY_AGAIN_LATER, SLOW_REASON)

    def close(self, code: int, reason: str) -> None:
        """Stop the worker and the library's reader, with a close frame when the stream can carry one (never mid-frame)."""
        self.ended = True
        self.woken.set()
        if self.closed_with is None and self.ws.connected:
            try:
                frame = self.ws.ws.send(CloseConnection(code=code, reason=close_reason(reason)))  # wsproto frames it
            except LocalProtocolError:  # the client is closing already
                frame = None
            if frame and self.wire.send_if_idle(frame, CLOSE_WAIT_S):
                self.closed_with = (code, reason)
        self.ws.connected = False
        self.woken.set()

    def leave(self) -> None:
        """The socket ended: each tab it beat for leaves the page's presence at once."""
        for beat in self.beats.values():
            try:
                presence_module.record(self.store, beat._replace(state=presence_module.GONE), self.service.config)
            except Exception as exc:  # the entry then expires after its TTL
                log.info("presence of %s on %s not ended at close: %s", beat.client_id, beat.slug, exc)
        self.beats.clear()

    def life(self, refusal: tuple[int, str] | None, park: bool) -> Generator[Parked, None, None]:
        """The socket from its admission to its end: closed at once with `refusal`, else served (run)."""
        try:
            if refusal is not None:
                self.close(*refusal)
                return
            metrics.OPEN_SOCKETS.inc()
            self.counted = True
            yield from self.run(park)
        finally:
            self.finish()

    def finish(self) -> None:
        """Once, however the socket ended: the client's moment to answer a close, the connection, the books."""
        if self.finished:
            return
        self.finished = self.ended = True
        try:
            if self.watch is not None:
                self.watch.close()
            if self.closed_with is not None:  # let the client answer the close frame
                self.linger()
            self.hang_up()
            if self.counted:
                metrics.OPEN_SOCKETS.dec()
            self.leave()
        finally:
            if self.release is not None:
                self.release()

    def hang_up(self) -> None:
        """End the TCP connection now: the library's reader stops, and the server reads no next request."""
        for raw in (self.wire.sock, self.environ.get("gunicorn.sock")):
            if raw is not None:
                try:
                    raw.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed
                    pass
        self.ws.thread.join(CLOSE_WAIT_S)

    def run(self, park: bool = False) -> Generator[Parked, None, None]:
        """Answer the client's messages, then send whatever is new on the followed pages, until the socket ends.

        One worker for both, woken by one event: the watch of the connection
        (or the library's reader) sets it for each message read and when the
        connection ends, each followed page's subscription for each save.
        With `park` (a server that offers it: ops/worker.py) each wait is
        yielded as a Parked, and the server holds the socket meanwhile with
        no greenlet: a waiting greenlet and its Flask frames were most of
        what an open socket cost (about 15 KiB of 37).
        """
        last_full_look = time.monotonic()
        try:
            while not self.ended:
                if not self.ws.input_buffer and not self.unread:
                    if self.watch is not None:
                        self.watch.arm()
                    if park:
                        yield Parked(self.woken, self.timeout())
                    else:
                        self.woken.wait(self.timeout())
                    self.woken.clear()
                if self.unread:
                    self.unread = False
                    self.read()
                if self.next_ping is not None and time.monotonic() >= self.next_ping:
                    self.ping()
                if self.ended:
                    return
                if len(self.ws.input_buffer) > BACKLOG:  # sent faster than answered, and more coming
                    return self.drop()
                messages = len(self.ws.input_buffer)
                while self.ws.input_buffer and not self.ended:
                    self.handle(self.ws.input_buffer.pop(0))
                if not self.ws.connected:  # the client closed, or the library dropped it (a missed ping, 1009)
                    return
                if self.notifier.closed:
                    return self.close(SERVICE_RESTART, RESTART_REASON)
                if self.ends_at is not None and time.monotonic() >= self.ends_at:
                    return self.close(TOKEN_EXPIRED, EXPIRED_REASON)
                answered = bool(self.replies) or messages > 0
                while self.replies and not self.ended:
                    item = self.replies.popleft()
                    if isinstance(item, str):
                        self.send(item)
                    else:
                        getattr(self, item[0])(item[1])
                news = False
                for page in list(self.follows.values()):
                    news |= self.look(page, full=False)
                now = time.monotonic()
                for feed in list(self.feeds.values()):
                    if feed.subscription.saved or (feed.look_at is not None and feed.look_at <= now):
                        news |= self.look_feed(feed)
                # A wake-up that brought nothing is the heartbeat tick (or a new database): look for
                # ourselves. Should a tick come along with news, the next one is looked at anyway.
                now = time.monotonic()
                if (not news and not answered) or now - last_full_look >= 2 * self.notifier.heartbeat_s:
                    last_full_look = now
                    for page in list(self.follows.values()):
                        self.look(page, full=True)
                    for feed in list(self.feeds.values()):
                        self.look_feed(feed)
        except TimeoutError:  # socket.timeout: the client took nothing for the send timeout
            self.drop()
        except (ConnectionClosed, OSError):  # the client went
            pass
        except Exception:
            log.exception("WebSocket failed")
            self.close(1011, "internal error")
        finally:
            self.ended = True
            for held in [*(page.held for page in self.follows.values()), *(feed.held for feed in self.feeds.values())]:
                held.__exit__(None, None, None)
            self.follows.clear()
            self.feeds.clear()

    def timeout(self) -> float | None:
        """How long to wait for a wake-up: until the first thing due (None: nothing is)."""
        now = time.monotonic()
        due = [feed.look_at for feed in self.feeds.values() if feed.look_at is not None]  # announced, not listed yet
        if not self.follows and not self.feeds:  # no subscription for notifier.close() to wake: look now and then
            due.append(now + 1.0)
        if self.ends_at is not None:
            due.append(self.ends_at)
        if self.next_ping is not None:
            due.append(self.next_ping)
        return max(0.0, min(due) - now) if due else None

    def _readable(self) -> None:
        """(The server's watch, from its event loop) there is something to read."""
        self.unread = True
        self.woken.set()

    def read(self) -> None:
        """Take what the client sent: messages into the library's buffer, its pings answered, its close seen.

        What the library's reader does in its loop, once: its own _handle_events does the rest.
        """
        try:
            data = self.wire.raw.recv(self.ws.receive_bytes)  # gevent's socket is non-blocking underneath
        except BlockingIOError:
            return
        except OSError:
            data = b""
        try:
            if not data:
                raise ConnectionResetError("the client closed the connection")
            self.ws.ws.receive_data(data)
            self.ws.connected = self.ws._handle_events()
        except (OSError, LocalProtocolError):
            self.ws.connected = False

    def ping(self) -> None:
        """Ping the client, or drop it (1001) when it did not answer the last ping: as the library does."""
        if not self.ws.pong_received:
            return self.close(GOING_AWAY, PING_TIMEOUT_REASON)
        self.ws.pong_received = False
        self.wire.send(self.ws.ws.send(Ping()))
        self.next_ping = time.monotonic() + self.service.ping_s

    def linger(self) -> None:
        """After a close frame, give the client a moment to answer it before the connection ends."""
        if self.watch is None:
            self.ws.thread.join(CLOSE_WAIT_S)  # the library's reader ends on the answer
            return
        try:
            self.wire.sock.settimeout(CLOSE_WAIT_S)
            self.wire.sock.recv(self.ws.receive_bytes)
        except OSError:
            pass

    def send(self, text: str) -> None:
        self.ws.send(text)

    def subscribe(self, item: dict[str, Any]) -> None:
        """Follow a page (again: from the position given), subscribed before the store is read."""
        slug = item["slug"]
        page = self.follows.get(slug)
        if page is None and len(self.follows) >= self.service.max_slugs:
            self.send(error_frame(
                "too many subscriptions", f"This socket follows {len(self.follows)} pages, its most "
                f"(CHANGEFEED_WS_MAX_SLUGS): unsubscribe from one first, or open another socket.", slug=slug))
            return
        try:
            if page is None:
                subscription = Subscription(self.woken)
                held: AbstractContextManager[Subscription] = self.notifier.subscribe(slug, subscription)
                held.__enter__()  # starts the watcher: may find the database gone
            else:  # what was delivered before speaks of the old position
                subscription, held = page.subscription, page.held
                subscription.latest = subscription.presence = None
            page = self.follows[slug] = Page(self.store, slug, item, subscription, held)
            change, present = page.read(), page.read_presence()
        except Unavailable as exc:
            self.unfollow(slug)
            self.send(error_frame("unavailable", f"The database cannot be read right now ({exc}). "
                                  "Subscribe again in a moment.", slug=slug))
            return
        self.send(f'{{"type":"subscribed","slug":"{slug}","version":{change.version},"epoch":"{change.epoch}"}}')
        news = page.take(change)
        if news is not None:
            self.send_change(page, news)
        present = page.take_presence(present)
        if present is not None:
            self.send_presence(page, present)

    def subscribe_prefix(self, item: dict[str, Any]) -> None:
        """Follow every page under a prefix from the cursor given (again: from there), subscribed before reading."""
        prefix = item["prefix"]
        feed = self.feeds.get(prefix)
        if feed is None and len(self.follows) + len(self.feeds) >= self.service.max_slugs:
            self.send(error_frame(
                "too many subscriptions", f"This socket follows {len(self.follows) + len(self.feeds)} pages and "
                "prefixes, its most (CHANGEFEED_WS_MAX_SLUGS): unsubscribe from one first.", prefix=prefix))
            return
        rights = self.rights
        readable = (lambda slug: rights.may("read", slug)) if rights is not None and not prefix else None
        content = item["payload"] == "full"
        try:
            if feed is None:
                reader = FeedReader(self.store, self.notifier, prefix, limit=STREAM_LIMIT, content=content,
                                    readable=readable, shared=True)
                reader.subscription = Subscription(self.woken)
                held: AbstractContextManager[Subscription] = self.notifier.subscribe_prefix(prefix,
                                                                                             reader.subscription)
                held.__enter__()
                feed = Feed(reader, item["since"], held)
            else:  # the new subscription's place and payload replace the old ones
                feed.epoch, feed.position = item["since"]
                feed.reader.content = content
            self.feeds[prefix] = feed
            frames = feed.frames()
        except Unavailable as exc:
            self.unsubscribe_prefix(prefix, answer=False)
            self.send(error_frame("unavailable", f"The database cannot be read right now ({exc}). "
                                  "Subscribe again in a moment.", prefix=prefix))
            return
        self.send(text_frame("subscribed", prefix=prefix, epoch=feed.epoch))
        for frame in frames:
            self.send(frame)

    def unsubscribe_prefix(self, prefix: str, answer: bool = True) -> None:
        feed = self.feeds.pop(prefix, None)
        if feed is not None:
            feed.held.__exit__(None, None, None)
        if answer:
            self.send(text_frame("unsubscribed", prefix=prefix))

    def look_feed(self, feed: Feed) -> bool:
        """Send what is new under one prefix; return whether anything was."""
        try:
            frames = feed.frames()
        except Unavailable as exc:  # looked at again on the next heartbeat
            log.warning("WebSocket could not read the feed of %r: %s", feed.reader.prefix, exc)
            return False
        for frame in frames:
            self.send(frame)
        return bool(frames)

    def unsubscribe(self, slug: str) -> None:
        self.unfollow(slug)
        self.send(f'{{"type":"unsubscribed","slug":"{slug}"}}')

    def unfollow(self, slug: str) -> None:
        page = self.follows.pop(slug, None)
        if page is not None:
            page.held.__exit__(None, None, None)

    def look(self, page: Page, full: bool) -> bool:
        """Send what is new of one page: delivered, or (`full`) read from the store. Return whether anything was."""
        try:
            change = page.new_change(full)
        except Unavailable as exc:  # looked at again on the next heartbeat
            change = None
            log.warning("WebSocket could not read %s: %s", page.slug, exc)
        if change is not None:
            self.send_change(page, change)
        try:
            present = page.new_presence(full)
        except Unavailable as exc:
            present = None
            log.warning("WebSocket could not read the presence on %s: %s", page.slug, exc)
        if present is not None:
            self.send_presence(page, present)
        return change is not None or present is not None

    def send_change(self, page: Page, change: Change) -> None:
        # The cached JSON text of the answer, with the frame's type and slug in front: no re-serializing.
        text = (change.answer if page.content else change.notice) if change.changed else change.unchanged
        self.send(f'{{"type":"change","slug":"{page.slug}",' + text[1:])

    def send_presence(self, page: Page, present: presence_module.Presence) -> None:
        self.send(f'{{"type":"presence","slug":"{page.slug}",' + present.text(page.count_only)[1:])


class Service:
    """What every socket of one app shares: the store, the notifier, the verifier, the limits."""

    def __init__(self, app: Flask, store: Store, notifier: Notifier, verifier: TokenVerifier,
                 waits: WaitGate) -> None:
        config = app.config
        self.config, self.store, self.notifier, self.verifier, self.waits = config, store, notifier, verifier, waits
        self.allowed_origins = parse_origins(config["CHANGEFEED_CORS_ORIGINS"])
        self.max_slugs = config["CHANGEFEED_WS_MAX_SLUGS"]
        self.send_timeout_s = config["CHANGEFEED_SEND_TIMEOUT_S"]
        self.ping_s = max(config["CHANGEFEED_WS_PING_S"], 1)
        self.subscribe_schema, self.unsubscribe_schema = SubscribeSchema(), UnsubscribeSchema()
        self.feed_subscribe_schema = FeedSubscribeSchema()
        self.ping_schema = PingSchema()
        self.presence_schema = PresenceSchema()

    def admit(self, req: Request) -> tuple[tuple[int, str] | None, Rights | None]:
        """The close (code, reason) this connection gets at once, or None, and the token's Rights."""
        if cross_site(req, self.allowed_origins):
            return (POLICY_VIOLATION, "a page of another site may not connect here (CHANGEFEED_CORS_ORIGINS)"), None
        if self.notifier.closed:
            return (SERVICE_RESTART, RESTART_REASON), None
        if not self.verifier.enabled:
            return None, None
        try:
            token = read_token(req)  # as an HTTP read: a Bearer header, else the cookie (beside a Basic header too)
            if token is None:
                if self.verifier.reads:
                    return (POLICY_VIOLATION, "a token is needed: send Authorization: Bearer, or the cookie of "
                                              "POST /session"), None
                return None, None
            rights = self.verifier.verify_token(token)
        except AuthError as exc:
            if exc.expired:
                return (TOKEN_EXPIRED, EXPIRED_REASON), None
            return (POLICY_VIOLATION, f"invalid token: {exc.message}"), None
        except Unavailable:  # the identity provider's keys cannot be fetched
            return (TRY_AGAIN_LATER, "the token cannot be checked right now: retry later"), None
        return None, rights

    def accept(self, environ: dict[str, Any]) -> Held[Parked]:
        """The route: the handshake and admission, then the socket's life as the body of the answer (Socket.life).

        The server iterates that body: under gunicorn each wait comes out of
        it as a Parked and the route's greenlet ends; under `flask run` its
        first step serves the whole socket. The connection is shut down before
        the body ends, so the server's late try at the 101 headers fails quietly.
        """
        ws = Server(environ, **self.config["SOCK_SERVER_OPTIONS"])  # the handshake: the 101 is sent here
        wire = ws.sock = Wire(ws.sock, self.send_timeout_s)
        _reconnectable_ping_timeout(ws)
        refusal, rights = self.admit(request)
        sock = Socket(ws, wire, self, rights, environ)
        if refusal is None:
            try:
                sock.release = self.waits.enter(environ)
            except TooManyWaits as exc:
                refusal = (TRY_AGAIN_LATER, exc.message)
        # Held: the server closes every body it was given, also one it never ran; finish() then still runs.
        return Held(sock.life(refusal, environ.get(PARK, False)), sock.finish)


def _reconnectable_ping_timeout(ws: Server) -> None:
    """Have a missed ping close with 1001, not the library's 1008, which tells a client never to retry.

    A peer that missed a ping is most likely gone; should it still be there
    (a pong lost, a late one), it must reconnect, not give up for good.
    """
    library_close = ws.close

    def close(reason: int | None = None, message: str | None = None) -> None:
        if reason == POLICY_VIOLATION and message == PING_TIMEOUT:
            reason, message = GOING_AWAY, PING_TIMEOUT_REASON
        return library_close(reason, message)

    ws.close = close


class _NoReader:
    """In place of simple-websocket's reader thread where the socket's worker reads for itself (Socket.read)."""

    name = "changefeed-ws-no-reader"

    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return False


def reader_thread(target: Callable[[], None]) -> "threading.Thread | _NoReader":
    """simple-websocket's `thread_class`: its reader, unless the server watches the connection (READABLE).

    Under gunicorn's gevent worker a reader greenlet (and the selector it
    pings with) would cost about 8 KiB more per socket, waiting for bytes a
    watcher sees for nothing; under `flask run` the thread reads, as before.
    """
    if READABLE in request.environ:
        return _NoReader()
    return threading.Thread(target=target, daemon=True)


class Upgraded(Response):
    """The answer to a WebSocket handshake: its body is the socket's life (Service.accept), its status for the books.

    The access log (ops/logs.py) says 101, not 0 (gevent) or 200 (werkzeug).
    """

    def __init__(self, life: Held[Parked]) -> None:
        super().__init__()
        self.life = life

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Held[Parked]:  # type: ignore[override]
        start_response("101 Switching Protocols", [("Connection", "close")])
        return self.life
