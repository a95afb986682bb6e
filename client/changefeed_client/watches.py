"""What a watch holds between events: where to resume, and which versions it already gave.

A stream may break anywhere and open again many times; these classes make
sure that, whatever the service sends after a reconnect, the caller is never
given a version older than one it was given (within one database), and is
given the newest one in the end. They do no I/O: the clients feed them events.
"""

import json
from collections.abc import Sequence
from typing import Any

from httpx_sse import ServerSentEvent

from .models import Change, Page, Reset

MAX_SLUGS = 100  # what one /events stream may name


class PageWatch:
    """One page's stream, `GET /events?slug=S`: resumes from the version it gave, by `Last-Event-ID`."""

    def __init__(self, slug: str, since: int = 0, epoch: str | None = None) -> None:
        self.slug, self.version, self.epoch = slug, since, epoch

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"slug": self.slug, "since": self.version}
        if self.epoch is not None:
            params["epoch"] = self.epoch
        return params

    def headers(self) -> dict[str, str]:
        """`Last-Event-ID: <epoch>:<version>`, the id of the last event given, as a browser's EventSource sends it."""
        return {"Last-Event-ID": f"{self.epoch}:{self.version}"} if self.epoch is not None else {}

    def take(self, event: ServerSentEvent) -> Page | None:
        """The page to give for this event, or None when it is nothing newer (or no change at all)."""
        if event.event != "change":
            return None  # presence, or the retry-only first event
        answer = json.loads(event.data)
        epoch = answer["epoch"]
        if epoch == self.epoch and answer["version"] <= self.version:
            return None  # a version already given, sent again after a reconnect
        if not answer.get("changed") and self.epoch is None:
            self.epoch = epoch  # the first answer: no such page yet
            return None
        if not answer.get("changed") and answer["version"] > 0:
            return None  # cannot happen: an unchanged answer is at or below what was asked
        self.epoch, self.version = epoch, answer["version"]
        return Page.from_answer(self.slug, answer)  # version 0: the new database has no such page


class FeedWatch:
    """Many pages on one stream, `GET /events?prefix=P` or `?slug=a&slug=b`: resumes from the cursor of the last event."""

    def __init__(self, prefix: str | None = None, slugs: Sequence[str] | None = None, since: str | None = None,
                 payload: str = "version") -> None:
        if (prefix is None) == (slugs is None):
            raise ValueError("give either prefix or slugs")
        if slugs is not None and not 1 <= len(slugs) <= MAX_SLUGS:
            raise ValueError(f"slugs: give 1 to {MAX_SLUGS} slugs (got {len(slugs)}); for more, use a prefix")
        self.prefix, self.slugs, self.payload = prefix, list(slugs or ()), payload
        self.cursor = since

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"payload": self.payload}
        if self.prefix is not None:
            params["prefix"] = self.prefix
        else:
            params["slug"] = self.slugs
        if self.cursor is not None:
            params["since"] = self.cursor
        return params

    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": self.cursor} if self.cursor is not None else {}

    def take(self, event: ServerSentEvent) -> Change | Reset | None:
        if event.event == "reset":
            return Reset(json.loads(event.data)["epoch"])
        if event.event != "change":
            return None
        self.cursor = event.id
        return Change.from_event(event.id, json.loads(event.data))


class Newest:
    """The pages a feed watch gave, so that it gives each page only at a newer version than before."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[str, int]] = {}

    def page(self, item: Change | Reset) -> Page | None:
        if isinstance(item, Reset):
            self.held.clear()  # a new database: every page comes again, as it holds it
            return None
        held = self.held.get(item.slug)
        if held is not None and held[0] == item.epoch and item.version <= held[1]:
            return None
        self.held[item.slug] = (item.epoch, item.version)
        return Page(slug=item.slug, version=item.version, html=item.html or "", data=item.data,
                    updated_at=item.updated_at, epoch=item.epoch, deleted=item.deleted)
