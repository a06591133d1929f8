"""GET /status: a small live page of the proxy's state, and GET /status.json behind it.

The page (HTML, one script, one stylesheet, all from ``static/status/``; no CDN) polls
``status.json`` every second and shows, per model and version: requests/s, p50 and p99
latency, queue depth, the batch-size distribution, the concurrency limit, the circuit
breaker, the cache hit ratio (null with the cache off, or before any item in the window) and
the A/B split.

Traffic figures come from the Prometheus metrics (so with WORKERS > 1 they count every
worker) over a sliding window: each status.json call takes a snapshot, and rates and latency
percentiles are the differences from the oldest snapshot of the last ``WINDOW_S`` seconds.
Percentiles are estimated from the histogram buckets, as Prometheus's histogram_quantile
does. The limit and breaker are those of the worker that answered.

Access: with API_KEY set, status.json is guarded like every data route (Bearer key); the page
and its files are public, hold no data, and say whether a key is needed. The page then asks
for the key and keeps it in the tab's sessionStorage (gone when the tab closes), sending it
as ``Authorization: Bearer``. No cookie, so no cross-site request can ride on it, and the
page's Content-Security-Policy (as /docs's) lets its script talk to this origin only.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client.metrics_core import Metric

from proxy.http.common import json_response
from proxy.http.docs import SECURITY_HEADERS, static_asset_operation, static_file
from proxy.http.keys import METRICS, REGISTRY, SETTINGS
from proxy.metrics import Metrics
from proxy.service import EmbeddingService

WINDOW_S = 10.0  # rates and percentiles cover about this much of the recent past
_KEEP_S = 60.0  # snapshots older than this are dropped

STATUS_ASSET_PREFIX = "/status/static"
STATUS_ASSET_ROUTE = STATUS_ASSET_PREFIX + "/{name}"
STATUS_ASSETS: dict[str, tuple[str, str]] = {
    "status.js": ("status/status.js", "text/javascript"),
    "status.css": ("status/status.css", "text/css"),
}
PUBLIC_STATUS_ROUTES = frozenset(
    {("GET", "/status")} | {("GET", f"{STATUS_ASSET_PREFIX}/{name}") for name in STATUS_ASSETS}
)

_STATIC = STATUS_ASSET_PREFIX.lstrip("/")
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Embedding batch proxy status</title>
<link rel="icon" type="image/png" href="docs/static/favicon-32x32.png">
<link rel="stylesheet" href="{static}/status.css">
</head>
<body data-auth="{auth}">
<header>
<h1>Embedding batch proxy</h1>
<p class="meta"><span id="state">loading</span> · updated <time id="updated">never</time>
 · window <span id="window">-</span> · workers <span id="workers">-</span></p>
</header>
<form id="key-form" hidden>
<label for="key">API key</label>
<input id="key" type="password" autocomplete="off" required>
<button type="submit">Show status</button>
<p id="key-message" class="message"></p>
</form>
<main id="models"></main>
<script src="{static}/status.js"></script>
</body>
</html>
"""

# Series the page reads (names as collected: counters without their _total).
_REQUESTS = "proxy_model_requests"
_LATENCY = "proxy_model_request_duration_seconds"
_BATCH = "proxy_batch_size"
_QUEUE = "proxy_queue_depth"
_IN_FLIGHT = "proxy_upstream_in_flight"
_LIMIT = "proxy_concurrency_limit"
_CACHE_HITS = "proxy_cache_hits_total"  # by model, version and level (memory, redis)
_CACHE_MISSES = "proxy_cache_misses_total"  # level memory: every item looked up

Buckets = list[tuple[float, float]]  # (upper bound, cumulative count), ascending


@dataclass(slots=True)
class _Snapshot:
    at: float
    requests: dict[tuple[str, str], float] = field(default_factory=dict)
    errors: dict[tuple[str, str], float] = field(default_factory=dict)
    latency: dict[tuple[str, str], Buckets] = field(default_factory=dict)
    # Keyed by (model, version); gauges by (series, model, version).
    batches: dict[tuple[str, str], Buckets] = field(default_factory=dict)
    batch_items: dict[tuple[str, str], float] = field(default_factory=dict)  # over all batches
    gauges: dict[tuple[str, str, str], float] = field(default_factory=dict)
    cache_hits: dict[tuple[str, str], float] = field(default_factory=dict)  # memory or Redis
    cache_items: dict[tuple[str, str], float] = field(default_factory=dict)  # looked up


def _bucket(store: dict[Any, dict[float, float]], key: Any, le: str, value: float) -> None:
    store.setdefault(key, {})[math.inf if le == "+Inf" else float(le)] = value


