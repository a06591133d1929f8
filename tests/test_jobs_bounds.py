"""Job stores bounded in bytes (MAX_JOB_BYTES) as well as in records, and each input stored
once: client input must not grow a store without limit.

The memory store counts an input as the str it holds (sys.getsizeof) and a result as 8 bytes
a float; the Redis store counts the bytes of its records. Both against a private redis-server
where Redis is involved.
"""

from __future__ import annotations

import asyncio
import sys
import time
from array import array
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from proxy.jobs.base import JobQueueFullError, JobRecord, JobStore
from proxy.jobs.memory import MemoryJobStore
from proxy.jobs.redis_store import RedisJobStore
from tests.conftest import make_settings
from tests.job_worker_process import fake_vector

BOUND = 64 * 1024
STREAM, GROUP = "proxy:jobs", "proxy:workers"


def options(**kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("max_bytes", BOUND)
    return kwargs


async def embed(text: str, deadline: float | None = None, model: str | None = None) -> list[float]:
    await asyncio.sleep(0)
    return fake_vector(text)


class Gate:
    """A processor that waits for ``opened`` before embedding."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def __call__(
        self, text: str, deadline: float | None = None, model: str | None = None
    ) -> list[float]:
        await self.opened.wait()
        return fake_vector(text)


def text_of(size: int, i: int) -> str:
    return f"{i:06d}" + "x" * (size - 6)


def held_in_memory(record: JobRecord | None) -> int:
    if record is None:
        return 0
    held = sys.getsizeof(record.input)
    if record.result is not None:
        held += sys.getsizeof(array("d", record.result))
    return held


async def wait_done(store: JobStore, prediction_id: str, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        record = await store.get(prediction_id)
        if record is not None and record.status == "done":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{prediction_id} not done: {await store.get(prediction_id)}")


@pytest.fixture
async def stores() -> AsyncIterator[list[JobStore]]:
    made: list[JobStore] = []
    yield made
    for store in made:
        await asyncio.wait_for(store.close(), 10)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def memory_store(stores: list[JobStore], **kwargs: Any) -> MemoryJobStore:
    kwargs = options(**kwargs)
    kwargs.setdefault("result_ttl_s", 60.0)
    kwargs.setdefault("workers", 4)
    store = MemoryJobStore(**kwargs)
    stores.append(store)
    return store


def redis_store(url: str, stores: list[JobStore], **kwargs: Any) -> RedisJobStore:
    kwargs = options(**kwargs)
    kwargs.setdefault("result_ttl_s", 60.0)
    kwargs.setdefault("workers", 4)
    store = RedisJobStore(url, **kwargs)
    stores.append(store)
    return store


async def submit_when_room(store: JobStore, text: str, limit_s: float = 10.0) -> str:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return await store.submit(text)
        except JobQueueFullError:
            assert time.monotonic() < deadline, "no room came"
            await asyncio.sleep(0.01)


def kept_suffix(present: list[bool]) -> int:
    """How many records were evicted, checking that they are exactly the oldest ones."""
    evicted = present.index(True) if True in present else len(present)
    assert present == [False] * evicted + [True] * (len(present) - evicted), present
    return evicted


# -- the memory store --------------------------------------------------------------------


async def test_memory_bytes_never_exceed_max_job_bytes(stores: list[JobStore]) -> None:
    store = memory_store(stores, max_jobs=50, max_records=1000)
    await store.start(embed)
    ids: list[str] = []
    for i in range(150):
        ids.append(await submit_when_room(store, text_of(1024 + (i * 397) % 5000, i)))
        records = [await store.get(prediction_id) for prediction_id in ids]
        held = sum(held_in_memory(r) for r in records)
        assert held <= BOUND, (i, held)
    await wait_done(store, ids[-1])
    records = [await store.get(prediction_id) for prediction_id in ids]
    assert sum(held_in_memory(r) for r in records) <= BOUND
    assert await store.get(ids[0]) is None  # the bound made room by evicting
    assert await store.get(ids[-1]) is not None


async def test_memory_evicts_the_oldest_finished_records_first(stores: list[JobStore]) -> None:
    store = memory_store(stores, max_jobs=10, max_records=1000)
    await store.start(embed)
    ids = []
    for i in range(40):
        ids.append(await store.submit(text_of(4000, i)))
        await wait_done(store, ids[-1])  # finishing order is submission order
    present = [await store.get(prediction_id) is not None for prediction_id in ids]
    evicted = kept_suffix(present)
    assert 0 < evicted < 40
    for i in range(evicted, 40):
        record = await store.get(ids[i])
        assert record is not None and record.result == fake_vector(text_of(4000, i))


async def test_memory_refuses_jobs_whose_inputs_would_exceed_max_job_bytes(
    stores: list[JobStore],
) -> None:
    store = memory_store(stores, max_jobs=1000, max_records=1000)  # not started: all unfinished
    accepted = []
    with pytest.raises(JobQueueFullError):
        for i in range(100):
            accepted.append(await store.submit(text_of(8000, i)))
    assert 1 <= len(accepted) < 100
    assert len(accepted) * sys.getsizeof(text_of(8000, 0)) <= BOUND
    await store.start(embed)
    for prediction_id in accepted:
        await wait_done(store, prediction_id)
    # Finished records give way to new jobs.
    await wait_done(store, await store.submit(text_of(8000, 100)))


# -- the Redis store ---------------------------------------------------------------------


async def everything_in(client: aioredis.Redis) -> list[str]:
    """Every string Redis holds, whatever the key's type."""
    held: list[str] = []
    async for key in client.scan_iter(count=1000):
        kind = await client.type(key)
        if kind == "string":
            held.append(await client.get(key))
        elif kind == "stream":
            for _, fields in await client.xrange(key):
                held.extend(fields.values())
        elif kind == "hash":
            held.extend((await client.hgetall(key)).values())
        elif kind == "zset":
            held.extend(await client.zrange(key, 0, -1))
        elif kind in ("list", "set"):
            members = await (client.lrange(key, 0, -1) if kind == "list" else client.smembers(key))
            held.extend(members)
    return held


async def test_redis_stores_each_input_once(
    redis_url: str, redis_client: aioredis.Redis, stores: list[JobStore]
) -> None:
    store = redis_store(redis_url, stores, max_jobs=10, max_records=10)
    text = "unique-marker " + "y" * 20_000
    prediction_id = await store.submit(text)
    assert sum(s.count("unique-marker") for s in await everything_in(redis_client)) == 1
    await store.start(embed)
    await wait_done(store, prediction_id)
    record = await store.get(prediction_id)
    assert record is not None and record.input == text
    assert sum(s.count("unique-marker") for s in await everything_in(redis_client)) == 1


async def stored_record_bytes(client: aioredis.Redis) -> tuple[int, int]:
    keys = [key async for key in client.scan_iter(match="proxy:job:*", count=1000)]
    sizes = [await client.strlen(key) for key in keys]
    return len(keys), sum(sizes)


async def test_redis_finished_records_are_bounded_in_count_and_bytes(
    redis_url: str, redis_client: aioredis.Redis, stores: list[JobStore]
) -> None:
    store = redis_store(redis_url, stores, max_jobs=5, max_records=8)
    await store.start(embed)
    ids = []
    for i in range(40):
        ids.append(await submit_when_room(store, text_of(3000 + (i * 211) % 3000, i)))
        await wait_done(store, ids[-1])
        count, size = await stored_record_bytes(redis_client)
        assert count <= 8 and size <= BOUND, (i, count, size)
    present = [await store.get(prediction_id) is not None for prediction_id in ids]
    assert kept_suffix(present) >= 32  # at most 8 kept, the newest


async def test_redis_refuses_jobs_whose_inputs_would_exceed_max_job_bytes(
    redis_url: str, redis_client: aioredis.Redis, stores: list[JobStore]
) -> None:
    store = redis_store(redis_url, stores, max_jobs=1000, max_records=1000)  # not started
    accepted = []
    with pytest.raises(JobQueueFullError):
        for i in range(100):
            accepted.append(await store.submit(text_of(8000, i)))
    assert 1 <= len(accepted) < 100
    assert (await stored_record_bytes(redis_client))[1] <= BOUND
    await store.start(embed)
    for prediction_id in accepted:
        await wait_done(store, prediction_id)
    await wait_done(store, await store.submit(text_of(8000, 100)))
    assert (await stored_record_bytes(redis_client))[1] <= BOUND


async def test_redis_bounds_are_shared_by_replicas(
    redis_url: str, redis_client: aioredis.Redis, stores: list[JobStore]
) -> None:
    replicas = [
        redis_store(redis_url, stores, max_jobs=5, max_records=10, consumer_name=f"r{i}")
        for i in range(3)
    ]
    for replica in replicas:
        await replica.start(embed)
    # All at once, from three replicas: the scripts keep the bounds atomically.
    await asyncio.gather(*(submit_when_room(replicas[i % 3], text_of(2000, i)) for i in range(60)))
    deadline = time.monotonic() + 10
    while await redis_client.xlen(STREAM) and time.monotonic() < deadline:
        count, size = await stored_record_bytes(redis_client)
        assert count <= 10 and size <= BOUND, (count, size)
        await asyncio.sleep(0.01)
    assert await redis_client.xlen(STREAM) == 0  # every job finished
    count, size = await stored_record_bytes(redis_client)
    assert count == 10 and size <= BOUND, (count, size)
    # The index agrees with what is stored: nothing pending, and the finished bytes.
    usage = await redis_client.hgetall("proxy:usage")
    assert int(usage["pending"]) == 0 and int(usage["done"]) == size
    assert await redis_client.zcard("proxy:done") == await redis_client.hlen("proxy:sizes") == 10


# -- settings ----------------------------------------------------------------------------


def test_max_job_bytes_must_hold_one_largest_job() -> None:
    settings = make_settings()
    assert settings.max_job_bytes >= 2 * settings.payload_limit
    assert settings.job_timeout > settings.request_timeout
    with pytest.raises(ValidationError, match="MAX_JOB_BYTES"):
        make_settings(max_job_bytes=3_000_000, payload_limit=2_000_000)
    with pytest.raises(ValidationError):
        make_settings(job_timeout=0)


async def test_redis_index_forgets_expired_records(
    redis_url: str, redis_client: aioredis.Redis, stores: list[JobStore]
) -> None:
    store = redis_store(redis_url, stores, max_jobs=10, max_records=100, result_ttl_s=0.3)
    await store.start(embed)
    for i in range(5):
        await wait_done(store, await store.submit(text_of(1000, i)))
    await asyncio.sleep(0.5)  # all five expired by TTL
    last = await store.submit(text_of(1000, 5))
    await wait_done(store, last)
    assert await redis_client.zrange("proxy:done", 0, -1) == [last]
    assert list(await redis_client.hgetall("proxy:sizes")) == [last]
    stored = await redis_client.strlen(f"proxy:job:{last}")
    assert int(await redis_client.hget("proxy:usage", "done")) == stored


async def test_redis_runs_jobs_queued_by_an_earlier_version(
    redis_url: str, redis_client: aioredis.Redis, stores: list[JobStore]
) -> None:
    """Entries that carried the input themselves (the earlier layout) still run."""
    record = '{"id":"legacy-job","status":"pending","input":"old text","result":null,"error":null}'
    await redis_client.set("proxy:job:legacy-job", record, px=60_000)
    await redis_client.xadd(STREAM, {"id": "legacy-job", "input": "old text"})
    store = redis_store(redis_url, stores, max_jobs=10, max_records=10)
    await store.start(embed)
    await wait_done(store, "legacy-job")
    done = await store.get("legacy-job")
    assert done == JobRecord("legacy-job", "done", "old text", fake_vector("old text"))
    assert await redis_client.xlen(STREAM) == 0
    assert (await redis_client.xpending(STREAM, GROUP))["pending"] == 0
    assert int(await redis_client.hget("proxy:usage", "pending") or 0) == 0
