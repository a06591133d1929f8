"""How the proxy treats a failing upstream: fault classification, retries with jittered
backoff, a circuit breaker, and the choice of replica with outlier ejection.

:class:`ResilientUpstream` puts these together around an upstream's replicas; it knows
nothing of batching or HTTP requests, only calls, deadlines and faults.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from proxy import errors
from proxy.concurrency import CongestionKind
from proxy.errors import ApiError, ErrorType
from proxy.upstream.base import EmbedInput, EmbedOptions, Replica, Upstream, Vector

log = logging.getLogger(__name__)

BREAKER_OPEN_MESSAGE = (
    "upstream circuit breaker is open after repeated failures; "
    "the proxy is probing the upstream's health"
)
# Ejected replicas are probed at REPLICA_PROBE_INTERVAL, doubling after each failed probe up
# to this ceiling, so a replica that stays dead costs one /health call every few seconds.
_MAX_PROBE_INTERVAL_S = 30.0


class Fault(enum.Enum):
    """What an upstream error means for the proxy's next step."""

    ITEM = "item"  # the upstream refused an input (TEI's 422/413): split the batch to find it
    OVERLOADED = "overloaded"  # 429: retry with backoff (another replica first) until deadline
    TRANSIENT = "transient"  # 5xx, 424, refused or reset connection: bounded retry elsewhere
    FINAL = "final"  # timeout, garbage, refused key or route: fail the batch now
    REFUSED = "refused"  # the proxy's own refusals, other 4xx: fail now, blame no one


def classify(exc: ApiError) -> Fault:
    """Errors the upstream answered carry ``from_upstream``; the proxy raises 502/503/504 on
    the upstream's behalf for transport faults and bad answers (see :mod:`proxy.errors`).
    Anything else raised in a call is the proxy's own refusal."""
    if exc.from_upstream:
        if exc.status == 429:
            return Fault.OVERLOADED
        # TEI's validation errors and payload limit; its 400 `Empty` is one input's too.
        if exc.status in (413, 422) or (exc.status == 400 and exc.error_type == ErrorType.EMPTY):
            return Fault.ITEM
        if exc.status == 424 or exc.status >= 500:
            return Fault.TRANSIENT
        return Fault.REFUSED
    if exc.status == 503:
        return Fault.TRANSIENT
    if exc.status in (502, 504):
        return Fault.FINAL
    return Fault.REFUSED


def counts_against_upstream(exc: ApiError) -> bool:
    """Failures that say the upstream itself is unwell: never the caller's input, the
    proxy's own refusals, or load."""
    return classify(exc) in (Fault.TRANSIENT, Fault.FINAL)


def congestion_kind(exc: ApiError) -> CongestionKind | None:
    """Whether a failed attempt says "overloaded": the upstream's 429 or 503, or a timeout
    (UPSTREAM_TIMEOUT, or a 504 the upstream answered). A 503 the proxy raised for a refused
    or reset connection is an outage, not load (the breaker and ejection handle it), and the
    inputs' 4xx say nothing of load. The caller's own deadline never reaches here."""
    if exc.status == 429:
        return CongestionKind.RATE_LIMITED
    if exc.status == 503 and exc.from_upstream:
        return CongestionKind.UNAVAILABLE
    if exc.status == 504:
        return CongestionKind.TIMEOUT
    return None


@dataclass(slots=True)
class RetryPolicy:
    max_retries: int = 2  # for TRANSIENT faults; OVERLOADED retries until the deadline
    base_delay_s: float = 0.05
    max_delay_s: float = 1.0

    def delay(self, attempt: int) -> float:
        """Full jitter: spreads retries of many batches so they don't arrive together."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        return random.uniform(ceiling / 2, ceiling)


class CircuitBreaker:
    """Opens after ``threshold`` consecutive upstream failures; while open, calls fail fast.

    Closing is the prober's job (it calls :meth:`record_success` once the upstream's health
    check passes) or any call that succeeds. The breaker itself only keeps state.
    """

    def __init__(
        self,
        threshold: int = 5,
        cooldown_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def record_success(self) -> None:
        if self._opened_at is not None:
            log.info("upstream circuit closed: the upstream answers again")
        self._failures = 0
        self._opened_at = None

    def record_failure(self) -> bool:
        """Count a failure; return True if this one opened the breaker."""
        self._failures += 1
        if self._opened_at is None and self._failures >= self.threshold:
            self._opened_at = self._clock()
            log.warning(
                "upstream circuit opened after %d consecutive failures; failing fast and "
                "probing its health every %.1fs",
                self._failures,
                self.cooldown_s,
            )
            return True
        return False


class CallObserver(Protocol):
    """Where :class:`ResilientUpstream` reports what it did (metrics)."""

    def call_finished(self, outcome: str, seconds: float) -> None: ...

    def retried(self, fault: Fault) -> None: ...

    def breaker_opened(self) -> None: ...


class LoadSignals(Protocol):
    """Where every upstream attempt reports load (the adaptive concurrency limit,
    :class:`proxy.adaptive.AdaptiveConcurrency`): once per attempt, retries included, so a
    retry that succeeds never hides that the upstream refused the first try."""

    def started(self) -> tuple[int, int]:
        """An attempt goes out; what it returns is handed back to ``served``."""
        ...

    def served(self, latency_s: float, size: int, at_start: tuple[int, int]) -> None: ...

    def overloaded(self, kind: CongestionKind) -> None: ...


@dataclass(frozen=True, slots=True)
class ResilienceConfig:
    retries: int = 2
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 2.0
    eject_after: int = 3
    probe_interval_s: float = 1.0


class _ReplicaState:
    """A replica's own breaker: consecutive failures, ejection, and its prober."""

    __slots__ = (
        "ejected",
        "ejections",
        "failures",
        "in_flight",
        "last_failure",
        "probe",
        "replica",
    )

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.in_flight = 0
        self.failures = 0  # consecutive
        self.ejected = False
        self.ejections = 0  # in a row without a served call: the probe backoff grows with it
        self.last_failure = float("-inf")
        self.probe: asyncio.Task[None] | None = None


