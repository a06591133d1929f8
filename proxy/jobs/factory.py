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
    max_bytes: int | None = None,
    job_timeout_s: float = 600.0,
) -> JobStore:
    """``memory``, or a Redis URL (redis://, rediss:// or unix://).

    ``max_records`` and ``max_bytes`` bound the records kept overall, in number and in
    bytes of inputs and results (None: only the TTL does); ``job_timeout_s`` is a job's
    lifetime, retries of temporary faults included.
    """
    if spec == "memory":
        return MemoryJobStore(
            max_jobs=max_jobs,
            result_ttl_s=result_ttl_s,
            workers=workers,
            max_records=max_records,
            max_bytes=max_bytes,
            job_timeout_s=job_timeout_s,
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
            max_records=max_records,
            max_bytes=max_bytes,
            job_timeout_s=job_timeout_s,
        )
    raise ValueError(
        f"unknown job store {spec!r}: expected `memory` or a redis://, rediss:// or unix:// URL"
    )
