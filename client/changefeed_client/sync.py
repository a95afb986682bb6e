"""`Client`: the service from plain Python, one call at a time."""

import secrets
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

from . import calls
from .models import Beat, Change, Page, Reset, Saved
from .retries import Attempts, Reconnect
from .watches import FeedWatch, Newest, PageWatch


class Client:
    """A connection pool to one changefeed service, and its calls.

    `retry_for` bounds how long a save or a read keeps retrying (30 s: long
    enough to outlive a server restart); `stream_timeout` how long a watch
    waits for a byte before it reconnects (the service sends one every 15 s).
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0, *,
                 retry_for: float = 30.0, stream_timeout: float = 60.0, reconnect_cap: float = 30.0) -> None:
        self.timeout, self.stream_timeout = calls.timeouts(timeout, stream_timeout)
        self.retry_for, self.reconnect_cap = retry_for, reconnect_cap
        self.client_id = "py-" + secrets.token_hex(8)  # this client's presence, as a tab's
        self.http = httpx.Client(base_url=base_url, headers=calls.headers_for(token), timeout=self.timeout)

    def save(self, slug: str, html: str, data: Any = None, base_version: int | None = None, *,
             idempotency_key: str | None = None) -> Saved:
        """Store a new version of the page: once, however many times it has to be sent.

        Raises `Conflict` when `base_version` is not the stored version,
        `InvalidRequest` for a bad field, `AuthError`, or `Unavailable` when
        the service could not be reached within `retry_for` (then save again
        with the error's `idempotency_key` to learn whether it was stored).
        """
        key = idempotency_key or calls.new_key()
        body = calls.save_body(slug, html, data, base_version)
        attempts = Attempts(f"save {slug}", self.retry_for, idempotency_key=key)
        while True:
            try:
                response = self.http.post("/save", json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError as error:
                delay = attempts.failed(error)
            else:
                if response.status_code == 200:
                    return calls.saved(response)
                delay = attempts.answered(response)
            time.sleep(delay)

    def get(self, slug: str) -> Page | None:
        """The page as stored now (a deleted one with `deleted` True), or None when it was never saved."""
        response = self._read("/changes", {"slug": slug, "since": 0}, f"get {slug}")
        return calls.page_of(slug, response)

    def _read(self, path: str, params: dict[str, Any], what: str) -> httpx.Response:
        attempts = Attempts(what, self.retry_for)
        while True:
            try:
                response = self.http.get(path, params=params)
            except httpx.TransportError as error:
                delay = attempts.failed(error)
            else:
                if response.status_code == 200:
                    return response
                delay = attempts.answered(response)
            time.sleep(delay)

    def watch(self, slug: str | None = None, *, slugs: Sequence[str] | None = None, prefix: str | None = None,
              since: int | str | None = None, epoch: str | None = None) -> Iterator[Page]:
        """Each newer version of a page, of the pages named, or of every page under a prefix, as it is saved.

        It starts with the page as it is now (for slugs and a prefix: every
        such page), or after `since` (a version with its `epoch` for one
        page, a feed cursor for many). It never gives a version older than
        one it gave; after a reconnect, a server restart or a new database
        it goes on to the newest. It runs until you stop iterating.
        """
        watch = calls.watch_for(slug, slugs, prefix, since, epoch)
        if isinstance(watch, PageWatch):
            yield from self._follow(watch)
            return
        newest = Newest()
        for item in self._follow(watch):
            page = newest.page(item)
            if page is not None:
                yield page

    def feed(self, since: str | None = None, *, prefix: str | None = None, slugs: Sequence[str] | None = None,
             payload: str = "version") -> Iterator[Change | Reset]:
        """The database's changes, each page once at its newest version, with the cursor to resume from.

        Keep the `cursor` of the last change you handled and give it as
        `since` to go on after it, in this process or the next. A `Reset`
        means the database was replaced: drop what you hold, every page comes
        again. `payload="full"` adds each page's html and data.
        """
        yield from self._follow(calls.feed_watch(since, prefix, slugs, payload))

    def beat(self, slug: str, name: str, state: str = "viewing") -> Beat:
        """Say that this client is on the page (`viewing`, `editing`, or `gone`); beat again within `ttl_ms`."""
        body = calls.beat_body(slug, self.client_id, name, state)
        try:
            response = self.http.post("/presence", json=body)
        except httpx.TransportError as error:  # not retried: the next beat is the retry
            raise calls.no_answer(f"beat {slug}", error) from error
        return calls.beat_of(response)

    def _follow(self, watch: PageWatch | FeedWatch) -> Iterator[Any]:
        reconnect = Reconnect(self.reconnect_cap)
        while True:
            try:
                with connect_sse(self.http, "GET", "/events", params=watch.params(), headers=watch.headers(),
                                 timeout=self.stream_timeout) as source:
                    if source.response.status_code != 200:
                        source.response.read()
                    delay = reconnect.answered(source.response)
                    if delay is None:
                        for event in source.iter_sse():
                            reconnect.saw(event)
                            item = watch.take(event)
                            if item is not None:
                                yield item
                        delay = reconnect.ended()
            except (httpx.TransportError, SSEError):
                delay = reconnect.failed()
            time.sleep(delay)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
