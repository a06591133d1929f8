"""Prometheus metrics. Each app owns its own registry: no global state, tests stay isolated.

With WORKERS > 1 the supervisor gives every worker one PROMETHEUS_MULTIPROC_DIR, and
prometheus-client's multiprocess mode writes each worker's values to files there; whichever
worker takes a scrape reads them all, so one scrape of /metrics counts every worker (a
worker that exited keeps its counters; its gauges go). Gauges computed by a callback (queue
depth, calls in flight) cannot be read across processes, so in that mode each worker copies
them into plain values every second and before it answers a scrape (:meth:`Metrics.refresh`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Per-model metrics carry the model's name and version (name@version is what a caller got).
MV = ["model", "version"]
SHADOW = ["model", "version", "shadow_version"]
# Cosine similarity between a primary vector and its shadow's: fine steps near 1, where two
# versions of a model that agree land. No bucket below 0 (le="0.0" holds the opposed ones):
# prometheus_client drops a histogram's _sum when a bucket is negative.
COSINE_BUCKETS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)


HOOK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def multiprocess_dir() -> str | None:
    """The folder every worker's values go to, when this process is one of several workers."""
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.multiprocess_dir = multiprocess_dir()
        self._tracked: list[tuple[Gauge, Callable[[], float]]] = []
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self.requests = Counter(
            "proxy_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "proxy_request_duration_seconds",
            "Time from request to response.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_items = Counter(
            "proxy_request_items", "Input items received, by model.", MV, registry=r
        )
        # livesum: across workers, the sum over the live ones (a dead worker's queue is gone).
        self.queue_depth = Gauge(
            "proxy_queue_depth",
            "Items waiting in the batcher.",
            MV,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight_batches = Gauge(
            "proxy_upstream_in_flight",
            "Upstream calls in flight.",
            MV,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.concurrency_limit = Gauge(
            "proxy_concurrency_limit",
            "Upstream calls the batcher may have in flight at once (adaptive: learned; timer: "
            "the ceiling; summed over workers).",
            MV,
            registry=r,
            multiprocess_mode="livesum",
        )
        # The adaptive concurrency limit (proxy/adaptive.py), one per model version; with
        # DISPATCH=timer the limit is the fixed ceiling and the latency gauges stay unset.
        self.concurrency_ceiling = Gauge(
            "proxy_concurrency_ceiling",
            "Hard ceiling on upstream calls in flight (MAX_CONCURRENT_BATCHES, or auto; summed "
            "over workers).",
            MV,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.concurrency_baseline = Gauge(
            "proxy_concurrency_baseline_seconds",
            "Adaptive limit: no-load latency of an upstream call, normalised to one item "
            "(with several workers: the lowest).",
            MV,
            registry=r,
            multiprocess_mode="livemin",
        )
        self.concurrency_recent = Gauge(
            "proxy_concurrency_recent_seconds",
            "Adaptive limit: recent latency of an upstream call, normalised to one item "
            "(with several workers: the highest).",
            MV,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.concurrency_gradient = Gauge(
            "proxy_concurrency_gradient",
            "Adaptive limit: tolerance * baseline / recent, clamped to [0.5, 1]; below 1 the "
            "limit shrinks (with several workers: the lowest).",
            MV,
            registry=r,
            multiprocess_mode="livemin",
        )
        self.concurrency_cuts = Counter(
            "proxy_concurrency_congestion_cuts",
            "Times the adaptive limit was cut because the upstream answered 429 or 503 or "
            "timed out.",
            MV,
            registry=r,
        )
        self.batch_size = Histogram(
            "proxy_batch_size",
            "Items per upstream call.",
            MV,
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_chars = Histogram(
            "proxy_batch_chars",
            "Characters per upstream call.",
            MV,
            buckets=(64, 256, 1024, 4096, 16384, 65536, 262144, 1048576),
            registry=r,
        )
        self.queue_wait = Histogram(
            "proxy_batch_queue_wait_seconds",
            "How long the oldest item of a batch waited before dispatch.",
            MV,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "proxy_upstream_duration_seconds",
            "Upstream call latency.",
            MV,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_calls = Counter(
            "proxy_upstream_calls",
            "Upstream calls by outcome (status code or fault).",
            [*MV, "outcome"],
            registry=r,
        )
        self.dropped_items = Counter(
            "proxy_dropped_items",
            "Items dropped before dispatch (cancelled: the caller went away; deadline: "
            "its time ran out).",
            [*MV, "reason"],
            registry=r,
        )
        self.batch_splits = Counter(
            "proxy_batch_splits",
            "Batches split in two because the upstream refused their inputs as a whole.",
            MV,
            registry=r,
        )
        self.upstream_retries = Counter(
            "proxy_upstream_retries",
            "Upstream calls retried, by fault (overloaded, transient).",
            [*MV, "fault"],
            registry=r,
        )
        self.breaker_opened = Counter(
            "proxy_breaker_opened",
            "Times the upstream circuit breaker opened.",
            MV,
            registry=r,
        )
        self.rejected = Counter(
            "proxy_rejected_requests",
            "Requests refused before queueing, by reason.",
            [*MV, "reason"],
            registry=r,
        )

        # Per model and version, for the status page and per-model dashboards (the route
        # metrics above know no model).
        self.model_requests = Counter(
            "proxy_model_requests",
            "Embedding requests by model, version and status.",
            ["model", "version", "status"],
            registry=r,
        )
        self.model_request_duration = Histogram(
            "proxy_model_request_duration_seconds",
            "Time from request to response, by model and version.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.hook_duration = Histogram(
            "proxy_hook_duration_seconds",
            "Time per hook call, by hook and phase (before, after).",
            ["hook", "phase"],
            buckets=HOOK_BUCKETS,
            registry=r,
        )
        self.hook_failures = Counter(
            "proxy_hook_failures",
            "Hook calls that raised (not ValueError) or timed out, by hook, phase and reason "
            "(error, timeout).",
            ["hook", "phase", "reason"],
            registry=r,
        )
        self.hook_rejections = Counter(
            "proxy_hook_rejections",
            "Requests a hook refused with ValueError (422), by hook and phase.",
            ["hook", "phase"],
            registry=r,
        )
        self.capture_records = Counter(
            "proxy_capture_records",
            "Sampled capture records, by outcome (written; dropped: the queue was full; "
            "error: the disk refused).",
            ["outcome"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "proxy_shadow_requests",
            "Requests copied to a shadow version, by outcome (ok, error, dropped).",
            [*SHADOW, "outcome"],
            registry=r,
        )
        self.shadow_duration = Histogram(
            "proxy_shadow_duration_seconds",
            "Latency of shadow requests (after the caller was answered).",
            SHADOW,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_cosine = Histogram(
            "proxy_shadow_cosine",
            "Cosine similarity between the primary and the shadow vector of each input.",
            SHADOW,
            buckets=COSINE_BUCKETS,
            registry=r,
        )
        # Who feeds each (model, version)'s gauges: a replaced version's successor binds
        # before its predecessor closes, and that close must not unbind the successor.
        self._gauge_owners: dict[tuple[str, str], object] = {}

        # -- the embedding cache (proxy/cache/) ---------------------------------------------
        self.cache_hits = Counter(
            "proxy_cache_hits",
            "Items answered from the cache, by model, version and level (memory: per item; "
            "redis: per distinct item looked up there).",
            ["model", "version", "level"],
            registry=r,
        )
        self.cache_misses = Counter(
            "proxy_cache_misses",
            "Items the cache did not hold, by model, version and level (memory: per item; "
            "redis: per distinct item looked up there).",
            ["model", "version", "level"],
            registry=r,
        )
        self.cache_merges = Counter(
            "proxy_cache_dedup_merges",
            "Items that shared an identical item's upstream work instead of their own, by "
            "scope (request: a repeat within one list; in_flight: another request's item).",
            ["model", "version", "scope"],
            registry=r,
        )
        self.cache_bypassed = Counter(
            "proxy_cache_bypassed_items",
            "Items whose request skipped the lookups (Cache-Control no-cache or no-store).",
            ["model", "version", "directive"],
            registry=r,
        )
        # livesum: with several workers, each has its own memory level; the sum is the total.
        self.cache_bytes = Gauge(
            "proxy_cache_bytes",
            "Bytes the in-memory cache accounts for (vectors, keys and per-entry overhead).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cache_entries = Gauge(
            "proxy_cache_entries",
            "Vectors in the in-memory cache.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cache_redis_duration = Histogram(
            "proxy_cache_redis_duration_seconds",
            "Redis calls of the cache (get: one MGET; set: one pipeline of writes).",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_redis_errors = Counter(
            "proxy_cache_redis_errors",
            "Failed Redis calls of the cache, and values that were not a vector "
            "(reason bad_value), by operation and reason.",
            ["op", "reason"],
            registry=r,
        )
        self.cache_redis_breaker_open = Gauge(
            "proxy_cache_redis_breaker_open",
            "1 while the cache does not ask Redis after repeated failures (with several "
            "workers: 1 if any worker's breaker is open).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cache_redis_dropped_writes = Counter(
            "proxy_cache_redis_dropped_writes",
            "Vectors not written to Redis (it failed, was skipped, or too many writes waited).",
            registry=r,
        )

    def track(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Let ``gauge`` show ``read()``: at scrape time in one process; copied every second
        and at each scrape with several workers (see the module's docstring)."""
        if self.multiprocess_dir is None:
            gauge.set_function(read)
        else:
            # One reader per gauge: a version's successor replaces its predecessor's.
            self._tracked = [(g, r) for g, r in self._tracked if g is not gauge]
            self._tracked.append((gauge, read))
            gauge.set(read())

    def refresh(self) -> None:
        """Copy the tracked gauges' values (multiprocess mode; a no-op otherwise)."""
        for gauge, read in self._tracked:
            gauge.set(read())

    def _source(self) -> CollectorRegistry:
        """This process's registry, or one that reads every worker's files."""
        if self.multiprocess_dir is None:
            return self.registry
        self.refresh()
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return merged

    def collect(self) -> Iterable[Metric]:
        """Every metric family, over all workers when there are several."""
        return self._source().collect()

    def bind_version(
        self,
        model: str,
        version: str,
        *,
        owner: object,
        queue_depth: Callable[[], float],
        in_flight: Callable[[], float],
        concurrency_limit: Callable[[], float],
        concurrency_ceiling: Callable[[], float] | None = None,
        adaptive: dict[str, Callable[[], float]] | None = None,
    ) -> None:
        """Feed the version's gauges from its batcher; ``adaptive``: readers of its limiter's
        ``baseline``, ``recent`` and ``gradient`` (adaptive dispatch only)."""
        self._gauge_owners[(model, version)] = owner
        self.track(self.queue_depth.labels(model, version), queue_depth)
        self.track(self.in_flight_batches.labels(model, version), in_flight)
        self.track(self.concurrency_limit.labels(model, version), concurrency_limit)
        if concurrency_ceiling is not None:
            self.track(self.concurrency_ceiling.labels(model, version), concurrency_ceiling)
        if adaptive is not None:
            gauges = {
                "baseline": self.concurrency_baseline,
                "recent": self.concurrency_recent,
                "gradient": self.concurrency_gradient,
            }
            for name, read in adaptive.items():
                self.track(gauges[name].labels(model, version), read)
            self.concurrency_cuts.labels(model, version)  # listed from the start, at 0

    def unbind_version(self, model: str, version: str, *, owner: object) -> None:
        """Drop the version's gauges (they read a closed batcher) unless a successor fed them
        meanwhile. Counters and histograms stay: their totals are history."""
        if self._gauge_owners.get((model, version)) is not owner:
            return
        del self._gauge_owners[(model, version)]
        for gauge in self._version_gauges():
            if (model, version) not in _label_sets(gauge):
                continue
            child = gauge.labels(model, version)
            self._tracked = [(g, r) for g, r in self._tracked if g is not child]
            if self.multiprocess_dir is not None:
                child.set(0)  # other workers read this worker's file: leave a zero there
            else:
                gauge.remove(model, version)

    def _version_gauges(self) -> tuple[Gauge, ...]:
        return (
            self.queue_depth,
            self.in_flight_batches,
            self.concurrency_limit,
            self.concurrency_ceiling,
            self.concurrency_baseline,
            self.concurrency_recent,
            self.concurrency_gradient,
        )

    def request_done(self, route: str, status: int, seconds: float) -> None:
        """One request answered: its count by route and status, and its duration. The
        labelled children are kept, so the hot path skips prometheus-client's labels()
        lookup (a lock and a tuple per call)."""
        key = (route, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(route, str(status)),
                self.request_duration.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self._source())


def _label_sets(gauge: Gauge) -> set[tuple[str, ...]]:
    """The label values ``gauge`` has children for."""
    return {tuple(labels) for labels in gauge._metrics}
