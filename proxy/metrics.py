"""Prometheus metrics. Each app owns its own registry: no global state, tests stay isolated."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
            "proxy_request_items", "Input items received, by model.", ["model"], registry=r
        )
        self.queue_depth = Gauge(
            "proxy_queue_depth", "Items waiting in the batcher.", ["model"], registry=r
        )
        self.in_flight_batches = Gauge(
            "proxy_upstream_in_flight", "Upstream calls in flight.", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "proxy_batch_size",
            "Items per upstream call.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_chars = Histogram(
            "proxy_batch_chars",
            "Characters per upstream call.",
            ["model"],
            buckets=(64, 256, 1024, 4096, 16384, 65536, 262144, 1048576),
            registry=r,
        )
        self.queue_wait = Histogram(
            "proxy_batch_queue_wait_seconds",
            "How long the oldest item of a batch waited before dispatch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "proxy_upstream_duration_seconds",
            "Upstream call latency.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_calls = Counter(
            "proxy_upstream_calls",
            "Upstream calls by outcome (status code or fault).",
            ["model", "outcome"],
            registry=r,
        )
        self.dropped_items = Counter(
            "proxy_dropped_items",
            "Items dropped before dispatch (cancelled: the caller went away; deadline: "
            "its time ran out).",
            ["model", "reason"],
            registry=r,
        )
        self.batch_splits = Counter(
            "proxy_batch_splits",
            "Batches split in two because the upstream refused their inputs as a whole.",
            ["model"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "proxy_upstream_retries",
            "Upstream calls retried, by fault (overloaded, transient).",
            ["fault"],
            registry=r,
        )
        self.breaker_opened = Counter(
            "proxy_breaker_opened",
            "Times the upstream circuit breaker opened.",
            ["model"],
            registry=r,
        )
        self.rejected = Counter(
            "proxy_rejected_requests",
            "Requests refused before queueing, by reason.",
            ["reason"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
