"""What a forked child must not share with its parent: the stores' and notifiers' per-process resources.

gunicorn --preload builds the app in the master and forks the workers
from it: a connection pool, a write queue or a watcher thread made there
is the master's, and a child that used (or closed) its connections would
corrupt the parent's conversation with the database. Every object that
holds such resources registers here and is told, in each child, to forget
them; it then opens its own on first use. Both engines and both notifiers
use this, so it is a module of its own rather than a part of either engine.

`MASTER_CHECKED` is the one piece of state gunicorn's master hands its
workers: once set, a worker (re)started while the database is missing or
unreachable waits for it (answering 503) instead of failing to boot.
"""

import os
import weakref
from typing import Protocol

# Set by gunicorn.conf.py once its master found the database usable: a worker
# (re)started while the file is missing then waits for it instead of failing.
MASTER_CHECKED = "CHANGEFEED_DB_CHECKED_BY_MASTER"


class ForgetsParent(Protocol):
    """An object holding resources of the process that made it."""

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's resources (without closing them); open new ones on first use."""


_per_process: "weakref.WeakSet[ForgetsParent]" = weakref.WeakSet()  # objects holding resources of their process


def after_fork_in_child(obj: ForgetsParent) -> None:
    """Have `obj._forget_parent()` called in every child forked from now on (gunicorn --preload)."""
    _per_process.add(obj)


def master_checked() -> bool:
    """Whether gunicorn's master found the database usable: then a worker waits for a missing one."""
    return os.environ.get(MASTER_CHECKED) == "1"


def _forget_parents() -> None:
    for obj in list(_per_process):
        obj._forget_parent()


os.register_at_fork(after_in_child=_forget_parents)
