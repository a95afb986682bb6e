"""GET /healthz (liveness), GET /readyz (readiness) and GET /metrics (Prometheus; its counters live in ops/metrics.py).

/metrics is a blueprint of its own, `metrics_blueprint`, which the extension
registers unless CHANGEFEED_METRICS is `off`: then it is a 404 like any
unknown path. Who may scrape it is decided by the guard (access.scrapes).
"""

from typing import Any

from flask import Blueprint, Response, request
from prometheus_client.exposition import choose_encoder

from changefeed.core.outcomes import Unavailable
from changefeed.ops import metrics

from . import access, errors
from .services import services

blueprint = Blueprint("health", __name__)
metrics_blueprint = Blueprint("metrics", __name__)
metrics_blueprint.before_request(access.guard)


@blueprint.get("/healthz")
def healthz() -> dict[str, str]:
    """Say that this process answers (a liveness probe)."""
    return {"status": "ok"}


@blueprint.get("/readyz")
def readyz() -> Response | dict[str, Any]:
    """Say whether this process can serve: its database reads and its watcher looks (readiness)."""
    feed = services()
    store, notifier = feed.store, feed.notifier
    problems = {}
    missing = store.problem()  # first: its message says what to do about the storage itself
    if missing:
        problems["database"] = missing
    else:
        try:
            store.ping()
            notifier.start()
        except Unavailable as exc:
            problems["database"] = str(exc)
        else:
            watcher = notifier.health()
            if watcher:
                problems["watcher"] = watcher
    if notifier.closed:
        problems["process"] = "shutting down"
    if problems:
        return errors.envelope(503, "not ready", "Not ready to serve: " + "; ".join(
            f"{part}: {why}" for part, why in problems.items()), headers={"Retry-After": "1"}, checks=problems)
    return {"status": "ready", "epoch": store.epoch}


@metrics_blueprint.get("/metrics", endpoint="metrics")
@access.scrapes
def scrape() -> Response:
    """The service's metrics, summed over its processes, in the format the scraper asks for."""
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(metrics.registry()), content_type=content_type,
                    headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
