"""A generic asyncio micro-batcher. It knows nothing of HTTP or embeddings.

Callers ``submit`` one item and await its own result. Items are grouped by a key (items with
different keys never share a batch), and batches are handed to an async ``process`` function
that takes a list of items and returns one result per item, in order. A result may be an
exception instance, which fails only that item's caller.

Two dispatch policies:

* ``timer``: a batch goes when it is full (by count or cost) or when its oldest item has
  waited ``max_wait``, and a slot is free.
* ``adaptive``: whenever a slot is free, whatever is queued goes at once, so a lone item
  never waits for a timer. Items only accumulate while every slot is busy; when one frees,
  the next batch forms at once. With a :class:`DispatchControl`, the number of slots is the
  control's ``limit`` (re-read at every dispatch, never above ``max_concurrent_batches``),
  and a *full* batch may also take the calls up to the control's ``full_batch_limit`` (it
  cannot grow by waiting: pipelining into a serial upstream); and before a batch that is
  neither full nor aged goes on a free slot the control may ask to ``hold`` it a little,
  when it measured that waiting for more items costs less than the upstream's fixed cost
  per call. ``max_wait`` caps every hold: no item is held more than ``max_wait`` past the
  later of its arrival and the moment a slot was free for it (as under ``timer``, where a
  batch goes once aged and a slot is free).

In both, at most ``max_concurrent_batches`` calls run at once: it is a hard bound that protects
the upstream. Items that arrive in the same event-loop turn are merged, because dispatch runs
on the next turn (``call_soon``) rather than inside ``submit``.

A caller may leave at any time (cancel its future, e.g. on a timeout): a queued item whose
future is done is never sent and is counted out of the queue exactly once, whether the
batcher notices it at dispatch or through the future's done-callback, which may run later in
the same turn. An item whose ``deadline`` has passed by the time it is taken fails with
:class:`DeadlineExceededError` instead of going upstream.

Shutdown has two steps. ``drain()`` stops taking items and sends everything queued at once,
then waits for every call to finish. ``aclose()`` stops for good: no batch starts once it has
begun, queued items fail with :class:`BatcherClosedError`, and calls in flight are cancelled
(their callers get :class:`BatcherClosedError` too). A drain bounded by a timeout is therefore
``asyncio.timeout(...)`` around ``drain()``, then ``aclose()``; a ``drain()`` still waiting
when ``aclose()`` begins returns at once.
"""

from __future__ import annotations

import asyncio
import contextvars
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

# After an unexpected error in dispatch, try again this much later: soon, but never a busy loop.
_RETRY_AFTER_S = 0.01


class DispatchPolicy(StrEnum):
    ADAPTIVE = "adaptive"
    TIMER = "timer"


class QueueFullError(Exception):
    """The batcher holds ``max_queue_size`` items already; the caller should back off."""


class BatcherClosedError(Exception):
    """The batcher is draining or closed and takes no new items; also what ``aclose()`` gives
    the callers whose items it still held, queued or in flight."""


class DeadlineExceededError(Exception):
    """The item's deadline passed before it could be dispatched."""


class BatchResultMismatchError(Exception):
    """``process`` returned a different number of results than it was given items."""


class DispatchControl(Protocol):
    """An adaptive bound on calls in flight, and advice on holding a batch that could go
    (``adaptive`` only; see :class:`proxy.adaptive.AdaptiveConcurrency`). Every method must be
    cheap: dispatch calls them on every turn in which items arrive or a call ends."""

    @property
    def limit(self) -> int:
        """Calls that may be in flight now (the batcher also keeps ``max_concurrent_batches``)."""
        ...

    @property
    def full_batch_limit(self) -> int:
        """Calls that may be in flight when the next one carries a full batch (at least
        ``limit``; the batcher still keeps ``max_concurrent_batches``)."""
        ...

    def arrived(self, count: int, now: float) -> None:
        """``count`` items were queued since the last dispatch (all at about ``now``)."""
        ...

    def hold(
        self, queued: int, in_flight: int, max_batch: int, now: float, oldest_enqueued_at: float
    ) -> float | None:
        """Seconds to hold a batch of ``queued`` items that could go now, or None: send it."""
        ...


