"""The requests of each call and the reading of their answers, shared by the sync and the async client."""

import uuid
from collections.abc import Sequence
from typing import Any

import httpx

from .errors import Unavailable, error_for
from .models import Beat, Page, Saved
from .retries import json_of, retry_after
from .watches import FeedWatch, PageWatch

PAYLOADS = ("version", "full")


def headers_for(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def timeouts(timeout: float, stream_timeout: float) -> tuple[httpx.Timeout, httpx.Timeout]:
    """The timeout of a call, and of an event stream: a stream may be quiet for a heartbeat (15 s) and more."""
    return httpx.Timeout(timeout), httpx.Timeout(timeout, read=stream_timeout)


def save_body(slug: str, html: str, data: Any, base_version: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"slug": slug, "html": html, "data": data}
    if base_version is not None:
        body["base_version"] = base_version
    return body


def new_key() -> str:
    """A fresh Idempotency-Key: one per save, the same for every retry of it."""
    return str(uuid.uuid4())


def saved(response: httpx.Response) -> Saved:
    return Saved.from_answer(response.json(), replayed=response.headers.get("Idempotent-Replayed") == "true")


def page_of(slug: str, response: httpx.Response) -> Page | None:
    answer = response.json()
    return Page.from_answer(slug, answer) if answer["version"] else None


def beat_body(slug: str, client_id: str, name: str, state: str) -> dict[str, Any]:
    return {"slug": slug, "client_id": client_id, "name": name, "state": state}


def no_answer(what: str, cause: httpx.TransportError) -> Unavailable:
    return Unavailable(f"{what}: no answer from the service ({type(cause).__name__}: {cause})")


def beat_of(response: httpx.Response) -> Beat:
    if response.status_code != 200:
        raise error_for(response.status_code, json_of(response), retry_after(response))
    return Beat.from_answer(response.json())


def watch_for(slug: str | None, slugs: Sequence[str] | None, prefix: str | None, since: Any,
              epoch: str | None) -> PageWatch | FeedWatch:
    """One page's stream for a slug, the feed's stream for a list of slugs or a prefix."""
    if sum(x is not None for x in (slug, slugs, prefix)) != 1:
        raise ValueError("watch one of: a slug, slugs=[...], or prefix=...")
    if slug is not None:
        return PageWatch(slug, int(since or 0), epoch)
    return FeedWatch(prefix, slugs, None if since in (None, 0, "0") else str(since), payload="full")


def feed_watch(since: str | None, prefix: str | None, slugs: Sequence[str] | None, payload: str) -> FeedWatch:
    if payload not in PAYLOADS:
        raise ValueError(f"payload: full or version, not {payload!r}")
    return FeedWatch("" if prefix is None and slugs is None else prefix, slugs, since, payload)
