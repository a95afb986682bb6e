"""changefeed benchmarks: `make bench` (full, for people) or `make bench QUICK=1` (seconds, for CI).

Starts the service exactly as production does (gunicorn -c gunicorn.conf.py
'app:create_app()', default config) on loopback against a temporary
database, drives it with wrk and an asyncio client, stops everything it
started, prints one table, and writes a JSON file of every run and a PNG
chart of propagation delays to bench/results/.

Every figure is the median over the runs; ratios are taken within one run,
so a noisy shared machine moves both sides together.
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import crowd  # noqa: E402
import servers  # noqa: E402
import subscribers as subs  # noqa: E402
import wrk  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POLL_PATH = "/changes?slug=bench&since=1"

FULL = dict(runs=3, wrk_s=10, subscribers=1000, saves_per_s=10, propagate_s=30, idle_s=5,
            capacity=50_000, ws_capacity=20_000, capacity_per_worker=12_500,
            many_slugs=10_000, many_saves_per_s=100, many_s=10)
QUICK = dict(runs=1, wrk_s=1, subscribers=20, saves_per_s=10, propagate_s=1, idle_s=0.5,
             capacity=100, ws_capacity=50, capacity_per_worker=12_500, many_slugs=100, many_saves_per_s=20, many_s=1)

TARGETS = {
    "unchanged_rps": ("unchanged poll, requests/s", ">=", 8000),
    "unchanged_vs_baseline": ("unchanged poll / do-nothing Flask", ">=", 0.80),
    "unchanged_304_vs_200": ("304 / unchanged 200, requests/s", ">=", 1.0),
    "saves_one_slug_rps": ("saves/s, 64 clients, one slug", ">=", 5000),
    "sse_p99_ms": ("SSE propagation p99, ms", "<", 50),
    "sse_prefix_p99_ms": ("SSE on a prefix's feed: propagation p99, ms", "<", 50),
    "ws_p99_ms": ("WebSocket propagation p99, ms", "<", 50),
    "longpoll_p99_ms": ("long-poll propagation p99, ms", "<", 50),
    "longpoll100_p99_ms": ("long-poll propagation p99 at 100 subscribers, ms", "<", 50),
    "longpoll_nginx_p99_ms": ("long-poll through nginx's micro-cache, 1,000 subscribers: propagation p99, ms", "<", 50),
    "longpoll_nginx_service_polls_per_save": ("long-poll through nginx: requests reaching the service per save "
                                              "(about one per worker, not one per subscriber)", "<=", 2),
    "longpoll_varnish_p99_ms": ("long-poll through Varnish (deploy/varnish.vcl), 1,000 subscribers: propagation "
                                "p99, ms", "<", 50),
    "longpoll_varnish_service_polls_per_save": ("long-poll through Varnish: requests reaching the service per save",
                                                "<=", 2),
    "hosts_sse_p99_ms": ("SSE across two instances over PostgreSQL: propagation p99, ms", "<", 100),
    "hosts_longpoll_p99_ms": ("long-poll across two instances over PostgreSQL, 100 subscribers: p99, ms", "<", 100),
    "capacity_p99_ms": ("50,000 streams: one save reaches all, p99 ms", "<", 1500),
    "capacity_kib_per_stream": ("server memory per open stream, KiB", "<=", 16),
    "ws_capacity_kib_per_socket": ("server memory per open WebSocket at 20,000, KiB", "<=", 24),
    "many_slugs_cost_ratio": ("CPU per save, 10,000 vs 100 subscribed slugs", "<=", 1.5),
    "stores_sqlite_polls_rps": ("SQLite unchanged polls/s", ">=", 8000),
    "stores_sqlite_polls_vs_stock_gevent": ("SQLite unchanged polls / do-nothing Flask under stock gevent",
                                            ">=", 0.9),
    "stores_sqlite_saves_one_rps": ("SQLite durable saves/s, 64 clients, one page", ">=", 5000),
    "stores_pg_polls_vs_sqlite": ("PostgreSQL unchanged polls / SQLite's", ">=", 0.9),
    "stores_pg_saves_many_vs_one": ("PostgreSQL saves/s over 1,000 pages / on one page", ">=", 3),
}

# The peers' published figures beside the one of ours each matches (docs/performance.md#peers: where each
# comes from). Theirs are other machines, other loads: the order of magnitude is the comparison.
PEERS = [
    ("capacity_kib_per_stream", "server KiB per open SSE stream",
     "Centrifugo about 30 KB per WebSocket; Phoenix about 64 KB per socket"),
    ("ws_capacity_kib_per_socket", "server KiB per open WebSocket",
     "Centrifugo about 30 KB; Phoenix about 64 KB"),
    ("capacity_streams", "open streams on this 2-core host", "Mercure about 40,000 on one t3.micro (2 vCPU)"),
    ("capacity_p99_ms", "one save to every stream, p99 ms",
     "Centrifugo 200 ms at 1 M sockets on 20 pods"),
    ("longpoll_varnish_p99_ms", "long-poll through a collapsing cache, p99 ms",
     "Electric about 400 ms, 1 M clients through a CDN"),
]


def percentile(values, p):
    return float(numpy.percentile(values, p)) if len(values) else float("nan")


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read(), dict(response.headers)


# --- scenario 1 --------------------------------------------------------------------------------

def unchanged_poll(cfg, tmp, log):
    """Unchanged polls at 64 connections: ours, ours with If-None-Match, the baseline, nginx-static."""
    db = servers.migrated_db(tmp)
    runs = []
    with servers.gunicorn("app:create_app()", db, log) as service, \
            servers.gunicorn("baseline:create_app()", db, log, pythonpath="bench") as baseline:
        http("POST", service.url + "/save", {"slug": "bench", "html": "<p>bench</p>"})
        body, headers = http("GET", service.url + POLL_PATH)
        assert body == http("GET", baseline.url + POLL_PATH)[0], "the baseline must answer the same bytes"
        nginx = servers.nginx_static(body)
        if nginx is None:
            print("  nginx is not installed (apt-get install nginx): no static-file ceiling this time")
        with nginx if nginx else _nothing():
            for _ in range(cfg["runs"]):
                run = {
                    "ours": wrk.run(service.url + POLL_PATH, cfg["wrk_s"]),
                    "ours_304": wrk.run(service.url + POLL_PATH, cfg["wrk_s"],
                                        headers=[f"If-None-Match: {headers['ETag']}"]),
                    "baseline": wrk.run(baseline.url + POLL_PATH, cfg["wrk_s"]),
                }
                if nginx:
                    run["nginx_static"] = wrk.run(nginx.url + "/changes", cfg["wrk_s"])
                runs.append(run)
    rps = lambda run, key: run[key]["requests_per_s"]  # noqa: E731
    summary = {
        "unchanged_rps": median(rps(r, "ours") for r in runs),
        "unchanged_p50_ms": median(r["ours"]["p50_ms"] for r in runs),
        "unchanged_p99_ms": median(r["ours"]["p99_ms"] for r in runs),
        "unchanged_304_rps": median(rps(r, "ours_304") for r in runs),
        "baseline_rps": median(rps(r, "baseline") for r in runs),
        "unchanged_vs_baseline": median(rps(r, "ours") / rps(r, "baseline") for r in runs),
        "unchanged_304_vs_200": median(rps(r, "ours_304") / rps(r, "ours") for r in runs),
        "unchanged_errors": sum(r["ours"]["non_2xx"] + r["ours"]["socket_errors"] for r in runs),
        "loadgen_cpu_s_per_s": median(r["ours"]["loadgen_cpu_s"] / cfg["wrk_s"] for r in runs),
    }
    if all("nginx_static" in r for r in runs):
        summary["nginx_static_rps"] = median(rps(r, "nginx_static") for r in runs)
        summary["unchanged_vs_nginx_static"] = median(rps(r, "ours") / rps(r, "nginx_static") for r in runs)
    return runs, summary


# --- scenario 2 --------------------------------------------------------------------------------

def saves(cfg, tmp, log):
    """Concurrent saves on one slug and on 1,000; then an exact check that no version was lost."""
    db = servers.migrated_db(tmp)
    runs = []
    with servers.gunicorn("app:create_app()", db, log) as service:
        for n in range(cfg["runs"]):
            run = {}
            for name, slugs in (("one_slug", 1), ("many_slugs", 1000)):
                run[name] = wrk_saves(service.url, cfg["wrk_s"], slugs, f"r{n}-{name.replace('_', '-')}")
            run["exact"] = asyncio.run(_exact_versions(service.url, f"r{n}-exact", 64, 2000 if cfg is FULL else 200))
            runs.append(run)
    return runs, {
        "saves_one_slug_rps": median(r["one_slug"]["requests_per_s"] for r in runs),
        "saves_one_slug_p99_ms": median(r["one_slug"]["p99_ms"] for r in runs),
        "saves_many_slugs_rps": median(r["many_slugs"]["requests_per_s"] for r in runs),
        "saves_many_slugs_p99_ms": median(r["many_slugs"]["p99_ms"] for r in runs),
        "saves_failed": sum(r[k]["non_2xx"] + r[k]["socket_errors"] for r in runs for k in ("one_slug", "many_slugs")),
        "saves_unaccounted": sum(not saves_accounted(r[k]) for r in runs for k in ("one_slug", "many_slugs")),
        "saves_exact": all(r["exact"] for r in runs),
    }


def wrk_saves(url, seconds, slugs, prefix):
    """wrk posting saves over `slugs` slugs named `prefix`-0...; "stored_minus_answered" checks none was lost."""
    result = wrk.run(url, seconds, script="save.lua", env={**os.environ, "SLUGS": str(slugs), "PREFIX": prefix})
    stored = sum(json.loads(http("GET", f"{url}/changes?slug={prefix}-{i}")[0])["version"] for i in range(slugs))
    # wrk stops mid-flight: up to 64 saves may land without their answer being counted.
    result["stored_minus_answered"] = stored - result["requests"]
    return result


def saves_accounted(result):
    """Every answered save is stored, and at most one per connection more (those wrk cut off mid-flight)."""
    return 0 <= result["stored_minus_answered"] <= 64


async def _exact_versions(url, slug, concurrency, total):
    """`total` saves of one slug from `concurrency` clients: the versions must be exactly 1..total."""
    async with subs.session(concurrency) as http_:
        queue = list(range(total))
        versions = []

        async def client():
            while queue:
                versions.append((await subs.save(http_, url, slug, queue.pop()))[0])

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return sorted(versions) == list(range(1, total + 1))


# --- scenario 3 --------------------------------------------------------------------------------

def propagation_variants(cfg):
    """(name, transport, subscribers): SSE, WebSocket, long-poll and poll at 1,000; long-poll at a tenth of that.

    `sse_prefix` is SSE on the feed (`/events?prefix=`, the slug as the prefix): what one
    save to a prefix costs to reach its followers, beside the single page's figure.

    Long-polling answers and re-asks once per subscriber per save: 1,000
    subscribers at 10 saves/s need 10,000 requests/s, more than this stack
    serves on 2 cores; the smaller run shows the mechanism at a load it carries.
    """
    n = cfg["subscribers"]
    variants = [("sse", "sse", n), ("sse_prefix", "sse_prefix", n), ("ws", "ws", n), ("longpoll", "longpoll", n),
                ("poll", "poll", n), ("longpoll100", "longpoll", max(n // 10, 1))]
    return [variant for variant in variants if not cfg.get("variants") or variant[0] in cfg["variants"]]


def propagation(cfg, tmp, log):
    """1,000 subscribers on one slug per transport, 10 saves/s: delay from each save's answer to each subscriber."""
    db = servers.migrated_db(tmp)
    runs, delays = [], {}
    with servers.gunicorn("app:create_app()", db, log) as service:
        for n in range(cfg["runs"]):
            run = {}
            for name, transport, count in propagation_variants(cfg):
                slug = f"prop-{name.replace('_', '-')}-{n}"  # a slug takes no underscore
                result, run_delays = asyncio.run(_propagate(service, transport, slug, count, cfg))
                run[name] = result
                delays.setdefault(f"{transport} ({count:,} subscribers)", []).extend(run_delays)
            runs.append(run)
    summary = {}
    for transport, _, _ in propagation_variants(cfg):
        for key in ("p50_ms", "p99_ms", "max_ms", "missed", "failed", "idle_server_cpu_pct", "idle_rps",
                    "load_server_cpu_pct", "load_rps", "loadgen_cpu_pct"):
            summary[f"{transport}_{key}"] = median(r[transport][key] for r in runs)
        summary[f"{transport}_spread"] = runs[-1][transport]["spread"]
    return runs, summary, delays


