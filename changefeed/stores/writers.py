"""How saves reach the store: one at a time, or committed together in groups.

A durable SQLite commit waits for an fsync, and only one writer commits at
a time, so saves/s is bounded by commits/s. Under gevent, one native thread
per process commits every save that is waiting in one transaction: one fsync
acknowledges them all (group commit, as PostgreSQL and most databases do),
and no greenlet ever blocks the worker on SQLite.

What a caller is told is what happened to its own save, never a guess:
`Saved` only once the commit holding it is on disk, `Conflict` or
`NotStored` (with `Busy`) only when it was certainly not written, and
`OutcomeUnknown` when that cannot be known (a commit that failed in a way
that may still land, or a caller that stopped waiting while its commit ran).
Every save has a deadline (the busy timeout): it ends by then, or soon after
when its commit had already begun.
"""

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

from changefeed.core.outcomes import Busy, OutcomeUnknown
from changefeed.ops import metrics

# A commit that has begun normally ends in milliseconds; a caller waits this
# much past its deadline for it before answering that the outcome is unknown.
COMMIT_GRACE_S = 2.0

# A store's batch: apply these items in one transaction before the deadline, and
# return each one's outcome (a result, or the exception saying what became of it).
SaveBatch = Callable[[Sequence[Any], float], Sequence[Any]]


class Writer(Protocol):
    """How one save reaches its store's batch: it returns the save's outcome, or raises it."""

    def save(self, item: Any, deadline: float) -> Any: ...


WriterFactory = Callable[[SaveBatch], Writer]


class DirectWriter:
    """Each save is its own transaction, in the caller's thread (flask run, tests)."""

    def __init__(self, save_batch: SaveBatch) -> None:
        self._save_batch = save_batch

    def save(self, item: Any, deadline: float) -> Any:
        metrics.COMMIT_BATCH.observe(1)
        return _outcome(self._save_batch([item], deadline)[0])


class _Waiting:
    """One save waiting for its commit, with the result its caller waits on."""

    __slots__ = ("item", "deadline", "result", "taken")

    def __init__(self, item: Any, deadline: float, result: Any) -> None:
        self.item, self.deadline, self.result, self.taken = item, deadline, result, False


class GroupCommit:
    """Saves from many greenlets, committed together by one native thread per process."""

    MAX_BATCH = 200      # bounds one transaction's size and the wait of the saves in it
    MAX_WAITING = 2_000  # past this many waiting saves, a new one is refused at once (503 busy)

    def __init__(self, save_batch: SaveBatch, native_thread: bool = True) -> None:
        import gevent
        from gevent.event import AsyncResult
        from gevent.threadpool import ThreadPool

        # Imported once, not per save.
        self._spawn, self._result, self._Timeout = gevent.spawn, AsyncResult, gevent.Timeout
        self._wait = gevent.wait
        self._save_batch = save_batch
        # SQLite blocks the thread that commits: a native one, so greenlets go on. A
        # driver that waits cooperatively (psycopg under gevent) commits in a greenlet.
        self._run = ThreadPool(1).spawn if native_thread else gevent.spawn
        self._waiting: list[_Waiting] = []  # [_Waiting] not yet taken by a commit
        self._committer: Any = None  # the greenlet feeding the commit thread, while there is work

    def save(self, item: Any, deadline: float) -> Any:
        if len(self._waiting) >= self.MAX_WAITING:
            raise Busy(f"{len(self._waiting)} saves are already waiting in this process")
        waiting = _Waiting(item, deadline, self._result())
        self._waiting.append(waiting)
        if self._committer is None:
            self._committer = self._spawn(self._commit_while_waiting)
        try:
            waiting.result.wait(max(0.0, deadline - time.monotonic()) + COMMIT_GRACE_S)
        except BaseException as exc:  # cut off from outside: a gevent.Timeout, a kill
            if self._withdraw(waiting) or not isinstance(exc, (self._Timeout, Exception)):
                raise  # never written (withdrawn), or this greenlet is being killed: let it go
            if not waiting.result.ready():
                raise OutcomeUnknown("the request was cut off while its commit was under way") from None
        if waiting.result.ready():
            return waiting.result.get()  # raises the save's own exception, e.g. Conflict
        if self._withdraw(waiting):
            raise Busy("it waited its whole busy timeout for its turn")
        raise OutcomeUnknown("its commit did not end within the busy timeout")

    def _withdraw(self, waiting: _Waiting) -> bool:
        """Take a save out of the queue if no commit has taken it yet; say whether it was."""
        if waiting.taken:
            return False
        self._waiting.remove(waiting)
        return True

    def _take_batch(self) -> list[_Waiting]:
        """Take up to MAX_BATCH waiting saves; those past their deadline are refused, not written."""
        batch = self._waiting[:self.MAX_BATCH]
        del self._waiting[:self.MAX_BATCH]
        now, live = time.monotonic(), list[_Waiting]()
        for waiting in batch:
            waiting.taken = True
            if waiting.deadline <= now:
                waiting.result.set_exception(Busy("it waited its whole busy timeout for its turn"))
            else:
                live.append(waiting)
        return live

    def _commit_while_waiting(self) -> None:
        """Commit what is waiting, then what came meanwhile, until nothing waits.

        Outcomes are handed out by a callback of the commit itself, not by
        this greenlet: were it killed mid-commit, the transaction still ends
        in its thread and every caller still learns what became of its save.
        """
        try:
            while self._waiting:
                batch = self._take_batch()
                if not batch:
                    continue
                metrics.COMMIT_BATCH.observe(len(batch))
                deadline = min(waiting.deadline for waiting in batch)
                commit = self._run(self._save_batch, [waiting.item for waiting in batch], deadline)
                commit.rawlink(partial(_hand_out, batch))
                self._wait([commit])  # one transaction at a time
        finally:
            self._committer = None


def _hand_out(batch: list[_Waiting], commit: Any) -> None:
    """Give each caller of a finished commit its own outcome (its own exception object, too)."""
    if commit.successful():
        outcomes = commit.value
    else:  # save_batch classifies every database error itself; anything else is a bug
        exc = commit.exception
        outcomes = [OutcomeUnknown(f"unexpected {type(exc).__name__}: {exc}") for _ in batch]
    for waiting, outcome in zip(batch, outcomes):
        if isinstance(outcome, BaseException):
            waiting.result.set_exception(outcome)
        else:
            waiting.result.set(outcome)


def for_this_process(native_thread: bool = True) -> WriterFactory:
    """GroupCommit when gevent runs this process (gunicorn), else DirectWriter.

    `native_thread`: whether commits block their thread (SQLite) and so need one of their own.
    """
    try:
        from gevent import monkey
    except ImportError:
        return DirectWriter
    if not monkey.is_module_patched("threading"):
        return DirectWriter
    return partial(GroupCommit, native_thread=native_thread)


def _outcome(outcome: Any) -> Any:
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
