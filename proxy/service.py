"""One model version's embedding service: its input rules, its batcher, and the resilient
upstream behind them.

The HTTP layer reaches it through the registry (:mod:`proxy.registry`), which picks a version
and calls :meth:`EmbeddingService.embed` with parsed inputs and the request's context; it
never sees the batcher. The batcher never sees HTTP. The service is put together from three
parts, split as TEI and Infinity split theirs: the input rules (:class:`proxy.rules.InputRules`),
the resilient upstream (:class:`proxy.resilience.ResilientUpstream`: retries, breaker, replica
choice) and the bisector (:class:`proxy.bisector.Bisector`), which finds the items an upstream
refused. Each version has its own of each, so one model's trouble (an open breaker, a full
queue, a slow upstream) never blocks another's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from proxy import errors
from proxy.adaptive import AdaptiveConcurrency
from proxy.batcher import (
    Batcher,
    BatcherClosedError,
    BatcherConfig,
    BatchObserver,
    BatchResultMismatchError,
    DeadlineExceededError,
    DispatchPolicy,
    QueueFullError,
)
from proxy.bisector import Bisector, Item
from proxy.cache import CacheScope, CacheUse, EmbeddingCache, upstream_fingerprint
from proxy.cache.front import Submit
from proxy.concurrency import auto_ceiling
from proxy.context import RequestContext
from proxy.errors import ApiError
from proxy.metrics import Metrics
from proxy.resilience import (
    CircuitBreaker,
    Fault,
    ResilienceConfig,
    ResilientUpstream,
    classify,
)
from proxy.rules import TEI_MAX_CHAR_MULTIPLIER, InputRules
from proxy.settings import Settings, UpstreamSettings
from proxy.tracing import RequestSpan, Tracing
from proxy.upstream.base import EmbedInput, EmbedOptions, Upstream, UpstreamInfo, Vector

__all__ = ["TEI_MAX_CHAR_MULTIPLIER", "EmbeddingService", "RetiredError", "input_cost"]

log = logging.getLogger(__name__)


class _MetricsObserver(BatchObserver):
    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._size = metrics.batch_size.labels(model, version)
        self._chars = metrics.batch_chars.labels(model, version)
        self._wait = metrics.queue_wait.labels(model, version)
        self._dropped = metrics.dropped_items
        self._labels = (model, version)

    def batch_dispatched(self, size: int, cost: float, oldest_wait_s: float) -> None:
        self._size.observe(size)
        self._chars.observe(cost)
        self._wait.observe(oldest_wait_s)

    def item_dropped(self, reason: str) -> None:
        self._dropped.labels(*self._labels, reason).inc()


class _UpstreamMetrics:
    """Metrics for :class:`ResilientUpstream` (a :class:`proxy.resilience.CallObserver`).
    Bound to its labels once the service knows its model's name (at start)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._labels = ("", "")

    def bind(self, model: str, version: str) -> None:
        self._labels = (model, version)
        self._duration = self._metrics.upstream_duration.labels(model, version)
        self._breaker_opened = self._metrics.breaker_opened.labels(model, version)

    def call_finished(self, outcome: str, seconds: float) -> None:
        self._duration.observe(seconds)
        self._metrics.upstream_calls.labels(*self._labels, outcome).inc()

    def retried(self, fault: Fault) -> None:
        self._metrics.upstream_retries.labels(*self._labels, fault.value).inc()

    def breaker_opened(self) -> None:
        self._breaker_opened.inc()


class RetiredError(ApiError):
    """The version left routing before this request was queued; the registry routes the
    request again (to whatever routing picks now)."""


def _is_item_fault(exc: BaseException) -> bool:
    """An error that belongs to one item (the upstream refused that input); anything else
    says the upstream, the proxy or the request as a whole failed."""
    return isinstance(exc, ApiError) and classify(exc) is Fault.ITEM


def input_cost(item: EmbedInput) -> int:
    return len(item)


