"""The batcher as a library: policies, limits, grouping, cancellation, deadlines, draining."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from proxy.batcher import (
    LAUNCH,
    Batcher,
    BatcherClosedError,
    BatcherConfig,
    BatchResultMismatchError,
    DeadlineExceededError,
    DispatchPolicy,
    LaunchInfo,
    QueueFullError,
)


class Recorder:
    """An async ``process`` function that records each batch and can be held or delayed."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.delay = delay
        self.gate: asyncio.Event | None = None
        self.started_at: list[float] = []

    async def __call__(self, items: list[str]) -> Sequence[str | BaseException]:
        self.batches.append(list(items))
        self.started_at.append(time.monotonic())
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        return [f"result:{i}" for i in items]


async def test_each_caller_gets_its_own_result() -> None:
    rec = Recorder(delay=0.01)
    batcher: Batcher[str, str] = Batcher(rec, BatcherConfig(max_batch_size=8))
    results = await asyncio.gather(*(batcher.submit(f"x{i}") for i in range(100)))
    assert results == [f"result:x{i}" for i in range(100)]
    assert all(len(b) <= 8 for b in rec.batches)
    assert sum(len(b) for b in rec.batches) == 100
    assert len(rec.batches) < 100  # they were really batched


async def test_adaptive_sends_a_lone_item_at_once() -> None:
    rec = Recorder()
    cfg = BatcherConfig(max_wait_s=5.0, policy=DispatchPolicy.ADAPTIVE)
    batcher: Batcher[str, str] = Batcher(rec, cfg)
    started = time.monotonic()
    assert await batcher.submit("alone") == "result:alone"
    # A 5 s timer exists; adaptive must not wait for it while a slot is free.
    assert time.monotonic() - started < 1.0


async def test_timer_holds_a_lone_item_for_max_wait_then_sends() -> None:
    rec = Recorder()
    cfg = BatcherConfig(max_wait_s=0.2, policy=DispatchPolicy.TIMER)
    batcher: Batcher[str, str] = Batcher(rec, cfg)
    started = time.monotonic()
    assert await batcher.submit("alone") == "result:alone"
    waited = rec.started_at[0] - started
    assert 0.19 <= waited < 1.0


async def test_timer_sends_a_full_batch_without_waiting() -> None:
    rec = Recorder()
    cfg = BatcherConfig(max_batch_size=4, max_wait_s=5.0, policy=DispatchPolicy.TIMER)
    batcher: Batcher[str, str] = Batcher(rec, cfg)
    started = time.monotonic()
    await asyncio.gather(*(batcher.submit(f"{i}") for i in range(4)))
    assert time.monotonic() - started < 1.0
    assert rec.batches == [["0", "1", "2", "3"]]


async def test_adaptive_accumulates_only_while_slots_are_busy() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    cfg = BatcherConfig(max_batch_size=100, max_concurrent_batches=1)
    batcher: Batcher[str, str] = Batcher(rec, cfg)
    first = asyncio.ensure_future(batcher.submit("first"))
    await asyncio.sleep(0.01)
    assert rec.batches == [["first"]]  # went alone, at once
    rest = [asyncio.ensure_future(batcher.submit(f"r{i}")) for i in range(20)]
    await asyncio.sleep(0.01)
    assert len(rec.batches) == 1  # the only slot is busy: the others accumulate
    assert batcher.queue_depth == 20
    rec.gate.set()
    await asyncio.gather(first, *rest)
    assert rec.batches[1] == [f"r{i}" for i in range(20)]  # one batch when the slot frees


async def test_concurrency_bound_is_never_exceeded() -> None:
    running = 0
    peak = 0

    async def process(items: list[int]) -> list[int]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        running -= 1
        return items

    batcher: Batcher[int, int] = Batcher(
        process, BatcherConfig(max_batch_size=3, max_concurrent_batches=2)
    )
    assert await asyncio.gather(*(batcher.submit(i) for i in range(60))) == list(range(60))
    assert peak == 2