async def _propagate(service, transport, slug, count, cfg, front=None, saver=None):
    """Subscribers and saver on `service`, or on `front` (nginx) before it; `*_rps` is what they sent.

    With `saver` (another instance on the same database) the saves go there instead.
    """
    url = (front or service).url
    save_url = saver.url if saver else url
    async with subs.session(count) as http_:
        await subs.save(http_, save_url, slug, 0)  # version 1: subscribers start from it
        counter = {"requests": 0}
        seens, tasks = await subs.subscribe_all(http_, url, transport, [slug] * count, 1, counter)
        spread = service.sockets_per_worker()
        idle = await _measure(service, counter, asyncio.sleep(cfg["idle_s"]))
        polls, front_cpu = polls_answered(service.url), front.cpu_seconds() if front else 0
        load = await _measure(service, counter, subs.save_steadily(http_, save_url, [slug], cfg["saves_per_s"],
                                                                   cfg["propagate_s"]))
        polls, front_cpu = polls_answered(service.url) - polls, (front.cpu_seconds() if front else 0) - front_cpu
        # Time for the last save to reach every subscriber: a poll's interval; nginx's lock looks every 0.5 s.
        await asyncio.sleep(subs.POLL_INTERVAL_S + 0.5 if transport == "poll" else 2.0 if front else 0.5)
        delays, missed = subs.delays_ms({slug: seens}, load["result"])
        await subs.cancel(tasks)
    return {
        "p50_ms": percentile(delays, 50), "p99_ms": percentile(delays, 99), "max_ms": max(delays, default=0),
        "missed": missed, "failed": sum(s.failed is not None for s in seens), "spread": spread,
        "idle_server_cpu_pct": idle["server_cpu_pct"], "idle_rps": idle["rps"],
        "load_server_cpu_pct": load["server_cpu_pct"], "load_rps": load["rps"],
        "loadgen_cpu_pct": load["loadgen_cpu_pct"],
        "service_polls_per_save": polls / len(load["result"]),
        "front_cpu_pct": front_cpu / cfg["propagate_s"] * 100,
    }, delays


