"""A discrete-event simulation of the proxy's dispatch in front of simulated upstreams.

No real sleeping and no asyncio: a heap of timed events and a simulated clock, so a run of
several simulated seconds takes a fraction of a real one and is exactly reproducible (the only
randomness is seeded: Poisson arrivals, and optional log-normal service-time ``jitter``).

The proxy side is the batcher's ``adaptive`` policy reduced to its core: items queue; while
fewer than ``limit`` calls are in flight, whatever is queued goes at once, up to
``max_batch`` items per call, each way taking ``one_way_s`` on the network. The limit comes
from a policy: a fixed number, or a :class:`proxy.concurrency.GradientLimiter` fed as the
batcher would feed it (each answer's latency, size, calls in flight at its start, and the
items it left queued when the limit was reached).

Three upstreams:

* :class:`SerialUpstream`: one call at a time, ``a + b*n`` each; extra calls queue inside.
* :class:`MergingUpstream`: TEI-like. Calls queue; whenever its single executor is free it
  takes every queued call that fits in ``max_items`` and runs them as one batch costing
  ``a + b*items + c*calls``. A call that arrives while a batch runs waits for it.
* :class:`DegradingUpstream`: ``workers`` calls run in parallel at full speed; past that the
  calls share the workers (processor sharing) and thrash: each call's speed is further
  divided by ``1 + thrash*(calls - workers)**2``, so latency grows superlinearly.
"""

from __future__ import annotations

import functools
import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from proxy.concurrency import GradientLimiter

Done = Callable[[], None]