async def test_cost_cap_splits_batches() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    cfg = BatcherConfig(max_batch_size=100, max_batch_cost=10, max_concurrent_batches=1)
    batcher: Batcher[str, str] = Batcher(rec, cfg)
    blocker = asyncio.ensure_future(batcher.submit("b", cost=1))
    await asyncio.sleep(0.01)
    futs = [asyncio.ensure_future(batcher.submit(f"c{i}", cost=4)) for i in range(5)]
    big = asyncio.ensure_future(batcher.submit("huge", cost=50))
    await asyncio.sleep(0.01)
    rec.gate.set()
    await asyncio.gather(blocker, big, *futs)
    assert rec.batches[1:] == [["c0", "c1"], ["c2", "c3"], ["c4"], ["huge"]]


async def test_keys_never_share_a_batch() -> None:
    rec = Recorder(delay=0.01)
    batcher: Batcher[str, str] = Batcher(rec, BatcherConfig(max_concurrent_batches=1))
    await asyncio.gather(
        *(batcher.submit(f"{k}-{i}", key=k) for i in range(10) for k in ("a", "b", "c"))
    )
    for batch in rec.batches:
        assert len({item.split("-")[0] for item in batch}) == 1


async def test_per_item_exceptions_fail_only_that_item() -> None:
    async def process(items: list[str]) -> list[str | BaseException]:
        return [ValueError(i) if i == "bad" else i for i in items]

    batcher: Batcher[str, str] = Batcher(process)
    results = await asyncio.gather(
        batcher.submit("a"), batcher.submit("bad"), batcher.submit("b"), return_exceptions=True
    )
    assert results[0] == "a" and results[2] == "b"
    assert isinstance(results[1], ValueError)


async def test_whole_batch_failure_reaches_every_caller() -> None:
    async def process(items: list[str]) -> list[str]:
        raise RuntimeError("upstream down")

    batcher: Batcher[str, str] = Batcher(process)
    results = await asyncio.gather(
        *(batcher.submit(str(i)) for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_wrong_result_count_is_never_zipped() -> None:
    async def process(items: list[str]) -> list[str]:
        return items[:-1]

    batcher: Batcher[str, str] = Batcher(process)
    results = await asyncio.gather(
        *(batcher.submit(str(i)) for i in range(4)), return_exceptions=True
    )
    assert all(isinstance(r, BatchResultMismatchError) for r in results)


async def test_cancelled_callers_are_dropped_before_dispatch() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    dropped: list[str] = []

    class Observer:
        def batch_dispatched(self, size: int, cost: float, oldest_wait_s: float) -> None:
            pass

        def item_dropped(self, reason: str) -> None:
            dropped.append(reason)

    batcher: Batcher[str, str] = Batcher(
        rec, BatcherConfig(max_concurrent_batches=1), observer=Observer()
    )
    blocker = asyncio.ensure_future(batcher.submit("blocker"))
    await asyncio.sleep(0.01)
    keep = asyncio.ensure_future(batcher.submit("keep"))
    gone = asyncio.ensure_future(batcher.submit("gone"))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0.01)
    assert batcher.queue_depth == 1
    rec.gate.set()
    await asyncio.gather(blocker, keep)
    assert rec.batches == [["blocker"], ["keep"]]
    assert dropped == ["cancelled"]


async def test_expired_items_are_never_dispatched() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    batcher: Batcher[str, str] = Batcher(rec, BatcherConfig(max_concurrent_batches=1))
    blocker = asyncio.ensure_future(batcher.submit("blocker"))
    await asyncio.sleep(0.01)
    stale = asyncio.ensure_future(batcher.submit("stale", deadline=time.monotonic() + 0.02))
    await asyncio.sleep(0.05)
    rec.gate.set()
    await blocker
    with pytest.raises(DeadlineExceededError):
        await stale
    assert ["stale"] not in rec.batches


async def test_queue_bound_rejects_without_blocking() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    batcher: Batcher[str, str] = Batcher(
        rec, BatcherConfig(max_concurrent_batches=1, max_queue_size=3)
    )
    futs = [batcher.submit_nowait(str(i)) for i in range(3)]
    with pytest.raises(QueueFullError):
        batcher.submit_nowait("one too many")
    rec.gate.set()
    await asyncio.gather(*futs)


async def test_drain_finishes_everything_and_refuses_new_items() -> None:
    rec = Recorder(delay=0.02)
    cfg = BatcherConfig(max_batch_size=4, max_wait_s=10.0, policy=DispatchPolicy.TIMER)
    batcher: Batcher[str, str] = Batcher(rec, cfg)
    futs = [batcher.submit_nowait(str(i)) for i in range(10)]
    await batcher.drain()
    assert all(f.done() and not f.exception() for f in futs)
    with pytest.raises(BatcherClosedError):
        batcher.submit_nowait("late")


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError):
        BatcherConfig(max_batch_size=0)
    with pytest.raises(ValueError):
        BatcherConfig(max_concurrent_batches=0)


