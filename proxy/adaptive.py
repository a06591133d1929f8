"""The adaptive concurrency limit of one upstream pool, wired between the batcher and the
resilient upstream.

:mod:`proxy.concurrency` holds the pure state machines (the limiter, the arrival rate, the
send-now-or-wait advisor). This puts one set of them in front of one upstream pool (all its
replicas) and connects them:

* the batcher asks it how many calls may be in flight (``limit``) and whether a batch that
  could go should be held a little (``hold``), and tells it how many items arrived
  (:class:`proxy.batcher.DispatchControl`);
* the resilient upstream tells it about every upstream *attempt* (retries included):
  ``started`` when it goes out, ``served`` when it succeeded, ``overloaded`` when it was
  answered 429 or 503 or timed out (:class:`proxy.resilience.LoadSignals`).

No asyncio here beyond :meth:`Pool.wake`: it runs on the event loop's thread, called from
the batcher's dispatch and from the upstream's attempts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from proxy.batcher import LAUNCH
from proxy.concurrency import (
    ArrivalRate,
    CongestionKind,
    DispatchAdvisor,
    GradientConfig,
    GradientLimiter,
    LimiterState,
)

log = logging.getLogger(__name__)

# A hold shorter than this costs the loop a timer for next to nothing: send instead.
MIN_HOLD_S = 0.0002
# How long after a call's answers their callers are expected back (closed-loop clients
# resend at once), as a share of the upstream's fixed cost per call; at least this long.
ECHO_SHARE = 0.25
MIN_ECHO_S = 0.0005


class Pool(Protocol):
    """What the controller reads from the batcher that feeds the pool."""

    @property
    def in_flight(self) -> int: ...

    @property
    def queue_depth(self) -> int: ...

    def wake(self) -> None: ...


class AdaptiveConcurrency:
    """One upstream pool's adaptive limit: :class:`GradientLimiter`, :class:`ArrivalRate` and
    :class:`DispatchAdvisor`, fed as :mod:`proxy.concurrency`'s reporting contract says.

    ``ceiling`` is the hard maximum (MAX_CONCURRENT_BATCHES, or ``auto_ceiling`` of the
    upstream's /info). ``on_cut`` is called once for each congestion cut (a metric)."""

    def __init__(
        self,
        name: str,
        *,
        ceiling: int,
        max_wait_s: float,
        config: GradientConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_cut: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.limiter = GradientLimiter(config, clock=clock)
        self.limiter.set_ceiling(ceiling)
        self.arrivals = ArrivalRate(clock=clock)
        self.advisor = DispatchAdvisor(self.limiter, max_wait_s)
        self._pool: Pool | None = None
        self._on_cut = on_cut
        self._clock = clock
        # Items answered lately whose callers have not sent again yet, and when the last
        # answers went out: see hold().
        self._echo = 0
        self._answered_at = -1.0

    def attach(self, pool: Pool) -> None:
        """The batcher whose calls this pool's limit bounds (it exists only once the
        upstream's /info is known, after this controller)."""
        self._pool = pool

    # -- what the batcher asks (proxy.batcher.DispatchControl) ---------------------------

    @property
    def limit(self) -> int:
        return self.limiter.limit

    @property
    def full_batch_limit(self) -> int:
        return self.limiter.full_batch_limit

    def arrived(self, count: int, now: float) -> None:
        self.arrivals.add(count, now)
        self._echo = max(0, self._echo - count)

    def hold(
        self, queued: int, in_flight: int, max_batch: int, now: float, oldest_enqueued_at: float
    ) -> float | None:
        wait = self.advisor.should_wait(
            queued, self.arrivals.rate(now), in_flight, max_batch, now, oldest_enqueued_at
        )
        if wait is None:
            wait = self._echo_hold(queued, in_flight, max_batch, now, oldest_enqueued_at)
        return wait if wait is not None and wait >= MIN_HOLD_S else None

    def _echo_hold(
        self, queued: int, in_flight: int, max_batch: int, now: float, oldest_enqueued_at: float
    ) -> float | None:
        """Closed-loop callers: the items of a call just answered come back at once, and an
        upstream that runs calls one at a time serves them a whole call later if the batch
        goes without them (8 clients, one slot: two half batches take turns). So does one
        that merges calls into its own batches: TEI cuts its next batch from whatever is
        queued when one starts, so a first caller sent alone makes the others wait a whole
        batch more (measured: 8 clients after a backlog, p50 55 ms instead of 34). While
        the upstream is idle (or, if it merges calls, whatever is in flight), hold a batch
        a moment (a quarter of its fixed cost) for those answered callers that have not
        sent again; each one that does is one less to wait for. Open-loop traffic has no
        such echo: the hold is short, and only right after answers went out."""
        if self._echo <= 0 or queued >= max_batch:
            return None
        if in_flight > 0 and self.limiter.merges_calls is not True:
            return None  # busy and one call at a time: the advisor's rule (fill) applies
        # Counted from the answers (when the slot freed): the batcher caps it by max_wait too.
        until = self._answered_at + min(self._echo_window(), self.advisor.max_wait_s)
        return until - now if until > now else None

    def _echo_window(self) -> float:
        return max(MIN_ECHO_S, ECHO_SHARE * self.limiter.cost_model.a)

    # -- what the upstream reports (proxy.resilience.LoadSignals) -----------------------

    def started(self) -> tuple[int, int]:
        """An attempt goes out: the calls in flight (counting its own batch) and the items
        the limit, not the batch size, held back (:meth:`GradientLimiter.held_back`). The
        first attempt of a batch reports what dispatch saw when it sent the batch; a retry
        or a bisection half, what the batcher holds now."""
        launch = LAUNCH.get()
        if launch is not None and not launch.reported:
            launch.reported = True
            held = self.limiter.held_back(
                launch.queue_left, launch.pass_in_flight, launch.pass_full_wait_s
            )
            return launch.in_flight, held
        pool = self._pool
        if pool is None:
            return 1, 0
        in_flight = pool.in_flight
        return in_flight, self.limiter.held_back(pool.queue_depth, in_flight)

    def served(self, latency_s: float, size: int, at_start: tuple[int, int]) -> None:
        in_flight, queued = at_start
        now = self._clock()
        if now - self._answered_at > self._echo_window():
            self._echo = 0  # callers answered before that did not come back (or are back)
        self._echo += size  # answered: their callers may send again at once
        self._answered_at = now
        before = self.limiter.limit
        after = self.limiter.on_sample(latency_s, size, in_flight, queued=queued)
        if after != before:
            self._changed(before, after, "latency")
            if after > before and self._pool is not None:
                self._pool.wake()  # a new slot: queued items need not wait for a call to end

    def overloaded(self, kind: CongestionKind) -> None:
        before_cuts = self.limiter.congestion_cuts
        before = self.limiter.limit
        after = self.limiter.on_congestion(kind)
        if self.limiter.congestion_cuts != before_cuts and self._on_cut is not None:
            self._on_cut()
        if after != before:
            self._changed(before, after, f"upstream {kind}")

    # -- reading ------------------------------------------------------------------------

    def state(self) -> LimiterState:
        return self.limiter.state()

    def _changed(self, before: int, after: int, why: str) -> None:
        if log.isEnabledFor(logging.DEBUG):
            state = self.limiter.state()
            log.debug(
                "concurrency limit of %s %d -> %d (%s; baseline %s ms, recent %s ms, "
                "gradient %.2f)",
                self.name,
                before,
                after,
                why,
                _ms(state.baseline_s),
                _ms(state.recent_s),
                state.gradient,
            )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"
