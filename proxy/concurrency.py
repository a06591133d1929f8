"""An adaptive limit on upstream calls in flight, and a "send now or wait" advisor.

Pure state machines: no asyncio, no threads, an injectable clock; one set per upstream pool.
The batcher reports what each upstream call did; the limiter answers with how many calls may
be in flight, and the advisor with how long a batch that could go now should wait.

**The limit** (:class:`GradientLimiter`) follows Netflix concurrency-limits' Gradient2 and
Envoy's adaptive_concurrency gradient controller where the proxy has no backlog, and measures
throughput where it does, because a batching client sits in front of upstreams whose latency
means different things:

* Latency is normalised by the call's size: ``x = latency * (a + b) / (a + b*n)``, "this
  call as if it had carried one item", with ``a`` (fixed cost per call) and ``b`` (cost per
  item) from the :class:`CostModel` fitted online. Per item (``latency / n``) until a fit
  exists. Batches grow with load, and a bigger batch is not a slower upstream.
* ``baseline`` is a soft, slowly rising minimum of ``x``: lower samples pull it down, and it
  rises toward calls that were alone in flight with time constant ``baseline_rise_s``, so an
  upstream that became slower for good is relearned. No pinned probe window (Envoy's minRTT
  window, whose docs warn of extra 503s while it runs); queued calls never raise it.
* ``recent`` is a short exponential average of ``x``;
  ``gradient = clamp(tolerance * baseline / recent, 0.5, 1)`` (Gradient2's clamp). The
  tolerance, 1.2, is a little tighter than Envoy's default 25% buffer: a controller can see
  the knee of an upstream that degrades past some concurrency only once latency has grown by
  the tolerance, and with 25% the simulated one settled a call past its knee. It must stay
  above the upstream's latency noise (with 10% service-time jitter it under-provisions a
  little: see tests/test_concurrency.py).
* Beyond the tolerance the limit moves toward ``limit * gradient``; within it, and if the
  proxy uses at least half the limit (not app-limited), toward ``limit + sqrt(limit)``
  (Envoy's headroom), by ``smoothing`` per round trip. Unlike Gradient2/Envoy the headroom
  is not added while shrinking: with limits of 1 to 16 it is as large as the cut, and
  ``0.5*L + sqrt(L) = L`` has its fixed point at L = 4, so a serial upstream could never be
  held at 1. A probe up that failed holds the next one for ``probe_hold_rtts`` round trips,
  twice as long after each probe in a row that failed (up to ``2**max_probe_backoff``
  times), so a serial upstream is not made to pay a doubled latency every few round trips
  for a level it never serves better; a probe that holds for ``probe_hold_rtts`` resets it.
* While items wait in the proxy because every slot is busy (a backlog lasting a round trip),
  latency is no verdict: a TEI-like upstream that merges queued calls into its own batches
  gets slower *because* its batches grow, which is what buys throughput, and at two calls
  in flight it looks exactly like a serial upstream (the second call waits for the first).
  There the limiter measures each level's capacity (items answered per second, over calls
  that ran entirely under that limit) and the demand (capacity plus the queue's growth), and
  climbs to the first level that carries the demand, or, if none does, toward the highest
  throughput, exploring unmeasured levels (below first, after starting too high). Upward it
  explores by jumps (:meth:`GradientLimiter._jump`): TEI's throughput grows by a few % per
  call (its batches by a fraction of a call each), under the 5 % a level must gain, yet by
  ~30 % from 1 to 8 calls. A level reached by a jump in front of an upstream that merges
  calls is held while its calls stay full (closed-loop clients: no backlog, so no
  measurement, and the gradient would walk it back into the backlog); once they are not,
  an unmeasured one goes back to one above where the jump started. A gradient cut never
  goes below the fewest calls measured to carry the load.
* At a limit of one, a full batch may take one more call (:attr:`GradientLimiter.
  full_batch_limit`): it waits inside the upstream for the running call (pipelining), so a
  serial upstream never idles a round trip between full batches. Levels are measured with
  it.
* 429, 503 and timeouts cut the limit by ``backoff`` (0.75), at most once per cooldown (one
  smoothed call latency), so a burst of failures from calls sent under the old limit counts
  once. Floor 1; ceiling configured (:func:`auto_ceiling` from the upstream's /info).

**The advisor** (:class:`DispatchAdvisor`): hold a batch only where a separate call would cost
the upstream its fixed cost ``a`` and more items will arrive during ``a`` than are queued
(see its docstring for the rule); send at once to an upstream where more calls in flight buy
throughput. Never past ``max_wait`` from the oldest item's arrival.

**Reporting contract** for callers:

* one :meth:`GradientLimiter.on_sample` per *successful upstream attempt*, with that
  attempt's own latency (not the batch's time in the proxy, not retry back-off sleeps), the
  calls in flight when it started (counting itself) and the items the limit held back when it
  was sent (:meth:`GradientLimiter.held_back`: those left queued behind it, or, for a full
  batch that emptied the queue after waiting half a round trip, one);
* one :meth:`GradientLimiter.on_congestion` per failed attempt that says "overloaded" (429,
  503, a timeout), *including every attempt that is then retried*: a retry that succeeds must
  not hide that the upstream refused the first try. The cooldown keeps a burst of such
  reports from collapsing the limit;
* nothing for failures caused by the inputs (4xx other than 429): they say nothing of load.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from itertools import pairwise

__all__ = [
    "ArrivalRate",
    "CongestionKind",
    "CostModel",
    "DispatchAdvisor",
    "GradientConfig",
    "GradientLimiter",
    "LimiterState",
    "auto_ceiling",
]


class CongestionKind(StrEnum):
    RATE_LIMITED = "429"
    UNAVAILABLE = "503"
    TIMEOUT = "timeout"


def auto_ceiling(max_concurrent_requests: int, batch_size: int, replicas: int = 1) -> int:
    """Calls in flight the upstream admits: its permits over the batch size, per replica.

    TEI counts ``max_concurrent_requests`` per input, so one replica holds at most
    ``max_concurrent_requests // batch_size`` full batches before it answers 429. Never < 1.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    per_replica = max(0, max_concurrent_requests) // batch_size
    return max(1, per_replica * max(1, replicas))