class Sim:
    """A clock and a queue of timed events."""

    def __init__(self, seed: int = 0) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._rng = random.Random(seed)  # service-time noise only; arrivals have their own

    def noisy(self, seconds: float, jitter: float) -> float:
        """``seconds`` times a log-normal factor of mean 1 and spread ``jitter``."""
        if jitter <= 0:
            return seconds
        return seconds * math.exp(self._rng.gauss(0.0, jitter) - jitter * jitter / 2)

    def at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(when, self.now), self._seq, action))

    def run_until(self, end: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= end:
            when, _, action = heapq.heappop(heap)
            self.now = when
            action()
        self.now = end

    def clock(self) -> float:
        return self.now


class Upstream(Protocol):
    def submit(self, size: int, done: Done) -> None: ...


class SerialUpstream:
    def __init__(self, sim: Sim, a: float, b: float, jitter: float = 0.0) -> None:
        self.sim, self.a, self.b, self.jitter = sim, a, b, jitter
        self._queue: deque[tuple[int, Done]] = deque()
        self._busy = False

    def submit(self, size: int, done: Done) -> None:
        self._queue.append((size, done))
        if not self._busy:
            self._start()

    def _start(self) -> None:
        size, done = self._queue.popleft()
        self._busy = True

        def finish() -> None:
            self._busy = False
            done()
            if self._queue:
                self._start()

        self.sim.at(self.sim.now + self.sim.noisy(self.a + self.b * size, self.jitter), finish)


class MergingUpstream:
    def __init__(
        self,
        sim: Sim,
        a: float,
        b: float,
        max_items: int,
        per_call: float = 0.0,
        jitter: float = 0.0,
        prefetch: bool = False,
    ) -> None:
        self.sim, self.a, self.b, self.jitter = sim, a, b, jitter
        self.max_items, self.per_call = max_items, per_call
        # TEI's scheduler: the next batch is cut while one runs, from whatever is queued at
        # that moment (the first call to arrive, if none was), not when the running one ends.
        self.prefetch = prefetch
        self._queue: deque[tuple[int, Done]] = deque()
        self._busy = False
        self._next: tuple[int, list[Done]] | None = None  # prefetch: the batch cut next
        self.batches: list[int] = []

    def submit(self, size: int, done: Done) -> None:
        self._queue.append((size, done))
        if not self._busy:
            self._start(self._cut())
        elif self.prefetch and self._next is None:
            self._next = self._cut()

    def _cut(self) -> tuple[int, list[Done]]:
        taken: list[Done] = []
        items = 0
        while self._queue and (not taken or items + self._queue[0][0] <= self.max_items):
            size, done = self._queue.popleft()
            taken.append(done)
            items += size
        return items, taken

    def _start(self, batch: tuple[int, list[Done]]) -> None:
        items, taken = batch
        self._busy = True
        self.batches.append(items)
        if self.prefetch and self._queue:
            self._next = self._cut()

        def finish() -> None:
            self._busy = False
            for done in taken:
                done()
            if self._next is not None:
                batch, self._next = self._next, None
                self._start(batch)
            elif self._queue:
                self._start(self._cut())

        cost = self.a + self.b * items + self.per_call * len(taken)
        self.sim.at(self.sim.now + self.sim.noisy(cost, self.jitter), finish)


@dataclass(eq=False)
class _Job:
    remaining: float  # seconds of work at full speed
    done: Done


class DegradingUpstream:
    def __init__(
        self, sim: Sim, a: float, b: float, workers: int, thrash: float, jitter: float = 0.0
    ) -> None:
        self.sim, self.a, self.b, self.jitter = sim, a, b, jitter
        self.workers, self.thrash = workers, thrash
        self._jobs: list[_Job] = []
        self._last = 0.0
        self._version = 0

    def speed(self, calls: int) -> float:
        if calls <= 0:
            return 1.0
        share = min(1.0, self.workers / calls)
        return share / (1.0 + self.thrash * max(0, calls - self.workers) ** 2)

    def submit(self, size: int, done: Done) -> None:
        self._advance()
        self._jobs.append(_Job(self.sim.noisy(self.a + self.b * size, self.jitter), done))
        self._reschedule()

    def _advance(self) -> None:
        now = self.sim.now
        progress = (now - self._last) * self.speed(len(self._jobs))
        for job in self._jobs:
            job.remaining -= progress
        self._last = now

    def _reschedule(self) -> None:
        self._version += 1
        if not self._jobs:
            return
        version = self._version
        shortest = min(job.remaining for job in self._jobs)
        delay = max(0.0, shortest) / self.speed(len(self._jobs))

        def fire() -> None:
            if version != self._version:
                return  # superseded by a later arrival or departure
            self._advance()
            finished = [job for job in self._jobs if job.remaining <= 1e-12]
            self._jobs = [job for job in self._jobs if job.remaining > 1e-12]
            self._reschedule()
            for job in finished:
                job.done()

        self.sim.at(self.sim.now + delay, fire)


# -- the proxy side --------------------------------------------------------------------------


class LimitPolicy(Protocol):
    @property
    def limit(self) -> int: ...

    @property
    def full_batch_limit(self) -> int:
        """Calls in flight that a full batch may use (as the batcher's; at least ``limit``)."""
        ...

    def completed(
        self, latency_s: float, size: int, in_flight_at_start: int, now: float, queued: int
    ) -> None: ...

    def held_back(self, queue_left: int, in_flight: int, full_wait_s: float) -> int:
        """What the batcher reports as ``queued`` for a call it sends."""
        ...


class FixedLimit:
    def __init__(self, limit: int) -> None:
        self._limit = limit

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def full_batch_limit(self) -> int:
        return self._limit

    def completed(
        self, latency_s: float, size: int, in_flight_at_start: int, now: float, queued: int
    ) -> None:
        pass

    def held_back(self, queue_left: int, in_flight: int, full_wait_s: float) -> int:
        return queue_left if in_flight >= self._limit else 0


class AdaptiveLimit:
    """Feeds a :class:`GradientLimiter` the way the batcher will."""

    def __init__(self, limiter: GradientLimiter) -> None:
        self.limiter = limiter

    @property
    def limit(self) -> int:
        return self.limiter.limit

    @property
    def full_batch_limit(self) -> int:
        return self.limiter.full_batch_limit

    def completed(
        self, latency_s: float, size: int, in_flight_at_start: int, now: float, queued: int
    ) -> None:
        self.limiter.on_sample(latency_s, size, in_flight_at_start, now, queued=queued)

    def held_back(self, queue_left: int, in_flight: int, full_wait_s: float) -> int:
        return self.limiter.held_back(queue_left, in_flight, full_wait_s)


@dataclass
class RunResult:
    throughput: float  # items/s completed among those that arrived in the window
    p50: float
    p99: float
    completed: int
    arrived: int
    calls: int
    mean_batch: float
    limit_trace: list[tuple[float, int]] = field(default_factory=list)
    in_flight_trace: list[tuple[float, int]] = field(default_factory=list)
    served_rate: float = 0.0  # items/s answered in the window, whenever they arrived

    def mean_in_flight(self, start: float, end: float) -> float:
        """Time-weighted mean of the calls in flight over [start, end)."""
        return _time_weighted(self.in_flight_trace, start, end)

    def mean_limit(self, start: float, end: float) -> float:
        """Time-weighted mean of the limit over [start, end)."""
        return _time_weighted(self.limit_trace, start, end)

    def converged_at(
        self, target: float, tolerance: float, end: float, window: float = 0.5
    ) -> float | None:
        """Earliest time from which every ``window``-long mean of the limit up to ``end`` is
        within ``target*(1 +- tolerance)`` (on a 10 ms grid); None if never. A brief probe
        does not undo convergence; sitting at the wrong level for half a second does."""
        step = 0.01
        starts = [i * step for i in range(round((end - window) / step) + 1)]
        inside = [
            abs(self.mean_limit(t, t + window) - target) <= tolerance * target for t in starts
        ]
        converged: float | None = None
        for t, ok in zip(starts, inside, strict=True):
            if ok and converged is None:
                converged = t
            elif not ok:
                converged = None
        return converged


@dataclass(eq=False, slots=True)
class _Call:
    items: list[tuple[float, int]]  # (arrival time, index) of each item
    started: float
    in_flight_at_start: int  # counting itself
    queued: int


def _time_weighted(trace: list[tuple[float, int]], start: float, end: float) -> float:
    total = 0.0
    for (when, limit), (next_when, _) in zip(trace, [*trace[1:], (math.inf, 0)], strict=True):
        lo, hi = max(when, start), min(next_when, end)
        if hi > lo:
            total += limit * (hi - lo)
    return total / (end - start)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.inf
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def run(
    make_upstream: Callable[[Sim], Upstream],
    make_policy: Callable[[Sim], LimitPolicy],
    *,
    rate: float,
    duration: float,
    warmup: float = 0.0,
    max_batch: int = 32,
    one_way_s: float = 0.0005,
    seed: int = 1,
    clients: int = 0,
    step: tuple[float, int] | None = None,
) -> RunResult:
    """Poisson arrivals at ``rate`` items/s for ``duration`` simulated seconds; or, with
    ``clients``, that many closed-loop clients (``rate`` ignored), each sending its next item
    ``one_way_s`` after its answer (those answered together arrive together, as the batcher
    merges items that arrive in one event-loop turn). ``step``: ``(at, clients)``, the number
    of closed-loop clients from then on (those answered beyond it stop sending).

    Latency statistics cover items that arrived after ``warmup``; an item still unanswered at
    the end counts with the time it has waited so far, so an unstable setting cannot hide
    its backlog.
    """
    sim = Sim(seed)
    upstream = make_upstream(sim)
    policy = make_policy(sim)
    rng = random.Random(seed)
    queue: deque[tuple[float, int]] = deque()  # (arrival time, index)
    in_flight = 0
    latencies: list[float] = []
    unanswered: dict[int, float] = {}  # measured items not yet answered: index -> arrival
    calls = 0
    items_sent = 0
    trace: list[tuple[float, int]] = [(0.0, policy.limit)]
    flights: list[tuple[float, int]] = [(0.0, 0)]
    next_index = 0
    served = 0
    population = clients  # closed-loop clients sending now
    wanted = clients

    def dispatch() -> None:
        nonlocal in_flight, calls, items_sent
        sent: list[tuple[list[tuple[float, int]], int, int]] = []
        # Past the limit, only a full batch may go, up to full_batch_limit (as the batcher).
        while queue and (
            in_flight < policy.limit
            or (len(queue) >= max_batch and in_flight < policy.full_batch_limit)
        ):
            batch = [queue.popleft() for _ in range(min(max_batch, len(queue)))]
            in_flight += 1
            calls += 1
            items_sent += len(batch)
            sent.append((batch, in_flight, len(queue)))
        if sent:
            flights.append((sim.now, in_flight))
        # What the batcher reports: the calls in flight when each call left (counting
        # itself), and the items the limit (not the batch size) held back: those left queued
        # behind it, if every slot was busy once the dispatch pass ended (its batches leave
        # together: a slot the same pass fills next is not free).
        full_wait = max((sim.now - b[0][0] for b, _, _ in sent if len(b) == max_batch), default=0.0)
        for batch, in_flight_at_start, left in sent:
            queued = policy.held_back(left, in_flight, full_wait)
            call = _Call(batch, sim.now, in_flight_at_start, queued)
            sim.at(sim.now + one_way_s, functools.partial(send, call))

    def send(call: _Call) -> None:
        # The answer travels back for one_way_s before the proxy sees it.
        upstream.submit(
            len(call.items), lambda: sim.at(sim.now + one_way_s, functools.partial(finish, call))
        )

    def finish(call: _Call) -> None:
        nonlocal in_flight, served
        in_flight -= 1
        now = sim.now
        flights.append((now, in_flight))
        if now >= warmup:
            served += len(call.items)
        for arrived, index in call.items:
            if unanswered.pop(index, None) is not None:
                latencies.append(now - arrived)
        if clients:
            sim.at(now + one_way_s, functools.partial(resend, len(call.items)))
        policy.completed(
            now - call.started, len(call.items), call.in_flight_at_start, now, call.queued
        )
        if trace[-1][1] != policy.limit:
            trace.append((now, policy.limit))
        dispatch()

    def arrive(index: int) -> None:
        now = sim.now
        queue.append((now, index))
        if now >= warmup:
            unanswered[index] = now
        dispatch()
        next_at = now + rng.expovariate(rate)
        if next_at < duration:
            sim.at(next_at, lambda: arrive(index + 1))

    def resend(count: int) -> None:
        nonlocal next_index, population
        now = sim.now
        if population > wanted:  # a step down: answered clients leave
            leaving = min(count, population - wanted)
            population -= leaving
            count -= leaving
        for _ in range(count):
            queue.append((now, next_index))
            if now >= warmup:
                unanswered[next_index] = now
            next_index += 1
        dispatch()

    def change(target: int) -> None:
        nonlocal wanted, population
        wanted = target
        if target > population:  # a step up: new clients send at once
            joining = target - population
            population = target
            resend(joining)

    if clients:
        sim.at(0.0, functools.partial(resend, clients))
        if step is not None:
            sim.at(step[0], functools.partial(change, step[1]))
    else:
        sim.at(rng.expovariate(rate), lambda: arrive(0))
    sim.run_until(duration)
    completed = len(latencies)
    all_latencies = sorted(latencies + [duration - t for t in unanswered.values()])
    window = duration - warmup
    return RunResult(
        throughput=completed / window,
        p50=_percentile(all_latencies, 0.50),
        p99=_percentile(all_latencies, 0.99),
        completed=completed,
        arrived=completed + len(unanswered),
        calls=calls,
        mean_batch=items_sent / calls if calls else 0.0,
        limit_trace=trace,
        in_flight_trace=flights,
        served_rate=served / window,
    )