def snapshot(families: Iterable[Metric], at: float) -> _Snapshot:
    snap = _Snapshot(at)
    latency: dict[tuple[str, str], dict[float, float]] = {}
    batches: dict[tuple[str, str], dict[float, float]] = {}
    for family in families:
        for sample in family.samples:
            labels = sample.labels
            if sample.name == _REQUESTS + "_total":
                key = (labels["model"], labels["version"])
                snap.requests[key] = snap.requests.get(key, 0.0) + sample.value
                if labels["status"].startswith("5"):
                    snap.errors[key] = snap.errors.get(key, 0.0) + sample.value
            elif sample.name == _LATENCY + "_bucket":
                _bucket(latency, (labels["model"], labels["version"]), labels["le"], sample.value)
            elif sample.name == _BATCH + "_bucket":
                key = (labels["model"], labels["version"])
                _bucket(batches, key, labels["le"], sample.value)
            elif sample.name == _BATCH + "_sum":
                snap.batch_items[(labels["model"], labels["version"])] = sample.value
            elif sample.name in (_QUEUE, _IN_FLIGHT, _LIMIT):
                key3 = (sample.name, labels["model"], labels["version"])
                snap.gauges[key3] = sample.value
            elif sample.name in (_CACHE_HITS, _CACHE_MISSES):
                key = (labels["model"], labels["version"])
                if sample.name == _CACHE_HITS:
                    snap.cache_hits[key] = snap.cache_hits.get(key, 0.0) + sample.value
                if labels["level"] == "memory":
                    snap.cache_items[key] = snap.cache_items.get(key, 0.0) + sample.value
    snap.latency = {k: sorted(v.items()) for k, v in latency.items()}
    snap.batches = {k: sorted(v.items()) for k, v in batches.items()}
    return snap


def _delta(now: Buckets, then: Buckets | None) -> Buckets:
    before = dict(then or ())
    return [(le, count - before.get(le, 0.0)) for le, count in now]


def quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q`` quantile of a cumulative histogram, interpolated within its bucket as
    Prometheus's histogram_quantile does; None when it holds no observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower  # past the last finite bound: its bound is all that is known
            inside = cumulative - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = upper, cumulative
    return lower


def _per_bucket(buckets: Buckets) -> list[dict[str, Any]]:
    """Cumulative counts as counts per bucket, up to the last bucket that has any."""
    out: list[dict[str, Any]] = []
    below = 0.0
    for upper, cumulative in buckets:
        out.append({"le": None if math.isinf(upper) else upper, "count": cumulative - below})
        below = cumulative
    while out and out[-1]["count"] == 0:
        out.pop()
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


@dataclass(frozen=True, slots=True)
class ModelState:
    """What the answering worker knows of one model that metrics do not say."""

    model: str
    version: str | None
    model_id: str
    concurrency_limit: int | None
    max_concurrent_batches: int | str
    adaptive_limit: dict[str, Any] | None
    breaker: str
    cache_hit_ratio: float | None = None
    ab_split: dict[str, float] | None = None


