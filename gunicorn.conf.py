"""gunicorn settings for changefeed: `gunicorn -c gunicorn.conf.py 'app:create_app()'`.

Each setting can be overridden from the environment (GUNICORN_CMD_ARGS, or
the variables read below) without editing this file.
"""

import gc
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile

# Loopback by default; put nginx in front (see docs/production.md) or set CHANGEFEED_BIND.
bind = os.environ.get("CHANGEFEED_BIND", "127.0.0.1:8000")

# One process per core: gevent serves thousands of connections in each, so
# more processes would only add context switches. Every process serves every
# slug; SQLite keeps their saves in order and each process's watcher wakes its
# own subscribers.
workers = int(os.environ.get("CHANGEFEED_WORKERS", multiprocessing.cpu_count()))

# gevent holds each long-poll as a cheap greenlet instead of a blocked
# process or thread, and an event stream that waits without one (ops/parking.py);
# its own WSGI server (gevent_pywsgi) also parses HTTP faster than gunicorn's
# plain "gevent" worker (see bench/README.md). worker_connections bounds the
# requests served at once (greenlets), not the streams that wait; the
# open-files limit (ulimit -n) bounds those (docs/production.md).
# worker.Worker is gevent_pywsgi with time limits on slow and idle clients
# (CHANGEFEED_HEADER_TIMEOUT_S, _BODY_TIMEOUT_S, _KEEPALIVE_S, _SEND_TIMEOUT_S):
# gunicorn's own `keepalive` and `timeout` do not reach gevent's server.
worker_class = "changefeed.ops.worker.Worker"
worker_connections = int(os.environ.get("CHANGEFEED_WORKER_CONNECTIONS", 20_000))

# With gevent this is the worker's heartbeat to the master, not a request
# limit: long-polls (up to 60 s) and streams are not cut by it.
timeout = 30

# On SIGTERM, open streams and long-polls end at once (see post_worker_init);
# other requests get this long to finish.
graceful_timeout = 10

# No gunicorn access log: the app writes its own when CHANGEFEED_ACCESS_LOG is
# `json` or `kv` (ops/logs.py: one structured line per request, with the request
# id, written when a stream or long-poll ends, token parameters redacted).
# It is off by default: nginx in front logs requests, and a line per poll
# costs throughput. Request bodies (page contents) are never logged.
accesslog = None

# No runtime control socket: nothing here uses it, and several servers on one
# machine (tests, benchmarks) would contend for its single default path.
control_socket_disable = True

# GET /metrics adds up every worker's counts (ops/metrics.py): each process writes
# its own to files in PROMETHEUS_MULTIPROC_DIR. Unless that names a folder,
# each server gets a private one, made here as the master loads this file:
# before anything imports prometheus-client (it picks its mode on import) and
# before the workers fork, so they inherit it. A reload (SIGHUP) runs this
# file again in the same master, which keeps its folder; on_exit removes it.
METRICS_DIR_OWNER = "CHANGEFEED_METRICS_DIR_OWNER"  # the pid of the master that made the folder
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(METRICS_DIR_OWNER) not in (None, str(os.getpid())):
    # None named, or the folder of the server that started this one (its own, which it removes): a new one.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="changefeed-metrics-")
    os.environ[METRICS_DIR_OWNER] = str(os.getpid())


def on_starting(server):
    """Refuse to start on a missing or out-of-date database, once, in the master.

    Each worker then boots even while the file is missing (a worker restarted
    while the file is moved or being restored), and answers 503 until it is
    back, instead of failing to boot, which would stop the whole server. The
    app is not preloaded: gevent must patch a worker before the app is built.
    """
    from changefeed.core.settings import from_environ
    from changefeed.stores.forking import MASTER_CHECKED
    from changefeed.stores.sqlite import check_database

    settings = from_environ()
    if settings["CHANGEFEED_DATABASE_URL"]:
        # In a child process: psycopg imported here, before gevent patched the
        # workers forked from this master, would block them on every query.
        checked = subprocess.run([sys.executable, "migrate.py", "--check"], cwd=os.path.dirname(__file__) or ".",
                                 capture_output=True, text=True)
        if checked.returncode:
            raise SystemExit(checked.stderr.strip() or "error: the database check failed")
    else:
        try:
            check_database(settings["CHANGEFEED_DB"])
        except RuntimeError as exc:  # SchemaOutOfDate, SchemaTooNew: their message says what to do
            raise SystemExit(f"error: {exc}") from None
    os.environ[MASTER_CHECKED] = "1"  # inherited by the workers

    # Each open stream is a descriptor: allow as many as the system lets this
    # user (`ulimit -Hn`, LimitNOFILE= in systemd). Each worker fits its cap
    # of open waits under what it gets (limits.descriptor_budget).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def post_worker_init(worker):
    """Tune the garbage collector; on SIGTERM, end every stream and long-poll so clients reconnect elsewhere."""
    # Thousands of open streams are thousands of live objects: a full
    # collection walking them all stalls every stream of the worker. Freeze
    # what start-up made and collect less often (bench/README.md: SSE p99
    # 55-61 ms -> 46-50 ms with 1,000 subscribers). The middle generation is
    # collected every 4 young collections, not 20: a burst of new streams
    # leaves their objects there, and the one collection of up to 400,000 of
    # them fell on the next save's fan-out (12,500 streams on one worker:
    # p99 of that save 380 -> 290 ms; docs/performance.md).
    gc.freeze()
    gc.set_threshold(20_000, 4, 20)
    if "changefeed.stores.postgres" in sys.modules:  # a preloaded app imported psycopg before gevent came in
        sys.modules["changefeed.stores.postgres"].cooperate()

    open_feed = getattr(worker.wsgi, "extensions", {}).get("changefeed.open")
    if open_feed is None:  # another app served with this file, such as the bench's baseline
        return
    notifier = open_feed().notifier  # a host app's feed opens on first use: now, so SIGTERM reaches it
    previous = signal.getsignal(signal.SIGTERM)

    def close_then_exit(signum, frame):
        notifier.close()
        previous(signum, frame)

    signal.signal(signal.SIGTERM, close_then_exit)


def child_exit(server, worker):
    """In the master, once a worker exited: its open streams leave the gauges; its counts stay in the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics folder this master made (never one PROMETHEUS_MULTIPROC_DIR named)."""
    if os.environ.get(METRICS_DIR_OWNER) == str(os.getpid()):
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