class ResilientUpstream:
    """Retries, the circuit breaker and the choice of replica, around an upstream.

    Each call goes to the live replica with the fewest calls in flight. A replica that fails
    ``eject_after`` calls in a row (refused or reset connections, 5xx, timeouts, garbage) is
    ejected, as Envoy's outlier detection does: no calls go to it while a prober asks its
    health with backoff, and it returns once healthy or once a call to it succeeds. If every
    replica is ejected, calls still go to the one whose last failure is oldest: ejection must
    never leave the proxy with nowhere to send a call.

    A call that fails on one replica with a retryable fault is retried on another at once,
    within the retry budget and the deadline. The breaker counts calls that failed after
    their retries; only faults of the upstream count (:func:`counts_against_upstream`).
    """

    def __init__(
        self,
        upstream: Upstream,
        config: ResilienceConfig,
        *,
        observer: CallObserver | None = None,
        check: Callable[[list[Vector], EmbedOptions], None] | None = None,
        load: LoadSignals | None = None,
    ) -> None:
        self.upstream = upstream
        self.config = config
        self.breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown_s)
        self._retry = RetryPolicy(max_retries=config.retries)
        self._observer = observer
        self.load = load
        self._check = check
        self._replicas = [_ReplicaState(r) for r in upstream.replicas]
        self._rotation = itertools.count()
        self._breaker_probe: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def replica_count(self) -> int:
        return len(self._replicas)

    @property
    def ejected_count(self) -> int:
        return sum(1 for s in self._replicas if s.ejected)

    def replica_status(self) -> list[dict[str, Any]]:
        """Each replica's name, whether it is ejected, and its calls in flight."""
        return [
            {"url": s.replica.name, "ejected": s.ejected, "in_flight": s.in_flight}
            for s in self._replicas
        ]

    async def close(self) -> None:
        """Stop the probers. The upstream itself belongs to the caller."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- calls ------------------------------------------------------------------------------

    async def embed(
        self, inputs: Sequence[EmbedInput], options: EmbedOptions, *, deadline: float
    ) -> list[Vector]:
        """One upstream call with retries: TEI's 429 with jittered backoff until ``deadline``
        (a ``time.monotonic()`` instant), 5xx/424/refused connections a bounded number of
        times; each retry goes to another replica when there is one."""
        policy = self._retry
        attempt = 0
        transient_retries = 0
        failed: _ReplicaState | None = None
        tried: set[_ReplicaState] = set()
        while True:
            if self.breaker.is_open:
                raise errors.unavailable(BREAKER_OPEN_MESSAGE)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.timeout("request deadline passed before the upstream answered")
            state = self._choose(avoid=failed, tried=tried)
            tried.add(state)
            call_started = time.monotonic()
            try:
                async with asyncio.timeout(remaining):
                    vectors = await self._attempt(state, inputs, options)
            except TimeoutError as exc:
                raise errors.timeout(
                    "request deadline passed while waiting for the upstream"
                ) from exc
            except ApiError as exc:
                fault = classify(exc)
                self._record(state, exc, fault)
                if self.load is not None:
                    kind = congestion_kind(exc)
                    if kind is not None:
                        self.load.overloaded(kind)  # before any retry: each attempt counts
                retry = fault is Fault.OVERLOADED or (
                    fault is Fault.TRANSIENT and transient_retries < policy.max_retries
                )
                # A replica not yet tried by this call needs no backoff: it did not just fail.
                delay = 0.0 if self._untried(tried) else policy.delay(attempt)
                # Don't start a retry that cannot finish in time: the caller would get a
                # 504 instead of the upstream's meaningful answer (e.g. 429: back off).
                call_s = time.monotonic() - call_started
                if not retry or time.monotonic() + delay + call_s >= deadline:
                    if counts_against_upstream(exc):
                        self._call_failed()
                    raise
                if fault is Fault.TRANSIENT:
                    transient_retries += 1
                attempt += 1
                failed = state
                if self._observer is not None:
                    self._observer.retried(fault)
                if delay > 0:
                    await asyncio.sleep(delay)
                continue
            self._replica_served(state)
            self.breaker.record_success()
            return vectors

    async def _attempt(
        self, state: _ReplicaState, inputs: Sequence[EmbedInput], options: EmbedOptions
    ) -> list[Vector]:
        load = self.load
        at_start = load.started() if load is not None else (0, 0)
        state.in_flight += 1
        started = time.perf_counter()
        outcome = "200"
        try:
            vectors = await state.replica.embed(inputs, options)
            if self._check is not None:
                self._check(vectors, options)
            if load is not None:
                # This attempt's own latency: not the batch's queueing, not retry back-off.
                load.served(time.perf_counter() - started, len(inputs), at_start)
            return vectors
        except ApiError as exc:
            outcome = str(exc.status)
            raise
        except TimeoutError:
            outcome = "deadline"
            raise
        except Exception as exc:
            outcome = "error"
            log.exception("upstream call failed unexpectedly")
            raise errors.bad_upstream(f"upstream call failed: {exc.__class__.__name__}") from exc
        finally:
            state.in_flight -= 1
            if self._observer is not None:
                self._observer.call_finished(outcome, time.perf_counter() - started)

    def _record(self, state: _ReplicaState, exc: ApiError, fault: Fault) -> None:
        if counts_against_upstream(exc):
            self._replica_failed(state, exc)
        elif exc.from_upstream and fault is not Fault.OVERLOADED:
            # It answered sanely; the input (or the request) was what it refused.
            self._replica_served(state)
            self.breaker.record_success()

    # -- replica choice and ejection ----------------------------------------------------------

    def _choose(self, avoid: _ReplicaState | None, tried: set[_ReplicaState]) -> _ReplicaState:
        # Least outstanding calls among live replicas, those this call has not tried first;
        # rotate among ties so idle ones share.
        start = next(self._rotation) % len(self._replicas)
        order = self._replicas[start:] + self._replicas[:start]
        live = [s for s in order if not s.ejected]
        for candidates in (
            [s for s in live if s not in tried],
            [s for s in live if s is not avoid],
        ):
            if candidates:
                return min(candidates, key=lambda s: s.in_flight)
        if live:
            return live[0]
        # Every replica is ejected: try the one that failed longest ago rather than none.
        return min(order, key=lambda s: s.last_failure)

    def _untried(self, tried: set[_ReplicaState]) -> bool:
        return any(not s.ejected and s not in tried for s in self._replicas)

    def _replica_served(self, state: _ReplicaState) -> None:
        state.failures = 0
        state.ejections = 0
        if state.ejected:
            self._readmit(state, "a call to it succeeded")

    def _replica_failed(self, state: _ReplicaState, exc: ApiError) -> None:
        state.failures += 1
        state.last_failure = time.monotonic()
        if state.ejected or state.failures < self.config.eject_after:
            return
        state.ejected = True
        state.ejections += 1
        log.warning(
            "upstream replica %s ejected after %d consecutive failures (last: %s); probing "
            "its health from %.1fs on",
            state.replica.name,
            state.failures,
            exc.message,
            self._first_probe_delay(state),
        )
        if state.probe is None or state.probe.done():
            state.probe = self._spawn(self._probe_replica(state))

    def _readmit(self, state: _ReplicaState, why: str) -> None:
        state.ejected = False
        state.failures = 0
        log.info("upstream replica %s is back: %s", state.replica.name, why)

    def _first_probe_delay(self, state: _ReplicaState) -> float:
        # A replica ejected again and again (healthy, yet failing its calls) waits longer.
        base = self.config.probe_interval_s * 2.0 ** min(state.ejections - 1, 5)
        return min(base, max(self.config.probe_interval_s, _MAX_PROBE_INTERVAL_S))

    async def _probe_replica(self, state: _ReplicaState) -> None:
        delay = self._first_probe_delay(state)
        ceiling = max(self.config.probe_interval_s, _MAX_PROBE_INTERVAL_S)
        while state.ejected:
            await asyncio.sleep(delay)
            if not state.ejected:
                return  # a call to it succeeded meanwhile
            if await self._healthy(state.replica):
                self._readmit(state, "its health check passed")
                return
            delay = min(delay * 2, ceiling)

    # -- the breaker --------------------------------------------------------------------------

    def _call_failed(self) -> None:
        if self.breaker.record_failure():
            if self._observer is not None:
                self._observer.breaker_opened()
            if self._breaker_probe is None or self._breaker_probe.done():
                self._breaker_probe = self._spawn(self._probe_until_healthy())

    async def _probe_until_healthy(self) -> None:
        while self.breaker.is_open:
            await asyncio.sleep(self.breaker.cooldown_s)
            if await self._healthy(self.upstream):
                self.breaker.record_success()

    @staticmethod
    async def _healthy(target: Replica | Upstream) -> bool:
        try:
            return await target.health()
        except Exception:  # a probe must never die: the breaker or ejection would stay
            log.exception("upstream health probe failed")
            return False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
