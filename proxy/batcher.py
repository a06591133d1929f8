"""A generic asyncio micro-batcher. It knows nothing of HTTP or embeddings.

Callers ``submit`` one item and await its own result. Items are grouped by a key (items with
different keys never share a batch), and batches are handed to an async ``process`` function
that takes a list of items and returns one result per item, in order. A result may be an
exception instance, which fails only that item's caller.

Two dispatch policies:

* ``timer``: a batch goes when it is full (by count or cost) or when its oldest item has
  waited ``max_wait``, and a slot is free.
* ``adaptive``: whenever fewer than ``eager_slots`` calls are in flight (the upstream is
  idle or nearly), whatever is queued goes at once, so a lone item never waits for a timer.
  Items only accumulate while those slots are busy; when one frees, the next batch forms at
  once. Past ``eager_slots`` and up to ``max_concurrent_batches``, the ``timer`` rule applies
  (a full batch, or one whose oldest item waited ``max_wait``), so ``max_wait`` still caps
  the wait while spare slots exist. An item never waits longer than it would under ``timer``.
  ``eager_slots`` defaults to ``max_concurrent_batches``: every slot is eager.

Why two kinds of slot: "idle" must mean the *upstream* has spare capacity. TEI runs one batch
and holds one prefetched; a third call only queues inside it. Sending whatever is queued to
every free slot would then make many tiny batches; letting extra slots carry only full (or
aged) batches keeps batches large while still using the upstream's admission capacity.

In both, at most ``max_concurrent_batches`` calls run at once: it is a hard bound that protects
the upstream. Items that arrive in the same event-loop turn are merged, because dispatch runs
on the next turn (``call_soon``) rather than inside ``submit``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class DispatchPolicy(StrEnum):
    ADAPTIVE = "adaptive"
    TIMER = "timer"


class QueueFullError(Exception):
    """The batcher holds ``max_queue_size`` items already; the caller should back off."""


class BatcherClosedError(Exception):
    """The batcher is draining or closed and takes no new items."""


class DeadlineExceededError(Exception):
    """The item's deadline passed before it could be dispatched."""


class BatchResultMismatchError(Exception):
    """``process`` returned a different number of results than it was given items."""


class BatchObserver(Protocol):
    """Hooks for metrics; every method must be cheap and must not raise."""

    def batch_dispatched(self, size: int, cost: float, oldest_wait_s: float) -> None: ...

    def item_dropped(self, reason: str) -> None: ...