# -- the upstream's cost model ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CostModelConfig:
    min_samples: int = 1  # lone calls before the fit is used (one size: all fixed cost)
    # A lower sample pulls its size bin's minimum down by this much (a soft minimum: one
    # lucky sample does not set it, a run of them does).
    drop: float = 0.3
    # Time constant with which a bin's minimum rises toward calls that were alone in flight,
    # so an upstream that became slower for good is relearned.
    rise_s: float = 10.0
    # Size bins are 2**(1/4) wide (19%): within a bin, sizes differ too little to matter.
    bins_per_doubling: int = 4
    # A bin's weight in the fit halves every this many seconds without a sample, so sizes
    # not seen for long (e.g. many tiny calls at start-up) weigh less than current ones.
    bin_half_life_s: float = 10.0
    # Fewer samples than this at concurrency >= 3 and the model does not say whether the
    # upstream merges calls.
    min_merge_samples: int = 8
    # Share of the fixed cost a that each call ahead adds to a call's latency, below which the
    # upstream is taken to merge (or run in parallel) concurrent calls. In the simulations a
    # serial upstream scores ~0.93 (each call ahead is a whole service time), a TEI-like one
    # that merges queued calls 0.2-0.4, and parallel workers below 0.
    merge_threshold: float = 0.6


@dataclass(slots=True)
class _Bin:
    size: float  # typical size of the bin's calls
    latency: float  # soft minimum of their latency
    at: float  # last sample
    count: int = 1


class CostModel:
    """Online fit of the upstream's no-load latency ``a + b*n``, and of how calls interfere.

    The fit is a lower envelope: calls are binned by size, each bin keeps a soft minimum of
    latency, and ``a`` and ``b`` are the weighted least squares line through the bins. Only a
    call that was alone in flight may open a bin or raise its minimum (slowly, so an upstream
    that became slower for good is relearned); any call may lower it. A queued call never
    inflates the fit: a bin opened by queued calls would teach it that queueing is the cost.

    Interference is measured on calls that started with two or more others in flight: the
    delay per call ahead beyond what its items cost, as a share of ``a``, averaged. An upstream
    that runs calls one by one pays ``a`` for each call ahead (~1); one that merges queued calls
    into its own batches, or runs them in parallel, does not (~0). With one call ahead a serial
    and a merging upstream look alike (both wait for the running call), so those are skipped.
    """

    def __init__(self, config: CostModelConfig | None = None) -> None:
        self.config = config or CostModelConfig()
        self._bins: dict[int, _Bin] = {}  # lone calls
        self._shared: dict[int, dict[int, _Bin]] = {}  # calls in flight -> their size bins
        self._shape = 0.0  # b/a borrowed from shared calls, while lone calls had one size
        self._count = 0
        self._a = 0.0
        self._b = 0.0
        self._last_at: float | None = None
        self._interference = 0.0
        self._interference_n = 0

    @property
    def ready(self) -> bool:
        return self._count >= self.config.min_samples

    @property
    def a(self) -> float:
        """Fixed cost of one call, seconds (0 until :attr:`ready`)."""
        return self._a if self.ready else 0.0

    @property
    def b(self) -> float:
        """Cost of one more item in a call, seconds (0 until :attr:`ready`)."""
        return self._b if self.ready else 0.0

    @property
    def samples(self) -> int:
        return self._count

    @property
    def interference(self) -> float | None:
        """Mean share of ``a`` that each call ahead added; None while unmeasured."""
        if self._interference_n < self.config.min_merge_samples:
            return None
        return self._interference

    @property
    def merges_calls(self) -> bool | None:
        """Whether concurrent calls cost the upstream little extra; None while unmeasured."""
        interference = self.interference
        if interference is None:
            return None
        return interference < self.config.merge_threshold

    def predict(self, size: float) -> float:
        return self._a + self._b * size

    def observe(self, latency_s: float, size: float, in_flight: int, now: float) -> None:
        if latency_s <= 0 or size <= 0:
            return
        if in_flight >= 3 and self.ready and self._a > 0:
            # The fixed cost each call ahead added, as a share of a: the delay per call ahead
            # beyond what its items cost (their count taken as this call's).
            per_call = (latency_s - self.predict(size)) / (in_flight - 1)
            share = (per_call - self._b * size) / self._a
            n = self._interference_n
            # A plain mean for the first samples, then a 20-sample exponential average.
            weight = 1.0 / (n + 1) if n < 20 else 0.05
            self._interference += weight * (share - self._interference)
            self._interference_n = n + 1
        cfg = self.config
        key = math.floor(cfg.bins_per_doubling * math.log2(size))
        alone = in_flight <= 1
        if not alone and in_flight <= 64:
            # Soft minima per size among calls that shared the upstream with as many others:
            # only their shape (b/a) is used, and only while lone calls had one size.
            shared = self._shared.setdefault(in_flight, {})
            other = shared.get(key)
            if other is None:
                shared[key] = _Bin(size, latency_s, now)
            else:
                if latency_s < other.latency:
                    other.latency += cfg.drop * (latency_s - other.latency)
                other.count += 1
                other.at = now
                other.size += 0.1 * (size - other.size)
        found = self._bins.get(key)
        if found is None:
            if alone:  # a queued call may only lower what lone calls measured
                self._bins[key] = _Bin(size, latency_s, now)
        else:
            if latency_s < found.latency:
                found.latency += cfg.drop * (latency_s - found.latency)
            elif alone and self._last_at is not None:
                pull = 1.0 - math.exp(-max(0.0, now - self._last_at) / cfg.rise_s)
                found.latency += pull * (latency_s - found.latency)
            found.count += 1
            found.at = now
            found.size += 0.1 * (size - found.size)
        if alone:
            self._last_at = now
            self._count += 1
        self._solve(now)

    def _solve(self, now: float) -> None:
        line = self._line(self._bins, now)
        if line is None:
            return
        mean_n, mean_y, slope = line
        if slope is None:
            # Lone calls of one size only: a and b cannot be told apart from them. Borrow the
            # shape b/a from calls that shared the upstream with the same number of others:
            # queueing stretches a serial upstream's latency by a factor, which keeps the
            # shape, and a parallel one's not at all. Without that, charge it all to the call
            # (over-states a: the advisor then waits a little more, bounded by max_wait).
            ratio = self._borrowed_shape(now)
            a = mean_y / (1.0 + ratio * mean_n)
            self._a, self._b = a, ratio * a
            return
        b = max(0.0, slope)
        a = mean_y - b * mean_n
        if a < 0.0:
            a, b = 0.0, mean_y / mean_n
        self._a, self._b = a, b

    def _borrowed_shape(self, now: float) -> float:
        best: tuple[int, float] | None = None  # (size bins, b/a)
        for bins in self._shared.values():
            if len(bins) < 3:
                continue  # two points make a line through any stale one
            line = self._line(bins, now)
            if line is None:
                continue
            mean_n, mean_y, slope = line
            if slope is None or slope <= 0:
                continue
            a = mean_y - slope * mean_n
            if a <= 0.0:
                continue  # all per-item: no finite shape to borrow
            # The widest spread of sizes says the most about the shape.
            if best is None or len(bins) > best[0]:
                best = (len(bins), slope / a)
        if best is not None:
            # Kept when the evidence lacks spread for a while (e.g. a backlog of full
            # batches): a shape that snapped back to "all fixed cost" would make every
            # bigger batch look queued and cut the limit for nothing.
            self._shape = best[1]
        return self._shape

    def _line(self, bins: dict[int, _Bin], now: float) -> tuple[float, float, float | None] | None:
        """Weighted least squares through the bins: (mean size, mean latency, slope or None
        when the sizes have no spread)."""
        w = sn = sy = snn = sny = 0.0
        half_life = self.config.bin_half_life_s
        for item in bins.values():
            # A bin seen once is a weak point; one not seen lately, a stale one.
            weight = min(item.count, 20) * 0.5 ** ((now - item.at) / half_life)
            w += weight
            sn += weight * item.size
            sy += weight * item.latency
            snn += weight * item.size * item.size
            sny += weight * item.size * item.latency
        if w <= 0:
            return None
        mean_n, mean_y = sn / w, sy / w
        var_n = snn / w - mean_n * mean_n
        if var_n <= 1e-6 * mean_n * mean_n:
            return mean_n, mean_y, None
        return mean_n, mean_y, (sny / w - mean_n * mean_y) / var_n


