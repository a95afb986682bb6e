"""What a save, a delete or a read can end in: plain types every layer may import.

A save (or a delete) ends in exactly one of: `Saved` (on disk), `Conflict`,
`KeyReused`, `NoSuchPage` or `NotStored` (certainly not written; `Busy` is
one kind), `StorageFull` (refused by a limit: not written either), or
`OutcomeUnknown` (it may or may not have been written: a retry with the same
Idempotency-Key settles it). The stores raise them, the write queue keeps the
promise for grouped saves, and the HTTP layer turns each into its answer.
"""

import hashlib
import json
import time
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple


@dataclass(frozen=True)
class Saved:
    """What a save answers: the version it created and when (`replayed`: by an earlier request)."""

    slug: str
    version: int
    updated_at: str
    epoch: str
    replayed: bool = False
    deleted: bool = False  # the version is a tombstone (a delete)


class SaveRequest(NamedTuple):
    """One save as the store applies it; `key` is its Idempotency-Key, if any; `delete`: a tombstone instead."""

    slug: str
    html: str
    data: str  # JSON text
    base_version: int | None = None
    key: str | None = None
    delete: bool = False

    def fingerprint(self) -> str:
        """Identify the request a key was first used for, to refuse the key for another."""
        text = json.dumps([self.slug, self.html, self.data, self.base_version], separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Change:
    """The state of a page as seen by a client that knows version `since`.

    `html` and `data` are filled only when `version > since`, so an unchanged
    poll never reads the page body. `epoch` is the database's identity: a
    client of another epoch gets the whole state, whatever its `since`.
    A deleted page is a tombstone version: `deleted`, with html "" and data null.
    """

    epoch: str
    version: int
    updated_at: str | None = None
    html: str | None = None
    data: str | None = None  # JSON text, as saved
    deleted: bool = False

    @property
    def changed(self) -> bool:
        """Whether the client that asked has something new: then the page body was read."""
        return self.html is not None

    @cached_property
    def answer(self) -> str:
        """The JSON text of a changed answer, built once however many clients it goes to.

        `data` is already compact JSON as stored, so it goes in as it is.
        """
        gone = '"deleted":true,' if self.deleted else ""  # what a client that renders html still shows: ""
        return (f'{{"changed":true,"version":{self.version},"html":{json.dumps(self.html, allow_nan=False)},'
                f'"data":{self.data},{gone}"updated_at":"{self.updated_at}","epoch":"{self.epoch}"}}')

    @cached_property
    def notice(self) -> str:
        """The JSON text of a changed answer without `html` and `data` (payload=version: schemas.Payload says why)."""
        gone = '"deleted":true,' if self.deleted else ""
        return (f'{{"changed":true,"version":{self.version},{gone}'
                f'"updated_at":"{self.updated_at}","epoch":"{self.epoch}"}}')

    @property
    def unchanged(self) -> str:
        """The JSON text of an unchanged answer: only the version there is."""
        return f'{{"changed":false,"version":{self.version},"epoch":"{self.epoch}"}}'

    @cached_property
    def event(self) -> bytes:
        """This version as one Server-Sent Event, encoded once for every stream it goes to.

        Its data is the changed answer, or the unchanged one for a page that a
        new database (epoch) does not hold: the client then starts over at 0.
        """
        return self._event(full=True)

    @cached_property
    def notice_event(self) -> bytes:
        """This version as the event of a payload=version stream: `notice` for `answer`, the same id."""
        return self._event(full=False)

    def _event(self, full: bool) -> bytes:
        data = self.unchanged if self.html is None else self.answer if full else self.notice
        return f"id: {self.epoch}:{self.version}\nevent: change\ndata: {data}\n\n".encode()


class Conflict(Exception):
    """A save named a base version that is no longer the stored one."""

    def __init__(self, version: int) -> None:
        super().__init__(f"stored version is {version}")
        self.version = version


class KeyReused(Exception):
    """An Idempotency-Key came back with a different request than the one it was first used for."""


class NoSuchPage(Exception):
    """A delete named a page that was never saved, or is deleted already (then at `version`)."""

    def __init__(self, version: int) -> None:
        super().__init__(f"no such page (version {version})")
        self.version = version


class NotStored(Exception):
    """The save was certainly not written; `reason` says why, in words for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Busy(NotStored):
    """Other saves held the database past this one's busy timeout; it was not written."""


class StorageFull(Exception):
    """A save would take the database past its page or byte limit; nothing was written.

    `limit` is "pages" or "stored_bytes"; saves that do not grow what is
    stored (an existing page, no bigger) are still taken.
    """

    def __init__(self, limit: str, reason: str) -> None:
        super().__init__(reason)
        self.limit, self.reason = limit, reason


class OutcomeUnknown(Exception):
    """The save may or may not have been written; nobody can tell from here."""


class Unavailable(Exception):
    """The database cannot be read right now."""


class SchemaOutOfDate(RuntimeError):
    """The database file is missing or older than this code."""


_clock: tuple[int, str] = (-1, "")  # the last second formatted, and its text: strftime once a second


def utc_now() -> str:
    """Return the current time as ISO 8601 UTC with milliseconds, e.g. 2026-11-23T21:24:37.444Z.

    Each save and each access-log line takes one: the date and time of day
    are formatted once a second (strftime is most of the cost), the
    milliseconds every time, from one integer reading of the clock so the
    two always agree.
    """
    global _clock
    ms = time.time_ns() // 1_000_000
    second, text = _clock
    if ms // 1000 != second:
        second = ms // 1000
        text = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _clock = second, text
    return f"{text}{ms % 1000:03d}Z"
