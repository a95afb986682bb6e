"""The feed of the whole database: positions in its save order, cursors, and what one read of it returns.

A reader of GET /feed (or of a feed stream) holds a cursor: the database's
epoch and a position in its save order, `(number, slug)`. Every page saved
after the position comes once, at its newest version, in save order. On
SQLite the number is the page's `seq`, taken under the one write lock, so it
alone orders saves and the slug is "". On PostgreSQL transactions commit out
of the order of any number they take, so the number is the writing
transaction's id and a read stops below the oldest transaction still running
(stores/postgres.py); the slug orders the pages of one transaction (a
batch of saves), so a page of a listing may end inside one.

The cursor is opaque to clients (`<epoch>.<number>[.<slug>]`): they send
back what they were given, or `0` to start from the beginning.
"""

import json
import re
from dataclasses import dataclass

Position = tuple[int, str]  # (number, slug) in the save order; START is before every save
START: Position = (0, "")
MAX_NUMBER = 2**63 - 1  # a position's number fits the databases' BIGINT

CURSOR = re.compile(r"([A-Za-z0-9_-]{1,64})\.(\d{1,20})(?:\.([A-Za-z0-9-]{1,120}))?")


def encode(epoch: str, position: Position) -> str:
    """The cursor a client sends back to read on from `position` of database `epoch`."""
    number, slug = position
    return f"{epoch}.{number}.{slug}" if slug else f"{epoch}.{number}"


def decode(text: str) -> tuple[str | None, Position]:
    """(epoch, position) of a cursor, (None, START) for "0"; raise ValueError for anything else."""
    if text == "0":
        return None, START
    match = CURSOR.fullmatch(text)
    if match is None or int(match[2]) > MAX_NUMBER:
        raise ValueError(text)
    return match[1], (int(match[2]), match[3] or "")


@dataclass(frozen=True)
class FeedEntry:
    """One page in a read of the feed: its newest version, where it stands in the save order, its content if asked."""

    slug: str
    version: int
    updated_at: str
    deleted: bool
    position: Position
    html: str | None = None  # filled when the read asked for content
    data: str | None = None  # JSON text, as saved

    def fields(self, content: bool) -> str:
        """This entry as the JSON object of a feed answer (a tombstone: slug, version, deleted)."""
        if self.deleted:
            return f'{{"slug":"{self.slug}","version":{self.version},"deleted":true,"updated_at":"{self.updated_at}"}}'
        body = f'"html":{json.dumps(self.html, allow_nan=False)},"data":{self.data},' if content else ""
        return f'{{"slug":"{self.slug}","version":{self.version},{body}"updated_at":"{self.updated_at}"}}'


@dataclass(frozen=True)
class FeedPage:
    """One read of the feed: the entries after a position, where to read on, and the database they came from.

    `ahead`: the position asked for lies past everything this database
    ever saved (a cursor of a copy that went on, or of a database restored
    from an older backup without a new epoch): the reader must start over.
    """

    epoch: str
    entries: list[FeedEntry]
    next: Position
    ahead: bool = False
