"""Presence: who has a page open right now, and who of them is editing.

Presence is a second feed beside a page's versions. Each open tab beats
(POST /presence, or a WebSocket `presence` message) about every 5 s; an
entry whose beats stop is swept after the TTL (three missed beats), and a
closing tab says so at once (state "gone"). Every change of who is there,
or of what they do, takes a new presence version from one database-wide
clock: a client that holds version V is sent the list when it is another
one, and an unchanged poll stays a 304. The page's own version never moves
for it.

Entries are listed by user, not by tab: the token's `sub` with access
control on (the server says who someone is), else the tab's client_id with
the display name it chose. A user is shown by `id`, a hash of who they are,
so the list never hands out the client_id another tab could beat with.
"""

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Protocol, TypedDict

from changefeed.core.errors import ApiError
from changefeed.core.outcomes import NotStored, OutcomeUnknown
from changefeed.core.settings import Config

STATES = ("viewing", "editing")
GONE = "gone"  # a beat that says the tab closed: its entry goes at once


class Beat(NamedTuple):
    """One heartbeat as the store applies it: this tab of this user is on `slug`, in `state`."""

    slug: str
    client_id: str
    user: str  # the token's sub, or "client:<client_id>" without access control
    name: str  # shown as text only
    state: str  # "viewing", "editing" or "gone"


class Sweep(NamedTuple):
    """A presence-writer item: delete the entries whose beats stopped."""


@dataclass(frozen=True)
class Beaten:
    """What a heartbeat answers: the presence version after it, and the user's id in the list."""

    slug: str
    version: int
    you: str


class TooSoon(Exception):
    """A client beat again before the minimum interval; `retry_after_s` says when it may."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"beat again in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class PresenceFull(Exception):
    """The page lists its most entries; a new tab is not added until some leave."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the page already lists {limit} present tabs")
        self.limit = limit


def user_id(user: str) -> str:
    """The public id of a user in presence lists: stable, short, and not the client_id."""
    return hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:12]


@dataclass(frozen=True)
class Presence:
    """Who is on a page: `editors` lists up to the configured number of users, editing ones first.

    Version 0 is the empty list of a page nobody has open; every other
    version is used once, so two different lists never share a version.
    """

    version: int
    count: int = 0  # users present
    editing: int = 0  # of them, users editing
    editors: tuple[tuple[str, str, str], ...] = ()  # ((id, name, state), ...)

    @cached_property
    def body(self) -> str:
        """The JSON text of this presence, built once for every client it goes to."""
        return json.dumps({"version": self.version, "count": self.count, "editing": self.editing,
                           "editors": [{"id": i, "name": n, "state": s} for i, n, s in self.editors]},
                          separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @cached_property
    def count_body(self) -> str:
        """The count-only form, for pages with many readers: no names."""
        return f'{{"version":{self.version},"count":{self.count},"editing":{self.editing}}}'

    def text(self, count_only: bool = False) -> str:
        return self.count_body if count_only else self.body

    @cached_property
    def event(self) -> bytes:
        """This presence as one Server-Sent Event (no id: the stream resumes by version, not by presence)."""
        return f"event: presence\ndata: {self.body}\n\n".encode()

    @cached_property
    def count_event(self) -> bytes:
        return f"event: presence\ndata: {self.count_body}\n\n".encode()


NOBODY = Presence(0)


class PresenceItem(TypedDict):
    """A heartbeat as schemas.PresenceSchema loads it."""

    slug: str
    client_id: str
    name: str | None
    state: str


class Reader(Protocol):
    """What presence needs of a verified token (security/tokens.py's Rights, a layer above): who, and may they read."""

    @property
    def sub(self) -> str | None: ...

    def require(self, right: str, slug: str) -> object: ...


class PresenceStore(Protocol):
    """The part of the store presence uses (the stores' Store has it): record a beat, read the list."""

    def beat(self, beat: Beat) -> Beaten: ...

    def presence_version(self, slug: str) -> int: ...

    def presence(self, slug: str) -> Presence: ...


class BeatAnswer(TypedDict):
    """The JSON answer to a heartbeat: the presence version after it, `you`, and the beat timings to keep."""

    slug: str
    version: int
    you: str
    beat_ms: int
    ttl_ms: int
    min_interval_ms: int


def beat_of(item: PresenceItem, rights: Reader | None, max_name: int) -> Beat:
    """The Beat of a validated heartbeat (schemas.PresenceSchema); raise 403 when the token may not read the page.

    With access control on, who beats is the token's `sub`, whatever name
    the client sends; without it, the tab is its own user, under the name it chose.
    """
    if rights is not None:
        rights.require("read", item["slug"])
        who = rights.sub or "someone"
        return Beat(item["slug"], item["client_id"], f"sub:{who}", who[:max_name], item["state"])
    return Beat(item["slug"], item["client_id"], f"client:{item['client_id']}", item["name"] or "Guest",
                item["state"])


def record(store: PresenceStore, beat: Beat, config: Config) -> BeatAnswer:
    """Record a heartbeat and return the answer to it; raise an ApiError (429, 503) saying what to do instead."""
    min_interval_ms = config["CHANGEFEED_PRESENCE_MIN_INTERVAL_MS"]
    try:
        beaten = store.beat(beat)
    except TooSoon as exc:
        wait_ms = max(1, math.ceil(exc.retry_after_s * 1000))
        raise ApiError(429, "too many requests",
                       f"This tab beat less than {min_interval_ms} ms after its last beat; send the next one "
                       f"in {wait_ms} ms (and one every {config['CHANGEFEED_PRESENCE_BEAT_MS']} ms after that).",
                       headers={"Retry-After": str(math.ceil(wait_ms / 1000))}, limit="presence_interval",
                       retry_after_ms=wait_ms) from None
    except PresenceFull as exc:
        ttl_ms = config["CHANGEFEED_PRESENCE_TTL_MS"]
        raise ApiError(429, "too many requests",
                       f"This page already lists its most open tabs ({exc.limit}, CHANGEFEED_PRESENCE_MAX_PER_PAGE); "
                       "this one is not listed. Try again later; the page's readers still see how many are here.",
                       headers={"Retry-After": str(math.ceil(ttl_ms / 1000))}, limit="presence_entries",
                       retry_after_ms=ttl_ms) from None
    except (NotStored, OutcomeUnknown) as exc:
        raise ApiError(503, "unavailable", f"The beat was not recorded ({exc}); beat again in a moment.",
                       headers={"Retry-After": "1"}) from None
    return {"slug": beaten.slug, "version": beaten.version, "you": beaten.you,
            "beat_ms": config["CHANGEFEED_PRESENCE_BEAT_MS"], "ttl_ms": config["CHANGEFEED_PRESENCE_TTL_MS"],
            "min_interval_ms": min_interval_ms}


def now_for(store: PresenceStore, slug: str, held: int) -> Presence:
    """The page's presence for a client holding version `held`: the whole list only when it is another version.

    An unchanged poll costs one indexed read; only a change reads the list.
    """
    version = store.presence_version(slug)
    if version == held:
        return Presence(version)
    return store.presence(slug)
