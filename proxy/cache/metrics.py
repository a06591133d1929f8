"""The Redis level's reports, as Prometheus metrics."""

from __future__ import annotations

from proxy.metrics import Metrics


class L2Metrics:
    """A :class:`proxy.cache.l2.L2Observer` on the app's metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._duration = {op: metrics.cache_redis_duration.labels(op) for op in ("get", "set")}

    def redis_call(self, op: str, seconds: float, ok: bool, reason: str) -> None:
        self._duration[op].observe(seconds)
        if not ok:
            self._m.cache_redis_errors.labels(op, reason).inc()

    def redis_breaker(self, is_open: bool) -> None:
        self._m.cache_redis_breaker_open.set(1 if is_open else 0)

    def redis_dropped_writes(self, n: int) -> None:
        self._m.cache_redis_dropped_writes.inc(n)
