"""What the service answers, as typed values: a save's receipt, a page, a change of the feed, a presence beat."""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Saved:
    """The receipt of a stored save: the page's new version, in the database named by `epoch`."""

    slug: str
    version: int
    updated_at: str
    epoch: str
    replayed: bool = False  # True when a retry learned that an earlier attempt had stored it

    @classmethod
    def from_answer(cls, answer: dict[str, Any], replayed: bool = False) -> "Saved":
        return cls(answer["slug"], answer["version"], answer["updated_at"], answer["epoch"], replayed)


@dataclass(frozen=True)
class Page:
    """A page at one version, as the database named by `epoch` holds it.

    `deleted` is True for a tombstone (`html` is "" and `data` None). A watch
    gives `version` 0 with `deleted` True when a new database (another epoch)
    holds no such page at all: forget what you had of it.
    """

    slug: str
    version: int
    html: str
    data: Any
    updated_at: str | None
    epoch: str
    deleted: bool = False

    @classmethod
    def from_answer(cls, slug: str, answer: dict[str, Any]) -> "Page":
        """A page from a changed `/changes` answer, a page stream's event or a feed entry."""
        return cls(slug=answer.get("slug", slug), version=answer["version"], html=answer.get("html", ""),
                   data=answer.get("data"), updated_at=answer.get("updated_at"), epoch=answer["epoch"],
                   deleted=bool(answer.get("deleted", False) or answer["version"] == 0))


@dataclass(frozen=True)
class Change:
    """One entry of the database's feed: which page is at which version now.

    `cursor` is where to resume from once this change is handled: give it as
    `feed(since=...)` and the feed goes on right after it. `html` and `data`
    are there with `payload="full"` only (None otherwise).
    """

    slug: str
    version: int
    updated_at: str | None
    epoch: str
    cursor: str
    deleted: bool = False
    html: str | None = None
    data: Any = None

    @classmethod
    def from_event(cls, cursor: str, entry: dict[str, Any]) -> "Change":
        return cls(slug=entry["slug"], version=entry["version"], updated_at=entry.get("updated_at"),
                   epoch=entry["epoch"], cursor=cursor, deleted=bool(entry.get("deleted", False)),
                   html=entry.get("html"), data=entry.get("data"))


@dataclass(frozen=True)
class Reset:
    """The feed starts over: the database was replaced (a new `epoch`, after a restore).

    Forget every page you hold from the feed: each one comes again, as the new
    database holds it, right after this.
    """

    epoch: str


@dataclass(frozen=True)
class Beat:
    """The answer to a presence beat: the page's presence version, who you are in lists, and the pace to keep."""

    slug: str
    version: int
    you: str
    beat_ms: int
    ttl_ms: int
    min_interval_ms: int

    @classmethod
    def from_answer(cls, answer: dict[str, Any]) -> "Beat":
        return cls(answer["slug"], answer["version"], answer["you"], answer["beat_ms"], answer["ttl_ms"],
                   answer["min_interval_ms"])