@dataclass(slots=True)
class LaunchInfo:
    """What the batcher knew when it sent a batch (with a :class:`DispatchControl` only):
    readable as ``LAUNCH.get()`` from inside that batch's ``process`` call, e.g. by whatever
    reports the call's load."""

    in_flight: int  # calls in flight when it left, counting itself
    queue_left: int  # items still queued once it left
    full: bool  # cut at the size or cost cap
    oldest_wait_s: float  # how long its oldest item waited
    # Of the dispatch pass that sent it (its batches leave together: a slot that the same
    # pass fills next was never free): calls in flight once it ended, and the longest wait
    # of the oldest item of a full batch it sent (0 if none was full).
    pass_in_flight: int = 0
    pass_full_wait_s: float = 0.0
    reported: bool = False  # for the reader: set once the first attempt used it


LAUNCH: contextvars.ContextVar[LaunchInfo | None] = contextvars.ContextVar(
    "batch_launch", default=None
)


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
    queue: _KeyQueue[T, R]
    batcher: Batcher[T, R]
    # True while counted in its queue's accounting: False once taken for a batch, expired,
    # or dropped because its caller left. Flipped in _unqueue only, so it counts out once.
    live: bool = True

    def __call__(self, _future: asyncio.Future[R]) -> None:
        """The future's done-callback: see :meth:`Batcher._on_caller_gone`."""
        self.batcher._on_caller_gone(self, self.queue, _future)


_NO_CONTEXT = contextvars.Context()


@dataclass(slots=True)
class BatcherConfig:
    max_batch_size: int = 32
    max_wait_s: float = 0.005
    max_concurrent_batches: int = 2
    policy: DispatchPolicy = DispatchPolicy.ADAPTIVE
    max_batch_cost: float = math.inf
    max_queue_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be at least 1")
        if self.max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        if self.max_batch_cost <= 0:
            raise ValueError("max_batch_cost must be positive")


@dataclass(slots=True)
class _KeyQueue(Generic[T, R]):
    entries: deque[_Entry[T, R]] = field(default_factory=deque)
    # Of live entries. A live entry's future may already be done (its caller left this turn
    # and the done-callback has not run yet): dispatch checks before trusting these.
    cost: float = 0.0
    count: int = 0


