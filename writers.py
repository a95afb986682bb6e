"""How saves reach the store: one at a time, or committed together in groups.

A durable SQLite commit waits for an fsync, and only one writer commits at
a time, so saves/s is bounded by commits/s. Under gevent, one native thread
per process commits every save that is waiting in one transaction: one fsync
acknowledges them all (group commit, as PostgreSQL and most databases do),
and no greenlet ever blocks the worker on SQLite. A save is still answered
only after the commit that holds it is on disk, and each keeps its own
outcome: a stale base_version fails that save alone.
"""


class DirectWriter:
    """Each save is its own transaction, in the caller's thread (flask run, tests)."""

    def __init__(self, save_batch):
        self._save_batch = save_batch

    def save(self, item):
        return _outcome(self._save_batch([item])[0])


class GroupCommit:
    """Saves from many greenlets, committed together by one native thread per process."""

    MAX_BATCH = 200  # bounds one transaction's size and the wait of the saves in it

    def __init__(self, save_batch):
        import gevent
        from gevent.event import AsyncResult
        from gevent.threadpool import ThreadPool

        self._spawn, self._result = gevent.spawn, AsyncResult  # imported once, not per save
        self._save_batch = save_batch
        self._thread = ThreadPool(1)
        self._waiting = []  # [(item, AsyncResult)] not yet taken by a commit
        self._committing = False

    def save(self, item):
        result = self._result()
        self._waiting.append((item, result))
        if not self._committing:
            self._committing = True
            self._spawn(self._commit_while_waiting)
        return result.get()  # raises the save's own exception, e.g. Conflict

    def _commit_while_waiting(self):
        """Commit what is waiting, then what came meanwhile, until nothing waits."""
        try:
            while self._waiting:
                batch = self._waiting[:self.MAX_BATCH]
                del self._waiting[:self.MAX_BATCH]
                try:
                    outcomes = self._thread.apply(self._save_batch, ([item for item, _ in batch],))
                except BaseException as exc:  # the whole transaction failed: every save in it did
                    outcomes = [exc] * len(batch)
                for (_, result), outcome in zip(batch, outcomes):
                    if isinstance(outcome, BaseException):
                        result.set_exception(outcome)
                    else:
                        result.set(outcome)
        finally:
            self._committing = False


def for_this_process():
    """GroupCommit when gevent runs this process (gunicorn), else DirectWriter."""
    try:
        from gevent import monkey
    except ImportError:
        return DirectWriter
    return GroupCommit if monkey.is_module_patched("threading") else DirectWriter


def _outcome(outcome):
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
