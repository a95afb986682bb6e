"""What one client, and one server process, may hold: open waits, and memory for queries.

A long-poll or an event stream holds a socket, a descriptor and a greenlet
for as long as it lasts, so they are counted: per process (past the cap a
503, try another process) and per client address (past the cap a 429, you
have enough open already; core/clients.py says who the client is behind a proxy).

Each server process counts its own: a client spread over W processes may
hold W times its cap. For one cap across all of them, put nginx's
`limit_conn` in front (docs/limits.md).
"""

import resource
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar
from wsgiref.types import WSGIEnvironment

from werkzeug.datastructures import MultiDict
from werkzeug.wrappers import Request

from changefeed.core.clients import Network, client_address
from changefeed.core.errors import ApiError

Value = TypeVar("Value")
Item = TypeVar("Item")  # what a held body yields: bytes, and for a stream its Parked waits

RESERVED_FDS = 256  # descriptors kept for the database, the watcher, logs and requests that do not wait


def descriptor_budget(cap: int) -> int:
    """Lower `cap` to fit this process's open-files limit, keeping RESERVED_FDS for everything else."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return cap
    return max(1, min(cap, soft - RESERVED_FDS))


class TooManyWaits(ApiError):
    """A 429 or 503 with Retry-After: the client (or this process) holds its most waits."""

    def __init__(self, status: int, limit: str, message: str) -> None:
        super().__init__(status, "too many requests" if status == 429 else "server full", message,
                         headers={"Retry-After": "5"}, limit=limit)
        self.limit = limit


class WaitGate:
    """Counts the open long-polls and event streams of one process, by client address."""

    def __init__(self, per_worker: int, per_client: int, proxies: Sequence[Network],
                 on_refusal: Callable[[str], object] | None = None) -> None:
        self.per_worker = descriptor_budget(per_worker)
        self.per_client = per_client
        self.proxies = proxies
        self.open = 0
        self._by_client: dict[str, int] = {}
        self._on_refusal = on_refusal or (lambda limit: None)

    def enter(self, environ: WSGIEnvironment) -> Callable[[], None]:
        """Count one more wait for this request's client; return its release(), or raise TooManyWaits."""
        client = client_address(environ, self.proxies)
        held = self._by_client.get(client, 0)
        if held >= self.per_client:
            self._on_refusal("waits_per_client")
            raise TooManyWaits(429, "waits_per_client",
                               f"This client already holds {held} open streams and long-polls here "
                               f"(CHANGEFEED_MAX_WAITS_PER_CLIENT): close some, or share one per "
                               f"browser, and retry after Retry-After.")
        if self.open >= self.per_worker:
            self._on_refusal("waits_per_worker")
            raise TooManyWaits(503, "waits_per_worker",
                               f"This server process holds its most open streams and long-polls "
                               f"({self.per_worker}); retry after Retry-After (a new connection may reach "
                               f"another process).")
        self._by_client[client] = held + 1
        self.open += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.open -= 1
            left = self._by_client[client] - 1
            if left:
                self._by_client[client] = left
            else:
                del self._by_client[client]

        return release

    @contextmanager
    def holding(self, environ: WSGIEnvironment) -> Iterator[None]:
        release = self.enter(environ)
        try:
            yield
        finally:
            release()


class Held(Generic[Item]):
    """A response body that gives its wait's place back when the server closes it, however it ends.

    The server calls close() on every body it was given (WSGI), also one it
    never iterated, which a generator's own `finally` would miss.
    """

    def __init__(self, stream: Generator[Item, None, None], release: Callable[[], None]) -> None:
        self._stream, self._release = stream, release

    def __iter__(self) -> Iterator[Item]:
        return self._stream

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._release()


# A cached query's key: its query string as sent, or (name, value) of the parameters that count.
QueryKey = bytes | tuple[tuple[str, str], ...]


class QueryCache(Generic[Value]):
    """Validated queries, by query string, in a memory budget: the oldest used goes first.

    Pollers repeat the same URL until a save moves their `since`, and
    validating is a pure function of the query, so its answer is kept (a
    refusal raises and is not kept). The budget is in bytes, as a query
    string can be kilobytes long. A query with parameters the schema ignores,
    or a parameter twice, is kept under its parameters that count, so junk
    added to a URL cannot multiply the entries.
    """

    ENTRY_BYTES = 600  # what one entry costs beyond its key: the dict, its values, the links (measured)

    def __init__(self, load: Callable[[MultiDict[str, str]], Value], known: Iterable[str], budget_bytes: int) -> None:
        self._load, self._known, self.budget = load, frozenset(known), budget_bytes
        self._entries: OrderedDict[QueryKey, Value] = OrderedDict()
        self.size = 0

    def get(self, request: Request) -> Value:
        """The validated query of `request`, from the cache or else loaded (raising on a bad one) and kept."""
        key: QueryKey = request.query_string
        value = self._entries.get(key)
        if value is not None:
            try:
                self._entries.move_to_end(key)
            except KeyError:  # evicted meanwhile by another thread (flask run)
                pass
            return value
        args = request.args
        if not self._known.issuperset(args.keys()) or len(args) != sum(1 for _ in args.items(multi=True)):
            key = tuple((name, args[name]) for name in sorted(self._known.intersection(args.keys())))
            value = self._entries.get(key)
            if value is not None:
                return value
        value = self._load(args)  # raises on a bad query: nothing kept
        self._put(key, value)
        return value

    def _put(self, key: QueryKey, value: Value) -> None:
        cost = len(repr(key)) + self.ENTRY_BYTES
        if cost > self.budget or key in self._entries:
            return
        self._entries[key] = value
        self.size += cost
        while self.size > self.budget:
            try:
                old_key, _ = self._entries.popitem(last=False)
            except KeyError:
                break
            self.size -= len(repr(old_key)) + self.ENTRY_BYTES