class EmbeddingService:
    """One version of one model. ``model`` None: named after the upstream's model id, once
    it answered (the one model of a proxy without MODELS_CONFIG)."""

    def __init__(
        self,
        model: str | None,
        version: str,
        upstream: Upstream,
        settings: Settings,
        config: UpstreamSettings,
        metrics: Metrics,
        *,
        tracing: Tracing | None = None,
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.model = model
        self.version = version
        self.tracing = tracing
        self.upstream = upstream
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self.info: UpstreamInfo | None = None
        self.rules = InputRules(
            upstream,
            max_client_batch_size=settings.max_client_batch_size,
            max_queue_size=config.max_queue_size,
            max_input_chars=settings.max_input_chars,
        )
        self._batcher: Batcher[Item, Vector] | None = None
        self._upstream_metrics = _UpstreamMetrics(metrics)
        self.resilient = ResilientUpstream(
            upstream,
            ResilienceConfig(
                retries=settings.upstream_retries,
                breaker_threshold=settings.breaker_threshold,
                breaker_cooldown_s=settings.breaker_cooldown,
                eject_after=settings.replica_eject_after,
                probe_interval_s=settings.replica_probe_interval,
            ),
            observer=self._upstream_metrics,
            check=self._check_dimension,
        )
        self._bisector = Bisector(self._call_upstream, self._count_split)
        # One adaptive limit for the upstream pool (all replicas), made at start once /info
        # gives its ceiling; None with DISPATCH=timer, whose bound is the ceiling as is.
        self.concurrency: AdaptiveConcurrency | None = None
        self._draining = False
        self._untraced_submit: tuple[EmbedOptions, Submit] | None = None
        # Taken out of routing by the registry (removed or replaced): callers that picked it
        # just before are sent to the version that routing picks now.
        self.retired = False
        self._closed = False
        # The cache, shared by every version's service; this version's scope in it once the
        # upstream said what it serves.
        self.cache = cache
        self.cache_scope: CacheScope | None = None

    @property
    def label(self) -> str:
        return f"{self.model}@{self.version}"

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        info = await self.upstream.start()
        self.info = info
        self.rules.learn(info)
        if self.model is None:
            self.model = self.served_model_name
        model, version = self.model, self.version
        self.cache_scope = CacheScope(
            model, version, upstream_fingerprint(self.upstream.kind, info)
        )
        c = self.config
        s = self.settings
        batch_size = min(c.max_batch_size, info.max_client_batch_size)
        ceiling = self._ceiling(info, batch_size)
        self._upstream_metrics.bind(model, version)
        self._items_counter = self.metrics.request_items.labels(model, version)
        self._splits = self.metrics.batch_splits.labels(model, version)
        self._rejected = self.metrics.rejected.labels(model, version, "queue_full")
        control = None
        if s.dispatch_policy is DispatchPolicy.ADAPTIVE:
            # This version's own limit: one per upstream pool (all its replicas).
            cuts = self.metrics.concurrency_cuts.labels(model, version)
            control = AdaptiveConcurrency(
                self.label, ceiling=ceiling, max_wait_s=c.max_wait_s, on_cut=cuts.inc
            )
        batcher: Batcher[Item, Vector] = Batcher(
            self._process,
            BatcherConfig(
                max_batch_size=batch_size,
                max_wait_s=c.max_wait_s,
                max_concurrent_batches=ceiling,
                policy=s.dispatch_policy,
                max_batch_cost=s.max_batch_chars,
                max_queue_size=c.max_queue_size,
            ),
            observer=_MetricsObserver(self.metrics, model, version),
            control=control,
        )
        if control is not None:
            control.attach(batcher)
            self.resilient.load = control
        self.concurrency = control
        self._batcher = batcher
        self._export_concurrency(batcher, control)
        log.info(
            "model %s via %s upstream (%s): effective batch size %d = min(MAX_BATCH_SIZE=%d, "
            "upstream max_client_batch_size=%d); dispatch=%s, max_wait=%gms, "
            "calls in flight at most %d (MAX_CONCURRENT_BATCHES=%s; upstream admits %d items "
            "on each of %d replicas)%s, max_batch_chars=%d",
            self.label,
            self.upstream.kind,
            info.model_id,
            batch_size,
            c.max_batch_size,
            info.max_client_batch_size,
            s.dispatch,
            c.max_wait_time,
            ceiling,
            c.max_concurrent_batches,
            info.max_concurrent_requests,
            self.resilient.replica_count,
            ", learned below that from the upstream's latency" if control else "",
            s.max_batch_chars,
        )

    def _ceiling(self, info: UpstreamInfo, batch_size: int) -> int:
        """The hard bound on calls in flight: never more items in the upstream than it admits
        (TEI's permits are per item: past max_concurrent_requests it answers 429 for the whole
        call), per replica; a number in the version's MAX_CONCURRENT_BATCHES can only lower
        it."""
        admitted = auto_ceiling(
            info.max_concurrent_requests, batch_size, self.resilient.replica_count
        )
        setting = self.config.max_concurrent_batches
        return admitted if setting == "auto" else max(1, min(setting, admitted))

    def _export_concurrency(
        self, batcher: Batcher[Item, Vector], control: AdaptiveConcurrency | None
    ) -> None:
        """The version's gauges: queue, calls in flight, its limit and ceiling, and (adaptive)
        its limiter's latencies and gradient, labelled model and version."""
        assert self.model is not None
        adaptive: dict[str, Callable[[], float]] | None = None
        if control is not None:
            limiter = control.limiter
            nan = float("nan")
            adaptive = {
                "baseline": lambda: nan if (v := limiter.state().baseline_s) is None else v,
                "recent": lambda: nan if (v := limiter.state().recent_s) is None else v,
                "gradient": lambda: limiter.state().gradient,
            }
        ceiling = batcher.config.max_concurrent_batches
        self.metrics.bind_version(
            self.model,
            self.version,
            owner=self,
            queue_depth=lambda: batcher.queue_depth,
            in_flight=lambda: batcher.in_flight,
            concurrency_limit=lambda: batcher.limit,
            concurrency_ceiling=lambda: ceiling,
            adaptive=adaptive,
        )

    @property
    def limiter(self) -> AdaptiveConcurrency | None:
        """This version's adaptive limit (what /status reads); None with DISPATCH=timer."""
        return self.concurrency

    @property
    def breaker(self) -> CircuitBreaker:
        return self.resilient.breaker

    @property
    def batcher(self) -> Batcher[Item, Vector]:
        if self._batcher is None:
            raise RuntimeError("service not started")
        return self._batcher

    @property
    def started(self) -> bool:
        return self._batcher is not None

    @property
    def queue_depth(self) -> int:
        return self._batcher.queue_depth if self._batcher is not None else 0

    @property
    def in_flight(self) -> int:
        return self._batcher.in_flight if self._batcher is not None else 0

    @property
    def concurrency_limit(self) -> int | None:
        """Upstream calls this version may have in flight now."""
        return self._batcher.limit if self._batcher is not None else None

    async def drain(self) -> None:
        """Refuse new work, dispatch everything queued and wait for calls in flight."""
        self._draining = True
        if self.cache is not None:
            await self.cache.wait_lookups()  # items being looked up in Redis go on queueing
        if self._batcher is not None:
            await self._batcher.drain()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._draining = True
        try:
            await self.resilient.close()
            if self._batcher is not None:
                await self._batcher.aclose()
            await self.upstream.close()
        finally:
            if self.model is not None:
                self.metrics.unbind_version(self.model, self.version, owner=self)

    async def retire(self, timeout_s: float) -> None:
        """Out of routing: finish what it holds (for at most ``timeout_s``), then close."""
        self.retired = True
        try:
            async with asyncio.timeout(timeout_s):
                await self.drain()
        except TimeoutError:
            log.warning("%s: still busy after %gs of draining; closing it", self.label, timeout_s)
        finally:
            await self.close()

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
            return self.model or ""
        return str(self.info.raw.get("served_model_name") or self.info.model_id)

    @property
    def effective_batch_size(self) -> int:
        return self.batcher.config.max_batch_size

    def validate(self, inputs: Sequence[EmbedInput], options: EmbedOptions) -> None:
        """Refuse bad input before it can reach the batcher or a neighbour's batch."""
        self.rules.validate(inputs, options)

    # -- embedding ----------------------------------------------------------------------

    async def embed(
        self,
        inputs: Sequence[EmbedInput],
        options: EmbedOptions,
        ctx: RequestContext,
        *,
        trace: RequestSpan | None = None,
    ) -> list[Vector]:
        """Embed ``inputs``; each item is batched with other callers' and put back in order.

        ``ctx.deadline`` (a ``time.monotonic()`` instant) bounds queueing, calls and retries.
        Like TEI, the request fails as a whole on its first failing item.

        One input, the most common request, takes a shorter path in this same frame (every
        frame of a waiting request is kept while it waits): its one future (the cache's, when
        it is on) awaited directly, and the deadline a timer that fails it, instead of a
        gather and an ``asyncio.timeout``.
        """
        self.rules.validate(inputs, options)
        inputs = self.rules.fit(inputs, options)  # cut or refuse long id lists
        if len(inputs) != 1:
            results = await self._run(
                inputs, options, ctx.deadline, fail_fast=True, trace=trace, cache=ctx.cache
            )
            return [r for r in results if not isinstance(r, BaseException)]
        batcher = self.batcher
        if self._draining or batcher.closing:
            if self.retired:
                raise RetiredError(503, f"version {self.label} left routing", "Unhealthy")
            raise errors.unavailable("proxy is shutting down")
        deadline = ctx.deadline
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.timeout("request timed out before it could be queued")
        queued_at = time.monotonic() if trace is not None else 0.0
        try:
            if self.cache is None or self.cache_scope is None:
                self._reserve(1)
                future = self._submit(
                    inputs[0], deadline, None, options=options, trace=trace, queued_at=queued_at
                )
            else:  # as in _run: a hit or a merge never queues
                (future,) = self.cache.submit(
                    self.cache_scope,
                    options,
                    self.rules.effective_truncate(options),
                    inputs,
                    deadline=deadline,
                    use=ctx.cache if ctx.cache is not None else CacheUse(),
                    upstream=self._submitter(options, trace, queued_at),
                    reserve=self._reserve,
                    dimension=self.rules.dimension,
                )
        except QueueFullError as exc:
            self._rejected.inc()
            raise errors.overloaded() from exc
        except BatcherClosedError as exc:
            raise self._as_api_error(exc) from exc
        self._items_counter.inc()
        del inputs
        timer = asyncio.get_running_loop().call_later(remaining, _expire, future)
        try:
            return [await future]
        except _RequestTimeoutError as exc:
            raise errors.timeout(
                f"request took longer than REQUEST_TIMEOUT={self.config.request_timeout:g}s"
            ) from exc
        except (BatcherClosedError, DeadlineExceededError, BatchResultMismatchError) as exc:
            raise self._as_api_error(exc) from exc
        finally:
            timer.cancel()
            if not future.done():
                future.cancel()  # the caller left: drop the item before it is sent

    async def embed_each(
        self,
        inputs: Sequence[EmbedInput],
        options: EmbedOptions,
        ctx: RequestContext,
        *,
        trace: RequestSpan | None = None,
    ) -> list[Vector | ApiError]:
        """Like :meth:`embed`, but an item that fails on its own (the proxy's validation, or the
        upstream refusing that input) gets its error in its slot while the others succeed.
        Any other fault (overload, an unwell upstream, the breaker, shutdown, timeout) fails
        the whole request at once."""
        self.rules.validate_request(inputs, options)
        slots: list[Vector | ApiError | None] = []
        valid: list[EmbedInput] = []
        for item in inputs:
            try:
                self.rules.validate_item(item, options)
            except ApiError as exc:
                slots.append(exc)
            else:
                slots.append(None)
                valid.append(item)
        results = iter(
            await self._run(
                valid, options, ctx.deadline, fail_fast=False, trace=trace, cache=ctx.cache
            )
            if valid
            else []
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
        cache: CacheUse | None = None,
    ) -> list[Vector | BaseException]:
        batcher = self.batcher
        if self._draining or batcher.closing:
            if self.retired:
                raise RetiredError(503, f"version {self.label} left routing", "Unhealthy")
            raise errors.unavailable("proxy is shutting down")
        futures: list[asyncio.Future[Vector]] = []
        queued_at = time.monotonic() if trace is not None else 0.0
        submit = self._submitter(options, trace, queued_at)
        try:
            if self.cache is None or self.cache_scope is None:
                self._reserve(len(inputs))
                futures = [submit(item, deadline, None) for item in inputs]
            else:
                # The one place the cache meets the batcher: hits and merges never queue.
                futures = self.cache.submit(
                    self.cache_scope,
                    options,
                    self.rules.effective_truncate(options),
                    inputs,
                    deadline=deadline,
                    use=cache if cache is not None else CacheUse(),
                    upstream=submit,
                    reserve=self._reserve,
                    dimension=self.rules.dimension,
                )
            self._items_counter.inc(len(inputs))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.timeout("request timed out before it could be queued")
            async with asyncio.timeout(remaining):
                if fail_fast:
                    return list(await asyncio.gather(*futures))
                return await self._gather_item_faults(futures)
        except TimeoutError as exc:
            raise errors.timeout(
                f"request took longer than REQUEST_TIMEOUT={self.config.request_timeout:g}s"
            ) from exc
        except QueueFullError as exc:
            self._rejected.inc()
            raise errors.overloaded() from exc
        except (
            BatcherClosedError,
            DeadlineExceededError,
            BatchResultMismatchError,
        ) as exc:
            raise self._as_api_error(exc) from exc
        finally:
            # A failed or abandoned request leaves no work behind: queued siblings are
            # dropped before dispatch (with the cache: once no other request waits for them).
            for fut in futures:
                if not fut.done():
                    fut.cancel()

    def _reserve(self, n: int) -> None:
        """Refuse at once, before anything is queued, a request whose ``n`` new items could
        not all be queued: never queue half a request that cannot be finished."""
        limit = self.batcher.config.max_queue_size
        if limit is not None and self.batcher.queue_depth + n > limit:
            self._rejected.inc()
            raise errors.overloaded()

    def _submitter(
        self, options: EmbedOptions, trace: RequestSpan | None, queued_at: float
    ) -> Submit:
        """``_submit`` with the request's options bound. Untraced requests with the same
        options object (the parsers share one for the defaults) share one: the cache keeps
        it with each item in flight, and 10,000 held requests would hold 10,000 copies."""
        if trace is not None:
            return functools.partial(
                self._submit, options=options, trace=trace, queued_at=queued_at
            )
        last = self._untraced_submit
        if last is not None and last[0] is options:
            return last[1]
        submit = functools.partial(self._submit, options=options, trace=None, queued_at=0.0)
        self._untraced_submit = (options, submit)
        return submit

    def _submit(
        self,
        item: EmbedInput,
        deadline: float,
        future: asyncio.Future[Vector] | None,
        *,
        options: EmbedOptions,
        trace: RequestSpan | None,
        queued_at: float,
    ) -> asyncio.Future[Vector]:
        # With the cache, ``trace`` is the span of the request that started the item: the
        # requests that merged onto it wait for the same call.
        return self.batcher.submit_nowait(
            Item(item, options, deadline, trace, queued_at),
            key=options,
            cost=input_cost(item),
            deadline=deadline,
            future=future,
        )

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

    async def _process(self, items: list[Item]) -> list[Vector | BaseException]:
        """One batch, through the bisector (which finds the items an upstream refused)."""
        if self.tracing is not None:
            now = time.monotonic()
            for item in items:
                if item.trace is not None:
                    item.trace.note_batch(now - item.queued_at, len(items))
        return await self._bisector.process(items)

    def _count_split(self) -> None:
        self._splits.inc()

    async def _call_upstream(self, items: Sequence[Item]) -> list[Vector]:
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
            if self.rules.dimension is None:
                self.rules.dimension = dim
            expected = self.rules.dimension
        if dim != expected or any(len(v) != dim for v in vectors):
            raise errors.bad_upstream(
                f"upstream answered vectors of {dim} dimensions, expected {expected}"
            )

    # -- /info --------------------------------------------------------------------------

    def _describe_cache(self) -> dict[str, Any]:
        if self.cache is None:
            return {"enabled": False}
        body = self.cache.describe()
        if self.cache_scope is not None:
            body["model"] = self.cache_scope.model
            body["version"] = self.cache_scope.version
            body["upstream"] = self.cache_scope.upstream
        return body

    def describe(self) -> dict[str, Any]:
        """TEI's /info body with the proxy's own effective limits, plus a ``proxy`` object."""
        info = self.info
        body: dict[str, Any] = dict(info.raw) if info is not None else {}
        s = self.settings
        c = self.config
        upstream_limits = {
            "max_client_batch_size": info.max_client_batch_size if info else None,
            "max_input_length": info.max_input_length if info else None,
            "max_concurrent_requests": info.max_concurrent_requests if info else None,
        }
        body["max_client_batch_size"] = s.max_client_batch_size
        body["max_concurrent_requests"] = c.max_queue_size
        body["proxy"] = {
            "version": _version(),
            "model": self.model,
            "model_version": self.version,
            "upstream_kind": self.upstream.kind,
            "dispatch": s.dispatch,
            "max_wait_time_ms": c.max_wait_time,
            "max_batch_size": c.max_batch_size,
            "effective_batch_size": self.effective_batch_size if self.started else None,
            "max_concurrent_batches": c.max_concurrent_batches,
            "effective_concurrent_batches": (
                self.batcher.config.max_concurrent_batches if self.started else None
            ),
            "concurrency": self._describe_concurrency(),
            "max_batch_chars": s.max_batch_chars,
            "max_client_batch_size": s.max_client_batch_size,
            "max_queue_size": c.max_queue_size,
            "request_timeout_s": c.request_timeout,
            "upstream_timeout_s": c.upstream_timeout,
            "upstream": upstream_limits,
            "upstream_replicas": self.resilient.replica_count,
            "upstream_replicas_ejected": self.resilient.ejected_count,
            "cache": self._describe_cache(),
        }
        return body

    def _describe_concurrency(self) -> dict[str, Any] | None:
        """The limit on calls in flight: learned (adaptive) or the fixed ceiling (timer)."""
        if not self.started:
            return None
        if self.concurrency is not None:
            return {"adaptive": True, **self.concurrency.state().as_dict()}
        ceiling = self.batcher.config.max_concurrent_batches
        return {"adaptive": False, "limit": ceiling, "ceiling": ceiling}


class _RequestTimeoutError(Exception):
    """REQUEST_TIMEOUT passed while the request's one item was queued or in flight."""


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(_RequestTimeoutError())


def _version() -> str:
    from proxy import __version__

    return __version__
