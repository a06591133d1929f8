"""Shadow traffic: a copy of some requests sent to another version of the same model after
the caller was answered, to compare the two versions' vectors on real inputs.

The caller never waits for it and never sees its faults: a request is only offered here
(``put_nowait`` into a small queue of its own) once its own vectors are in hand, and a few
worker tasks send the copies later. Under load the shadow work goes first: a full queue drops
new copies, and a copy whose target version already holds half its queue bound is dropped
rather than queued in front of that version's own callers. Each pair (model, primary version,
shadow version) gets its latency, its outcomes and the cosine between the two vectors of
every input as metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.context import RequestContext
from proxy.errors import ApiError
from proxy.metrics import Metrics
from proxy.service import EmbeddingService
from proxy.upstream.base import EmbedInput, EmbedOptions, Vector

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ShadowJob:
    model: str
    version: str  # the primary's
    shadow_version: str
    inputs: Sequence[EmbedInput]
    options: EmbedOptions
    primary: Sequence[Vector]  # one per input
    request_id: str


def cosine(a: Vector, b: Vector) -> float | None:
    """Cosine similarity, or None when it is undefined (other dimensions, a zero vector)."""
    if len(a) != len(b):
        return None
    dot = na = nb = 0.0
    for x, y in zip(a, b, strict=True):
        dot += x * y
        na += x * x
        nb += y * y
    if na == 0.0 or nb == 0.0:
        return None
    return dot / math.sqrt(na * nb)


# Finds the service of a version that is ready to take traffic, or None.
Lookup = Callable[[str, str], EmbeddingService | None]


class ShadowRunner:
    def __init__(
        self, lookup: Lookup, metrics: Metrics, *, queue_size: int, concurrency: int
    ) -> None:
        self._lookup = lookup
        self._metrics = metrics
        self._queue: asyncio.Queue[ShadowJob] = asyncio.Queue(queue_size)
        self._concurrency = concurrency
        self._workers: list[asyncio.Task[None]] = []
        self._stopped = False

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"shadow-{i}") for i in range(self._concurrency)
        ]

    def offer(self, job: ShadowJob) -> None:
        """Queue a copy if there is room; never waits, never raises."""
        if self._stopped:
            self._count(job, "dropped")
            return
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._count(job, "dropped")

    async def close(self) -> None:
        """Stop: copies still queued are dropped, the ones in flight cancelled."""
        self._stopped = True
        workers, self._workers = self._workers, []
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        while not self._queue.empty():
            self._count(self._queue.get_nowait(), "dropped")

    def _count(self, job: ShadowJob, outcome: str) -> None:
        self._metrics.shadow_requests.labels(
            job.model, job.version, job.shadow_version, outcome
        ).inc()

    async def _work(self) -> None:
        while not self._stopped:
            job = await self._queue.get()
            try:
                await self._run(job)
            except Exception:  # a shadow fault must never end the worker
                log.exception("shadow request %s failed unexpectedly", job.request_id)

    async def _run(self, job: ShadowJob) -> None:
        service = self._lookup(job.model, job.shadow_version)
        if service is None or 2 * service.queue_depth >= service.config.max_queue_size:
            self._count(job, "dropped")  # gone, or busy with its own callers
            return
        ctx = RequestContext.internal(
            timeout_s=service.config.request_timeout,
            requested_model=f"{job.model}@{job.shadow_version}",
            request_id=job.request_id,
        )
        ctx.model, ctx.version = job.model, job.shadow_version
        labels = (job.model, job.version, job.shadow_version)
        started = time.perf_counter()
        try:
            vectors = await service.embed(job.inputs, job.options, ctx)
        except ApiError as exc:
            log.debug("shadow request %s to %s failed: %s", job.request_id, service.label, exc)
            self._count(job, "error")
            return
        finally:
            self._metrics.shadow_duration.labels(*labels).observe(time.perf_counter() - started)
        histogram = self._metrics.shadow_cosine.labels(*labels)
        for primary, shadow in zip(job.primary, vectors, strict=True):
            similarity = cosine(primary, shadow)
            if similarity is not None:
                histogram.observe(similarity)
        self._count(job, "ok")
