"""What the service does, counted for Prometheus: `GET /metrics`, summed over every worker.

gunicorn serves with several processes, and a scrape reaches one of them,
so each process's own counts would be a random sample. prometheus-client's
multi-process mode has every process write its values to files of its own
in PROMETHEUS_MULTIPROC_DIR (memory-mapped: an increment is a write to
memory, about 1 µs with its lock and its getpid() check for a fork), and a
scrape adds them up. gunicorn.conf.py makes that folder for each server, and
drops the gauges of a worker that exited (`child_exit`), so a dead worker's
open streams stop counting while its counters stay in the totals. Without
the variable (`flask run`, the tests' Flask client) the values live in this
process, as usual.

The metrics are module globals with their label values bound here, once:
`/changes` is the hot path (about 130 µs a request), so it pays one
increment of a ready child per poll (under 1%), never a `.labels()` lookup.
The rest of the code calls the objects and small functions below; only
`register` knows about Flask.
"""

import os
import time
from collections.abc import Callable
from datetime import datetime
from typing import TypeVarTuple, Unpack

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

from changefeed.core.outcomes import Busy, Conflict, KeyReused, NotStored, OutcomeUnknown, Saved, StorageFull

Args = TypeVarTuple("Args")

# prometheus-client picks the mode the same way, when it is imported: a
# scrape must read the files exactly when the values are written to them.
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ

ACCESS = ("on", "off", "public")  # CHANGEFEED_METRICS

SAVES = Counter("changefeed_saves", "Saves that reached the store (POST /save), by what became of them: "
                "ok, replayed (an Idempotency-Key retry), conflict (stale base_version), key_reused, "
                "busy, not_stored (503 not saved), refused (a storage limit, 507), unknown (outcome unknown), "
                "error (a bug, 500).", ["outcome"])
SAVES_OK, SAVES_REPLAYED = SAVES.labels(outcome="ok"), SAVES.labels(outcome="replayed")
# Each refusal of the store, by class; the first match along the class's MRO wins (Busy before NotStored).
_SAVE_FAILURES: dict[type[Exception], Counter] = {Conflict: SAVES.labels(outcome="conflict"), KeyReused: SAVES.labels(outcome="key_reused"),
                  Busy: SAVES.labels(outcome="busy"), NotStored: SAVES.labels(outcome="not_stored"),
                  StorageFull: SAVES.labels(outcome="refused"), OutcomeUnknown: SAVES.labels(outcome="unknown")}
SAVES_ERROR = SAVES.labels(outcome="error")

# A save is an fsync, a few ms; it may wait its whole busy timeout (10 s) plus a commit's grace (2 s).
SAVE_SECONDS = Histogram("changefeed_save_seconds", "Time POST /save spent in the store, whatever the outcome.",
                         buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 15))

COMMIT_BATCH = Histogram("changefeed_commit_batch_saves", "Saves committed together in one transaction "
                         "(group commit under gunicorn; always 1 without gevent).",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 200))

POLLS = Counter("changefeed_polls", "Answers of GET /changes: status 200 or 304 (If-None-Match); wait 1 for a "
                "long-poll (wait > 0), 0 for a plain poll. Errors are not counted here.", ["status", "wait"])
# Indexed by `wait > 0`: POLLS_304[False] is a plain poll answered 304.
POLLS_200 = (POLLS.labels(status="200", wait="0"), POLLS.labels(status="200", wait="1"))
POLLS_304 = (POLLS.labels(status="304", wait="0"), POLLS.labels(status="304", wait="1"))

# livesum: the sum over the processes alive now; a worker that died takes its share away.
OPEN_WAITS = Gauge("changefeed_open_waits", "Event streams and WebSockets open, and long-polls waiting for a "
                   "save, now.", ["transport"], multiprocess_mode="livesum")
OPEN_STREAMS, OPEN_LONG_POLLS = OPEN_WAITS.labels(transport="sse"), OPEN_WAITS.labels(transport="long-poll")
OPEN_SOCKETS = OPEN_WAITS.labels(transport="ws")
SUBSCRIBERS = Gauge("changefeed_subscribers", "Subscriptions held by streams and long-polls now.",
                    multiprocess_mode="livesum")
WATCHED_SLUGS = Gauge("changefeed_watched_slugs", "Slugs with at least one subscription, summed over the "
                      "processes (a slug watched in two processes counts twice).", multiprocess_mode="livesum")
DELIVERIES = Counter("changefeed_deliveries", "New versions handed to a waiting subscription (one per "
                     "subscription a save reached).")
WATCHER_LAG = Histogram("changefeed_watcher_lag_seconds", "From a save's updated_at to its delivery by a "
                        "process's watcher (one per delivered save and process; updated_at has ms precision).",
                        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))

PAGE_READS = Counter("changefeed_page_reads", "States of a page read for /changes, long-polls, streams and "
                     "wake-ups on PostgreSQL, by where the answer came from: memory (the process's poll memory, "
                     "CHANGEFEED_POLL_MEMORY_BYTES) or database (a round trip).", ["source"])
PAGE_READS_MEMORY, PAGE_READS_DATABASE = PAGE_READS.labels(source="memory"), PAGE_READS.labels(source="database")

LIMITS = ("waits_per_client", "waits_per_worker", "pages", "stored_bytes", "header_timeout", "body_timeout",
          "send_timeout")
REFUSALS = Counter("changefeed_refusals", "Requests and connections refused or cut off by a limit.", ["limit"])
_REFUSALS = {limit: REFUSALS.labels(limit=limit) for limit in LIMITS}  # shown as 0 before the first


def timed_save(save: Callable[[Unpack[Args]], Saved], *args: Unpack[Args]) -> Saved:
    """Call `save(*args)` (the store's save), timing it and counting what became of it."""
    started = time.perf_counter()
    try:
        saved = save(*args)
    except Exception as exc:
        SAVE_SECONDS.observe(time.perf_counter() - started)
        next((_SAVE_FAILURES[cls] for cls in type(exc).__mro__ if cls in _SAVE_FAILURES), SAVES_ERROR).inc()
        raise
    SAVE_SECONDS.observe(time.perf_counter() - started)
    (SAVES_REPLAYED if saved.replayed else SAVES_OK).inc()
    return saved


def watcher_delivered(updated_at: str | None) -> None:
    """Count how long a save took to reach this process's watcher; `updated_at` as the store writes it."""
    if updated_at:  # None when the page is gone (a database restored without it)
        saved_at = datetime.fromisoformat(updated_at).timestamp()  # 2026-11-23T21:24:37.444Z, about 1 µs
        WATCHER_LAG.observe(max(0.0, time.time() - saved_at))


def refused(limit: str) -> None:
    """Count one request (or connection) refused by `limit`, one of LIMITS."""
    child = _REFUSALS.get(limit)
    if child is None:  # a limit added without adding it to LIMITS: still counted
        child = _REFUSALS[limit] = REFUSALS.labels(limit=limit)
    child.inc()


def registry() -> CollectorRegistry:
    """What a scrape reads: every process's files in multi-process mode, else this process's registry."""
    if not MULTIPROCESS:
        return REGISTRY
    registry = CollectorRegistry()  # per scrape, as prometheus-client says: the files change meanwhile
    MultiProcessCollector(registry)
    return registry
