"""Builds the job store a ``--job-store`` spec names."""

from __future__ import annotations

from proxy.jobs.base import JobStore
from proxy.jobs.memory import MemoryJobStore

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def build_job_store(
    spec: str,
    *,
    max_jobs: int,
    result_ttl_s: float,
    workers: int,
    visibility_timeout_s: float,
    max_records: int | None = None,
) -> JobStore:
    """``memory``, or a Redis URL (redis://, rediss:// or unix://).

    ``max_records`` bounds the memory store's records overall (None: only the TTL does).
    """
    if spec == "memory":
        return MemoryJobStore(
            max_jobs=max_jobs, result_ttl_s=result_ttl_s, workers=workers, max_records=max_records
        )
    if spec.startswith(REDIS_SCHEMES):
        # Imported here so the memory store works without redis installed.
        from proxy.jobs.redis_store import RedisJobStore

        return RedisJobStore(
            spec,
            max_jobs=max_jobs,
            result_ttl_s=result_ttl_s,
            workers=workers,
            visibility_timeout_s=visibility_timeout_s,
        )
    raise ValueError(
        f"unknown job store {spec!r}: expected `memory` or a redis://, rediss:// or unix:// URL"
    )