class Control:
    """A :class:`proxy.batcher.DispatchControl` whose limit and advice the test sets."""

    def __init__(
        self, limit: int = 1, hold: float | None = None, full_batch_limit: int = 0
    ) -> None:
        self.limit = limit
        self.full_batch_limit = full_batch_limit  # below limit: no extra calls for full ones
        self.hold_s = hold
        self.arrivals: list[int] = []
        self.asked: list[tuple[int, int]] = []  # (queued, in_flight) of each hold question

    def arrived(self, count: int, now: float) -> None:
        self.arrivals.append(count)

    def hold(
        self, queued: int, in_flight: int, max_batch: int, now: float, oldest_enqueued_at: float
    ) -> float | None:
        self.asked.append((queued, in_flight))
        return self.hold_s


async def test_the_controls_limit_bounds_calls_and_is_read_at_every_dispatch() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    control = Control(limit=1)
    cfg = BatcherConfig(max_batch_size=1, max_concurrent_batches=3)
    batcher: Batcher[str, str] = Batcher(rec, cfg, control=control)
    futs = [batcher.submit_nowait(f"{i}") for i in range(6)]
    await until(lambda: len(rec.batches) == 1)
    for _ in range(5):
        await asyncio.sleep(0)
    assert batcher.in_flight == 1 and batcher.limit == 1  # the control's limit, not 3
    control.limit = 10  # above the hard bound: max_concurrent_batches still holds
    batcher.wake()
    await until(lambda: len(rec.batches) == 3)
    for _ in range(5):
        await asyncio.sleep(0)
    assert batcher.in_flight == 3 and batcher.limit == 3
    control.limit = 0  # nonsense: at least one call may always go
    assert batcher.limit == 1
    rec.gate.set()
    assert await asyncio.gather(*futs) == [f"result:{i}" for i in range(6)]
    assert sum(control.arrivals) == 6  # every item reported, in bulk per dispatch