class Batcher(Generic[T, R]):
    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        config: BatcherConfig | None = None,
        *,
        observer: BatchObserver | None = None,
        control: DispatchControl | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._process = process
        self.config = config or BatcherConfig()
        self._observer = observer
        self._control = control
        self._arrivals = 0  # items queued since the last dispatch, for the control
        self._slot_freed_at = -math.inf  # when a call last ended
        self._clock = clock
        self._queues: dict[Hashable, _KeyQueue[T, R]] = {}
        self._queued = 0  # live entries waiting, for the queue bound and the depth gauge
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatch_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False  # drain() or aclose() began: no new items
        self._closed = False  # aclose() began: no new batches either
        # Set when nothing is queued or in flight, or once closed: what drain() waits for.
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
    def limit(self) -> int:
        """Calls that may be in flight now: the control's limit, within the hard bound."""
        bound = self.config.max_concurrent_batches
        if self._control is None:
            return bound
        return max(1, min(bound, self._control.limit))

    @property
    def full_batch_limit(self) -> int:
        """Calls that may be in flight when the next batch is full: the control's
        ``full_batch_limit`` within the hard bound (``limit`` without a control)."""
        bound = self.config.max_concurrent_batches
        if self._control is None:
            return bound
        return max(1, min(bound, max(self._control.limit, self._control.full_batch_limit)))

    def wake(self) -> None:
        """Look at the queue again soon (e.g. the control's limit rose). Needs a running loop."""
        if not self._closed:
            self._schedule_dispatch()

    @property
    def closing(self) -> bool:
        """True once draining or closed: new items are refused."""
        return self._closing

    @property
    def closed(self) -> bool:
        """True once ``aclose()`` began: no batch starts any more."""
        return self._closed

    def submit_nowait(
        self,
        item: T,
        *,
        key: Hashable = None,
        cost: float = 1.0,
        deadline: float | None = None,
        future: asyncio.Future[R] | None = None,
    ) -> asyncio.Future[R]:
        """Queue ``item``; return the future of its result. Never blocks.

        Raises :class:`QueueFullError` past ``max_queue_size`` and :class:`BatcherClosedError`
        once draining has begun. ``deadline`` is on this batcher's clock (``time.monotonic``).
        ``future``: a pending future of this loop to complete instead of a new one (e.g. a
        subclass that acts the moment it is completed, rather than a loop turn later).
        """
        if self._closing:
            raise BatcherClosedError("batcher is closed" if self._closed else "batcher is draining")
        limit = self.config.max_queue_size
        if limit is not None and self._queued >= limit:
            raise QueueFullError(f"queue holds {self._queued} items")
        if future is None:
            future = asyncio.get_running_loop().create_future()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _KeyQueue()
        entry = _Entry(item, future, cost, self._clock(), deadline, queue, self)
        queue.entries.append(entry)
        queue.cost += cost
        queue.count += 1
        self._queued += 1
        self._arrivals += 1
        self._idle.clear()
        # The entry is its own done-callback, in an empty context: no partial and no copy of
        # the caller's context per item (10,000 queued requests hold 10,000 of each).
        future.add_done_callback(entry, context=_NO_CONTEXT)
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
        """Stop taking items, dispatch everything queued and wait for every call to finish.

        Returns at once if ``aclose()`` begins meanwhile: nothing would run any more. To bound
        it, wrap it in ``asyncio.timeout`` and call ``aclose()`` afterwards.
        """
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

    async def aclose(self) -> None:
        """Stop for good: no batch starts once this has begun. Queued items fail with
        :class:`BatcherClosedError`; calls in flight are cancelled and their callers get
        :class:`BatcherClosedError`. Returns once those calls have ended. Safe to call while
        ``drain()`` waits (it then returns) and more than once."""
        self._closing = True
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Fail the queue first, so that no batch finishing meanwhile finds anything to send.
        for queue in self._queues.values():
            while queue.entries:
                entry = queue.entries.popleft()
                if self._unqueue(entry, queue) and not entry.future.done():
                    entry.future.set_exception(BatcherClosedError("batcher closed"))
        self._queues.clear()
        self._idle.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- accounting -------------------------------------------------------------------------

    def _unqueue(self, entry: _Entry[T, R], queue: _KeyQueue[T, R]) -> bool:
        """Count ``entry`` out of the queue; True only the first time (the one place that
        does it, so no path can count an entry out twice)."""
        if not entry.live:
            return False
        entry.live = False
        self._queued -= 1
        queue.count -= 1
        queue.cost -= entry.cost
        if queue.count == 0:
            queue.cost = 0.0  # no float drift left behind by fractional costs
        return True

    def _waiting(self, entry: _Entry[T, R], queue: _KeyQueue[T, R]) -> bool:
        """Whether ``entry`` still waits for a batch. A done future means its caller left;
        its done-callback may not have run yet, so count it out here (once) and skip it."""
        if not entry.live:
            return False
        if entry.future.done():
            self._unqueue(entry, queue)
            self._dropped("cancelled")
            return False
        return True

    def _on_caller_gone(
        self, entry: _Entry[T, R], queue: _KeyQueue[T, R], _future: asyncio.Future[R]
    ) -> None:
        # Runs when the future completes for any reason. If the entry is still counted as
        # queued, its caller left (a timeout or a disconnect upstream of us) before dispatch
        # noticed; if dispatch took, expired or dropped it first, this does nothing.
        if self._unqueue(entry, queue):
            self._dropped("cancelled")
            self._schedule_dispatch()

    def _dropped(self, reason: str) -> None:
        if self._observer is not None:
            try:
                self._observer.item_dropped(reason)
            except Exception:  # a broken metric must never strand callers
                log.exception("batch observer failed")

    # -- dispatch -----------------------------------------------------------------------

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        now = self._clock()
        next_wake: float | None = None
        try:
            if self._arrivals and self._control is not None:
                arrivals, self._arrivals = self._arrivals, 0
                self._control.arrived(arrivals, now)
            if not self._closed:
                next_wake = self._launch_ready(now)
        except Exception:
            # A bug or a broken hook, not the callers' doing. Whatever was taken off a queue
            # has been answered; what is still queued must not wait without a timer.
            log.exception("batcher dispatch failed; retrying in %gs", _RETRY_AFTER_S)
            next_wake = now + _RETRY_AFTER_S if self._queued else None
        finally:
            self._cleanup_empty_queues()
            self._arm_timer(next_wake, now)
            self._update_idle()

    def _launch_ready(self, now: float) -> float | None:
        """Launch every batch that may go now; return when the next one may (None: when a
        call ends or an item arrives)."""
        launched: list[LaunchInfo] = []
        try:
            while True:
                # Re-read both bounds: the control may move them any time. Past the limit,
                # only full batches go (up to full_batch_limit); the rest wait for a call to end.
                free = self._in_flight < self.limit
                if not free and (self._control is None or self._in_flight >= self.full_batch_limit):
                    return None
                ready, key, ready_at = self._next_ready_key(now, full_only=not free)
                if not ready:
                    return ready_at
                batch, full = self._take_batch(self._queues[key], now)
                if batch:
                    try:
                        info = self._launch(batch, now, full)
                    except Exception as exc:
                        self._fail(batch, exc)  # taken off the queue: answer, never strand
                        raise
                    if info is not None:
                        launched.append(info)
        finally:
            # Batches sent in one pass leave together (their tasks start after it).
            full_wait = max((i.oldest_wait_s for i in launched if i.full), default=0.0)
            for info in launched:
                info.pass_in_flight = self._in_flight
                info.pass_full_wait_s = full_wait

    def _next_ready_key(
        self, now: float, *, full_only: bool = False
    ) -> tuple[bool, Hashable, float | None]:
        """The key whose batch may go now (oldest head first), or when the next one may.
        Called only while a slot is free, or with ``full_only`` while only a full batch may
        go (then never a time: the others wait for a call to end)."""
        cfg = self.config
        adaptive = cfg.policy is DispatchPolicy.ADAPTIVE
        control = self._control
        best_key: Hashable | None = None
        best_age = -math.inf
        earliest: float | None = None
        found = False
        for key, queue in self._queues.items():
            head = self._live_head(queue)
            if head is None:
                continue
            age = now - head.enqueued_at
            if self._is_full(queue) or (self._closing and not full_only):
                at = None  # ready
            elif full_only:
                continue
            elif not adaptive:
                at = None if age >= cfg.max_wait_s else head.enqueued_at + cfg.max_wait_s
            elif control is None:
                at = None  # adaptive: a free slot takes whatever is queued
            else:
                # A hold never keeps an item more than max_wait past the later of its arrival
                # and the moment a slot was free for it, whatever the control says (as the
                # timer policy: a batch goes once aged *and* a slot is free).
                free_since = max(head.enqueued_at, self._slot_freed_at)
                if now - free_since >= cfg.max_wait_s:
                    at = None
                else:
                    hold = control.hold(
                        queue.count, self._in_flight, cfg.max_batch_size, now, head.enqueued_at
                    )
                    at = None if hold is None else min(now + hold, free_since + cfg.max_wait_s)
            if at is None:
                if age > best_age:
                    best_key, best_age, found = key, age, True
            else:
                earliest = at if earliest is None else min(earliest, at)
        if found:
            return True, best_key, None
        return False, None, earliest

    def _live_head(self, queue: _KeyQueue[T, R]) -> _Entry[T, R] | None:
        entries = queue.entries
        while entries and not self._waiting(entries[0], queue):
            entries.popleft()
        return entries[0] if entries else None

    def _is_full(self, queue: _KeyQueue[T, R]) -> bool:
        """Whether a full batch (by count or cost) waits. The counters may still include
        callers who left this turn, so confirm against the entries, counting those out."""
        cfg = self.config
        if queue.count < cfg.max_batch_size and queue.cost < cfg.max_batch_cost:
            return False
        count = 0
        cost = 0.0
        for entry in queue.entries:  # reads only the prefix that makes one batch
            if not self._waiting(entry, queue):
                continue
            count += 1
            cost += entry.cost
            if count >= cfg.max_batch_size or cost >= cfg.max_batch_cost:
                return True
        return False

    def _take_batch(self, queue: _KeyQueue[T, R], now: float) -> tuple[list[_Entry[T, R]], bool]:
        """The next batch of ``queue``, and whether it was cut at the size or cost cap."""
        cfg = self.config
        batch: list[_Entry[T, R]] = []
        cost = 0.0
        full = False
        entries = queue.entries
        try:
            while entries and len(batch) < cfg.max_batch_size:
                entry = entries[0]
                if not self._waiting(entry, queue):
                    entries.popleft()
                    continue
                if batch and cost + entry.cost > cfg.max_batch_cost:
                    full = True
                    break
                entries.popleft()
                self._unqueue(entry, queue)
                # Off the queue, its done-callback has nothing left to do: without it, the
                # result costs no scheduled call per item.
                entry.future.remove_done_callback(entry)
                if entry.deadline is not None and now >= entry.deadline:
                    # Never spend upstream work on a caller whose time is already up.
                    entry.future.set_exception(
                        DeadlineExceededError("deadline passed while queued")
                    )
                    self._dropped("deadline")
                    continue
                batch.append(entry)
                cost += entry.cost
        except Exception as exc:
            self._fail(batch, exc)  # already off the queue: answer, never strand
            raise
        return batch, full or len(batch) >= cfg.max_batch_size

    def _launch(
        self, batch: list[_Entry[T, R]], now: float, full: bool = False
    ) -> LaunchInfo | None:
        loop = asyncio.get_running_loop()
        info = None
        if self._control is None:
            task = loop.create_task(self._run(batch))
        else:
            # The task copies the context: its process call can read what dispatch knew.
            info = LaunchInfo(self._in_flight + 1, self._queued, full, now - batch[0].enqueued_at)
            token = LAUNCH.set(info)
            try:
                task = loop.create_task(self._run(batch))
            finally:
                LAUNCH.reset(token)
        self._in_flight += 1
        self._tasks.add(task)
        # A done-callback rather than a ``finally`` in _run: it also runs for a task that is
        # cancelled before its first step, whose body (and any finally) never runs at all.
        task.add_done_callback(functools.partial(self._on_batch_done, batch))
        if self._observer is not None:
            try:
                cost = sum(e.cost for e in batch)
                self._observer.batch_dispatched(len(batch), cost, now - batch[0].enqueued_at)
            except Exception:  # a broken metric must never strand callers
                log.exception("batch observer failed")
        return info

    async def _run(self, batch: list[_Entry[T, R]]) -> None:
        try:
            results = await self._process([e.item for e in batch])
        except Exception as exc:  # the whole call failed: every caller gets the error
            self._fail(batch, exc)
            return
        if len(results) != len(batch):
            # Never zip a wrong-length answer onto callers: someone would get another's.
            self._fail(
                batch,
                BatchResultMismatchError(
                    f"process returned {len(results)} results for {len(batch)} items"
                ),
            )
            return
        for entry, result in zip(batch, results, strict=True):
            if entry.future.done():
                continue
            if isinstance(result, BaseException):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)

    def _on_batch_done(self, batch: list[_Entry[T, R]], task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        self._slot_freed_at = self._clock()
        error: BaseException | None = None
        if not task.cancelled():
            error = task.exception()  # _run answers everyone itself; this would be a bug
            if error is not None:
                log.error("batch task failed", exc_info=error)
        for entry in batch:
            if entry.future.done():
                continue
            if self._closed:
                entry.future.set_exception(BatcherClosedError("batcher closed"))
            elif error is not None:
                entry.future.set_exception(error)
            else:  # cancelled from outside (e.g. the loop shutting down)
                entry.future.cancel()
        self._schedule_dispatch()

    @staticmethod
    def _fail(batch: list[_Entry[T, R]], exc: BaseException) -> None:
        for entry in batch:
            if not entry.future.done():
                entry.future.set_exception(exc)

    def _cleanup_empty_queues(self) -> None:
        if len(self._queues) > 1:
            for key in [k for k, q in self._queues.items() if not q.entries]:
                del self._queues[key]

    def _arm_timer(self, wake_at: float | None, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wake_at is not None and not self._closed:
            delay = max(0.0, wake_at - now)
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _update_idle(self) -> None:
        if self._closed or (self._queued == 0 and self._in_flight == 0):
            self._idle.set()
        else:
            self._idle.clear()
