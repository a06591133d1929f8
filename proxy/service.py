"""One model's embedding service: validation, the batcher and the upstream behind it.

The HTTP layer calls :meth:`EmbeddingService.embed` with parsed inputs; it never sees the
batcher. The batcher never sees HTTP. This is the only place that knows both the upstream's
limits and the batching settings. It has three parts: the input rules (``validate``), the
resilient upstream (:class:`proxy.resilience.ResilientUpstream`: retries, breaker, replica
choice) and the bisector (``_process``), which finds the items an upstream refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy import errors
from proxy.batcher import (
    Batcher,
    BatcherClosedError,
    BatcherConfig,
    BatchObserver,
    BatchResultMismatchError,
    DeadlineExceededError,
    QueueFullError,
)
from proxy.errors import ApiError
from proxy.metrics import Metrics
from proxy.resilience import (
    CircuitBreaker,
    Fault,
    ResilienceConfig,
    ResilientUpstream,
    classify,
)
from proxy.settings import Settings
from proxy.token_ids import fit_token_ids
from proxy.tracing import RequestSpan, Tracing
from proxy.upstream.base import EmbedInput, EmbedOptions, Upstream, UpstreamInfo, Vector

log = logging.getLogger(__name__)

# TEI's MAX_CHAR_MULTIPLIER: with truncation off, inputs over max_input_length * 250
# characters are refused before tokenisation (core/src/tokenization.rs).
TEI_MAX_CHAR_MULTIPLIER = 250
# A harmless input for telling a batch-wide refusal from two items refused alike.
_PROBE_INPUT = "a"


@dataclass(frozen=True, slots=True)
class _Item:
    input: EmbedInput
    options: EmbedOptions
    deadline: float
    # The request's span (tracing on), and when the item was queued, for its queue wait.
    trace: RequestSpan | None = None
    queued_at: float = 0.0


class _MetricsObserver(BatchObserver):
    def __init__(self, metrics: Metrics, model: str) -> None:
        self._size = metrics.batch_size.labels(model)
        self._chars = metrics.batch_chars.labels(model)
        self._wait = metrics.queue_wait.labels(model)
        self._dropped = metrics.dropped_items
        self._model = model

    def batch_dispatched(self, size: int, cost: float, oldest_wait_s: float) -> None:
        self._size.observe(size)
        self._chars.observe(cost)
        self._wait.observe(oldest_wait_s)

    def item_dropped(self, reason: str) -> None:
        self._dropped.labels(self._model, reason).inc()


class _UpstreamMetrics:
    """Metrics for :class:`ResilientUpstream` (a :class:`proxy.resilience.CallObserver`)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._duration = metrics.upstream_duration.labels(model)
        self._calls = metrics.upstream_calls
        self._retries = metrics.upstream_retries
        self._breaker_opened = metrics.breaker_opened.labels(model)
        self._model = model

    def call_finished(self, outcome: str, seconds: float) -> None:
        self._duration.observe(seconds)
        self._calls.labels(self._model, outcome).inc()

    def retried(self, fault: Fault) -> None:
        self._retries.labels(fault.value).inc()

    def breaker_opened(self) -> None:
        self._breaker_opened.inc()


def _is_item_fault(exc: BaseException) -> bool:
    """An error that belongs to one item (the upstream refused that input); anything else
    says the upstream, the proxy or the request as a whole failed."""
    return isinstance(exc, ApiError) and classify(exc) is Fault.ITEM


def input_cost(item: EmbedInput) -> int:
    return len(item)


