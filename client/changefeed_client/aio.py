"""`AsyncClient`: the same calls as `Client`, for asyncio programs."""

import secrets
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import anyio
import httpx
from httpx_sse import SSEError, aconnect_sse

from . import calls
from .models import Beat, Change, Page, Reset, Saved
from .retries import Attempts, Reconnect
from .watches import FeedWatch, Newest, PageWatch


class AsyncClient:
    """`Client`'s twin: each call is awaited, `watch` and `feed` are iterated with `async for`."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0, *,
                 retry_for: float = 30.0, stream_timeout: float = 60.0, reconnect_cap: float = 30.0) -> None:
        self.timeout, self.stream_timeout = calls.timeouts(timeout, stream_timeout)
        self.retry_for, self.reconnect_cap = retry_for, reconnect_cap
        self.client_id = "py-" + secrets.token_hex(8)
        self.http = httpx.AsyncClient(base_url=base_url, headers=calls.headers_for(token), timeout=self.timeout)

    async def save(self, slug: str, html: str, data: Any = None, base_version: int | None = None, *,
                   idempotency_key: str | None = None) -> Saved:
        """See `Client.save`."""
        key = idempotency_key or calls.new_key()
        body = calls.save_body(slug, html, data, base_version)
        attempts = Attempts(f"save {slug}", self.retry_for, idempotency_key=key)
        while True:
            try:
                response = await self.http.post("/save", json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError as error:
                delay = attempts.failed(error)
            else:
                if response.status_code == 200:
                    return calls.saved(response)
                delay = attempts.answered(response)
            await anyio.sleep(delay)

    async def get(self, slug: str) -> Page | None:
        """See `Client.get`."""
        attempts = Attempts(f"get {slug}", self.retry_for)
        while True:
            try:
                response = await self.http.get("/changes", params={"slug": slug, "since": 0})
            except httpx.TransportError as error:
                delay = attempts.failed(error)
            else:
                if response.status_code == 200:
                    return calls.page_of(slug, response)
                delay = attempts.answered(response)
            await anyio.sleep(delay)

    async def watch(self, slug: str | None = None, *, slugs: Sequence[str] | None = None,
                    prefix: str | None = None, since: int | str | None = None,
                    epoch: str | None = None) -> AsyncIterator[Page]:
        """See `Client.watch`."""
        watch = calls.watch_for(slug, slugs, prefix, since, epoch)
        newest = None if isinstance(watch, PageWatch) else Newest()
        async for item in self._follow(watch):
            page = item if newest is None else newest.page(item)
            if page is not None:
                yield page

    async def feed(self, since: str | None = None, *, prefix: str | None = None,
                   slugs: Sequence[str] | None = None, payload: str = "version") -> AsyncIterator[Change | Reset]:
        """See `Client.feed`."""
        async for item in self._follow(calls.feed_watch(since, prefix, slugs, payload)):
            yield item

    async def beat(self, slug: str, name: str, state: str = "viewing") -> Beat:
        """See `Client.beat`."""
        body = calls.beat_body(slug, self.client_id, name, state)
        try:
            response = await self.http.post("/presence", json=body)
        except httpx.TransportError as error:  # not retried: the next beat is the retry
            raise calls.no_answer(f"beat {slug}", error) from error
        return calls.beat_of(response)

    async def _follow(self, watch: PageWatch | FeedWatch) -> AsyncIterator[Any]:
        reconnect = Reconnect(self.reconnect_cap)
        while True:
            try:
                async with aconnect_sse(self.http, "GET", "/events", params=watch.params(),
                                        headers=watch.headers(), timeout=self.stream_timeout) as source:
                    if source.response.status_code != 200:
                        await source.response.aread()
                    delay = reconnect.answered(source.response)
                    if delay is None:
                        async for event in source.aiter_sse():
                            reconnect.saw(event)
                            item = watch.take(event)
                            if item is not None:
                                yield item
                        delay = reconnect.ended()
            except (httpx.TransportError, SSEError):
                delay = reconnect.failed()
            await anyio.sleep(delay)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()