def polls_answered(url):
    """How many /changes requests the service (all its workers) has answered: what reached it past nginx."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rpartition(" ")[2]) for line in lines if line.startswith("changefeed_polls_total{"))


def propagation_nginx(cfg, tmp, log):
    """Long-poll through nginx with deploy/nginx.conf: 1,000 subscribers of one slug, 10 saves/s, as `propagation`.

    The micro-cache answers the identical requests of the subscribers with
    one request to the service; the requests it still gets per save is the
    figure to watch, with the delay nginx's cache lock adds (README.md).
    """
    return _propagation_through(cfg, tmp, log, "nginx", lambda service: servers.nginx_deploy([service]),
                                "apt-get install nginx")


def propagation_varnish(cfg, tmp, log):
    """Long-poll through Varnish with deploy/varnish.vcl: 1,000 subscribers of one slug, 10 saves/s.

    Varnish's waiting list hands the one fetched answer to every waiting
    request as it arrives: one request to the service per save, no timer.
    """
    return _propagation_through(cfg, tmp, log, "varnish", servers.varnish_deploy, "apt-get install varnish")


def _propagation_through(cfg, tmp, log, name, make_front, install):
    db = servers.migrated_db(tmp)
    runs, delays = [], {}
    with servers.gunicorn("app:create_app()", db, log) as service:
        front = make_front(service)
        if front is None:
            print(f"  {name} is not installed ({install}): no run through {name} this time")
            return runs, {}, delays
        with front:
            for n in range(cfg["runs"]):
                result, run_delays = asyncio.run(_propagate(service, "longpoll", f"prop-{name}-{n}",
                                                            cfg["subscribers"], cfg, front))
                runs.append(result)
                delays.setdefault(f"long-poll through {name} ({cfg['subscribers']:,} subscribers)",
                                  []).extend(run_delays)
    keys = ("p50_ms", "p99_ms", "max_ms", "missed", "failed", "idle_rps", "load_rps", "load_server_cpu_pct",
            "front_cpu_pct", "loadgen_cpu_pct", "service_polls_per_save")
    return runs, {f"longpoll_{name}_{key}": median(r[key] for r in runs) for key in keys}, delays


def hosts(cfg, tmp, log):
    """Two instances on one PostgreSQL database: saves through one, 10/s; subscribers on the other.

    Each instance is gunicorn as production runs it (a worker per core), so
    the saves reach the other instance's workers only by NOTIFY. SSE with
    1,000 subscribers, long-poll with 100 (1,000 need more requests/s than
    this machine serves, as in `propagation`).
    """
    runs, delays = [], {}
    with servers.postgres_db() as url:
        if url is None:
            print("  no PostgreSQL server on 127.0.0.1:5432 (CHANGEFEED_BENCH_DATABASE_URL): no run across hosts")
            return runs, {}, delays
        env = {"CHANGEFEED_DATABASE_URL": url}
        with servers.gunicorn("app:create_app()", "", log, env=env) as one, \
                servers.gunicorn("app:create_app()", "", log, env=env) as other:
            variants = [("sse", cfg["subscribers"]), ("longpoll", max(cfg["subscribers"] // 10, 1))]
            for n in range(cfg["runs"]):
                run = {}
                for transport, count in variants:
                    result, run_delays = asyncio.run(_propagate(other, transport, f"hosts-{transport}-{n}", count,
                                                                cfg, saver=one))
                    run[transport] = result
                    delays.setdefault(f"{transport} across hosts, PostgreSQL ({count:,} subscribers)", []).extend(
                        run_delays)
                runs.append(run)
            run_saves = wrk.run(one.url, cfg["wrk_s"], script="save.lua",
                                env={**os.environ, "SLUGS": "1", "PREFIX": "hosts-saves"})
            run_polls = wrk.run(one.url + "/changes?slug=hosts-saves-0&since=1000000000", cfg["wrk_s"])
    summary = {f"hosts_{t}_{key}": median(r[t][key] for r in runs)
               for t, _ in variants for key in ("p50_ms", "p99_ms", "max_ms", "missed", "failed")}
    summary["hosts_saves_one_slug_rps"] = run_saves["requests_per_s"]
    summary["hosts_saves_one_slug_p99_ms"] = run_saves["p99_ms"]
    summary["hosts_unchanged_rps"] = run_polls["requests_per_s"]
    return runs, summary, delays


async def _measure(service, counter, work):
    """Run `work`; return the server's CPU %, the requests/s it served us, and the load generator's CPU %."""
    cpu, requests, own, started = service.cpu_seconds(), counter["requests"], time.process_time(), time.monotonic()
    result = await work
    wall = time.monotonic() - started
    return {
        "result": result,
        "server_cpu_pct": (service.cpu_seconds() - cpu) / wall * 100,
        "rps": (counter["requests"] - requests) / wall,
        "loadgen_cpu_pct": (time.process_time() - own) / wall * 100,
    }


# --- scenario 4 --------------------------------------------------------------------------------

def capacity(cfg, tmp, log):
    """Open SSE streams up to 50,000, then one save: how long until every stream has it, and memory per stream."""
    runs, summary = _capacity_runs(cfg, tmp, log, "sse", cfg["capacity"], "capacity", "cap")
    return runs, {"capacity_streams": cfg["capacity"], **summary,
                  "capacity_kib_per_stream": median(r["kib_per_stream"] for r in runs)}


def ws_capacity(cfg, tmp, log):
    """Open WebSockets on /ws up to 20,000 (one subscription each), then one save: as `capacity`, per socket."""
    runs, summary = _capacity_runs(cfg, tmp, log, "ws", cfg["ws_capacity"], "ws_capacity", "wscap")
    return runs, {"ws_capacity_sockets": cfg["ws_capacity"], **summary,
                  "ws_capacity_kib_per_socket": median(r["kib_per_stream"] for r in runs)}


def _capacity_runs(cfg, tmp, log, transport, count, key, prefix):
    """`count` subscribers of `transport`, then one save, on a fresh server per run; the summary under `key`_.

    The server has one worker per `capacity_per_worker` connections (at least
    two): a process opens at most 20,000 files here (`ulimit -Hn`).
    """
    db = servers.migrated_db(tmp)
    workers = max(2, -(-count // cfg["capacity_per_worker"]))
    # Each worker may hold what its open files allow (limits.descriptor_budget lowers this to fit):
    # the kernel hands connections to whichever worker accepts first, never exactly evenly.
    env = {"CHANGEFEED_WORKERS": str(workers), "CHANGEFEED_MAX_WAITS_PER_WORKER": "1000000"}
    runs = []
    for n in range(cfg["runs"]):
        # A fresh server each run: one that served a run before reuses the memory its streams freed,
        # and would show less per stream than a server taking its first 10,000.
        with servers.gunicorn("app:create_app()", db, log, env=env) as service:
            runs.append(_capacity(service, f"{prefix}-{n}", count, transport))
    return runs, {
        f"{key}_p50_ms": median(r["p50_ms"] for r in runs),
        f"{key}_p99_ms": median(r["p99_ms"] for r in runs),
        f"{key}_max_ms": median(r["max_ms"] for r in runs),
        f"{key}_dropped": max(r["dropped"] for r in runs),
        f"{key}_open_s": median(r["open_s"] for r in runs),
        f"{key}_poll_ms": median(r["poll_ms"] for r in runs),
        f"{key}_save_ms": median(r["save_ms"] for r in runs),
        f"{key}_workers": workers,
        f"{key}_spread": runs[-1]["spread"],
    }


def _capacity(service, slug, streams, transport):
    """`streams` subscribers of `transport` on one slug, then one save; "kib_per_stream" is per connection.

    Held by several load-generator processes (crowd.py); each request of this
    process (a save, a poll) is a connection of its own.
    """
    url = service.url
    http("POST", f"{url}/save", {"slug": slug, "html": "<p>save 0</p>"})
    rss = service.worker_rss()
    with crowd.Crowd(url, transport, slug, streams) as held:
        time.sleep(1)
        opened = streams - len(held.failed)
        grown = service.worker_rss() - rss
        spread = service.sockets_per_worker()
        # The server still answers while it holds them all: an unchanged poll, timed on its own.
        polls = []
        for _ in range(20):
            asked = time.monotonic()
            http("GET", f"{url}/changes?slug={slug}&since=1")
            polls.append((time.monotonic() - asked) * 1000)
        # From when the save is sent, not answered: the streams may have it before its answer is read.
        sent = time.monotonic()
        body, _headers = http("POST", f"{url}/save", {"slug": slug, "html": "<p>save 1</p>"})
        save_ms = (time.monotonic() - sent) * 1000
        arrived = held.arrivals(json.loads(body)["version"])
        delays = [(at - sent) * 1000 for at in arrived if at is not None]
        open_s = held.open_s
    return {"p50_ms": percentile(delays, 50), "p99_ms": percentile(delays, 99), "max_ms": max(delays, default=0),
            "kib_per_stream": grown / max(opened, 1) / 1024, "dropped": streams - len(delays),
            "open_s": open_s, "poll_ms": median(polls), "save_ms": save_ms, "spread": spread, "failed": held.failed[:5]}


# --- scenario 5 --------------------------------------------------------------------------------

def many_slugs(cfg, tmp, log):
    """One subscriber on each of 100, then 10,000 slugs, saves spread over them: CPU per save must not grow."""
    db = servers.migrated_db(tmp)
    runs = []
    with servers.gunicorn("app:create_app()", db, log) as service:
        for n in range(cfg["runs"]):
            few = asyncio.run(_many(service, f"few{n}", 100, cfg))
            many = asyncio.run(_many(service, f"many{n}", cfg["many_slugs"], cfg))
            runs.append({"few": few, "many": many, "cost_ratio": many["cpu_ms_per_save"] / few["cpu_ms_per_save"]})
    return runs, {
        "many_slugs_cpu_ms_per_save_100": median(r["few"]["cpu_ms_per_save"] for r in runs),
        "many_slugs_cpu_ms_per_save_n": median(r["many"]["cpu_ms_per_save"] for r in runs),
        "many_slugs_cost_ratio": median(r["cost_ratio"] for r in runs),
        "many_slugs_p99_ms_100": median(r["few"]["p99_ms"] for r in runs),
        "many_slugs_p99_ms_n": median(r["many"]["p99_ms"] for r in runs),
    }


async def _many(service, prefix, count, cfg):
    url = service.url
    slugs = [f"{prefix}-{i}" for i in range(count)]
    async with subs.session(count) as http_:
        counter = {"requests": 0}
        seens, tasks = await subs.subscribe_all(http_, url, "sse", slugs, 0, counter)
        idle = await _measure(service, counter, asyncio.sleep(cfg["many_s"]))
        load = await _measure(service, counter, subs.save_steadily(
            http_, url, slugs, cfg["many_saves_per_s"], cfg["many_s"]))
        await asyncio.sleep(0.5)
        delays, _ = subs.delays_ms({slug: [seen] for slug, seen in zip(slugs, seens)}, load["result"])
        await subs.cancel(tasks)
    saved = len(load["result"])
    # What the saves cost on top of holding the idle streams (heartbeats, watcher ticks).
    extra_cpu_s = (load["server_cpu_pct"] - idle["server_cpu_pct"]) / 100 * cfg["many_s"]
    return {"cpu_ms_per_save": max(extra_cpu_s, 0) / saved * 1000, "p99_ms": percentile(delays, 99),
            "p50_ms": percentile(delays, 50), "saves": saved}


# --- scenario 9 --------------------------------------------------------------------------------

def stores(cfg, tmp, log):
    """SQLite and PostgreSQL in one run, round by round: unchanged polls, saves on one page and on 1,000.

    Both services run at once, as production runs them, each on a fresh
    database; in each round every measure is taken on one store right after
    the other (which goes first alternates between rounds), so the drift of a
    shared machine moves both sides together, and each ratio is taken within
    its round. A do-nothing Flask route with the same answer under gunicorn's
    stock gevent worker (not ours) gives the poll a ratio that travels between
    machines. Without a PostgreSQL server, SQLite alone.
    """
    folder = Path(tmp) / "stores"
    folder.mkdir(exist_ok=True)
    db = servers.migrated_db(folder)
    runs = []
    with servers.postgres_db() as pg_url, contextlib.ExitStack() as stack:
        services = {"sqlite": stack.enter_context(servers.gunicorn("app:create_app()", db, log))}
        if pg_url is None:
            print("  no PostgreSQL server on 127.0.0.1:5432 (CHANGEFEED_BENCH_DATABASE_URL): SQLite alone")
        else:
            services["pg"] = stack.enter_context(servers.gunicorn("app:create_app()", "", log,
                                                                  env={"CHANGEFEED_DATABASE_URL": pg_url}))
        stock = stack.enter_context(servers.gunicorn("baseline:create_app()", db, log, pythonpath="bench",
                                                     worker_class="gevent"))
        polls = {}  # each store's unchanged poll: since= the page's current version
        for name, service in services.items():
            saved = json.loads(http("POST", service.url + "/save", {"slug": "stores-poll", "html": "<p>x</p>"})[0])
            polls[name] = f"/changes?slug=stores-poll&since={saved['version']}"
            assert json.loads(http("GET", service.url + polls[name])[0])["changed"] is False
        # The do-nothing route answers version 1 with the SQLite file's epoch: the bytes of SQLite's answer.
        assert http("GET", stock.url + polls["sqlite"])[0] == http("GET", services["sqlite"].url + polls["sqlite"])[0]
        poll_urls = {"stock_gevent": stock.url + polls["sqlite"],
                   **{f"{name}_polls": service.url + polls[name] for name, service in services.items()}}
        for n in range(cfg["runs"]):
            # Polls: do-nothing, SQLite, PostgreSQL, then the other way round: SQLite always beside both.
            order = list(services) if n % 2 == 0 else list(services)[::-1]
            run = {"order": order}
            for key in (poll_urls if n % 2 == 0 else reversed(poll_urls)):
                run[key] = wrk.run(poll_urls[key], cfg["wrk_s"])
            for measure, slugs in (("saves_one", 1), ("saves_many", 1000)):
                for name in order:
                    run[f"{name}_{measure}"] = wrk_saves(services[name].url, cfg["wrk_s"], slugs,
                                                         f"stores-r{n}-{measure.replace('_', '-')}")
            runs.append(run)
        exact = {name: asyncio.run(_exact_versions(service.url, "stores-exact", 64, 2000 if cfg is FULL else 200))
                 for name, service in services.items()}
    measured = [key for key in runs[0] if key != "order"]
    rps = lambda run, key: run[key]["requests_per_s"]  # noqa: E731
    ratio = lambda over, under: median(rps(r, over) / rps(r, under) for r in runs)  # noqa: E731
    summary = {f"stores_{key}_rps": median(rps(r, key) for r in runs) for key in measured}
    summary.update({f"stores_{key}_p99_ms": median(r[key]["p99_ms"] for r in runs) for key in measured})
    summary["stores_sqlite_polls_vs_stock_gevent"] = ratio("sqlite_polls", "stock_gevent")
    if "pg" in services:
        summary.update({
            "stores_pg_polls_vs_stock_gevent": ratio("pg_polls", "stock_gevent"),
            "stores_pg_polls_vs_sqlite": ratio("pg_polls", "sqlite_polls"),
            "stores_pg_saves_many_vs_one": ratio("pg_saves_many", "pg_saves_one"),
            "stores_pg_vs_sqlite_saves_one": ratio("pg_saves_one", "sqlite_saves_one"),
            "stores_pg_vs_sqlite_saves_many": ratio("pg_saves_many", "sqlite_saves_many"),
        })
    saves_runs = [r[key] for r in runs for key in measured if "_saves_" in key]
    summary.update({
        "stores_non_2xx": sum(r[key]["non_2xx"] for r in runs for key in measured),
        # wrk's connect, read and write errors and its timeouts (an answer later than 2 s), apart from refusals.
        "stores_socket_errors": sum(r[key]["socket_errors"] for r in runs for key in measured),
        "stores_saves_unaccounted": sum(not saves_accounted(result) for result in saves_runs),
        "stores_saves_exact": all(exact.values()),
    })
    return {"rounds": runs, "exact": exact}, summary


# --- report ------------------------------------------------------------------------------------

def median(values):
    values = list(values)
    return statistics.median(values) if values else float("nan")


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def machine():
    memory = psutil.virtual_memory().total / 2**30
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return {"cores": os.cpu_count(), "memory_gib": round(memory, 1), "cpu": model, "python": platform.python_version()}


def verdict(key, value):
    _, op, target = TARGETS[key]
    ok = {">=": value >= target, "<": value < target, "<=": value <= target}[op]
    return f"{op} {target:g}", "met" if ok else "MISSED"


def print_table(summary):
    rows = [
        ("unchanged poll", "requests/s", "unchanged_rps"),
        ("", "p50 / p99 ms", ("unchanged_p50_ms", "unchanged_p99_ms")),
        ("", "errors", "unchanged_errors"), ("", "load generator (wrk) CPU s per s", "loadgen_cpu_s_per_s"),
        ("", "304 requests/s", "unchanged_304_rps"), ("", "304 / 200", "unchanged_304_vs_200"),
        ("", "do-nothing Flask requests/s", "baseline_rps"), ("", "ours / do-nothing", "unchanged_vs_baseline"),
        ("", "nginx static requests/s", "nginx_static_rps"), ("", "ours / nginx static", "unchanged_vs_nginx_static"),
        ("saves", "one slug saves/s", "saves_one_slug_rps"), ("", "one slug p99 ms", "saves_one_slug_p99_ms"),
        ("", "1,000 slugs saves/s", "saves_many_slugs_rps"), ("", "1,000 slugs p99 ms", "saves_many_slugs_p99_ms"),
        ("", "failed / unaccounted", ("saves_failed", "saves_unaccounted")),
        ("", "versions exactly 1..N", "saves_exact"),
    ]
    for t in ("sse", "sse_prefix", "ws", "longpoll", "poll", "longpoll100"):
        rows += [(f"propagation {t}", "p50 / p99 / max ms", (f"{t}_p50_ms", f"{t}_p99_ms", f"{t}_max_ms")),
                 ("", "missed / failed subscribers", (f"{t}_missed", f"{t}_failed")),
                 ("", "server CPU % idle / load", (f"{t}_idle_server_cpu_pct", f"{t}_load_server_cpu_pct")),
                 ("", "server requests/s idle / load", (f"{t}_idle_rps", f"{t}_load_rps")),
                 ("", "load generator CPU %", f"{t}_loadgen_cpu_pct"),
                 ("", "connections per worker", f"{t}_spread")]
    for front in ("nginx", "varnish"):
        rows += [(f"long-poll, {front}", "p50 / p99 / max ms", (f"longpoll_{front}_p50_ms", f"longpoll_{front}_p99_ms",
                                                                f"longpoll_{front}_max_ms")),
                 ("", "missed / failed subscribers", (f"longpoll_{front}_missed", f"longpoll_{front}_failed")),
                 ("", "requests to the service per save", f"longpoll_{front}_service_polls_per_save"),
                 ("", f"requests/s to {front} idle / load", (f"longpoll_{front}_idle_rps", f"longpoll_{front}_load_rps")),
                 ("", f"CPU %: service / {front} / load generator", (f"longpoll_{front}_load_server_cpu_pct",
                                                                    f"longpoll_{front}_front_cpu_pct",
                                                                    f"longpoll_{front}_loadgen_cpu_pct"))]
    rows += [("across hosts (PostgreSQL)", "SSE p50 / p99 / max ms", ("hosts_sse_p50_ms", "hosts_sse_p99_ms",
                                                                     "hosts_sse_max_ms")),
             ("", "long-poll (100) p50 / p99 / max ms", ("hosts_longpoll_p50_ms", "hosts_longpoll_p99_ms",
                                                         "hosts_longpoll_max_ms")),
             ("", "missed / failed subscribers", ("hosts_sse_missed", "hosts_longpoll_missed")),
             ("", "saves/s, 64 clients, one slug; p99 ms", ("hosts_saves_one_slug_rps",
                                                           "hosts_saves_one_slug_p99_ms")),
             ("", "unchanged poll requests/s (one instance)", "hosts_unchanged_rps")]
    rows += [("capacity (SSE)", "streams", "capacity_streams"),
             ("", "one save reaches all: p50 / p99 / max ms",
              ("capacity_p50_ms", "capacity_p99_ms", "capacity_max_ms")),
             ("", "server KiB per open stream", "capacity_kib_per_stream"),
             ("", "dropped streams", "capacity_dropped"),
             ("", "workers; streams per worker", ("capacity_workers", "capacity_spread")),
             ("", "while open: an unchanged poll, the save (ms)", ("capacity_poll_ms", "capacity_save_ms")),
             ("capacity (WebSocket)", "sockets", "ws_capacity_sockets"),
             ("", "one save reaches all: p50 / p99 / max ms",
              ("ws_capacity_p50_ms", "ws_capacity_p99_ms", "ws_capacity_max_ms")),
             ("", "server KiB per open socket", "ws_capacity_kib_per_socket"),
             ("", "dropped sockets", "ws_capacity_dropped"),
             ("", "workers; sockets per worker", ("ws_capacity_workers", "ws_capacity_spread")),
             ("many slugs", "CPU ms per save, 100 slugs / 10,000", ("many_slugs_cpu_ms_per_save_100",
                                                                    "many_slugs_cpu_ms_per_save_n")),
             ("", "ratio", "many_slugs_cost_ratio"),
             ("", "p99 ms, 100 slugs / 10,000", ("many_slugs_p99_ms_100", "many_slugs_p99_ms_n"))]
    rows += [("stores A/B", "SQLite unchanged polls/s", "stores_sqlite_polls_rps"),
             ("", "PostgreSQL unchanged polls/s", "stores_pg_polls_rps"),
             ("", "do-nothing Flask, stock gevent, requests/s", "stores_stock_gevent_rps"),
             ("", "SQLite polls / do-nothing stock gevent", "stores_sqlite_polls_vs_stock_gevent"),
             ("", "PostgreSQL polls / do-nothing stock gevent", "stores_pg_polls_vs_stock_gevent"),
             ("", "PostgreSQL polls / SQLite polls", "stores_pg_polls_vs_sqlite"),
             ("", "SQLite saves/s, one page", "stores_sqlite_saves_one_rps"),
             ("", "SQLite saves/s, 1,000 pages", "stores_sqlite_saves_many_rps"),
             ("", "PostgreSQL saves/s, one page", "stores_pg_saves_one_rps"),
             ("", "PostgreSQL saves/s, 1,000 pages", "stores_pg_saves_many_rps"),
             ("", "PostgreSQL saves, 1,000 pages / one page", "stores_pg_saves_many_vs_one"),
             ("", "PostgreSQL / SQLite saves, one / 1,000", ("stores_pg_vs_sqlite_saves_one",
                                                            "stores_pg_vs_sqlite_saves_many")),
             ("", "saves p99 ms, SQLite one / 1,000 pages", ("stores_sqlite_saves_one_p99_ms",
                                                            "stores_sqlite_saves_many_p99_ms")),
             ("", "saves p99 ms, PostgreSQL one / 1,000 pages", ("stores_pg_saves_one_p99_ms",
                                                                "stores_pg_saves_many_p99_ms")),
             ("", "non-2xx / socket errors / unaccounted", ("stores_non_2xx", "stores_socket_errors",
                                                           "stores_saves_unaccounted")),
             ("", "versions exactly 1..N, each store", "stores_saves_exact")]
    print(f"\n{'scenario':<18} {'measure':<42} {'median':>22}  target")
    for scenario, label, keys in rows:
        keys = keys if isinstance(keys, tuple) else (keys,)
        if not all(k in summary for k in keys):
            continue
        value = " / ".join(_fmt(summary[k]) for k in keys)
        target = ""
        if len(keys) == 1 and keys[0] in TARGETS:
            target = "  ".join(verdict(keys[0], summary[keys[0]]))
        elif keys[0] in ("sse_p50_ms", "ws_p50_ms", "longpoll_p50_ms", "longpoll100_p50_ms", "longpoll_nginx_p50_ms",
                         "longpoll_varnish_p50_ms", "hosts_sse_p50_ms", "hosts_longpoll_p50_ms"):
            target = "  ".join(verdict(keys[0].replace("p50", "p99"), summary[keys[1]]))
        elif keys[0] == "capacity_p50_ms":
            target = "  ".join(verdict("capacity_p99_ms", summary[keys[1]]))
        print(f"{scenario:<18} {label:<42} {value:>22}  {target}")
    peers = [(label, summary[key], theirs) for key, label, theirs in PEERS if key in summary]
    if peers:
        print("\nbeside the peers' published figures (docs/performance.md#peers)")
        for label, ours, theirs in peers:
            print(f"  {label:<46} ours {_fmt(ours):>10}   {theirs}")


def _fmt(value):
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, list):
        return "+".join(map(str, value))
    if isinstance(value, int):
        return f"{value:,}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def chart(delays, path):
    """Cumulative distribution of propagation delay per transport, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    shares = numpy.linspace(0, 100, 1001)
    for transport, values in delays.items():
        if len(values):  # negative delays (had it before the saver had its answer) drawn at 0.1 ms
            ax.plot(numpy.maximum(numpy.percentile(values, shares), 0.1), shares, label=transport)
    ax.set_xscale("log")
    ax.set_xlabel("delay from the save's answer to the subscriber having it (ms, log scale; "
                  "at or below 0.1: the subscriber had it first)")
    ax.set_ylabel("% of (subscriber, save) pairs")
    ax.set_title("changefeed propagation: subscribers on one slug, 10 saves/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


SCENARIOS = {"poll": unchanged_poll, "saves": saves, "propagation": propagation,
             "nginx": propagation_nginx, "varnish": propagation_varnish, "hosts": hosts, "capacity": capacity,
             "ws_capacity": ws_capacity, "many": many_slugs, "stores": stores}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds with tiny numbers, to keep the harness working")
    parser.add_argument("--only", nargs="*", choices=SCENARIOS, help="run only these scenarios")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the JSON and the chart")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="propagation: only these transports (sse sse_prefix ws longpoll poll longpoll100)")
    args = parser.parse_args()
    results = args.results
    cfg = dict(QUICK if args.quick else FULL, variants=args.variants)
    if not wrk.available():
        sys.exit(wrk.INSTALL_HINT)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the servers started below inherit it
    if hard < cfg["capacity_per_worker"] + 1000:
        print(f"  open-files limit is {hard}: {cfg['capacity_per_worker']:,} streams per worker may not fit "
              "(raise `ulimit -Hn`, or lower capacity_per_worker)")
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
    report = {"date": stamp, "machine": machine(), "mode": "quick" if args.quick else "full", "config": cfg,
              "command": "make bench" + (" QUICK=1" if args.quick else ""), "runs": {}, "summary": {}}
    print(f"changefeed bench ({report['mode']}) on {report['machine']}")
    with tempfile.TemporaryDirectory(prefix="changefeed-bench-") as tmp:
        log = str(Path(tmp) / "servers.log")
        for name, scenario in SCENARIOS.items():
            if args.only and name not in args.only:
                continue
            print(f"- {name} ...", flush=True)
            started = time.monotonic()
            runs, summary, *extra = scenario(cfg, tmp, log)
            report["runs"][name], report["summary"] = runs, {**report["summary"], **summary}
            if extra and extra[0]:  # delays of the propagation scenarios: one chart for all of them
                delays = report.setdefault("propagation_delays_ms", {})
                delays.update({k: [round(v, 3) for v in vs] for k, vs in extra[0].items()})
                chart(delays, results / "propagation.png")
            print(f"  done in {time.monotonic() - started:.0f} s", flush=True)
    print_table(report["summary"])
    out = results / f"bench-{stamp}.json"
    out.write_text(json.dumps(report, indent=1))
    (results / "latest.json").write_text(json.dumps(report, indent=1))
    print(f"\nresults: {out}")
    if "propagation_delays_ms" in report:
        print(f"chart: {results / 'propagation.png'}")
    return report


if __name__ == "__main__":
    main()
