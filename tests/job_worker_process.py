"""A job-consuming replica as its own process, for the crash test.

python -m tests.job_worker_process URL PREFIX CONSUMER DELAY_S WORKERS
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

from proxy.jobs.redis_store import RedisJobStore


def fake_vector(text: str) -> list[float]:
    """A deterministic embedding, the same in every process (unlike hash())."""
    digest = hashlib.sha256(text.encode()).digest()
    return [byte / 255 for byte in digest[:8]]


async def main(url: str, prefix: str, consumer: str, delay_s: float, workers: int) -> None:
    async def slow(text: str, deadline: float, model: str | None = None) -> list[float]:
        await asyncio.sleep(delay_s)
        return fake_vector(text)

    store = RedisJobStore(
        url,
        max_jobs=1000,
        result_ttl_s=60,
        workers=workers,
        visibility_timeout_s=30,
        key_prefix=prefix,
        consumer_name=consumer,
    )
    await store.start(slow)
    print("ready", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    url, prefix, consumer, delay, workers = sys.argv[1:6]
    asyncio.run(main(url, prefix, consumer, float(delay), int(workers)))
