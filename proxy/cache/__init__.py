"""The embedding cache: never embed the same text twice.

* :mod:`proxy.cache.identity`: the key, a SHA-256 of (model, version, options that change
  the vector, input).
* :mod:`proxy.cache.lru`: the in-memory LRU of float32 vectors, bounded in bytes.
* :mod:`proxy.cache.l2`: the optional shared level in Redis (timeout, breaker, fail-open).
* :mod:`proxy.cache.front`: single-flight dedup and the lookups, in front of the batcher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.cache.front import CacheUse, EmbeddingCache
from proxy.cache.identity import CacheScope, upstream_fingerprint

if TYPE_CHECKING:
    from proxy.metrics import Metrics
    from proxy.settings import Settings

__all__ = ["CacheScope", "CacheUse", "EmbeddingCache", "build_cache", "upstream_fingerprint"]

MIB = 1024 * 1024


def build_cache(settings: Settings, metrics: Metrics | None = None) -> EmbeddingCache | None:
    """The cache the settings ask for; None when ``CACHE_SIZE_MB`` is 0 (cache and dedup
    off)."""
    max_bytes = int(settings.cache_size_mb * MIB)
    if max_bytes <= 0:
        return None
    l2 = None
    if settings.cache_url is not None:
        try:
            from proxy.cache.l2 import RedisL2
        except ImportError as exc:  # the redis extra is not installed
            raise RuntimeError("CACHE_URL needs the Redis client: pip install '.[redis]'") from exc
        from proxy.cache.metrics import L2Metrics

        l2 = RedisL2(
            settings.cache_url,
            prefix=settings.cache_key_prefix,
            ttl_s=settings.cache_ttl,
            timeout_s=settings.cache_timeout_ms / 1000.0,
            breaker_cooldown_s=settings.cache_breaker_cooldown,
            observer=L2Metrics(metrics) if metrics is not None else None,
        )
    return EmbeddingCache(max_bytes, l2=l2, metrics=metrics)