class EmbeddingService:
    def __init__(
        self,
        name: str,
        upstream: Upstream,
        settings: Settings,
        metrics: Metrics,
        *,
        tracing: Tracing | None = None,
    ) -> None:
        self.name = name
        self.tracing = tracing
        self.upstream = upstream
        self.settings = settings
        self.metrics = metrics
        self.info: UpstreamInfo | None = None
        self._dimension: int | None = None
        self._batcher: Batcher[_Item, Vector] | None = None
        self._queue_gauge = metrics.queue_depth.labels(name)
        self._in_flight_gauge = metrics.in_flight_batches.labels(name)
        self._items_counter = metrics.request_items.labels(name)
        self._splits = metrics.batch_splits.labels(name)
        self.resilient = ResilientUpstream(
            upstream,
            ResilienceConfig(
                retries=settings.upstream_retries,
                breaker_threshold=settings.breaker_threshold,
                breaker_cooldown_s=settings.breaker_cooldown,
                eject_after=settings.replica_eject_after,
                probe_interval_s=settings.replica_probe_interval,
            ),
            observer=_UpstreamMetrics(metrics, name),
            check=self._check_dimension,
        )
        self._draining = False

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        info = await self.upstream.start()
        self.info = info
        self._dimension = info.embedding_dimension
        s = self.settings
        batch_size = min(s.max_batch_size, info.max_client_batch_size)
        # Never hold more items in the upstream than it admits (TEI's permits are per item:
        # past max_concurrent_requests it answers 429 for the whole call).
        concurrency = min(
            s.max_concurrent_batches, max(1, info.max_concurrent_requests // batch_size)
        )
        self._batcher = Batcher(
            self._process,
            BatcherConfig(
                max_batch_size=batch_size,
                max_wait_s=s.max_wait_s,
                max_concurrent_batches=concurrency,
                eager_slots=min(s.eager_batches, concurrency),
                policy=s.dispatch_policy,
                max_batch_cost=s.max_batch_chars,
                max_queue_size=s.max_queue_size,
            ),
            observer=_MetricsObserver(self.metrics, self.name),
        )
        self.metrics.track(self._queue_gauge, lambda: self.batcher.queue_depth)
        self.metrics.track(self._in_flight_gauge, lambda: self.batcher.in_flight)
        self.metrics.track(
            self.metrics.concurrency_limit.labels(self.name),
            lambda: self.batcher.config.max_concurrent_batches,
        )
        log.info(
            "model %s via %s upstream (%s): effective batch size %d = min(MAX_BATCH_SIZE=%d, "
            "upstream max_client_batch_size=%d); dispatch=%s, max_wait=%gms, "
            "max_concurrent_batches=%d (upstream admits %d items), max_batch_chars=%d",
            self.name,
            self.upstream.kind,
            info.model_id,
            batch_size,
            s.max_batch_size,
            info.max_client_batch_size,
            s.dispatch,
            s.max_wait_time,
            concurrency,
            info.max_concurrent_requests,
            s.max_batch_chars,
        )

    @property
    def breaker(self) -> CircuitBreaker:
        return self.resilient.breaker

    @property
    def batcher(self) -> Batcher[_Item, Vector]:
        if self._batcher is None:
            raise RuntimeError("service not started")
        return self._batcher

    @property
    def started(self) -> bool:
        return self._batcher is not None

    async def drain(self) -> None:
        """Refuse new work, dispatch everything queued and wait for calls in flight."""
        self._draining = True
        if self._batcher is not None:
            await self._batcher.drain()

    async def close(self) -> None:
        await self.resilient.close()
        if self._batcher is not None:
            await self._batcher.aclose()
        await self.upstream.close()

    async def unhealthy_reason(self) -> str | None:
        """None when ready to serve; otherwise why not (for /health's 503)."""
        if self._draining:
            return "draining"
        if not self.started:
            return "starting"
        if self.breaker.is_open:
            return "unhealthy: upstream circuit breaker is open"
        if not await self.upstream.health():
            return "unhealthy"
        return None

    # -- limits -------------------------------------------------------------------------

    @property
    def served_model_name(self) -> str:
        if self.info is None:
            return self.name
        return str(self.info.raw.get("served_model_name") or self.info.model_id)

    @property
    def effective_batch_size(self) -> int:
        return self.batcher.config.max_batch_size

    def _auto_truncate(self) -> bool:
        return self.info.auto_truncate if self.info is not None else True

    def _max_chars(self, options: EmbedOptions) -> tuple[int | None, bool]:
        """The character limit for one input, and whether it is TEI's own rule."""
        if self.settings.max_input_chars is not None:
            return self.settings.max_input_chars, False
        truncate = options.truncate if options.truncate is not None else self._auto_truncate()
        if truncate or self.info is None:
            return None, True
        return self.info.max_input_length * TEI_MAX_CHAR_MULTIPLIER, True

    def validate(self, inputs: Sequence[EmbedInput], options: EmbedOptions) -> None:
        """Refuse bad input before it can reach the batcher or a neighbour's batch."""
        self._validate_request(inputs, options)
        for item in inputs:
            self._validate_item(item, options)

    def _validate_request(self, inputs: Sequence[EmbedInput], options: EmbedOptions) -> None:
        if not inputs:
            raise errors.empty_input()
        limit = self.settings.max_client_batch_size
        if len(inputs) > limit:
            raise errors.batch_too_large(len(inputs), limit)
        queue_limit = self.settings.max_queue_size
        if len(inputs) > queue_limit:
            # It could never be queued, however long the caller waits: not a 429.
            raise errors.validation(
                f"batch size {len(inputs)} > MAX_QUEUE_SIZE={queue_limit}: the proxy never "
                "queues more items than that at once"
            )
        unsupported = self.upstream.unsupported(options)
        if unsupported is not None:
            raise errors.validation(unsupported)
        if options.dimensions is not None:
            if options.dimensions <= 0:
                raise errors.validation("Input validation error: `dimensions` should be positive")
            if self._dimension is not None and options.dimensions > self._dimension:
                raise errors.validation(
                    "Input validation error: `dimensions` should be smaller than the maximum "
                    "embedding dimension."
                )

    def _validate_item(self, item: EmbedInput, options: EmbedOptions) -> None:
        n = len(item)
        if n == 0:
            raise errors.empty_input()
        max_chars, tei_rule = self._max_chars(options)
        if max_chars is not None and n > max_chars:
            if tei_rule:
                raise errors.validation(
                    f"Input validation error: `inputs` must have less than {max_chars} "
                    f"characters. Given: {n}"
                )
            raise errors.validation(
                f"Input validation error: `inputs` must have less than {max_chars} "
                f"characters (MAX_INPUT_CHARS). Given: {n}"
            )

    # -- embedding ----------------------------------------------------------------------

    async def embed(
        self,
        inputs: Sequence[EmbedInput],
        options: EmbedOptions,
        *,
        deadline: float,
        trace: RequestSpan | None = None,
    ) -> list[Vector]:
        """Embed ``inputs``; each item is batched with other callers' and put back in order.

        ``deadline`` is a ``time.monotonic()`` instant. Like TEI, the request fails as a whole
        on its first failing item.
        """
        self.validate(inputs, options)
        inputs = fit_token_ids(inputs, options, self.info)  # cut or refuse long id lists
        results = await self._run(inputs, options, deadline, fail_fast=True, trace=trace)
        return [r for r in results if not isinstance(r, BaseException)]

    async def embed_each(
        self,
        inputs: Sequence[EmbedInput],
        options: EmbedOptions,
        *,
        deadline: float,
        trace: RequestSpan | None = None,
    ) -> list[Vector | ApiError]:
        """Like :meth:`embed`, but an item that fails on its own (the proxy's validation, or the
        upstream refusing that input) gets its error in its slot while the others succeed.
        Any other fault (overload, an unwell upstream, the breaker, shutdown, timeout) fails
        the whole request at once."""
        self._validate_request(inputs, options)
        slots: list[Vector | ApiError | None] = []
        valid: list[EmbedInput] = []
        for item in inputs:
            try:
                self._validate_item(item, options)
            except ApiError as exc:
                slots.append(exc)
            else:
                slots.append(None)
                valid.append(item)
        results = iter(
            await self._run(valid, options, deadline, fail_fast=False, trace=trace) if valid else []
        )
        out: list[Vector | ApiError] = []
        for slot in slots:
            if slot is not None:
                out.append(slot)
                continue
            result = next(results)
            # _run raised every fault that is not one item's: what is left is an ApiError.
            out.append(self._as_api_error(result) if isinstance(result, BaseException) else result)
        return out

    async def _run(
        self,
        inputs: Sequence[EmbedInput],
        options: EmbedOptions,
        deadline: float,
        *,
        fail_fast: bool,
        trace: RequestSpan | None = None,
    ) -> list[Vector | BaseException]:
        batcher = self.batcher
        if self._draining or batcher.closing:
            raise errors.unavailable("proxy is shutting down")
        limit = batcher.config.max_queue_size
        if limit is not None and batcher.queue_depth + len(inputs) > limit:
            # All or nothing: never queue half a request that cannot be finished.
            self.metrics.rejected.labels("queue_full").inc()
            raise errors.overloaded()
        self._items_counter.inc(len(inputs))
        futures: list[asyncio.Future[Vector]] = []
        queued_at = time.monotonic() if trace is not None else 0.0
        try:
            for item in inputs:
                futures.append(
                    batcher.submit_nowait(
                        _Item(item, options, deadline, trace, queued_at),
                        key=options,
                        cost=input_cost(item),
                        deadline=deadline,
                    )
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.timeout("request timed out before it could be queued")
            async with asyncio.timeout(remaining):
                if fail_fast:
                    return list(await asyncio.gather(*futures))
                return await self._gather_item_faults(futures)
        except TimeoutError as exc:
            raise errors.timeout(
                f"request took longer than REQUEST_TIMEOUT={self.settings.request_timeout:g}s"
            ) from exc
        except QueueFullError as exc:
            self.metrics.rejected.labels("queue_full").inc()
            raise errors.overloaded() from exc
        except (
            BatcherClosedError,
            DeadlineExceededError,
            BatchResultMismatchError,
        ) as exc:
            raise self._as_api_error(exc) from exc
        finally:
            # A failed or abandoned request leaves no work behind: queued siblings are
            # dropped before dispatch.
            for fut in futures:
                if not fut.done():
                    fut.cancel()

    @staticmethod
    async def _gather_item_faults(
        futures: list[asyncio.Future[Vector]],
    ) -> list[Vector | BaseException]:
        """Wait for every item; keep item faults in their slots, but raise the first fault
        of any other kind at once (the caller's finally cancels the rest)."""
        pending: set[asyncio.Future[Vector]] = set(futures)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                if fut.cancelled():
                    raise errors.unavailable("proxy is shutting down")
                exc = fut.exception()
                if exc is not None and not _is_item_fault(exc):
                    for other in futures:  # retrieved, so asyncio does not log them
                        if other.done() and not other.cancelled():
                            other.exception()
                    raise exc
        return [fut.exception() or fut.result() for fut in futures]

    @staticmethod
    def _as_api_error(exc: BaseException) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, BatcherClosedError):
            return errors.unavailable("proxy is shutting down")
        if isinstance(exc, DeadlineExceededError):
            return errors.timeout("request deadline passed while queued")
        if isinstance(exc, BatchResultMismatchError):
            return errors.bad_upstream(str(exc))
        return ApiError(500, "internal error", errors.ErrorType.BACKEND)

    async def _process(self, items: list[_Item]) -> list[Vector | BaseException]:
        """One batch. If the upstream refuses it for its inputs without naming one, split it
        and retry the halves, so only the offending items fail and their neighbours succeed."""
        if self.tracing is not None:
            now = time.monotonic()
            for item in items:
                if item.trace is not None:
                    item.trace.note_batch(now - item.queued_at, len(items))
        try:
            return list(await self._call_upstream(items))
        except ApiError as exc:
            if classify(exc) is not Fault.ITEM:
                raise
            return await self._bisect(items, exc, item_specific=False)

    async def _bisect(
        self, items: list[_Item], exc: ApiError, *, item_specific: bool
    ) -> list[Vector | BaseException]:
        """``items`` were refused with ``exc``, an item fault: find which items are at fault.

        If both halves are refused with the very same error, the refusal is probably not
        about any one item (e.g. an unknown ``prompt_name``): one call with a harmless input
        settles it, and if that is refused alike, every item gets the error at once instead
        of ~2n calls. Two bad items that fail alike (same message) keep being split; once the
        harmless input passed (``item_specific``), no further probe is needed.
        """
        if len(items) == 1:
            return [exc]
        self._splits.inc()
        mid = len(items) // 2
        halves = (items[:mid], items[mid:])
        # Halves go one after the other: splitting must not exceed the upstream's
        # concurrency bound that the batcher keeps.
        outcomes = [await self._try_upstream(half) for half in halves]
        left, right = outcomes
        if (
            not item_specific
            and len(items) > 2
            and isinstance(left, ApiError)
            and isinstance(right, ApiError)
            and _same_error(left, right)
        ):
            if await self._refused_for_any_input(items, left):
                return [left] * len(items)
            item_specific = True
        results: list[Vector | BaseException] = []
        for half, outcome in zip(halves, outcomes, strict=True):
            if isinstance(outcome, ApiError):
                results.extend(await self._bisect(half, outcome, item_specific=item_specific))
            else:
                results.extend(outcome)
        return results

    async def _try_upstream(self, items: list[_Item]) -> list[Vector] | ApiError:
        """A call whose item fault is returned, not raised; other faults still raise."""
        try:
            return await self._call_upstream(items)
        except ApiError as exc:
            if classify(exc) is not Fault.ITEM:
                raise
            return exc

    async def _refused_for_any_input(self, items: list[_Item], exc: ApiError) -> bool:
        probe = _Item(_PROBE_INPUT, items[0].options, max(item.deadline for item in items))
        outcome = await self._try_upstream([probe])
        return isinstance(outcome, ApiError) and _same_error(outcome, exc)

    async def _call_upstream(self, items: list[_Item]) -> list[Vector]:
        """One upstream call, with the resilient upstream's retries and replica choice, until
        the latest caller's deadline."""
        inputs = [item.input for item in items]
        deadline = max(item.deadline for item in items)
        if self.tracing is None:
            return await self.resilient.embed(inputs, items[0].options, deadline=deadline)
        served = list({id(i.trace): i.trace for i in items if i.trace is not None}.values())
        for request_span in served:
            request_span.note_call()
        with self.tracing.upstream_call(
            self.served_model_name, self.upstream.kind, served, len(items)
        ):
            return await self.resilient.embed(inputs, items[0].options, deadline=deadline)

    def _check_dimension(self, vectors: list[Vector], options: EmbedOptions) -> None:
        if len(vectors) == 0:
            return
        dim = len(vectors[0])
        if options.dimensions is not None:
            expected: int | None = options.dimensions
        else:
            if self._dimension is None:
                self._dimension = dim
            expected = self._dimension
        if dim != expected or any(len(v) != dim for v in vectors):
            raise errors.bad_upstream(
                f"upstream answered vectors of {dim} dimensions, expected {expected}"
            )

    # -- /info --------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """TEI's /info body with the proxy's own effective limits, plus a ``proxy`` object."""
        info = self.info
        body: dict[str, Any] = dict(info.raw) if info is not None else {}
        s = self.settings
        upstream_limits = {
            "max_client_batch_size": info.max_client_batch_size if info else None,
            "max_input_length": info.max_input_length if info else None,
            "max_concurrent_requests": info.max_concurrent_requests if info else None,
        }
        body["max_client_batch_size"] = s.max_client_batch_size
        body["max_concurrent_requests"] = s.max_queue_size
        body["proxy"] = {
            "version": _version(),
            "model": self.name,
            "upstream_kind": self.upstream.kind,
            "dispatch": s.dispatch,
            "max_wait_time_ms": s.max_wait_time,
            "max_batch_size": s.max_batch_size,
            "effective_batch_size": self.effective_batch_size if self.started else None,
            "max_concurrent_batches": s.max_concurrent_batches,
            "effective_concurrent_batches": (
                self.batcher.config.max_concurrent_batches if self.started else None
            ),
            "eager_batches": min(s.eager_batches, s.max_concurrent_batches),
            "max_batch_chars": s.max_batch_chars,
            "max_client_batch_size": s.max_client_batch_size,
            "max_queue_size": s.max_queue_size,
            "request_timeout_s": s.request_timeout,
            "upstream_timeout_s": s.upstream_timeout,
            "upstream": upstream_limits,
            "upstream_replicas": self.resilient.replica_count,
            "upstream_replicas_ejected": self.resilient.ejected_count,
        }
        return body


def _same_error(a: ApiError, b: ApiError) -> bool:
    return (a.status, a.error_type, a.message) == (b.status, b.error_type, b.message)


def _version() -> str:
    from proxy import __version__

    return __version__
