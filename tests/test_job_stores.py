"""The two async job stores, against a fake processor (and a private redis-server)."""

from __future__ import annotations

import asyncio
import base64
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from proxy.errors import ApiError, ErrorType
from proxy.jobs.base import (
    JobQueueFullError,
    JobRecord,
    JobStatus,
    JobStore,
    JobStoreUnavailableError,
)
from proxy.jobs.factory import build_job_store
from proxy.jobs.memory import MemoryJobStore
from proxy.jobs.redis_store import RedisJobStore
from proxy.jobs.retry import INTERNAL_ERROR_MESSAGE
from tests.job_worker_process import fake_vector
from tests.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
STREAM, GROUP = "proxy:jobs", "proxy:workers"

StoreMaker = Callable[..., JobStore]


class FakeProcessor:
    """Embeds like a model would (deterministically), optionally slowly or failing."""

    def __init__(self, delay_s: float = 0.0, name: str = "") -> None:
        self.delay_s = delay_s
        self.name = name
        self.calls: list[str] = []
        self.running = 0
        self.most_running = 0
        self.gate: asyncio.Event | None = None

    async def __call__(
        self, text: str, deadline: float | None = None, model: str | None = None
    ) -> list[float]:
        self.calls.append(text)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.delay_s)
            if text.startswith("invalid"):
                raise ApiError(422, f"cannot embed {text}", ErrorType.VALIDATION)
            if text.startswith("crash"):
                raise RuntimeError("secret internal detail")
            return fake_vector(text)
        finally:
            self.running -= 1


async def wait_status(
    store: JobStore, prediction_id: str, status: JobStatus, limit_s: float = 5.0
) -> JobRecord:
    deadline = time.monotonic() + limit_s
    record = None
    while time.monotonic() < deadline:
        record = await store.get(prediction_id)
        if record is not None and record.status == status:
            return record
        await asyncio.sleep(0.02)
    raise AssertionError(f"{prediction_id} not {status} after {limit_s}s: {record}")


