"""A job store in this process's memory: bounded, fast, and lost on restart."""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from proxy.jobs.base import (
    JobQueueFullError,
    JobRecord,
    JobStatus,
    JobStoreUnavailableError,
    Processor,
)
from proxy.jobs.retry import INTERNAL_ERROR_MESSAGE, Outcome, attempt_job, error_for

__all__ = ["INTERNAL_ERROR_MESSAGE", "MemoryJobStore", "error_for", "new_prediction_id"]

log = logging.getLogger(__name__)

# Room held for the result of each unfinished job until a result has been measured: a
# 1024-float vector. Afterwards the largest result so far.
DEFAULT_RESULT_RESERVE = sys.getsizeof(array("d", bytes(8 * 1024)))


def new_prediction_id() -> str:
    # 128 random bits: ids double as the only access control on results.
    return secrets.token_urlsafe(16)


@dataclass(slots=True)
class _Job:
    input: str
    deadline: float  # time.monotonic() by which the job ends, done or failed
    input_bytes: int
    model: str | None = None
    status: JobStatus = "pending"
    # 8 bytes a float; a list of floats would take 32.
    result: array[float] | None = None
    error: dict[str, Any] | None = None
    size: int = 0  # input and result (or error) bytes, once finished

    def record(self, prediction_id: str) -> JobRecord:
        result = self.result.tolist() if self.result is not None else None
        return JobRecord(prediction_id, self.status, self.input, result, self.error, self.model)


