"""Async jobs and temporary faults: a job that meets a 429, 502, 503 or 504 is retried with
backoff within its lifetime (JOB_TIMEOUT); a fault of the input itself fails it at once.

Both stores against a fake processor (the Redis one on a private redis-server), then end to
end through the proxy in front of the TEI double.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.errors import ApiError, ErrorType
from proxy.jobs.base import JobRecord, JobStatus, JobStore
from proxy.jobs.memory import MemoryJobStore
from proxy.jobs.redis_store import RedisJobStore
from tests.conftest import ProxyFactory
from tests.job_worker_process import fake_vector
from tests.tei_double import Fault, TeiDouble, expected_vector

STREAM, GROUP = "proxy:jobs", "proxy:workers"
ERROR_TYPES = {
    400: ErrorType.EMPTY,
    413: ErrorType.VALIDATION,
    422: ErrorType.VALIDATION,
    429: ErrorType.OVERLOADED,
    500: ErrorType.BACKEND,
    502: ErrorType.UPSTREAM,
    503: ErrorType.UNHEALTHY,
    504: ErrorType.TIMEOUT,
}


def options(**kwargs: Any) -> dict[str, Any]:
    """Store options; short retry waits so tests see several retries quickly."""
    kwargs.setdefault("retry_first_s", 0.02)
    kwargs.setdefault("retry_cap_s", 0.1)
    return kwargs


class FlakyProcessor:
    """Fails ``failures`` times (None: always) with ``status``, then embeds like a model."""

    def __init__(self, status: int, failures: int | None) -> None:
        self.status = status
        self.failures = failures
        self.calls: list[str] = []
        self.deadlines: list[float | None] = []
        self.called = asyncio.Event()

    async def __call__(
        self, text: str, deadline: float | None = None, model: str | None = None
    ) -> list[float]:
        self.calls.append(text)
        self.deadlines.append(deadline)
        self.called.set()
        await asyncio.sleep(0)
        if self.failures is None or len(self.calls) <= self.failures:
            n = len(self.calls)
            raise ApiError(self.status, f"fault number {n}", ERROR_TYPES[self.status])
        return fake_vector(text)


async def wait_status(
    store: JobStore, prediction_id: str, status: JobStatus, limit_s: float = 10.0
) -> JobRecord:
    deadline = time.monotonic() + limit_s
    record = None
    while time.monotonic() < deadline:
        record = await store.get(prediction_id)
        if record is not None and record.status != "pending":
            break
        await asyncio.sleep(0.02)
    assert record is not None and record.status == status, record
    return record


@pytest.fixture
async def stores() -> AsyncIterator[list[JobStore]]:
    made: list[JobStore] = []
    yield made
    for store in made:
        await asyncio.wait_for(store.close(), 10)


StoreMaker = Callable[..., JobStore]


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest, stores: list[JobStore]) -> StoreMaker:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    def make(**kwargs: Any) -> JobStore:
        kwargs = options(**kwargs)
        kwargs.setdefault("max_jobs", 100)
        kwargs.setdefault("result_ttl_s", 60.0)
        kwargs.setdefault("workers", 8)
        store: JobStore = MemoryJobStore(**kwargs) if url is None else RedisJobStore(url, **kwargs)
        stores.append(store)
        return store

    return make


# -- both stores -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_temporary_fault_is_retried_until_the_job_succeeds(
    make_store: StoreMaker, status: int
) -> None:
    store = make_store()
    processor = FlakyProcessor(status, failures=3)
    await store.start(processor)
    prediction_id = await store.submit("try again")
    record = await wait_status(store, prediction_id, "done")
    assert record.result == fake_vector("try again")
    assert record.error is None
    assert processor.calls == ["try again"] * 4  # three faults, then the answer


@pytest.mark.parametrize("status", [400, 413, 422, 500])
async def test_fault_of_the_input_fails_the_job_at_once(
    make_store: StoreMaker, status: int
) -> None:
    store = make_store()
    processor = FlakyProcessor(status, failures=None)
    await store.start(processor)
    prediction_id = await store.submit("bad input")
    record = await wait_status(store, prediction_id, "failed")
    assert record.error == {
        "error": "fault number 1",
        "error_type": str(ERROR_TYPES[status]),
        "status": status,
    }
    await asyncio.sleep(0.3)  # several retry waits: none may follow
    assert processor.calls == ["bad input"]


async def test_temporary_fault_past_the_jobs_lifetime_fails_with_the_last_cause(
    make_store: StoreMaker,
) -> None:
    store = make_store(job_timeout_s=0.6)
    processor = FlakyProcessor(503, failures=None)
    await store.start(processor)
    submitted = time.monotonic()
    prediction_id = await store.submit("never works")
    record = await wait_status(store, prediction_id, "failed")
    attempts = len(processor.calls)
    assert attempts >= 2  # retried meanwhile
    assert record.error == {
        "error": f"fault number {attempts}",
        "error_type": "Unhealthy",
        "status": 503,
    }
    # Every attempt was bounded by the job's own deadline, not only by REQUEST_TIMEOUT.
    assert all(d is not None and d <= submitted + 0.6 + 0.05 for d in processor.deadlines)
    await asyncio.sleep(0.3)
    assert len(processor.calls) == attempts  # failed for good: no retries after


async def test_job_left_queued_past_its_lifetime_fails_without_running(
    make_store: StoreMaker,
) -> None:
    store = make_store(job_timeout_s=0.2)
    prediction_id = await store.submit("too late")  # not started: nobody runs it yet
    await asyncio.sleep(0.4)
    processor = FlakyProcessor(503, failures=0)
    await store.start(processor)
    record = await wait_status(store, prediction_id, "failed")
    assert record.error is not None
    assert record.error["status"] == 504 and record.error["error_type"] == "Timeout"
    assert "JOB_TIMEOUT" in record.error["error"]
    assert processor.calls == []


# -- the memory store --------------------------------------------------------------------


async def test_memory_drain_fails_a_job_waiting_to_retry(stores: list[JobStore]) -> None:
    # Nobody else could run it, and its result dies with the process: answer now.
    store = MemoryJobStore(**options(max_jobs=10, result_ttl_s=60, workers=2, retry_first_s=30))
    stores.append(store)
    processor = FlakyProcessor(503, failures=None)
    await store.start(processor)
    prediction_id = await store.submit("in a retry wait")
    await asyncio.wait_for(processor.called.wait(), 5)
    await asyncio.wait_for(store.drain(), 5)
    record = await store.get(prediction_id)
    assert record is not None and record.status == "failed"
    assert record.error == {"error": "fault number 1", "error_type": "Unhealthy", "status": 503}


# -- the Redis store ---------------------------------------------------------------------


async def test_redis_retrying_job_is_not_reclaimed_by_another_replica(
    redis_url: str, stores: list[JobStore]
) -> None:
    """A job in its retry waits is still held: the ownership refresh covers the waits."""
    failing_until = time.monotonic() + 2.0  # four visibility timeouts

    class UntilThen(FlakyProcessor):
        async def __call__(
            self, text: str, deadline: float | None = None, model: str | None = None
        ) -> list[float]:
            if time.monotonic() >= failing_until:
                self.failures = 0
            return await super().__call__(text, deadline)

    processors = [UntilThen(503, failures=None), UntilThen(503, failures=None)]
    for i, processor in enumerate(processors):
        replica = RedisJobStore(
            redis_url,
            **options(max_jobs=10, result_ttl_s=60, workers=2, visibility_timeout_s=0.5),
            consumer_name=f"r{i}",
        )
        stores.append(replica)
        await replica.start(processor)
    prediction_id = await replica.submit("flaky for a while")
    record = await wait_status(replica, prediction_id, "done")
    assert record.result == fake_vector("flaky for a while")
    ran = sorted(len(p.calls) for p in processors)
    assert ran[0] == 0 and ran[1] >= 3, ran  # one replica did every attempt


async def test_redis_drain_hands_a_retrying_job_to_another_replica(
    redis_url: str, stores: list[JobStore]
) -> None:
    first = RedisJobStore(
        redis_url, **options(max_jobs=10, result_ttl_s=60, workers=2, retry_first_s=30)
    )
    stores.append(first)
    failing = FlakyProcessor(503, failures=None)
    await first.start(failing)
    prediction_id = await first.submit("hand me over")
    await asyncio.wait_for(failing.called.wait(), 5)
    await asyncio.wait_for(first.drain(), 5)
    record = await first.get(prediction_id)
    assert record is not None and record.status == "pending"  # not failed: handed back
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert await client.xlen(STREAM) == 1
        assert (await client.xpending(STREAM, GROUP))["pending"] == 0  # nobody holds it
    finally:
        await client.aclose()
    second = RedisJobStore(redis_url, **options(max_jobs=10, result_ttl_s=60, workers=2))
    stores.append(second)
    await second.start(FlakyProcessor(503, failures=0))
    done = await wait_status(second, prediction_id, "done")
    assert done.result == fake_vector("hand me over")


# -- end to end --------------------------------------------------------------------------


async def poll(client: Any, prediction_id: str, limit_s: float) -> Any:
    deadline = time.monotonic() + limit_s
    while True:
        resp = await client.get(f"/predict/{prediction_id}")
        if resp.status != 400:  # 400: still being processed
            return resp
        assert time.monotonic() < deadline, "job never finished"
        await asyncio.sleep(0.05)


async def test_async_job_rides_out_dropped_connections_and_an_open_breaker(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    # No retries inside the service, and a breaker that opens after two faults: the job
    # meets 502s, then the breaker's 503s, and must still finish once TEI recovers.
    client = await start_proxy(upstream_retries=0, breaker_threshold=2, breaker_cooldown=0.2)
    tei_double.set_fault(Fault.DROP, times=4)
    resp = await client.post("/predict", json={"input": "patience"}, headers={"Async-Mode": "true"})
    assert resp.status == 202
    prediction_id = (await resp.json())["prediction_id"]
    done = await poll(client, prediction_id, limit_s=60)
    assert done.status == 200, await done.text()
    body = await done.json()
    assert body["prediction_id"] == prediction_id
    assert body["output"]["input"] == "patience"
    assert body["output"]["result"] == pytest.approx(expected_vector("patience"), rel=1e-5)
    assert tei_double.fault is Fault.NONE  # every injected fault was met


async def test_async_job_failing_with_a_backend_error_is_424_at_once(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(upstream_retries=0)
    # TEI's 500, once the service's own retries (UPSTREAM_RETRIES) are spent, is final.
    tei_double.set_fault(Fault.ERROR_500)
    resp = await client.post("/predict", json={"input": "doomed"}, headers={"Async-Mode": "1"})
    prediction_id = (await resp.json())["prediction_id"]
    failed = await poll(client, prediction_id, limit_s=10)
    assert failed.status == 424
    body = await failed.json()
    assert body["status"] == "failed" and "injected failure" in body["error"]
    await asyncio.sleep(0.5)
    assert len(tei_double.calls) == 1  # not retried