async def wait_until(check: Callable[[], Awaitable[bool]], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met after {limit_s}s")


async def wait_started(processor: FakeProcessor, count: int) -> None:
    async def started() -> bool:
        return len(processor.calls) >= count

    await wait_until(started)


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


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest, stores: list[JobStore]) -> StoreMaker:
    """Builds stores of either kind (the Redis ones on a private server)."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    def make(**kwargs: Any) -> JobStore:
        kwargs.setdefault("max_jobs", 1000)
        kwargs.setdefault("result_ttl_s", 60.0)
        kwargs.setdefault("workers", 64)
        store: JobStore
        if url is None:
            store = MemoryJobStore(**kwargs)
        else:
            store = RedisJobStore(url, **kwargs)
        stores.append(store)
        return store

    return make


def make_redis(url: str, stores: list[JobStore], **kwargs: Any) -> RedisJobStore:
    kwargs.setdefault("max_jobs", 1000)
    kwargs.setdefault("result_ttl_s", 60.0)
    kwargs.setdefault("workers", 8)
    store = RedisJobStore(url, **kwargs)
    stores.append(store)
    return store


# -- both stores -------------------------------------------------------------------------


async def test_submit_pending_then_done(make_store: StoreMaker) -> None:
    store = make_store()
    processor = FakeProcessor()
    processor.gate = asyncio.Event()
    await store.start(processor)
    prediction_id = await store.submit("hello world")
    pending = await store.get(prediction_id)
    assert pending == JobRecord(prediction_id, "pending", "hello world")
    processor.gate.set()
    done = await wait_status(store, prediction_id, "done")
    assert done.result == fake_vector("hello world")
    assert done.input == "hello world" and done.error is None


async def test_failed_processor_gives_failed_record(make_store: StoreMaker) -> None:
    store = make_store()
    await store.start(FakeProcessor())
    api_failure = await store.submit("invalid text")
    crash = await store.submit("crash now")
    record = await wait_status(store, api_failure, "failed")
    assert record.result is None
    assert record.error == {
        "error": "cannot embed invalid text",
        "error_type": "Validation",
        "status": 422,
    }
    # Unexpected exceptions give a generic message: their details stay in the log.
    record = await wait_status(store, crash, "failed")
    assert record.error == {"error": INTERNAL_ERROR_MESSAGE, "error_type": "Backend", "status": 500}


async def test_unknown_id_is_none(make_store: StoreMaker) -> None:
    store = make_store()
    await store.start(FakeProcessor())
    assert await store.get("no-such-job") is None
    assert await store.get("") is None
    assert await store.get("../../etc/passwd") is None


async def test_ids_are_unique_and_unguessable(make_store: StoreMaker) -> None:
    store = make_store()  # not started: jobs stay pending
    ids = [await store.submit(f"text {i}") for i in range(200)]
    assert len(set(ids)) == 200
    for prediction_id in ids:
        assert len(base64.urlsafe_b64decode(prediction_id + "==")) == 16  # 128 random bits
    assert sorted(ids) != ids  # not handed out in order


async def test_concurrent_jobs_run_concurrently(make_store: StoreMaker) -> None:
    store = make_store(workers=64)
    processor = FakeProcessor(delay_s=0.2)
    await store.start(processor)
    started = time.monotonic()
    ids = await asyncio.gather(*(store.submit(f"text {i}") for i in range(50)))
    for i, prediction_id in enumerate(ids):
        record = await wait_status(store, prediction_id, "done")
        assert record.result == fake_vector(f"text {i}")
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, elapsed  # one at a time would take 10 s
    assert processor.most_running >= 40  # the batcher gets to merge them


async def test_queue_full(make_store: StoreMaker) -> None:
    store = make_store(max_jobs=3)
    ids = [await store.submit(f"text {i}") for i in range(3)]
    with pytest.raises(JobQueueFullError):
        await store.submit("one too many")
    await store.start(FakeProcessor())
    for prediction_id in ids:
        await wait_status(store, prediction_id, "done")
    # Finished jobs no longer count.
    await wait_status(store, await store.submit("room again"), "done")


async def test_drain_finishes_jobs_in_hand(make_store: StoreMaker) -> None:
    store = make_store(workers=4)
    processor = FakeProcessor(delay_s=0.3)
    await store.start(processor)
    ids = [await store.submit(f"text {i}") for i in range(4)]
    await wait_started(processor, 4)
    await asyncio.wait_for(store.drain(), 5)
    for i, prediction_id in enumerate(ids):
        record = await store.get(prediction_id)
        assert record is not None and record.status == "done"
        assert record.result == fake_vector(f"text {i}")


# -- the memory store --------------------------------------------------------------------


async def test_memory_drain_finishes_every_accepted_job(stores: list[JobStore]) -> None:
    store = MemoryJobStore(max_jobs=100, result_ttl_s=60, workers=2)
    stores.append(store)
    await store.start(FakeProcessor(delay_s=0.05))
    ids = [await store.submit(f"text {i}") for i in range(10)]
    await asyncio.wait_for(store.drain(), 5)
    records = [await store.get(prediction_id) for prediction_id in ids]
    assert [r.status if r else None for r in records] == ["done"] * 10
    with pytest.raises(JobStoreUnavailableError):
        await store.submit("too late")


async def test_memory_results_expire(stores: list[JobStore]) -> None:
    store = MemoryJobStore(max_jobs=10, result_ttl_s=0.3, workers=2)
    stores.append(store)
    await store.start(FakeProcessor())
    prediction_id = await store.submit("short-lived")
    await wait_status(store, prediction_id, "done")
    await asyncio.sleep(0.4)
    assert await store.get(prediction_id) is None
    assert store._records == {}  # gone, not just hidden


async def test_memory_max_records_evicts_oldest_finished(stores: list[JobStore]) -> None:
    store = MemoryJobStore(max_jobs=3, result_ttl_s=60, workers=2, max_records=3)
    stores.append(store)
    processor = FakeProcessor()
    await store.start(processor)
    first = [await store.submit(f"text {i}") for i in range(3)]
    for prediction_id in first:
        await wait_status(store, prediction_id, "done")
    newest = await store.submit("text 3")
    assert await store.get(first[0]) is None  # the oldest finished made room
    assert await store.get(first[1]) is not None
    await wait_status(store, newest, "done")
    # Unfinished records are never evicted.
    processor.gate = asyncio.Event()
    waiting = [await store.submit(text) for text in "abc"]
    assert set(store._records) == set(waiting)
    with pytest.raises(JobQueueFullError):
        await store.submit("d")
    processor.gate.set()
    for prediction_id in waiting:
        await wait_status(store, prediction_id, "done")


def test_memory_rejects_inconsistent_bounds() -> None:
    with pytest.raises(ValueError, match="max_records"):
        MemoryJobStore(max_jobs=10, result_ttl_s=1, workers=1, max_records=5)


# -- the factory -------------------------------------------------------------------------


async def test_factory() -> None:
    options: dict[str, Any] = {
        "max_jobs": 5, "result_ttl_s": 1.0, "workers": 2, "visibility_timeout_s": 3.0
    }  # fmt: skip
    assert isinstance(build_job_store("memory", **options), MemoryJobStore)
    for url in ("redis://127.0.0.1:1/0", "rediss://example.invalid:6380", "unix:///tmp/r.sock"):
        store = build_job_store(url, **options)
        assert isinstance(store, RedisJobStore) and store.kind == "redis"
        await store.close()
    with pytest.raises(ValueError, match="unknown job store 'postgres://x'"):
        build_job_store("postgres://x", **options)


# -- the Redis store ---------------------------------------------------------------------


async def test_redis_replicas_share_work_and_answer_for_each_other(
    redis_url: str, stores: list[JobStore]
) -> None:
    processors = {name: FakeProcessor(delay_s=0.2, name=name) for name in ("a", "b")}
    replicas = {
        name: make_redis(redis_url, stores, workers=2, consumer_name=name) for name in processors
    }
    for name, replica in replicas.items():
        await replica.start(processors[name])
    ids = [await replicas["a"].submit(f"text {i}") for i in range(10)]
    for i, prediction_id in enumerate(ids):
        for replica in replicas.values():
            record = await wait_status(replica, prediction_id, "done")
            assert record.result == fake_vector(f"text {i}")
    ran = {name: len(p.calls) for name, p in processors.items()}
    assert ran["a"] + ran["b"] == 10 and ran["a"] > 0 and ran["b"] > 0, ran


async def test_redis_records_have_ttls(
    redis_url: str, redis_client: aioredis.Redis, stores: list[JobStore]
) -> None:
    store = make_redis(redis_url, stores, result_ttl_s=30)
    prediction_id = await store.submit("ttl")
    assert await redis_client.ttl(f"proxy:job:{prediction_id}") > 30  # pending: long
    await store.start(FakeProcessor())
    await wait_status(store, prediction_id, "done")
    assert 0 < await redis_client.ttl(f"proxy:job:{prediction_id}") <= 30
    # Acknowledged and deleted: the stream holds unfinished jobs only.
    assert await redis_client.xlen(STREAM) == 0
    assert (await redis_client.xpending(STREAM, GROUP))["pending"] == 0


async def test_redis_down_raises_unavailable_quickly(stores: list[JobStore]) -> None:
    store = make_redis(f"redis://127.0.0.1:{free_port()}/0", stores)
    await store.start(FakeProcessor())  # does not fail: the reader retries in the background
    started = time.monotonic()
    with pytest.raises(JobStoreUnavailableError):
        await store.submit("nobody home")
    with pytest.raises(JobStoreUnavailableError):
        await store.get("abc")
    assert not await store.healthy()
    assert time.monotonic() - started < 3


async def test_redis_unresponsive_times_out(stores: list[JobStore]) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, never answer
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        store = make_redis(f"redis://127.0.0.1:{port}/0", stores, socket_timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(JobStoreUnavailableError):
            await asyncio.wait_for(store.submit("hello?"), 5)
        assert not await asyncio.wait_for(store.healthy(), 5)
        assert time.monotonic() - started < 4
    finally:
        server.close()


async def test_redis_consumer_survives_a_redis_restart(
    redis_server: RedisServer, stores: list[JobStore]
) -> None:
    store = make_redis(redis_server.url, stores)
    await store.start(FakeProcessor())
    await wait_status(store, await store.submit("before"), "done")
    redis_server.stop()
    with pytest.raises(JobStoreUnavailableError):
        await store.submit("while down")
    await asyncio.sleep(0.5)  # the reader is failing and backing off meanwhile
    redis_server.start()  # same port, empty: the group must be recreated
    await wait_status(store, await store.submit("after"), "done", limit_s=10)


async def test_redis_long_job_is_not_stolen_from_a_live_replica(
    redis_url: str, stores: list[JobStore]
) -> None:
    processors = [FakeProcessor(delay_s=2.0), FakeProcessor(delay_s=2.0)]
    for i, processor in enumerate(processors):
        replica = make_redis(redis_url, stores, visibility_timeout_s=0.5, consumer_name=f"r{i}")
        await replica.start(processor)
    prediction_id = await replica.submit("slow")
    await wait_status(replica, prediction_id, "done")
    # 4x the visibility timeout, yet run once: the owner kept refreshing its claim.
    assert sum(len(p.calls) for p in processors) == 1


async def test_redis_first_final_record_wins(redis_url: str, stores: list[JobStore]) -> None:
    store = make_redis(redis_url, stores)
    await store.start(FakeProcessor())
    prediction_id = await store.submit("twice")
    done = await wait_status(store, prediction_id, "done")
    # A second run of the job (re-claimed from a replica that stalled) finishing late.
    late = JobRecord(prediction_id, "failed", "twice", error={"error": "late", "status": 500})
    await store._store("0-1", prediction_id, late)
    assert await store.get(prediction_id) == done


async def test_redis_job_delivered_too_often_fails(
    redis_url: str, redis_client: aioredis.Redis, stores: list[JobStore]
) -> None:
    store = make_redis(redis_url, stores, visibility_timeout_s=0.3, max_deliveries=2)
    prediction_id = await store.submit("unlucky")
    # A "replica" that takes the job twice and dies each time.
    await redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    read: Any = await redis_client.xreadgroup(GROUP, "ghost", {STREAM: ">"}, count=1)
    entry_id: str = read[0][1][0][0]
    await redis_client.xclaim(STREAM, GROUP, "ghost", 0, [entry_id])
    await asyncio.sleep(0.4)
    processor = FakeProcessor()
    await store.start(processor)
    record = await wait_status(store, prediction_id, "failed")
    assert record.error is not None and record.error["status"] == 500
    assert "abandoned after 2 attempts" in record.error["error"]
    assert processor.calls == []
    assert (await redis_client.xpending(STREAM, GROUP))["pending"] == 0
    assert await redis_client.xlen(STREAM) == 0


async def test_redis_drain_leaves_unread_jobs_for_other_replicas(
    redis_url: str, redis_client: aioredis.Redis, stores: list[JobStore]
) -> None:
    first = make_redis(redis_url, stores, workers=2, consumer_name="first")
    processor = FakeProcessor(delay_s=0.3)
    await first.start(processor)
    ids = [await first.submit(f"text {i}") for i in range(4)]
    await wait_started(processor, 2)
    await asyncio.wait_for(first.drain(), 5)
    statuses = [(await first.get(prediction_id)) for prediction_id in ids]
    assert sorted(r.status for r in statuses if r) == ["done", "done", "pending", "pending"]
    assert (await redis_client.xpending(STREAM, GROUP))["pending"] == 0  # nothing held
    assert await redis_client.xlen(STREAM) == 2
    second = make_redis(redis_url, stores, consumer_name="second")
    await second.start(FakeProcessor())
    for i, prediction_id in enumerate(ids):
        record = await wait_status(second, prediction_id, "done")
        assert record.result == fake_vector(f"text {i}")


async def test_redis_jobs_of_a_killed_replica_are_finished_by_another(
    redis_url: str, redis_client: aioredis.Redis, stores: list[JobStore]
) -> None:
    submitter = make_redis(redis_url, stores, key_prefix="crash")
    texts = [f"job {i}" for i in range(5)]
    ids = [await submitter.submit(text) for text in texts]
    victim = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.job_worker_process", redis_url, "crash", "victim", "2.0", "3",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert victim.stdout is not None
        assert await asyncio.wait_for(victim.stdout.readline(), 15) == b"ready\n"

        async def victim_holds_three() -> bool:
            try:
                summary = await redis_client.xpending("crash:jobs", "crash:workers")
            except ResponseError:  # the victim has not created the group yet
                return False
            return bool(summary["consumers"] == [{"name": "victim", "pending": 3}])

        await wait_until(victim_holds_three)
    finally:
        victim.send_signal(signal.SIGKILL)
        await asyncio.wait_for(victim.wait(), 5)
    assert victim.returncode == -signal.SIGKILL
    assert [(await submitter.get(i)).status for i in ids] == ["pending"] * 5  # type: ignore[union-attr]

    rescuer_processor = FakeProcessor()
    rescuer = make_redis(
        redis_url, stores, key_prefix="crash", consumer_name="rescuer", visibility_timeout_s=1.0
    )
    await rescuer.start(rescuer_processor)
    for text, prediction_id in zip(texts, ids, strict=True):
        record = await wait_status(submitter, prediction_id, "done", limit_s=15)
        assert record.result == fake_vector(text)
    assert sorted(rescuer_processor.calls) == texts  # including the 3 the victim held
    assert (await redis_client.xpending("crash:jobs", "crash:workers"))["pending"] == 0
    assert await redis_client.xlen("crash:jobs") == 0