async def test_past_the_limit_only_full_batches_go_up_to_the_full_batch_limit() -> None:
    """A full batch cannot grow by waiting: the control may let it take calls beyond its
    limit (pipelining into a serial upstream). A partial batch still waits for a call to
    end, and so does a full one once full_batch_limit is reached; the hard bound holds."""
    rec = Recorder()
    rec.gate = asyncio.Event()
    control = Control(limit=1, full_batch_limit=2)
    cfg = BatcherConfig(max_batch_size=4, max_concurrent_batches=3)
    batcher: Batcher[str, str] = Batcher(rec, cfg, control=control)
    futs = [batcher.submit_nowait("a0")]
    await until(lambda: len(rec.batches) == 1)
    futs += [batcher.submit_nowait(f"b{i}") for i in range(3)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(rec.batches) == 1 and batcher.queue_depth == 3  # partial: waits
    futs.append(batcher.submit_nowait("b3"))  # now full: takes the extra call
    await until(lambda: len(rec.batches) == 2)
    futs += [batcher.submit_nowait(f"c{i}") for i in range(4)]  # full, but no call left
    for _ in range(5):
        await asyncio.sleep(0)
    assert batcher.in_flight == 2 and batcher.queue_depth == 4
    control.full_batch_limit = 10  # above the hard bound: max_concurrent_batches holds
    batcher.wake()
    await until(lambda: len(rec.batches) == 3)
    assert batcher.in_flight == 3 and batcher.full_batch_limit == 3
    rec.gate.set()
    assert len(await asyncio.gather(*futs)) == 9
    assert rec.batches == [["a0"], ["b0", "b1", "b2", "b3"], ["c0", "c1", "c2", "c3"]]


async def test_draining_sends_partial_batches_within_the_limit_only() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    control = Control(limit=1, full_batch_limit=3)
    cfg = BatcherConfig(max_batch_size=4, max_concurrent_batches=3)
    batcher: Batcher[str, str] = Batcher(rec, cfg, control=control)
    futs = [batcher.submit_nowait("a0")]
    await until(lambda: len(rec.batches) == 1)
    futs += [batcher.submit_nowait(f"b{i}") for i in range(2)]
    drained = asyncio.ensure_future(batcher.drain())
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(rec.batches) == 1  # partial: the extra calls are for full batches only
    rec.gate.set()
    await drained
    assert rec.batches == [["a0"], ["b0", "b1"]]
    assert len(await asyncio.gather(*futs)) == 3


async def test_a_hold_merges_what_arrives_meanwhile() -> None:
    rec = Recorder()
    control = Control(limit=2, hold=0.1)
    cfg = BatcherConfig(max_batch_size=8, max_wait_s=5.0, max_concurrent_batches=2)
    batcher: Batcher[str, str] = Batcher(rec, cfg, control=control)
    first = batcher.submit_nowait("a")
    await asyncio.sleep(0.03)
    assert rec.batches == []  # held although both slots are free
    assert control.asked[0] == (1, 0)
    second = batcher.submit_nowait("b")
    control.hold_s = None  # advice changes: the next dispatch sends
    assert await asyncio.gather(first, second) == ["result:a", "result:b"]
    assert rec.batches == [["a", "b"]]


async def test_a_hold_never_passes_max_wait_nor_delays_a_full_batch() -> None:
    rec = Recorder()
    control = Control(limit=2, hold=60.0)  # a broken control asking for a minute
    cfg = BatcherConfig(max_batch_size=3, max_wait_s=0.2, max_concurrent_batches=2)
    batcher: Batcher[str, str] = Batcher(rec, cfg, control=control)
    started = time.monotonic()
    assert await batcher.submit("alone") == "result:alone"
    waited = rec.started_at[0] - started
    assert 0.19 <= waited < 1.0  # max_wait from the item's arrival, not a minute
    started = time.monotonic()
    await asyncio.gather(*(batcher.submit(f"f{i}") for i in range(3)))
    assert time.monotonic() - started < 0.15  # full: goes at once, no hold asked
    assert rec.batches[-1] == ["f0", "f1", "f2"]


async def test_a_batch_can_read_what_dispatch_knew_when_it_left() -> None:
    seen: list[LaunchInfo | None] = []

    async def process(items: list[str]) -> list[str]:
        seen.append(LAUNCH.get())
        await asyncio.sleep(0.05)
        return items

    control = Control(limit=1)
    cfg = BatcherConfig(max_batch_size=2, max_concurrent_batches=4)
    batcher: Batcher[str, str] = Batcher(process, cfg, control=control)
    futs = [batcher.submit_nowait(f"{i}") for i in range(5)]
    await asyncio.gather(*futs)
    assert seen[0] is not None and seen[1] is not None
    assert (seen[0].in_flight, seen[0].queue_left, seen[0].full) == (1, 3, True)
    assert seen[0].pass_in_flight == 1
    assert seen[0].oldest_wait_s < 0.04
    assert (seen[1].in_flight, seen[1].queue_left, seen[1].full) == (1, 1, True)
    assert seen[1].oldest_wait_s >= 0.045  # waited for the first call to end
    last = seen[2]
    assert last is not None and (last.queue_left, last.full) == (0, False)
    assert LAUNCH.get() is None  # set only inside the batch's task


async def test_timer_policy_never_asks_the_control_to_hold() -> None:
    rec = Recorder()
    control = Control(limit=1, hold=None)
    cfg = BatcherConfig(max_wait_s=0.05, policy=DispatchPolicy.TIMER)
    batcher: Batcher[str, str] = Batcher(rec, cfg, control=control)
    started = time.monotonic()
    assert await batcher.submit("x") == "result:x"
    assert rec.started_at[0] - started >= 0.045  # the timer's wait, not the control's "send"
    assert control.asked == []


# -- races, robustness and shutdown (issue 10) ------------------------------------------


class FakeClock:
    """The batcher's injectable clock. ``on_read`` runs once, at the next read: a way to act
    at the exact moment a dispatch starts, with no sleeps."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.on_read: Callable[[], None] | None = None

    def __call__(self) -> float:
        hook, self.on_read = self.on_read, None
        if hook is not None:
            hook()
        return self.now


class DropLog:
    """An observer that records drops; ``fail`` makes every hook raise (a broken metric)."""

    def __init__(self, *, fail: bool = False) -> None:
        self.dropped: list[str] = []
        self.fail = fail

    def batch_dispatched(self, size: int, cost: float, oldest_wait_s: float) -> None:
        if self.fail:
            raise RuntimeError("observer broke")

    def item_dropped(self, reason: str) -> None:
        self.dropped.append(reason)
        if self.fail:
            raise RuntimeError("observer broke")


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What the loop would report: errors in callbacks, exceptions never retrieved."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        gc.collect()  # "never retrieved" is reported when a future is collected
        loop.set_exception_handler(previous)


def assert_empty(batcher: Batcher[Any, Any]) -> None:
    assert batcher.queue_depth == 0
    assert batcher.in_flight == 0
    assert all(not q.entries and q.count == 0 for q in batcher._queues.values())


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop turn until ``condition`` holds; a hang fails instead of blocking."""
    async with asyncio.timeout(2):
        while True:
            if condition():
                return
            await asyncio.sleep(0)  # polled: the conditions are batcher state, not events


@pytest.mark.parametrize("policy", list(DispatchPolicy))
async def test_a_cancel_racing_a_freed_slot_past_its_deadline_strands_nothing(
    policy: DispatchPolicy,
) -> None:
    clock = FakeClock()
    gate = asyncio.Event()
    batches: list[list[str]] = []
    victim: list[asyncio.Future[str]] = []

    async def process(items: list[str]) -> list[str]:
        batches.append(list(items))
        if items == ["blocker"]:
            await gate.wait()
            clock.now = 10.0  # the victim's deadline has passed; every wait has aged
            # The victim's caller times out in the very turn in which this slot frees: its
            # future is done when the dispatch starts, before the batcher's done-callback
            # for it can run.
            clock.on_read = victim[0].cancel
        return [f"r:{i}" for i in items]

    drops = DropLog()
    cfg = BatcherConfig(max_concurrent_batches=1, max_wait_s=0.5, policy=policy)
    batcher: Batcher[str, str] = Batcher(process, cfg, observer=drops, clock=clock)
    with loop_errors() as errors:
        blocker = batcher.submit_nowait("blocker")
        clock.now = 1.0  # aged past max_wait: goes on the next turn under either policy
        await until(lambda: bool(batches))
        a = batcher.submit_nowait("a")
        victim.append(batcher.submit_nowait("victim", deadline=5.0))
        b = batcher.submit_nowait("b")
        c = batcher.submit_nowait("c", key="other")
        gate.set()
        await asyncio.wait([blocker, a, b, c], timeout=2)
    assert not errors, errors
    assert victim[0].cancelled()
    assert [f.result() for f in (blocker, a, b, c)] == ["r:blocker", "r:a", "r:b", "r:c"]
    assert batches == [["blocker"], ["a", "b"], ["c"]]
    assert drops.dropped == ["cancelled"]  # accounted once, not again by its done-callback
    await until(lambda: batcher.in_flight == 0)
    assert_empty(batcher)


async def test_a_caller_who_left_this_turn_never_makes_a_batch_look_full() -> None:
    clock = FakeClock()
    rec = Recorder()
    cfg = BatcherConfig(max_batch_size=3, max_wait_s=10.0, policy=DispatchPolicy.TIMER)
    batcher: Batcher[str, str] = Batcher(rec, cfg, clock=clock)
    a = batcher.submit_nowait("a")
    gone = batcher.submit_nowait("gone")
    b = batcher.submit_nowait("b")
    gone.cancel()  # same turn: the dispatch runs before the batcher hears of it
    for _ in range(5):
        await asyncio.sleep(0)
    assert rec.batches == []  # two waiting callers: not full, and young by the clock
    assert batcher.queue_depth == 2
    c = batcher.submit_nowait("c")
    async with asyncio.timeout(2):
        assert await asyncio.gather(a, b, c) == ["result:a", "result:b", "result:c"]
    assert rec.batches == [["a", "b", "c"]]
    await batcher.aclose()


async def test_a_broken_observer_never_strands_a_batch() -> None:
    clock = FakeClock()
    rec = Recorder()
    batcher: Batcher[str, str] = Batcher(
        rec, BatcherConfig(max_concurrent_batches=1), observer=DropLog(fail=True), clock=clock
    )
    with loop_errors() as errors:
        futs = [
            batcher.submit_nowait("a"),
            batcher.submit_nowait("late", deadline=0.0),  # expired: reported as a drop
            batcher.submit_nowait("b"),
        ]
        done, _ = await asyncio.wait(futs, timeout=2)
    assert len(done) == 3
    assert [futs[0].result(), futs[2].result()] == ["result:a", "result:b"]
    assert isinstance(futs[1].exception(), DeadlineExceededError)
    assert rec.batches == [["a", "b"]]
    assert not errors, errors
    await until(lambda: batcher.in_flight == 0)
    assert_empty(batcher)


async def test_a_failure_while_launching_answers_that_batch_and_dispatch_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    batcher: Batcher[str, str] = Batcher(rec, BatcherConfig(max_concurrent_batches=2))
    launch = batcher._launch
    calls = 0

    def launch_once_broken(batch: Any, now: float, full: bool = False) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("launch failed")
        return launch(batch, now, full)

    monkeypatch.setattr(batcher, "_launch", launch_once_broken)
    with loop_errors() as errors, caplog.at_level(logging.ERROR, logger="proxy.batcher"):
        xs = [batcher.submit_nowait(f"x{i}", key="x") for i in range(2)]
        y = batcher.submit_nowait("y", key="y")
        done, _ = await asyncio.wait([*xs, y], timeout=2)
    assert len(done) == 3, "a popped batch was stranded"
    assert all(str(f.exception()) == "launch failed" for f in xs)
    assert y.result() == "result:y"
    assert rec.batches == [["y"]]
    assert not errors, errors  # logged by the batcher, not escaped into the loop
    assert "launch failed" in caplog.text
    await until(lambda: batcher.in_flight == 0)
    assert_empty(batcher)


async def test_aclose_launches_nothing_new_and_fails_what_is_queued() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    batcher: Batcher[str, str] = Batcher(rec, BatcherConfig(max_concurrent_batches=1))
    running = batcher.submit_nowait("running")
    await until(lambda: bool(rec.batches))
    queued = [batcher.submit_nowait(f"q{i}") for i in range(3)]
    async with asyncio.timeout(2):
        await batcher.aclose()
    for _ in range(5):  # a dispatch that the cancelled batch scheduled would run now
        await asyncio.sleep(0)
    assert rec.batches == [["running"]]  # nothing started once aclose began
    assert all(isinstance(f.exception(), BatcherClosedError) for f in queued)
    assert isinstance(running.exception(), BatcherClosedError)
    assert batcher.closed and batcher.closing
    assert_empty(batcher)
    assert not batcher._tasks
    with pytest.raises(BatcherClosedError):
        batcher.submit_nowait("late")


async def test_aclose_answers_a_batch_cancelled_before_it_started() -> None:
    rec = Recorder()
    batcher: Batcher[str, str] = Batcher(rec, BatcherConfig(max_batch_size=2))
    futs = [batcher.submit_nowait(f"{i}") for i in range(3)]
    await until(lambda: batcher.in_flight > 0)  # launched, their tasks not yet stepped
    async with asyncio.timeout(2):
        await batcher.aclose()
    assert all(isinstance(f.exception(), BatcherClosedError) for f in futs)
    assert rec.batches == []
    assert_empty(batcher)


async def test_drain_returns_once_aclose_begins_even_if_a_batch_is_slow_to_stop() -> None:
    gate = asyncio.Event()
    release = asyncio.Event()
    batches: list[list[str]] = []

    async def process(items: list[str]) -> list[str]:
        batches.append(list(items))
        try:
            await gate.wait()
        except asyncio.CancelledError:
            await release.wait()  # an upstream call that takes a while to abort
            raise
        return items

    cfg = BatcherConfig(max_batch_size=2, max_concurrent_batches=1)
    batcher: Batcher[str, str] = Batcher(process, cfg)
    futs = [batcher.submit_nowait(f"{i}") for i in range(5)]
    await until(lambda: bool(batches))
    drainer = asyncio.ensure_future(batcher.drain())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not drainer.done()  # draining: waiting for the call in flight
    closer = asyncio.ensure_future(batcher.aclose())
    async with asyncio.timeout(2):
        await drainer  # nothing will run any more: drain has nothing left to wait for
    assert not closer.done()
    release.set()
    async with asyncio.timeout(2):
        await closer
    for _ in range(5):
        await asyncio.sleep(0)
    assert batches == [["0", "1"]]
    assert all(isinstance(f.exception(), BatcherClosedError) for f in futs)
    assert_empty(batcher)


async def test_a_callers_own_future_is_the_one_completed_and_can_act_at_once() -> None:
    """``submit_nowait(future=...)``: the batcher completes the caller's future (a subclass
    that acts the moment it is set, as the cache's is), and a cancelled one still leaves the
    queue."""
    completed: list[str] = []

    class Eager(asyncio.Future[str]):
        def set_result(self, result: str) -> None:
            super().set_result(result)
            completed.append(result)  # the batcher called the override itself

    rec = Recorder()
    rec.gate = asyncio.Event()
    batcher: Batcher[str, str] = Batcher(rec, BatcherConfig(max_concurrent_batches=1))
    loop = asyncio.get_running_loop()
    mine = Eager(loop=loop)
    assert batcher.submit_nowait("a", future=mine) is mine
    await asyncio.sleep(0)
    queued = Eager(loop=loop)
    batcher.submit_nowait("b", future=queued)
    queued.cancel()
    await asyncio.sleep(0)
    assert batcher.queue_depth == 0
    rec.gate.set()
    assert await mine == "result:a" and completed == ["result:a"]
    await batcher.aclose()