class MemoryJobStore:
    """Jobs and results held in a dict, run by ``workers`` tasks that all call the processor
    concurrently (so the batcher can merge them).

    Everything is lost when the process stops: a restart forgets every job, finished or
    not. ``drain()`` finishes all accepted jobs, so a graceful shutdown loses none that
    were accepted, but their results go away with the process. A job waiting to retry a
    temporary fault when the drain begins is failed with that fault: nobody else could run
    it, and its client learns at once instead of at the end of its lifetime.

    Bounds: at most ``max_jobs`` unfinished jobs; (if ``max_records`` is set) at most
    ``max_records`` records overall; (if ``max_bytes`` is set) at most ``max_bytes`` of
    inputs and results, counted as held: an input as its ``str`` (``sys.getsizeof``), a
    result as 8 bytes a float. Each unfinished job also holds room for its result, as large
    as the largest result so far, so finishing it does not break the bound. Past a bound
    the oldest finished records are evicted; a job whose input would not fit beside the
    unfinished ones is refused (JobQueueFullError). Finished records expire ``result_ttl_s``
    after they finish; since the TTL is the same for all, finishing order is expiry order,
    so expired records are dropped from the front of an ordered dict on every access, with
    no timer per job.
    """

    kind = "memory"

    def __init__(
        self,
        *,
        max_jobs: int,
        result_ttl_s: float,
        workers: int,
        max_records: int | None = None,
        max_bytes: int | None = None,
        job_timeout_s: float = 600.0,
        retry_first_s: float = 0.25,
        retry_cap_s: float = 10.0,
    ) -> None:
        if max_jobs < 1 or workers < 1 or result_ttl_s <= 0 or job_timeout_s <= 0:
            raise ValueError(
                "max_jobs and workers must be >= 1, result_ttl_s and job_timeout_s > 0"
            )
        if max_records is not None and max_records < max_jobs:
            raise ValueError(f"max_records ({max_records}) must be >= max_jobs ({max_jobs})")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._max_jobs = max_jobs
        self._result_ttl_s = result_ttl_s
        self._workers = workers
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._job_timeout_s = job_timeout_s
        self._retry = (retry_first_s, retry_cap_s)
        self._records: dict[str, _Job] = {}
        # id -> expiry time (monotonic), in the order the jobs finished.
        self._finished: OrderedDict[str, float] = OrderedDict()
        self._unfinished = 0
        self._pending_bytes = 0  # inputs of unfinished jobs
        self._done_bytes = 0  # inputs and results of finished ones
        self._reserve = DEFAULT_RESULT_RESERVE
        self._reserve_measured = False
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._processor: Processor | None = None
        self._stopping = asyncio.Event()  # draining or closed: no new jobs, no retry waits
        self._stopped = False

    async def start(self, processor: Processor) -> None:
        if self._processor is not None:
            raise RuntimeError("job store already started")
        self._processor = processor
        self._tasks = [
            asyncio.create_task(self._work(), name=f"memory-job-worker-{i}")
            for i in range(self._workers)
        ]

    async def submit(self, text: str, model: str | None = None) -> str:
        if self._stopping.is_set():
            # An accepted job would die with the process.
            raise JobStoreUnavailableError("job store is shutting down")
        now = time.monotonic()
        self._expire(now)
        if self._unfinished >= self._max_jobs:
            raise JobQueueFullError(f"{self._unfinished} unfinished jobs (max_jobs)")
        size = sys.getsizeof(text)
        if self._max_bytes is not None:
            held = self._pending_bytes + size + (self._unfinished + 1) * self._reserve
            if held > self._max_bytes:
                raise JobQueueFullError(
                    f"unfinished jobs would hold {held} bytes (max_bytes {self._max_bytes})"
                )
        prediction_id = new_prediction_id()
        self._records[prediction_id] = _Job(text, now + self._job_timeout_s, size, model)
        self._unfinished += 1
        self._pending_bytes += size
        # Fits once finished records give way: unfinished ones alone fit, checked above.
        self._evict_past_bounds(keep=None)
        self._queue.put_nowait(prediction_id)
        return prediction_id

    async def get(self, prediction_id: str) -> JobRecord | None:
        self._expire(time.monotonic())
        job = self._records.get(prediction_id)
        return job.record(prediction_id) if job is not None else None

    async def healthy(self) -> bool:
        return True

    async def drain(self) -> None:
        self._stopping.set()
        if self._tasks:
            await self._queue.join()
        elif self._unfinished:
            log.warning("draining a job store that never started: %d jobs", self._unfinished)
        await self._stop_workers()

    async def close(self) -> None:
        self._stopping.set()
        await self._stop_workers()

    async def _stop_workers(self) -> None:
        self._stopped = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _committed_bytes(self) -> int:
        return self._pending_bytes + self._done_bytes + self._unfinished * self._reserve

    def _evict_oldest_finished(self) -> None:
        prediction_id, _ = self._finished.popitem(last=False)
        job = self._records.pop(prediction_id)
        self._done_bytes -= job.size

    def _evict_past_bounds(self, keep: str | None) -> None:
        """Evict the oldest finished records while a bound is exceeded, but never ``keep``
        (a record that just finished: its client has not seen it yet)."""
        while self._finished and next(iter(self._finished)) != keep:
            over_records = self._max_records is not None and (
                len(self._records) > self._max_records
            )
            over_bytes = self._max_bytes is not None and (self._committed_bytes() > self._max_bytes)
            if not (over_records or over_bytes):
                return
            self._evict_oldest_finished()

    def _expire(self, now: float) -> None:
        finished = self._finished
        while finished:
            _, expires_at = next(iter(finished.items()))
            if expires_at > now:
                break
            self._evict_oldest_finished()

    async def _work(self) -> None:
        # Not `while True`: should a processor swallow our cancellation, the worker still ends.
        while not self._stopped:
            prediction_id = await self._queue.get()
            try:
                await self._run(prediction_id)
            finally:
                self._queue.task_done()

    async def _run(self, prediction_id: str) -> None:
        job = self._records.get(prediction_id)
        assert job is not None and self._processor is not None  # unfinished: never evicted
        first_s, cap_s = self._retry
        outcome = await attempt_job(
            self._processor,
            prediction_id,
            job.input,
            model=job.model,
            deadline=job.deadline,
            job_timeout_s=self._job_timeout_s,
            stopping=self._stopping,
            retry_first_s=first_s,
            retry_cap_s=cap_s,
        )
        self._finish(prediction_id, job, outcome)

    def _finish(self, prediction_id: str, job: _Job, outcome: Outcome) -> None:
        # An interrupted job (draining during a retry wait) fails with its last cause.
        size = job.input_bytes
        if outcome.result is not None:
            job.status, job.result = "done", array("d", outcome.result)
            result_bytes = sys.getsizeof(job.result)
            size += result_bytes
            self._learn_reserve(result_bytes)
        else:
            job.status, job.error = "failed", outcome.error or error_for(RuntimeError())
            size += sys.getsizeof(job.error.get("error", ""))
        job.size = size
        self._unfinished -= 1
        self._pending_bytes -= job.input_bytes
        self._done_bytes += size
        self._finished[prediction_id] = time.monotonic() + self._result_ttl_s
        self._evict_past_bounds(keep=prediction_id)

    def _learn_reserve(self, result_bytes: int) -> None:
        # The default is a guess until a result is measured; one model's results are all
        # alike, so the largest seen is what later ones need.
        if self._reserve_measured:
            self._reserve = max(self._reserve, result_bytes)
        else:
            self._reserve, self._reserve_measured = result_bytes, True