@dataclass(slots=True, eq=False)
class _Entry(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    cost: float
    enqueued_at: float
    deadline: float | None
    live: bool = True  # False once the caller went away while queued


@dataclass(slots=True)
class BatcherConfig:
    max_batch_size: int = 32
    max_wait_s: float = 0.005
    max_concurrent_batches: int = 2
    eager_slots: int | None = None  # adaptive only; None: max_concurrent_batches
    policy: DispatchPolicy = DispatchPolicy.ADAPTIVE
    max_batch_cost: float = math.inf
    max_queue_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be at least 1")
        if self.eager_slots is not None and not 0 <= self.eager_slots:
            raise ValueError("eager_slots must not be negative")
        if self.max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        if self.max_batch_cost <= 0:
            raise ValueError("max_batch_cost must be positive")


@dataclass(slots=True)
class _KeyQueue(Generic[T, R]):
    entries: deque[_Entry[T, R]] = field(default_factory=deque)
    cost: float = 0.0  # of live entries
    count: int = 0  # live entries


class Batcher(Generic[T, R]):
    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        config: BatcherConfig | None = None,
        *,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._process = process
        self.config = config or BatcherConfig()
        self._observer = observer
        self._clock = clock
        self._queues: dict[Hashable, _KeyQueue[T, R]] = {}
        self._queued = 0  # live entries waiting, for the queue bound and the depth gauge
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatch_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    # -- public API ---------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def closing(self) -> bool:
        return self._closing

    def submit_nowait(
        self,
        item: T,
        *,
        key: Hashable = None,
        cost: float = 1.0,
        deadline: float | None = None,
    ) -> asyncio.Future[R]:
        """Queue ``item``; return the future of its result. Never blocks.

        Raises :class:`QueueFullError` past ``max_queue_size`` and :class:`BatcherClosedError`
        once draining has begun. ``deadline`` is on this batcher's clock (``time.monotonic``).
        """
        if self._closing:
            raise BatcherClosedError("batcher is draining")
        limit = self.config.max_queue_size
        if limit is not None and self._queued >= limit:
            raise QueueFullError(f"queue holds {self._queued} items")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        entry = _Entry(item, future, cost, self._clock(), deadline)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _KeyQueue()
        queue.entries.append(entry)
        queue.cost += cost
        queue.count += 1
        self._queued += 1
        self._idle.clear()
        future.add_done_callback(functools.partial(self._on_caller_gone, entry, queue))
        self._schedule_dispatch()
        return future

    async def submit(
        self,
        item: T,
        *,
        key: Hashable = None,
        cost: float = 1.0,
        deadline: float | None = None,
    ) -> R:
        return await self.submit_nowait(item, key=key, cost=cost, deadline=deadline)

    async def drain(self) -> None:
        """Stop taking items, dispatch everything queued and wait for every call to finish."""
        self._closing = True
        self._schedule_dispatch()
        await self._idle.wait()

    def set_limits(
        self, *, max_batch_size: int | None = None, max_batch_cost: float | None = None
    ) -> None:
        """Adjust batch caps at run time (e.g. once the upstream's /info is known)."""
        if max_batch_size is not None:
            if max_batch_size < 1:
                raise ValueError("max_batch_size must be at least 1")
            self.config.max_batch_size = max_batch_size
        if max_batch_cost is not None:
            if max_batch_cost <= 0:
                raise ValueError("max_batch_cost must be positive")
            self.config.max_batch_cost = max_batch_cost

    # -- dispatch -----------------------------------------------------------------------

    def _on_caller_gone(
        self, entry: _Entry[T, R], queue: _KeyQueue[T, R], _future: asyncio.Future[R]
    ) -> None:
        # Runs when the future completes for any reason; only a cancellation while still
        # queued means the caller left (a timeout or a disconnect upstream of us).
        if entry.live and entry.future.cancelled():
            entry.live = False
            self._queued -= 1
            queue.cost -= entry.cost
            queue.count -= 1
            if self._observer is not None:
                self._observer.item_dropped("cancelled")
            self._schedule_dispatch()

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        cfg = self.config
        now = self._clock()
        next_wake: float | None = None
        while self._in_flight < cfg.max_concurrent_batches:
            ready, key, ready_at = self._next_ready_key(now)
            if not ready:
                next_wake = ready_at
                break
            batch = self._take_batch(self._queues[key], now)
            if batch:
                self._launch(batch, now)
        self._cleanup_empty_queues()
        self._arm_timer(next_wake, now)
        self._update_idle()

    def _next_ready_key(self, now: float) -> tuple[bool, Hashable, float | None]:
        """The key whose batch may go now (oldest head first), or when the next one may."""
        cfg = self.config
        eager_limit = cfg.max_concurrent_batches if cfg.eager_slots is None else cfg.eager_slots
        eager = cfg.policy is DispatchPolicy.ADAPTIVE and self._in_flight < eager_limit
        best_key: Hashable | None = None
        best_age = -math.inf
        earliest: float | None = None
        found = False
        for key, queue in self._queues.items():
            head = self._live_head(queue)
            if head is None:
                continue
            age = now - head.enqueued_at
            ready = (
                eager
                or self._closing
                or age >= cfg.max_wait_s
                or queue.count >= cfg.max_batch_size
                or queue.cost >= cfg.max_batch_cost
            )
            if ready:
                if age > best_age:
                    best_key, best_age, found = key, age, True
            else:
                at = head.enqueued_at + cfg.max_wait_s
                earliest = at if earliest is None else min(earliest, at)
        if found:
            return True, best_key, None
        return False, None, earliest

    @staticmethod
    def _live_head(queue: _KeyQueue[T, R]) -> _Entry[T, R] | None:
        entries = queue.entries
        while entries and not entries[0].live:
            entries.popleft()
        return entries[0] if entries else None

    def _take_batch(self, queue: _KeyQueue[T, R], now: float) -> list[_Entry[T, R]]:
        cfg = self.config
        batch: list[_Entry[T, R]] = []
        cost = 0.0
        entries = queue.entries
        while entries and len(batch) < cfg.max_batch_size:
            entry = entries[0]
            if not entry.live:
                entries.popleft()
                continue
            if batch and cost + entry.cost > cfg.max_batch_cost:
                break
            entries.popleft()
            entry.live = False
            self._queued -= 1
            queue.cost -= entry.cost
            queue.count -= 1
            if entry.deadline is not None and now >= entry.deadline:
                # Never spend upstream work on a caller whose time is already up.
                entry.future.set_exception(DeadlineExceededError("deadline passed while queued"))
                if self._observer is not None:
                    self._observer.item_dropped("deadline")
                continue
            batch.append(entry)
            cost += entry.cost
        return batch

    def _launch(self, batch: list[_Entry[T, R]], now: float) -> None:
        self._in_flight += 1
        if self._observer is not None:
            cost = sum(e.cost for e in batch)
            self._observer.batch_dispatched(len(batch), cost, now - batch[0].enqueued_at)
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Entry[T, R]]) -> None:
        try:
            try:
                results = await self._process([e.item for e in batch])
            except Exception as exc:  # the whole call failed: every caller gets the error
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                return
            if len(results) != len(batch):
                # Never zip a wrong-length answer onto callers: someone would get another's.
                err = BatchResultMismatchError(
                    f"process returned {len(results)} results for {len(batch)} items"
                )
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(err)
                return
            for entry, result in zip(batch, results, strict=True):
                if entry.future.done():
                    continue
                if isinstance(result, BaseException):
                    entry.future.set_exception(result)
                else:
                    entry.future.set_result(result)
        except asyncio.CancelledError:
            for entry in batch:
                if not entry.future.done():
                    entry.future.cancel()
            raise
        finally:
            self._in_flight -= 1
            self._schedule_dispatch()

    def _cleanup_empty_queues(self) -> None:
        if len(self._queues) > 1:
            for key in [k for k, q in self._queues.items() if not q.entries]:
                del self._queues[key]

    def _arm_timer(self, wake_at: float | None, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wake_at is not None:
            delay = max(0.0, wake_at - now)
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _update_idle(self) -> None:
        if self._queued == 0 and self._in_flight == 0:
            self._idle.set()
        else:
            self._idle.clear()

    async def aclose(self) -> None:
        """Cancel whatever is still running; callers of cancelled batches see cancellation."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for queue in self._queues.values():
            for entry in queue.entries:
                if entry.live and not entry.future.done():
                    entry.future.set_exception(BatcherClosedError("batcher closed"))
            queue.entries.clear()
        self._queued = 0
        self._idle.set()