# -- the limit --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GradientConfig:
    initial_limit: float = 2.0  # MAX_CONCURRENT_BATCHES' static default (TEI: 1 + 1 prefetch)
    floor: int = 1
    ceiling: int = 16  # TEI's 512 permits / 32 items; see auto_ceiling
    # -- the latency gradient
    tolerance: float = 1.2  # Envoy's default buffer is 25%; see the module docstring
    min_gradient: float = 0.5  # Gradient2's clamp: one update never cuts by more than half
    # Weight of one round trip's worth of samples (each sample weighs smoothing / limit, as
    # about `limit` calls complete per round trip). Gradient2 uses 0.2 per sample, which at
    # its minimum limit of 20 is ~0.99 per round trip.
    smoothing: float = 1.0
    recent_alpha: float = 0.5  # weight of the newest sample in ``recent``
    baseline_drop: float = 0.2  # weight of a lower sample in the baseline (a soft minimum)
    baseline_rise_s: float = 10.0  # time constant of the baseline's rise toward lone calls
    # After a probe upward failed, wait this many round trips before the next one: each
    # probe of a level just found too high costs every call sent under it.
    probe_hold_rtts: float = 15.0
    # Each probe in a row that failed doubles that hold, up to 2**max_probe_backoff times
    # (16: 240 round trips, about 6 s on a 26 ms serial upstream).
    max_probe_backoff: int = 4
    # -- capacity while backlogged
    throughput_gain: float = 0.05  # a level serves more only if it serves this much more
    capacity_margin: float = 0.02  # a level carries the load if its capacity beats it by this
    throughput_memory_s: float = 5.0  # forget capacity measured longer ago than this
    measure_rtts: float = 10.0  # how long a backlogged level is held for its measurement
    # A full batch that empties the queue still says "backlog" if its oldest item waited
    # this many round trips (see held_back).
    full_wait_rtts: float = 0.5
    # A call at least this share of the biggest lately counts as full (see on_sample).
    full_share: float = 0.9
    # No full batch beyond a limit of one (see full_batch_limit) this long after a cut.
    pipeline_after_cut_s: float = 5.0
    # -- congestion signals
    backoff: float = 0.75  # within the brief's 0.5-0.9 (AIMD's 0.9 is for limits ~100)
    congestion_cooldown_s: float | None = None  # None: one smoothed call latency
    default_cooldown_s: float = 0.1  # before any call latency is known

    def __post_init__(self) -> None:
        if not 1 <= self.floor <= self.ceiling:
            raise ValueError("need 1 <= floor <= ceiling")
        if self.tolerance < 1.0:
            raise ValueError("tolerance must be at least 1")
        if not 0 < self.min_gradient <= 1:
            raise ValueError("min_gradient must be in (0, 1]")
        for name in ("smoothing", "recent_alpha", "baseline_drop"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        if not 0 < self.backoff < 1:
            raise ValueError("backoff must be in (0, 1)")
        if self.baseline_rise_s <= 0 or self.throughput_memory_s <= 0:
            raise ValueError("time constants must be positive")


@dataclass(frozen=True, slots=True)
class LimiterState:
    """What /info and /metrics show. Latencies are seconds for a one-item call."""

    limit: int
    estimate: float
    floor: int
    ceiling: int
    baseline_s: float | None
    recent_s: float | None
    gradient: float
    samples: int
    congestion_cuts: int
    fixed_cost_s: float
    item_cost_s: float
    merges_calls: bool | None
    capacity: dict[int, float]  # limit -> items/s measured while backlogged (recent ones)
    demand_per_s: float

    def as_dict(self) -> dict[str, object]:
        return {
            "limit": self.limit,
            "estimate": round(self.estimate, 3),
            "floor": self.floor,
            "ceiling": self.ceiling,
            "baseline_ms": None if self.baseline_s is None else self.baseline_s * 1e3,
            "recent_ms": None if self.recent_s is None else self.recent_s * 1e3,
            "gradient": self.gradient,
            "samples": self.samples,
            "congestion_cuts": self.congestion_cuts,
            "fixed_cost_ms": self.fixed_cost_s * 1e3,
            "item_cost_ms": self.item_cost_s * 1e3,
            "merges_calls": self.merges_calls,
            "capacity_per_s": {str(k): round(v, 1) for k, v in sorted(self.capacity.items())},
            "demand_per_s": round(self.demand_per_s, 1),
        }


@dataclass(slots=True)
class _Level:
    items_per_s: float
    at: float


@dataclass(slots=True)
class _Window:
    """One capacity measurement in progress: answers to calls sent into a backlog."""

    start: float
    queued: int  # items waiting when it started
    items: float = 0.0
    calls: int = 0


class GradientLimiter:
    """Adaptive limit on one upstream pool's calls in flight. Not thread-safe (one loop).

    Two rules, one per situation:

    * No backlog in the proxy (items go out as they come): the latency gradient, as in
      Gradient2/Envoy. Beyond ``tolerance`` the limit shrinks, within it (and if not
      app-limited) it grows by ``sqrt(limit)``; a failed probe holds the next one back. A cut
      never goes below the fewest calls measured to carry the current load.
    * A backlog that lasts a round trip (items wait because every slot is busy): latency is no
      verdict here, because a merging upstream's latency grows with the batches that buy its
      throughput, and a serial upstream's second call looks just like its merging cousin's.
      Instead each level's capacity (items answered per second while backlogged) and the
      demand (capacity + queue growth) are measured; the limit climbs to the first level
      whose capacity carries the demand, or, if none does, toward the highest throughput,
      exploring unmeasured levels (below first after starting too high; upward by jumps).
    """

    def __init__(
        self,
        config: GradientConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        cost_model: CostModel | None = None,
    ) -> None:
        self.config = cfg = config or GradientConfig()
        self._clock = clock
        self.cost_model = cost_model or CostModel()
        self._ceiling = cfg.ceiling
        self._estimate = self._clamp(cfg.initial_limit)
        # the latency gradient
        self._baseline: float | None = None
        self._recent: float | None = None
        self._gradient = 1.0
        self._normaliser_ready = False
        self._last_sample_at: float | None = None
        self._rtt: float | None = None  # smoothed raw call latency: one round trip
        self._failed_probe_at: float | None = None
        self._failed_level = 0
        self._probe_streak = 0  # probes up in a row that failed
        self._probe_from: int | None = None  # the limit a probe up in progress started from
        self._probe_at = -math.inf  # when the limit last went up
        # Exploring an unmeasured level during a backlog: the level, and how many such
        # explorations in a row ended before it could be measured (a serial upstream's
        # second call drains the proxy's queue into the upstream's, so its level is never
        # backlogged long enough to measure, and the gradient cuts it each time).
        self._exploring: int | None = None
        self._explore_streak = 0
        self._explore_failed_at = -math.inf
        # capacity and demand while backlogged
        self._levels: dict[int, _Level] = {}
        self._window: _Window | None = None
        self._held = 0  # items the limit held back when the last call answered was sent
        self._call_size = 0.0  # items per call, a short average
        self._max_size = 0.0  # the biggest call lately (a slowly decaying maximum)
        self._jumped_from: int | None = None  # the level the last jump up started from
        self._jump_holds = False  # whether it is held while its calls are full (see on_sample)
        self._demand: float | None = None  # items/s offered, measured while backlogged
        self._delivered = ArrivalRate(0.5, clock=clock)  # items/s answered
        self._backlog_at: float | None = None  # last call sent into a backlog
        self._backlog_since = math.inf  # start of the current backlog
        self._limit_since = -math.inf  # when the integer limit last changed
        self._trial_until = -math.inf
        # congestion signals
        self._last_cut_at: float | None = None
        self._samples = 0
        self._cuts = 0

    # -- reading ------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        return max(self.config.floor, min(self._ceiling, int(self._estimate)))

    @property
    def ceiling(self) -> int:
        return self._ceiling

    @property
    def congestion_cuts(self) -> int:
        return self._cuts

    @property
    def merges_calls(self) -> bool | None:
        """Whether more calls in flight buy throughput (the upstream merges them into its own
        batches or runs them in parallel): from capacity measured at several levels when
        there is some, else from how much each call ahead delayed others; None if unknown."""
        now = self._last_sample_at
        levels = {} if now is None else self._fresh(now)
        gain = 1.0 + self.config.throughput_gain
        ordered = sorted(levels)
        if any(hi >= 2 and levels[hi] >= levels[lo] * gain for lo, hi in pairwise(ordered)):
            return True
        if len(ordered) >= 3 and max(levels.values()) < min(levels.values()) * gain:
            return False  # three levels or more, all alike: one call at a time
        return self.cost_model.merges_calls

    @property
    def full_batch_limit(self) -> int:
        """Calls in flight that a *full* batch may use (never fewer than :attr:`limit`).

        At a limit of one call, one more for a full batch: a full batch cannot grow by
        waiting, and sent now it waits inside the upstream, which starts it the moment the
        running call ends instead of a round trip later (pipelining: a serial upstream never
        idles between full batches; one that merges or runs calls in parallel just gets the
        next batch sooner). Not for a while after a congestion cut (the upstream refused
        more), and not above the ceiling. Higher limits get more calls by the limit's own
        rules."""
        limit = self.limit
        if limit != 1:
            return limit
        cut = self._last_cut_at
        if cut is not None and self._last_sample_at is not None:
            if self._last_sample_at - cut < self.config.pipeline_after_cut_s:
                return limit
        return min(self._ceiling, limit + 1)

    def set_ceiling(self, ceiling: int) -> None:
        """Change the hard maximum (e.g. once the upstream's /info gives :func:`auto_ceiling`)."""
        self._ceiling = max(self.config.floor, ceiling)
        self._estimate = self._clamp(self._estimate)

    def state(self) -> LimiterState:
        model = self.cost_model
        now = self._last_sample_at
        return LimiterState(
            limit=self.limit,
            estimate=self._estimate,
            floor=self.config.floor,
            ceiling=self._ceiling,
            baseline_s=self._baseline,
            recent_s=self._recent,
            gradient=self._gradient,
            samples=self._samples,
            congestion_cuts=self._cuts,
            fixed_cost_s=model.a,
            item_cost_s=model.b,
            merges_calls=self.merges_calls,
            capacity={} if now is None else self._fresh(now),
            demand_per_s=0.0 if now is None else self._demand_now(now, sustained=False),
        )

    # -- feeding ------------------------------------------------------------------------

    def held_back(self, queue_left: int, in_flight: int, full_wait_s: float = 0.0) -> int:
        """What to report as ``queued`` for a call being sent: items the limit, not the batch
        size, held back. ``queue_left``: items still queued once it left; ``in_flight``:
        calls in flight once the calls sent with it left; ``full_wait_s``: among the batches
        sent with it (itself included) that were cut at their size cap, how long the oldest
        item waited (0 if none was full).

        Items left behind while every slot is busy are held back. So are, as one, those of a
        send that emptied the queue with a full batch whose oldest item waited half a round
        trip: closed-loop clients resend only once answered, so a backlog of about the calls
        answered together (64 clients, 2 batches of 32, one slot) leaves little or nothing
        behind at each send, yet half of the clients wait for a slot every round trip."""
        if in_flight < self.limit:
            return 0
        if queue_left > 0:
            return queue_left
        rtt = self._rtt
        if rtt is not None and full_wait_s > 0 and full_wait_s >= self.config.full_wait_rtts * rtt:
            return 1
        return 0

    def on_sample(
        self,
        latency_s: float,
        size: float,
        in_flight_at_start: int,
        now: float | None = None,
        *,
        queued: int = 0,
    ) -> int:
        """Record one successful upstream attempt; return the new limit.

        ``size``: items in the call (or its cost, in any unit that grows with the upstream's
        work). ``in_flight_at_start``: calls in flight when this one started, *counting this
        one* (the batcher's in-flight count right after it launched the call), so a lone call
        reports 1. ``queued``: items left waiting in the proxy when this call went out because
        every slot was busy (the batcher's queue depth after launching it if it was then at
        its limit, else 0).
        """
        if latency_s <= 0 or size <= 0:
            return self.limit
        now = self._clock() if now is None else now
        cfg = self.config
        in_flight = max(1, in_flight_at_start)
        self._samples += 1
        self.cost_model.observe(latency_s, size, in_flight, now)
        self._rtt = latency_s if self._rtt is None else self._rtt + 0.2 * (latency_s - self._rtt)
        self._probe_held(now, self._rtt)
        self._delivered.add(size, now)
        backlogged = self._track_backlog(latency_s, size, in_flight, queued, now)
        self._update_latency(latency_s, size, in_flight, now)
        rtt = self._rtt
        sustained = backlogged and now - self._backlog_since >= rtt
        jumped = self._jumped_from
        if jumped is not None and self._call_size < cfg.full_share * self._max_size:
            start, jumped, self._jumped_from = jumped, None, None
            if self.limit not in self._levels:
                # Calls no longer full after a jump to a level never measured: it overshot
                # (or the load dropped). Back to one above where it started; the usual rules
                # go on from there, as they do from a level that was measured.
                self._set_estimate(min(self._estimate, start + 1.5), now)
                return self.limit
        if sustained:
            level_target = self._capacity_target(now)
            if level_target is not None:
                before = self.limit
                self._set_estimate(level_target, now)  # a measured decision: no smoothing
                if self.limit > before:
                    # Give the new level two round trips: right after a move up the queue
                    # drains into the new slot, the next calls look unbacklogged, and the
                    # gradient would judge the level before its capacity is known.
                    self._trial_until = now + 2.0 * rtt
                return self.limit
            if now - self._limit_since < cfg.measure_rtts * rtt:
                return self.limit  # hold the level while its capacity is being measured
        if now < self._trial_until:
            return self.limit
        if jumped is not None and self._jump_holds:
            # A jump that absorbed the backlog with full calls (closed-loop clients in front
            # of an upstream that merges calls): the levels in between are unmeasured, and
            # the gradient would walk down through them into the backlog again, since such an
            # upstream's latency grows with the batches that buy its throughput.
            return self.limit
        target = self._gradient_target(in_flight, now)
        if backlogged:
            target = min(target, self._estimate)  # a passing backlog is no reason to grow
        weight = min(1.0, cfg.smoothing / max(1.0, self._estimate))
        self._set_estimate(self._estimate + weight * (target - self._estimate), now)
        return self.limit

    def on_congestion(self, kind: CongestionKind | str, now: float | None = None) -> int:
        """Record one overloaded attempt (429, 503, timeout); return the new limit."""
        CongestionKind(kind)  # reject unknown kinds early
        now = self._clock() if now is None else now
        cfg = self.config
        cooldown = cfg.congestion_cooldown_s
        if cooldown is None:
            cooldown = cfg.default_cooldown_s if self._rtt is None else self._rtt
        if self._last_cut_at is not None and now - self._last_cut_at < cooldown:
            return self.limit
        self._last_cut_at = now
        self._fail_probe(now, self.limit)
        self._cuts += 1
        self._jumped_from = None  # refused: no level is held for having absorbed a backlog
        self._set_estimate(self._estimate * cfg.backoff, now)
        return self.limit

    # -- the latency gradient -----------------------------------------------------------

    def _update_latency(self, latency_s: float, size: float, in_flight: int, now: float) -> None:
        cfg = self.config
        if self.cost_model.ready and not self._normaliser_ready:
            # The unit of x changes from "per item" to "per one-item call": start afresh.
            self._normaliser_ready = True
            self._baseline = self._recent = None
        x = self._normalise(latency_s, size)
        self._recent = (
            x if self._recent is None else self._recent + cfg.recent_alpha * (x - self._recent)
        )
        if self._baseline is None:
            self._baseline = x
        elif x < self._baseline:
            # A soft minimum: one lucky sample does not set it, a run of them does.
            self._baseline += cfg.baseline_drop * (x - self._baseline)
        elif in_flight <= 1 and self._last_sample_at is not None:
            # Only calls that had the upstream to themselves may raise the no-load baseline:
            # under load every sample carries queueing, and following it would creep.
            pull = 1.0 - math.exp(-max(0.0, now - self._last_sample_at) / cfg.baseline_rise_s)
            self._baseline += pull * (x - self._baseline)
        self._last_sample_at = now
        self._gradient = max(
            cfg.min_gradient, min(1.0, cfg.tolerance * self._baseline / self._recent)
        )

    def _normalise(self, latency_s: float, size: float) -> float:
        """This call's latency as if it had carried one item (per item until a fit exists)."""
        model = self.cost_model
        if not model.ready:
            return latency_s / size
        a, b = model.a, model.b
        denominator = a + b * size
        if denominator <= 0:
            return latency_s / size
        return latency_s * (a + b) / denominator

    def _gradient_target(self, in_flight: int, now: float) -> float:
        """Gradient2/Envoy: shrink past the latency tolerance, else grow by sqrt(limit)."""
        estimate = self._estimate
        if self._gradient < 1.0:
            if estimate >= self.limit + 0.5 or self._gradient < 0.9:
                self._fail_probe(now, self.limit)
            needed = self._needed_level(now)
            if needed >= self.limit:
                return estimate
            return max(estimate * self._gradient, needed + 0.5)
        if in_flight < estimate / 2:
            return estimate  # app-limited: the latency says nothing about a higher limit
        if not self._probe_allowed(now, self.limit + 1):
            return estimate
        return estimate + math.sqrt(estimate)

    def _needed_level(self, now: float) -> int:
        """Fewest calls not measured too small for what the upstream answers now.

        A merging upstream's latency at its best is several times its no-load latency (its
        batches are bigger), so the gradient alone would cut it until a backlog forms; a cut
        to a level that cannot carry the load would only move the queue into the proxy.
        """
        demand = self._delivered.rate(now) * (1.0 + self.config.capacity_margin)
        # Only levels below this one matter: above it (e.g. where a degrading upstream
        # thrashed) too little capacity says nothing about cutting.
        too_small = [
            level
            for level, rate in self._fresh(now).items()
            if rate < demand and level < self.limit
        ]
        return max(too_small, default=0) + 1

    def _fail_probe(self, now: float, level: int) -> None:
        if self._probe_from is not None and level > self._probe_from:
            # The probe up from _probe_from failed: the next one waits twice as long.
            self._probe_streak = min(self._probe_streak + 1, self.config.max_probe_backoff)
            self._probe_from = None
        self._failed_probe_at = now
        self._failed_level = level

    def _explore_allowed(self, now: float) -> bool:
        """The first exploration always; after ones that ended unmeasured, a back-off like
        the gradient's probes (``probe_hold_rtts``, doubling)."""
        if self._explore_streak == 0 or self._rtt is None:
            return True
        # Probes and explorations try the same levels: either kind's failures hold both.
        streak = max(self._explore_streak - 1, self._probe_streak)
        hold = self.config.probe_hold_rtts * 2.0**streak * self._rtt
        return now - self._explore_failed_at >= hold

    def _explore_ended(self, now: float, measured: bool) -> None:
        self._exploring = None
        if measured:
            self._explore_streak = 0
        else:
            self._explore_streak = min(self._explore_streak + 1, self.config.max_probe_backoff)
            self._explore_failed_at = now

    def _probe_held(self, now: float, rtt: float) -> None:
        """A probe up that lasted ``probe_hold_rtts`` without failing: the level above works,
        so the next failed probe starts the back-off afresh."""
        if (
            self._probe_from is not None
            and self.limit > self._probe_from
            and now - self._probe_at >= self.config.probe_hold_rtts * rtt
        ):
            self._probe_streak = 0
            self._probe_from = None

    def _probe_allowed(self, now: float, level: int) -> bool:
        """Whether going up to ``level`` may be tried: not soon after it (or lower) failed."""
        if self._failed_probe_at is None or self._rtt is None or level < self._failed_level:
            return True
        streak = max(self._probe_streak, self._explore_streak)
        hold = self.config.probe_hold_rtts * 2.0**streak * self._rtt
        return now - self._failed_probe_at >= hold

    # -- capacity while backlogged ------------------------------------------------------

    def _track_backlog(
        self, latency_s: float, size: float, in_flight: int, queued: int, now: float
    ) -> bool:
        """Note this call's backlog state and measure capacity; return "backlogged"."""
        rtt = self._rtt or 0.0
        self._held = queued
        self._call_size += 0.2 * (size - self._call_size)
        self._max_size = max(size, self._max_size * 0.999)
        if queued <= 0:
            self._window = None  # capacity is measured only over calls sent into a backlog
            # One call finding the queue empty right after a burst of answers is no sign that
            # the backlog is gone: within a round trip of the last one, it is not.
            return self._backlog_at is not None and now - self._backlog_at < rtt
        if self._backlog_at is None or now - self._backlog_at > 2.0 * rtt:
            self._backlog_since = now  # a new backlog (the last one ended a while ago)
        self._backlog_at = now
        # Credit a level only with calls that ran entirely under it and started with no
        # leftovers of a higher limit in flight (an upstream that queues calls is still
        # working those off).
        if now - latency_s < self._limit_since or in_flight > self.full_batch_limit:
            self._window = None
            return True
        window = self._window
        if window is None:
            self._window = _Window(now, queued)
            return True
        window.items += size
        window.calls += 1
        span = now - window.start
        # At least three round trips and three answers per slot: a merging upstream answers
        # several calls at once and service times vary, so a shorter window misses the rate
        # by a burst or by noise.
        if span <= 0 or span < 3.0 * rtt or window.calls < max(8, 3 * self.limit):
            return True
        capacity = window.items / span
        demand = capacity + (queued - window.queued) / span  # answered + queue growth
        found = self._levels.get(self.limit)
        if self._exploring == self.limit:
            self._explore_ended(now, measured=True)
        if found is None or now - found.at > self.config.throughput_memory_s:
            self._levels[self.limit] = _Level(capacity, now)
        else:
            found.items_per_s += 0.5 * (capacity - found.items_per_s)
            found.at = now
        self._demand = demand if self._demand is None else 0.5 * (self._demand + demand)
        self._window = _Window(now, queued)
        return True

    def _demand_now(self, now: float, *, sustained: bool) -> float:
        """Items/s offered: measured through a backlog, else simply what is answered."""
        delivered = self._delivered.rate(now)
        if sustained and self._demand is not None:
            return max(delivered, self._demand)
        return delivered

    def _capacity_target(self, now: float) -> float | None:
        """The level to move to during a backlog; None while this level is unmeasured."""
        levels = self._fresh(now)
        level = self.limit
        if level not in levels:
            return None
        floor = self.config.floor
        need = self._demand_now(now, sustained=True) * (1.0 + self.config.capacity_margin)
        carrying = [lv for lv, rate in levels.items() if rate >= need]
        if carrying:
            if min(carrying) > level:
                return level + 1.5  # measured enough above: go there, a level at a time
            above = levels.get(level + 1)
            if above is not None and above >= levels[level] * (1.0 + self.config.throughput_gain):
                return level + 1.5  # the queue drains faster a level up (measured)
            # This level carries the load: the queue is draining. A backlog is never a reason
            # for fewer calls; once it is gone the gradient may cut (not below what carries
            # the load).
            return level + 0.5
        # Nothing measured carries the load: serve as much as possible, with the fewest
        # calls within throughput_gain of the most.
        good = max(levels.values()) / (1.0 + self.config.throughput_gain)
        top = min(lv for lv, rate in levels.items() if rate >= good)
        if level < top:
            return level + 1.5
        if level > floor and min(levels) == level:
            # Nothing measured below: try fewer calls first. Cheap while backlogged (the
            # items wait anyway), and the way down after starting too high, when every
            # latency seen was already inflated and the gradient has no clean baseline.
            return max(floor, min(level - 1, int(level * 0.75))) + 0.5
        if level <= top + 1 and level + 1 not in levels and level + 1 <= self._ceiling:
            # Explore up, even from one above the best: an upstream that batches queued calls
            # itself gains little from a 2nd call (it waits for the 1st), much from a 3rd.
            # After explorations that ended unmeasured (the gradient cut them first), wait
            # as a failed probe does: each one costs every call sent meanwhile.
            if not self._explore_allowed(now):
                return level + 0.5
            up = self._jump(level, levels[level], need)
            if up > level + 1:
                self._jumped_from = level
                # Decided now: the levels that show it may be forgotten while it holds.
                self._jump_holds = self.merges_calls is True
            self._exploring = up
            return up + 0.5
        if level > top:
            self._fail_probe(now, level)
            return top + 0.5  # measured no better: come back down
        return level + 0.5

    def _jump(self, level: int, capacity: float, need: float) -> int:
        """The level to explore from the best one measured so far: as many calls as would
        carry the demand if capacity grew in proportion to calls, or as would send every
        item held back (closed-loop clients: the queue does not grow, it waits), at most
        twice this level (slow start); one more at least. A jump past the knee is measured
        and comes back down to the best level like any exploration."""
        wanted = level + 1
        if capacity > 0:
            wanted = max(wanted, math.ceil(level * need / capacity))
        if self._call_size > 0:
            wanted = max(wanted, level + math.ceil(self._held / self._call_size))
        return max(level + 1, min(2 * level, self._ceiling, wanted))

    def _fresh(self, now: float) -> dict[int, float]:
        memory = self.config.throughput_memory_s
        return {lv: e.items_per_s for lv, e in self._levels.items() if now - e.at <= memory}

    # -- internals ----------------------------------------------------------------------

    def _set_estimate(self, value: float, now: float) -> None:
        before = self.limit
        self._estimate = self._clamp(value)
        after = self.limit
        if after != before:
            self._limit_since = now
            self._window = None
            if after > before:
                if self._probe_from is None:
                    self._probe_from = before
                self._probe_at = now
            elif self._probe_from is not None and after <= self._probe_from:
                self._probe_from = None  # back where the probe started, with no verdict
            if self._exploring is not None and after < self._exploring:
                self._explore_ended(now, measured=False)
            if self._jumped_from is not None and after <= self._jumped_from + 1:
                self._jumped_from = None

    def _clamp(self, value: float) -> float:
        return max(float(self.config.floor), min(float(self._ceiling), value))


# -- arrival rate and the dispatch advisor -----------------------------------------------------


class ArrivalRate:
    """Items per second, an exponentially decaying count (time constant ``window_s``)."""

    def __init__(self, window_s: float = 0.25, *, clock: Callable[[], float] = time.monotonic):
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self._window = window_s
        self._clock = clock
        self._level = 0.0  # decayed count of arrivals; rate = level / window
        self._at: float | None = None

    def add(self, count: float = 1.0, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        self._decay(now)
        self._level += count

    def rate(self, now: float | None = None) -> float:
        now = self._clock() if now is None else now
        self._decay(now)
        return self._level / self._window

    def _decay(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self._level *= math.exp(-(now - self._at) / self._window)
        if self._at is None or now > self._at:
            self._at = now


class DispatchAdvisor:
    """Decides, for a batch that could go now, whether holding it for more items pays.

    Sending a partial batch now and the rest later costs the upstream one more fixed cost
    ``a``. Waiting ``w`` costs the ``q`` queued items ``w`` each. With ``lam`` items arriving
    per second, ``lam*w`` join the batch and finish ``a - w`` earlier than if they had to
    follow a separate call; the gain ``lam*w*(a - w) - q*w*(1 + b*lam)`` is best at
    ``w* = a/2 - q*(1 + b*lam)/(2*lam)``: wait only while more items will arrive during one
    fixed cost than are already queued. Capped by the time to fill the batch and by
    ``max_wait`` counted from the oldest item's arrival, so no item waits longer than under
    the batcher's timer policy. A hold during which not even one item is expected to arrive
    (``lam*w < 1``) is no hold: nobody would join.

    The trade exists only where a separate call costs the upstream its own fixed cost. If
    more calls in flight buy throughput (the upstream merges them into its own batches, or
    runs them in parallel), the batch goes at once. If it runs calls one at a time and is
    busy, a call sent now would only queue inside it: hold the batch until it fills (the
    batcher sends it anyway when the running call returns).
    """

    def __init__(self, limiter: GradientLimiter, max_wait_s: float) -> None:
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        self.limiter = limiter
        self.max_wait_s = max_wait_s

    def should_wait(
        self,
        queued: int,
        arrival_rate: float,
        in_flight: int,
        max_batch: int,
        now: float,
        oldest_enqueued_at: float | None = None,
    ) -> float | None:
        """Seconds to hold the batch, or None to send it now.

        ``queued``: items that would go in this batch; ``arrival_rate``: items/s arriving
        (see :class:`ArrivalRate`); ``in_flight``: calls already in flight; ``max_batch``:
        the batch size cap; ``oldest_enqueued_at``: arrival of the oldest queued item, on
        the same clock as ``now``.
        """
        if queued <= 0 or queued >= max_batch or arrival_rate <= 0:
            return None
        budget = self.max_wait_s
        if oldest_enqueued_at is not None:
            budget = min(budget, oldest_enqueued_at + self.max_wait_s - now)
        model = self.limiter.cost_model
        if budget <= 0 or not model.ready:
            return None  # out of time, or nothing measured yet: plain dispatch-when-idle
        merges = self.limiter.merges_calls
        if merges:
            return None
        fill = (max_batch - queued) / arrival_rate
        if in_flight >= 1 and merges is False:
            wait = fill
        else:
            wait = model.a / 2 - queued * (1 + model.b * arrival_rate) / (2 * arrival_rate)
            wait = min(wait, fill)
        wait = min(wait, budget)
        # Hold only if at least one more item is expected meanwhile: with fewer, the likely
        # outcome is a wait that nobody joins. It also keeps a lone closed-loop client (one
        # request per round trip, and a rate estimate a little above that) from waiting.
        return wait if wait > 0 and arrival_rate * wait >= 1.0 else None
