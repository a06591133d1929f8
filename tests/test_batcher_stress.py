"""The batcher under random load: thousands of submits with random keys, costs, deadlines and
cancels, against a ``process`` with random latency and random per-item and whole-batch
failures. Whatever happens, every caller is answered with its own result (or an error, or
its cancellation), the limits hold, and nothing is left queued once the batcher is idle."""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.batcher import (
    Batcher,
    BatcherClosedError,
    BatcherConfig,
    DeadlineExceededError,
    DispatchPolicy,
)
from tests.test_batcher import assert_empty, loop_errors, until

SEEDS = [1, 2, 3]
ITEMS = 4000


@dataclass(frozen=True, slots=True)
class Item:
    id: int
    key: str
    cost: int
    fails: bool  # process answers this one item with an exception


class ItemFailedError(Exception):
    def __init__(self, item_id: int) -> None:
        super().__init__(item_id)
        self.item_id = item_id


class BatchFailedError(Exception):
    """The whole call failed: every item of the batch gets this."""


@dataclass
class Upstream:
    """A ``process`` with random latency and failures that checks the batcher's limits."""

    rng: random.Random
    cfg: BatcherConfig
    batcher: Batcher[Item, str] | None = None
    running: int = 0
    peak: int = 0
    batches: list[list[Item]] = field(default_factory=list)
    failed_batches: set[int] = field(default_factory=set)  # ids of items in failed calls
    violations: list[str] = field(default_factory=list)
    recent: list[asyncio.Future[str]] = field(default_factory=list)  # callers to time out

    async def __call__(self, items: list[Item]) -> list[str | BaseException]:
        # Record, never raise, on a violation: raising would only fail this batch.
        self.batches.append(list(items))
        self.running += 1
        self.peak = max(self.peak, self.running)
        assert self.batcher is not None
        if self.batcher.closed:
            self.violations.append(f"batch of {len(items)} started after aclose began")
        if self.batcher.in_flight > self.cfg.max_concurrent_batches:
            self.violations.append(f"in flight {self.batcher.in_flight}")
        if len(items) > self.cfg.max_batch_size:
            self.violations.append(f"batch of {len(items)} > {self.cfg.max_batch_size}")
        if len({i.key for i in items}) != 1:
            self.violations.append("keys mixed in one batch")
        if len(items) > 1 and sum(i.cost for i in items) > self.cfg.max_batch_cost:
            self.violations.append("cost cap exceeded")
        try:
            if self.rng.random() < 0.25:
                await asyncio.sleep(self.rng.uniform(0, 0.003))
            else:
                await asyncio.sleep(0)
            if self.rng.random() < 0.03:
                self.failed_batches.update(i.id for i in items)
                raise BatchFailedError
            return [ItemFailedError(i.id) if i.fails else f"r:{i.id}" for i in items]
        finally:
            self.running -= 1
            if self.recent and self.rng.random() < 0.3:
                # A queued caller times out in the very turn in which this slot frees: the
                # dispatch that follows may see its future done before its done-callback ran.
                victim = self.rng.choice(self.recent[-64:])
                asyncio.get_running_loop().call_soon(victim.cancel)


def random_config(rng: random.Random, policy: DispatchPolicy) -> BatcherConfig:
    concurrency = rng.randint(1, 4)
    return BatcherConfig(
        max_batch_size=rng.choice([3, 8, 16, 32]),
        max_wait_s=rng.choice([0.0, 0.0005, 0.002]),
        max_concurrent_batches=concurrency,
        policy=policy,
        max_batch_cost=rng.choice([math.inf, 40.0]),
    )


class RandomControl:
    """A :class:`proxy.batcher.DispatchControl` that moves its limit (sometimes past the hard
    bound, sometimes to nonsense) and asks for random holds, as a misbehaving controller
    might: the batcher's own guarantees must hold whatever it says."""

    def __init__(self, rng: random.Random, bound: int) -> None:
        self.rng = rng
        self.bound = bound
        self.arrived_items = 0

    @property
    def limit(self) -> int:
        return self.rng.randint(0, self.bound + 2)

    @property
    def full_batch_limit(self) -> int:
        return self.rng.randint(0, self.bound + 2)

    def arrived(self, count: int, now: float) -> None:
        self.arrived_items += count

    def hold(
        self, queued: int, in_flight: int, max_batch: int, now: float, oldest_enqueued_at: float
    ) -> float | None:
        return self.rng.choice([None, None, 0.0, 0.0005, 0.002, 10.0])


def make_batcher(
    rng: random.Random, upstream: Upstream, cfg: BatcherConfig, *, with_control: bool
) -> tuple[Batcher[Item, str], RandomControl | None]:
    control = RandomControl(rng, cfg.max_concurrent_batches) if with_control else None
    batcher: Batcher[Item, str] = Batcher(upstream, cfg, control=control)
    upstream.batcher = batcher
    return batcher, control