class StatusBoard:
    """The app's recent metric snapshots, and the status document built from them."""

    def __init__(self, metrics: Metrics, *, clock: Any = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._snapshots: deque[_Snapshot] = deque()

    def _window(self, now: _Snapshot) -> _Snapshot | None:
        while self._snapshots and now.at - self._snapshots[0].at > _KEEP_S:
            self._snapshots.popleft()
        base = next((s for s in self._snapshots if now.at - s.at <= WINDOW_S), None)
        if base is None and self._snapshots:
            base = self._snapshots[-1]  # only older ones: the newest of them
        return base

    def document(self, models: Sequence[ModelState], workers: int) -> dict[str, Any]:
        now = snapshot(self._metrics.collect(), self._clock())
        base = self._window(now)
        self._snapshots.append(now)
        span = now.at - base.at if base is not None else None
        entries = []
        for state in models:
            key = (state.model, state.version or "")
            entries.append(self._model(state, key, now, base, span))
        return {
            "generated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "window_s": None if span is None else round(span, 3),
            "workers": workers,
            "models": entries,
        }

    @staticmethod
    def _model(
        state: ModelState,
        key: tuple[str, str],
        now: _Snapshot,
        base: _Snapshot | None,
        span: float | None,
    ) -> dict[str, Any]:
        rate = errors = p50 = p99 = None
        hit_ratio = state.cache_hit_ratio
        batches: Buckets = now.batches.get(key, [])
        items = now.batch_items.get(key, 0.0)
        if base is not None and span:
            rate = (now.requests.get(key, 0.0) - base.requests.get(key, 0.0)) / span
            errors = (now.errors.get(key, 0.0) - base.errors.get(key, 0.0)) / span
            latency = _delta(now.latency.get(key, []), base.latency.get(key))
            p50, p99 = quantile(0.5, latency), quantile(0.99, latency)
            batches = _delta(batches, base.batches.get(key))
            items -= base.batch_items.get(key, 0.0)
            looked_up = now.cache_items.get(key, 0.0) - base.cache_items.get(key, 0.0)
            if looked_up > 0:
                hits = now.cache_hits.get(key, 0.0) - base.cache_hits.get(key, 0.0)
                hit_ratio = round(hits / looked_up, 4)
        gauges = now.gauges
        total_batches = batches[-1][1] if batches else 0.0
        return {
            "model": state.model,
            "version": state.version,
            "model_id": state.model_id,
            "requests_per_s": None if rate is None else round(rate, 3),
            "errors_per_s": None if errors is None else round(errors, 3),
            "latency_p50_ms": _ms(p50),
            "latency_p99_ms": _ms(p99),
            "queue_depth": gauges.get((_QUEUE, *key)),
            "in_flight": gauges.get((_IN_FLIGHT, *key)),
            "batch_size": {
                "batches": total_batches,
                "mean": round(items / total_batches, 3) if total_batches else None,
                "buckets": _per_bucket(batches),
            },
            "concurrency": {
                "limit": state.concurrency_limit,
                "limit_all_workers": gauges.get((_LIMIT, *key)),
                "max_concurrent_batches": state.max_concurrent_batches,
                "adaptive": state.adaptive_limit,
            },
            "breaker": state.breaker,
            "cache_hit_ratio": hit_ratio,
            "ab_split": state.ab_split,
        }


STATUS_BOARD = web.AppKey("status_board", StatusBoard)


def _adaptive_state(service: EmbeddingService) -> dict[str, Any] | None:
    """The adaptive limiter's state (limit, baseline, gradient, ...) once one is wired into
    the service (proxy/concurrency.py's GradientLimiter); None while the limit is fixed."""
    limiter = getattr(service, "limiter", None)
    state = getattr(limiter, "state", None)
    if not callable(state):
        return None
    snapshot = state()
    as_dict = getattr(snapshot, "as_dict", None)
    return dict(as_dict()) if callable(as_dict) else None


def model_state(service: EmbeddingService, ab_split: dict[str, float] | None = None) -> ModelState:
    """The answering worker's view of one model version's service; ``ab_split``: the
    model's traffic shares per version."""
    started = service.started
    adaptive = _adaptive_state(service)
    limit = service.batcher.config.max_concurrent_batches if started else None
    if adaptive is not None and isinstance(adaptive.get("limit"), int):
        limit = adaptive["limit"]
    return ModelState(
        model=service.model or "",
        version=service.version,
        model_id=service.served_model_name,
        concurrency_limit=limit,
        max_concurrent_batches=service.config.max_concurrent_batches,
        adaptive_limit=adaptive,
        breaker="open" if service.breaker.is_open else "closed",
        ab_split=ab_split,
    )


async def status(request: web.Request) -> web.Response:
    return page_response(request.app[SETTINGS].api_key is not None)


async def status_json(request: web.Request) -> web.Response:
    models = [
        model_state(version.service, shares)
        for shares, version in request.app[REGISTRY].routed_versions()
    ]
    document = request.app[STATUS_BOARD].document(models, request.app[SETTINGS].workers)
    return json_response(document, headers={"Cache-Control": "no-store"})


def add_status_routes(app: web.Application) -> None:
    app[STATUS_BOARD] = StatusBoard(app[METRICS])
    app.router.add_get("/status", status)
    app.router.add_get("/status.json", status_json)
    app.router.add_get(STATUS_ASSET_ROUTE, status_asset)


def status_page(api_key_set: bool) -> str:
    return _PAGE.format(static=_STATIC, auth="required" if api_key_set else "none")


async def status_asset(request: web.Request) -> web.StreamResponse:
    entry = STATUS_ASSETS.get(request.match_info["name"])
    if entry is None:
        raise web.HTTPNotFound()
    return static_file(*entry)


def page_response(api_key_set: bool) -> web.Response:
    return web.Response(
        text=status_page(api_key_set),
        content_type="text/html",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


def status_route_specs() -> dict[str, Any]:
    """The OpenAPI path items of /status, /status.json and the page's files."""
    return {
        "/status": {
            "get": {
                "summary": "A live status page (HTML) that polls /status.json",
                "operationId": "status_page",
                "tags": ["Observe"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "An HTML page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        STATUS_ASSET_ROUTE: {
            "get": static_asset_operation(
                "A static file of the /status page", "status_asset", "Observe", STATUS_ASSETS
            )
        },
    }
