"""The batcher as a library: policies, limits, grouping, cancellation, deadlines, draining."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from proxy.batcher import (
    Batcher,
    BatcherClosedError,
    BatcherConfig,
    BatchResultMismatchError,
    DeadlineExceededError,
    DispatchPolicy,
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


async def test_extra_slots_carry_only_full_or_aged_batches() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    cfg = BatcherConfig(max_batch_size=4, max_concurrent_batches=3, eager_slots=1, max_wait_s=0.3)
    batcher: Batcher[str, str] = Batcher(rec, cfg)
    first = asyncio.ensure_future(batcher.submit("first"))
    await asyncio.sleep(0.01)
    assert rec.batches == [["first"]]  # the eager slot: at once
    small = [asyncio.ensure_future(batcher.submit(f"s{i}")) for i in range(2)]
    await asyncio.sleep(0.05)
    assert len(rec.batches) == 1  # not full and young: it waits although slots are free
    full = [asyncio.ensure_future(batcher.submit(f"f{i}")) for i in range(2)]
    await asyncio.sleep(0.05)
    assert rec.batches[1] == ["s0", "s1", "f0", "f1"]  # full: goes on an extra slot at once
    late = asyncio.ensure_future(batcher.submit("late"))
    await asyncio.sleep(0.1)
    assert len(rec.batches) == 2
    await asyncio.sleep(0.3)
    assert rec.batches[2] == ["late"]  # aged past max_wait: goes on the last free slot
    rec.gate.set()
    await asyncio.gather(first, late, *small, *full)
