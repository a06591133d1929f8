"""A job store in this process's memory: bounded, fast, and lost on restart."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from typing import Any

from proxy.errors import ApiError, ErrorType
from proxy.jobs.base import (
    JobQueueFullError,
    JobRecord,
    JobStoreUnavailableError,
    Processor,
)

log = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "Internal error while processing the job"


def new_prediction_id() -> str:
    # 128 random bits: ids double as the only access control on results.
    return secrets.token_urlsafe(16)


def error_for(exc: Exception) -> dict[str, Any]:
    """The ``error`` field of a failed record; details of unexpected faults stay in the log."""
    if isinstance(exc, ApiError):
        return {"error": exc.message, "error_type": exc.error_type, "status": exc.status}
    return {"error": INTERNAL_ERROR_MESSAGE, "error_type": str(ErrorType.BACKEND), "status": 500}


class MemoryJobStore:
    """Jobs and results held in a dict, run by ``workers`` tasks that all call the processor
    concurrently (so the batcher can merge them).

    Everything is lost when the process stops: a restart forgets every job, finished or
    not. ``drain()`` finishes all accepted jobs, so a graceful shutdown loses none that
    were accepted, but their results go away with the process.

    Bounds: at most ``max_jobs`` unfinished jobs, and (if ``max_records`` is set) at most
    ``max_records`` records overall, the oldest finished ones evicted first. Finished records
    expire ``result_ttl_s`` after they finish; since the TTL is the same for all, finishing
    order is expiry order, so expired records are dropped from the front of an ordered dict
    on every access, with no timer per job.
    """

    kind = "memory"

    def __init__(
        self,
        *,
        max_jobs: int,
        result_ttl_s: float,
        workers: int,
        max_records: int | None = None,
    ) -> None:
        if max_jobs < 1 or workers < 1 or result_ttl_s <= 0:
            raise ValueError("max_jobs and workers must be >= 1 and result_ttl_s > 0")
        if max_records is not None and max_records < max_jobs:
            raise ValueError(f"max_records ({max_records}) must be >= max_jobs ({max_jobs})")
        self._max_jobs = max_jobs
        self._result_ttl_s = result_ttl_s
        self._workers = workers
        self._max_records = max_records
        self._records: dict[str, JobRecord] = {}
        # id -> expiry time (monotonic), in the order the jobs finished.
        self._finished: OrderedDict[str, float] = OrderedDict()
        self._unfinished = 0
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._processor: Processor | None = None
        self._draining = False
        self._stopped = False

    async def start(self, processor: Processor) -> None:
        if self._processor is not None:
            raise RuntimeError("job store already started")
        self._processor = processor
        self._tasks = [
            asyncio.create_task(self._work(), name=f"memory-job-worker-{i}")
            for i in range(self._workers)
        ]

    async def submit(self, text: str) -> str:
        if self._draining:
            # An accepted job would die with the process.
            raise JobStoreUnavailableError("job store is shutting down")
        self._expire(time.monotonic())
        if self._unfinished >= self._max_jobs:
            raise JobQueueFullError(f"{self._unfinished} unfinished jobs (max_jobs)")
        if self._max_records is not None and len(self._records) >= self._max_records:
            # Some record is finished, as max_records >= max_jobs > unfinished.
            evicted, _ = self._finished.popitem(last=False)
            del self._records[evicted]
        prediction_id = new_prediction_id()
        self._records[prediction_id] = JobRecord(prediction_id, "pending", text)
        self._unfinished += 1
        self._queue.put_nowait(prediction_id)
        return prediction_id

    async def get(self, prediction_id: str) -> JobRecord | None:
        self._expire(time.monotonic())
        return self._records.get(prediction_id)

    async def healthy(self) -> bool:
        return True

    async def drain(self) -> None:
        self._draining = True
        if self._tasks:
            await self._queue.join()
        elif self._unfinished:
            log.warning("draining a job store that never started: %d jobs", self._unfinished)
        await self._stop_workers()

    async def close(self) -> None:
        self._draining = True
        await self._stop_workers()

    async def _stop_workers(self) -> None:
        self._stopped = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _expire(self, now: float) -> None:
        finished = self._finished
        while finished:
            prediction_id, expires_at = next(iter(finished.items()))
            if expires_at > now:
                break
            finished.popitem(last=False)
            self._records.pop(prediction_id, None)

    async def _work(self) -> None:
        # Not `while True`: should a processor swallow our cancellation, the worker still ends.
        while not self._stopped:
            prediction_id = await self._queue.get()
            try:
                await self._run(prediction_id)
            finally:
                self._queue.task_done()

    async def _run(self, prediction_id: str) -> None:
        record = self._records.get(prediction_id)
        assert record is not None and self._processor is not None  # unfinished: never evicted
        try:
            vector = await self._processor(record.input)
            done = JobRecord(prediction_id, "done", record.input, result=[float(x) for x in vector])
        except Exception as exc:
            if not isinstance(exc, ApiError):
                log.exception("job %s failed unexpectedly", prediction_id)
            done = JobRecord(prediction_id, "failed", record.input, error=error_for(exc))
        self._records[prediction_id] = done
        self._unfinished -= 1
        self._finished[prediction_id] = time.monotonic() + self._result_ttl_s