async def submit_randomly(
    batcher: Batcher[Item, str], upstream: Upstream, rng: random.Random, count: int
) -> list[tuple[Item, float | None, asyncio.Future[str]]]:
    """Submit ``count`` items in random bursts; cancel about a fifth of them at random times
    (at once, later in the same turn, or a few ms later: a caller's timeout). ``upstream``
    cancels more of them, in the turn in which a slot frees."""
    loop = asyncio.get_running_loop()
    submitted = []
    for n in range(count):
        item = Item(n, rng.choice("abc"), rng.randint(1, 12), rng.random() < 0.05)
        deadline = None
        if rng.random() < 0.3:
            deadline = time.monotonic() + rng.uniform(-0.001, 0.004)
        fut = batcher.submit_nowait(item, key=item.key, cost=item.cost, deadline=deadline)
        submitted.append((item, deadline, fut))
        upstream.recent.append(fut)
        r = rng.random()
        if r < 0.05:
            fut.cancel()
        elif r < 0.10:
            loop.call_soon(fut.cancel)
        elif r < 0.20:
            loop.call_later(rng.uniform(0, 0.004), fut.cancel)
        if rng.random() < 0.05:  # let the batcher run between bursts
            await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.001]))
    return submitted


def check_outcomes(
    submitted: list[tuple[Item, float | None, asyncio.Future[str]]],
    upstream: Upstream,
    *,
    closed_ok: bool = False,
) -> None:
    processed = [i.id for batch in upstream.batches for i in batch]
    assert len(processed) == len(set(processed)), "an item was sent upstream twice"
    assert len(processed) <= len(submitted)
    sent = set(processed)
    for item, deadline, fut in submitted:
        assert fut.done(), f"item {item.id} never answered"
        if fut.cancelled():
            continue
        exc = fut.exception()
        if exc is None:
            assert fut.result() == f"r:{item.id}", "a caller got another's result"
            assert item.id in sent and not item.fails
        elif isinstance(exc, ItemFailedError):
            assert exc.item_id == item.id and item.fails and item.id in sent
        elif isinstance(exc, BatchFailedError):
            assert item.id in upstream.failed_batches
        elif isinstance(exc, DeadlineExceededError):
            assert deadline is not None and item.id not in sent
        elif isinstance(exc, BatcherClosedError):
            assert closed_ok
        else:
            raise AssertionError(f"item {item.id}: unexpected {exc!r}")
    assert not upstream.violations, upstream.violations[:5]
    assert upstream.peak <= upstream.cfg.max_concurrent_batches


@pytest.mark.parametrize("with_control", [False, True])
@pytest.mark.parametrize("policy", list(DispatchPolicy))
@pytest.mark.parametrize("seed", SEEDS)
async def test_random_load_answers_everyone_and_leaves_nothing_queued(
    seed: int, policy: DispatchPolicy, with_control: bool
) -> None:
    rng = random.Random(seed)
    cfg = random_config(rng, policy)
    upstream = Upstream(rng, cfg)
    batcher, control = make_batcher(rng, upstream, cfg, with_control=with_control)
    with loop_errors() as errors:
        submitted = await submit_randomly(batcher, upstream, rng, ITEMS)
        futures: list[Any] = [f for _, _, f in submitted]
        _, pending = await asyncio.wait(futures, timeout=5)
        assert not errors, errors[:3]
        assert not pending, f"{len(pending)} callers never answered"
        await until(lambda: batcher.in_flight == 0 and batcher._idle.is_set())
    check_outcomes(submitted, upstream)
    if control is not None:
        assert control.arrived_items == ITEMS
    assert_empty(batcher)
    assert not errors, errors[:3]
    assert upstream.batches, "nothing was processed at all"
    async with asyncio.timeout(1):
        await batcher.drain()  # idle already: returns at once
    await batcher.aclose()


@pytest.mark.parametrize("policy", list(DispatchPolicy))
@pytest.mark.parametrize("seed", SEEDS[:2])
async def test_random_load_cut_short_by_aclose(seed: int, policy: DispatchPolicy) -> None:
    rng = random.Random(seed)
    cfg = random_config(rng, policy)
    upstream = Upstream(rng, cfg)
    batcher, _ = make_batcher(rng, upstream, cfg, with_control=seed % 2 == 1)
    with loop_errors() as errors:
        submitted = await submit_randomly(batcher, upstream, rng, ITEMS // 2)
        if rng.random() < 0.5:
            drainer = asyncio.ensure_future(batcher.drain())
            await asyncio.sleep(0.002)
        else:
            drainer = None
        async with asyncio.timeout(5):
            await batcher.aclose()
            if drainer is not None:
                await drainer
        futures: list[Any] = [f for _, _, f in submitted]
        _, pending = await asyncio.wait(futures, timeout=5)
        assert not errors, errors[:3]
        assert not pending, f"{len(pending)} callers never answered"
        for _ in range(5):  # whatever a finished batch scheduled runs now, and must not launch
            await asyncio.sleep(0)
    check_outcomes(submitted, upstream, closed_ok=True)
    assert_empty(batcher)
    assert not errors, errors[:3]
    with pytest.raises(BatcherClosedError):
        batcher.submit_nowait(Item(-1, "a", 1, False))
