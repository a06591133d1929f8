"""The merge logic of the cache (proxy/cache/front.py): single flight, hits, failures and
callers that leave, against a real batcher and an in-process upstream.

Property tests (hypothesis) drive random requests with repeated texts, random hit and miss
patterns, random refusals and failed calls, random Cache-Control and random cancellations,
and compare every caller's answer with what a model without any cache gives for its own
input. The deterministic tests below them pin the rules one by one.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from dataclasses import dataclass
from typing import cast

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.batcher import Batcher, BatcherConfig
from proxy.cache import CacheUse, EmbeddingCache
from proxy.cache.front import JsonRow
from proxy.cache.identity import CacheScope
from proxy.upstream.base import EmbedOptions, RawVector, Vector
from tests.cache_support import (
    SCOPE,
    BatchFailed,
    FakeUpstream,
    ItemRefused,
    Job,
    batcher_for,
    f32,
    memory_key,
    preload,
    submit,
    submitter,
    vector_of,
)

TEXTS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
DIRECTIVES = {
    "default": (True, True),
    "no-cache": (False, True),
    "no-store": (False, False),
}


@dataclass(frozen=True)
class Req:
    texts: list[str]
    start_turns: int
    directive: str
    cancel_after: int | None  # loop turns after its start; None: it stays


requests_st = st.lists(
    st.builds(
        Req,
        texts=st.lists(st.sampled_from(TEXTS), min_size=1, max_size=6),
        start_turns=st.integers(0, 4),
        directive=st.sampled_from(sorted(DIRECTIVES)),
        cancel_after=st.none() | st.integers(0, 6),
    ),
    min_size=1,
    max_size=8,
)


def check_slot(text: str, result: Vector | BaseException) -> None:
    """What a model without a cache gives for ``text``: its own vector (as float32), or an
    error that is about ``text``."""
    if isinstance(result, ItemRefused):
        assert result.text == text
    elif isinstance(result, BatchFailed):
        assert text in result.texts
    else:
        assert not isinstance(result, BaseException), result
        assert np.array_equal(np.asarray(result), f32(text))


async def run_requests(
    cache: EmbeddingCache, upstream: FakeUpstream, batcher: Batcher[Job, Vector], reqs: list[Req]
) -> list[tuple[Req, list[Vector | BaseException] | None, CacheUse]]:
    async def one(req: Req, use: CacheUse) -> list[Vector | BaseException]:
        for _ in range(req.start_turns):
            await asyncio.sleep(0)
        futures = submit(cache, batcher, req.texts, use)
        try:
            # A cancelled task cancels these futures, as a request whose caller left does.
            return list(await asyncio.gather(*futures, return_exceptions=True))
        finally:
            for fut in futures:
                if not fut.done():
                    fut.cancel()

    async def cancel_later(task: asyncio.Task[list[Vector | BaseException]], turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()

    uses = [CacheUse(*DIRECTIVES[r.directive]) for r in reqs]
    tasks = [asyncio.ensure_future(one(r, u)) for r, u in zip(reqs, uses, strict=True)]
    cancellers = [
        asyncio.ensure_future(cancel_later(t, r.start_turns + r.cancel_after))
        for r, t in zip(reqs, tasks, strict=True)
        if r.cancel_after is not None
    ]
    async with asyncio.timeout(3):  # a caller never answered would hang here
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*cancellers)
    out: list[tuple[Req, list[Vector | BaseException] | None, CacheUse]] = []
    for req, outcome, use in zip(reqs, outcomes, uses, strict=True):
        if isinstance(outcome, asyncio.CancelledError):
            out.append((req, None, use))
        else:
            assert isinstance(outcome, list), outcome
            out.append((req, outcome, use))
    return out


@settings(max_examples=300, deadline=None)
@given(
    reqs=requests_st,
    cached=st.sets(st.sampled_from(TEXTS)),
    refused=st.frozensets(st.sampled_from(TEXTS)),
    failing_calls=st.frozensets(st.integers(0, 8)),
    turns=st.integers(0, 3),
    batch=st.integers(1, 4),
    concurrent=st.integers(1, 2),
)
def test_every_caller_gets_its_own_inputs_answer(
    reqs: list[Req],
    cached: set[str],
    refused: frozenset[str],
    failing_calls: frozenset[int],
    turns: int,
    batch: int,
    concurrent: int,
) -> None:
    async def scenario() -> None:
        cache = EmbeddingCache(1 << 20)
        preload(cache, sorted(cached))
        upstream = FakeUpstream(refused=refused, failing_calls=failing_calls, turns=turns)
        batcher = batcher_for(upstream, batch, concurrent)
        try:
            results = await run_requests(cache, upstream, batcher, reqs)
        finally:
            await batcher.aclose()
        any_cancelled = False
        for req, slots, use in results:
            if slots is None:
                any_cancelled = True
                continue
            assert len(slots) == len(req.texts)
            for text, result in zip(req.texts, slots, strict=True):
                check_slot(text, result)
            assert use.hits + use.misses == len(req.texts)
            if not DIRECTIVES[req.directive][0]:
                assert use.hits == 0  # no-cache and no-store never read the cache
        # Nothing is left in flight, and an error is never stored.
        assert cache.in_flight == 0
        for text in refused:
            if text not in cached:
                assert memory_key(cache, text) not in cache.lru
        # Without leaving callers, no text is ever in two upstream items at once.
        if not any_cancelled:
            assert upstream.overlaps == []
        # With only default requests and no failures: each text goes upstream at most once,
        # and never when it was cached.
        if (
            not any_cancelled
            and not refused
            and not failing_calls
            and all(r.directive == "default" for r in reqs)
        ):
            assert all(n == 1 for n in upstream.sent.values()), upstream.sent
            assert not set(upstream.sent) & cached

    asyncio.run(scenario())


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    reqs=requests_st,
    in_memory=st.sets(st.sampled_from(TEXTS)),
    in_redis=st.sets(st.sampled_from(TEXTS)),
    refused=st.frozensets(st.sampled_from(TEXTS)),
    failing_calls=st.frozensets(st.integers(0, 8)),
)
def test_with_redis_every_caller_still_gets_its_own_answer(
    redis_url: str,
    reqs: list[Req],
    in_memory: set[str],
    in_redis: set[str],
    refused: frozenset[str],
    failing_calls: frozenset[int],
) -> None:
    import redis.asyncio as aioredis

    from proxy.cache.l2 import RedisL2

    async def scenario() -> None:
        # A fresh prefix per example: the server is shared by every example of this test.
        prefix = f"t{time.monotonic_ns()}"
        l2 = RedisL2(redis_url, prefix=prefix, ttl_s=60, timeout_s=1.0)
        cache = EmbeddingCache(1 << 20, l2=l2)
        preload(cache, sorted(in_memory))
        writer = aioredis.Redis.from_url(redis_url)
        for text in sorted(in_redis):
            await writer.set(l2.redis_key(memory_key(cache, text)[4:]), f32(text).tobytes())
        await writer.aclose()
        upstream = FakeUpstream(refused=refused, failing_calls=failing_calls, turns=1)
        batcher = batcher_for(upstream)
        try:
            results = await run_requests(cache, upstream, batcher, reqs)
        finally:
            await batcher.aclose()
            await cache.aclose()
        for req, slots, use in results:
            if slots is None:
                continue
            for text, result in zip(req.texts, slots, strict=True):
                check_slot(text, result)
            assert use.hits + use.misses == len(req.texts)
        assert cache.in_flight == 0
        # Whatever Redis held was never computed again by a default request that read it.
        if all(r.directive == "default" for r in reqs) and all(
            r.cancel_after is None for r in reqs
        ):
            assert not set(upstream.sent) & (in_redis | in_memory)

    asyncio.run(scenario())


# -- the rules, one by one ---------------------------------------------------------------------


async def test_200_concurrent_callers_of_one_text_make_one_upstream_item() -> None:
    cache = EmbeddingCache(1 << 20)
    upstream = FakeUpstream(gate=asyncio.Event())
    batcher = batcher_for(upstream, batch=32)
    futures = [submit(cache, batcher, ["the same text"])[0] for _ in range(200)]
    await asyncio.sleep(0.01)
    assert cache.in_flight == 1
    assert upstream.gate is not None
    upstream.gate.set()
    results = await asyncio.gather(*futures)
    assert upstream.sent == {"the same text": 1}
    for r in results:
        assert np.array_equal(r, f32("the same text"))
    # One array for everyone: stored once, shared read-only.
    assert all(r is results[0] for r in results)
    assert not np.asarray(results[0]).flags.writeable
    await batcher.aclose()


async def test_repeats_within_one_list_share_one_upstream_item_and_keep_their_slots() -> None:
    cache = EmbeddingCache(1 << 20)
    preload(cache, ["cached"])
    upstream = FakeUpstream()
    batcher = batcher_for(upstream, batch=32)
    texts = ["a", "cached", "b", "a", "cached", "a", "b", "c"]
    use = CacheUse()
    results = await asyncio.gather(*submit(cache, batcher, texts, use))
    for text, r in zip(texts, results, strict=True):
        assert np.array_equal(r, f32(text))
    assert upstream.sent == {"a": 1, "b": 1, "c": 1}
    assert (use.hits, use.misses) == (2, 6)
    await batcher.aclose()


async def test_last_waiter_rule_cancel_nine_of_ten_the_tenth_gets_its_vector() -> None:
    cache = EmbeddingCache(1 << 20)
    upstream = FakeUpstream(gate=asyncio.Event())
    # One slot, held by another item, so the shared item is still queued when callers leave.
    batcher = batcher_for(upstream, batch=1, concurrent=1)
    blocker = submit(cache, batcher, ["blocker"])[0]
    futures = [submit(cache, batcher, ["shared"])[0] for _ in range(10)]
    await asyncio.sleep(0)
    for fut in futures[:9]:
        fut.cancel()
    await asyncio.sleep(0)
    assert cache.in_flight == 2  # still wanted by the tenth
    assert upstream.gate is not None
    upstream.gate.set()
    assert np.array_equal(await futures[9], f32("shared"))
    await blocker
    assert upstream.sent == {"blocker": 1, "shared": 1}
    await batcher.aclose()


async def test_when_the_last_waiter_leaves_the_item_leaves_the_queue() -> None:
    cache = EmbeddingCache(1 << 20)
    upstream = FakeUpstream(gate=asyncio.Event())
    batcher = batcher_for(upstream, batch=1, concurrent=1)
    blocker = submit(cache, batcher, ["blocker"])[0]
    futures = [submit(cache, batcher, ["abandoned"])[0] for _ in range(3)]
    await asyncio.sleep(0)
    assert batcher.queue_depth == 1
    for fut in futures:
        fut.cancel()
    for _ in range(3):  # the waiters' callbacks, then the batcher's
        await asyncio.sleep(0)
    assert batcher.queue_depth == 0
    assert cache.in_flight == 1  # the blocker only
    assert upstream.gate is not None
    upstream.gate.set()
    await blocker
    assert "abandoned" not in upstream.sent
    await batcher.aclose()


async def test_an_error_reaches_every_waiter_and_is_never_cached() -> None:
    cache = EmbeddingCache(1 << 20)
    upstream = FakeUpstream(refused=frozenset({"bad"}))
    batcher = batcher_for(upstream, batch=32)
    futures = [submit(cache, batcher, ["bad", "good"]) for _ in range(5)]
    for pair in futures:
        with pytest.raises(ItemRefused):
            await pair[0]
        assert np.array_equal(await pair[1], f32("good"))
    assert upstream.sent == {"bad": 1, "good": 1}
    assert memory_key(cache, "bad") not in cache.lru
    # Tried afresh next time: the upstream is asked again.
    with pytest.raises(ItemRefused):
        await submit(cache, batcher, ["bad"])[0]
    assert upstream.sent["bad"] == 2
    await batcher.aclose()


async def test_a_failed_call_fails_exactly_its_items_callers() -> None:
    cache = EmbeddingCache(1 << 20)
    upstream = FakeUpstream(failing_calls=frozenset({0}), gate=asyncio.Event())
    batcher = batcher_for(upstream, batch=2, concurrent=2)
    first = submit(cache, batcher, ["x", "y"])  # call 0: fails
    second = submit(cache, batcher, ["z", "x"])  # z in call 1, x joins call 0's item
    await asyncio.sleep(0)
    assert upstream.gate is not None
    upstream.gate.set()
    for fut in (first[0], first[1], second[1]):
        with pytest.raises(BatchFailed):
            await fut
    assert np.array_equal(await second[0], f32("z"))
    await batcher.aclose()


async def test_no_cache_skips_the_lookup_but_stores_and_no_store_does_neither() -> None:
    cache = EmbeddingCache(1 << 20)
    upstream = FakeUpstream()
    batcher = batcher_for(upstream)
    preload(cache, ["stale?"])
    use = CacheUse(read=False, write=True)
    assert np.array_equal(await submit(cache, batcher, ["stale?"], use)[0], f32("stale?"))
    assert upstream.sent == {"stale?": 1} and (use.hits, use.misses) == (0, 1)
    use = CacheUse(read=False, write=False)
    await submit(cache, batcher, ["private"], use)[0]
    assert memory_key(cache, "private") not in cache.lru
    use = CacheUse(read=False, write=True)
    await submit(cache, batcher, ["fresh"], use)[0]
    assert memory_key(cache, "fresh") in cache.lru
    await batcher.aclose()


async def test_different_options_or_versions_never_share_an_entry_or_a_flight() -> None:
    cache = EmbeddingCache(1 << 20)
    upstream = FakeUpstream(gate=asyncio.Event())
    batcher = batcher_for(upstream, batch=32)
    variants = [
        (SCOPE, EmbedOptions()),
        (CacheScope(SCOPE.model, "v2"), EmbedOptions()),
        (CacheScope("other/model", SCOPE.version), EmbedOptions()),
        (SCOPE, EmbedOptions(normalize=False)),
        (SCOPE, EmbedOptions(dimensions=2)),
        (SCOPE, EmbedOptions(prompt_name="query")),
        (SCOPE, EmbedOptions(truncation_direction="Left")),
    ]
    futures = [
        submit(cache, batcher, ["same text"], scope=scope, options=options)[0]
        for scope, options in variants
    ]
    await asyncio.sleep(0)
    assert cache.in_flight == len(variants)
    assert upstream.gate is not None
    upstream.gate.set()
    await asyncio.gather(*futures)
    assert upstream.sent == {"same text": len(variants)}
    assert cache.lru.entries == len(variants)
    await batcher.aclose()


async def test_a_later_waiter_keeps_an_item_whose_first_waiters_deadline_passed() -> None:
    cache = EmbeddingCache(1 << 20)
    upstream = FakeUpstream(gate=asyncio.Event())
    batcher: Batcher[Job, Vector] = Batcher(
        upstream.process, BatcherConfig(max_batch_size=1, max_concurrent_batches=1)
    )
    blocker = submit(cache, batcher, ["blocker"])[0]
    now = time.monotonic()
    early = cache.submit(
        SCOPE,
        EmbedOptions(),
        True,
        ["shared"],
        deadline=now + 0.05,
        use=CacheUse(),
        upstream=submitter(batcher),
        reserve=lambda n: None,
    )[0]
    late = submit(cache, batcher, ["shared"])[0]
    await asyncio.sleep(0.1)  # the early waiter's deadline passes while the item is queued
    early.cancel()
    assert upstream.gate is not None
    upstream.gate.set()
    await blocker
    assert np.array_equal(await late, f32("shared"))
    await batcher.aclose()


async def test_a_refused_submission_fails_only_that_flight() -> None:
    cache = EmbeddingCache(1 << 20)

    def refuse(item: object, deadline: float, future: object) -> asyncio.Future[Vector]:
        raise RuntimeError("queue full")

    futures = cache.submit(
        SCOPE,
        EmbedOptions(),
        True,
        ["a", "a", "b"],
        deadline=time.monotonic() + 5,
        use=CacheUse(),
        upstream=refuse,
        reserve=lambda n: None,
    )
    for fut in futures:
        with pytest.raises(RuntimeError, match="queue full"):
            await fut
    assert cache.in_flight == 0


async def test_reserve_refuses_the_whole_request_before_anything_is_queued() -> None:
    cache = EmbeddingCache(1 << 20)
    upstream = FakeUpstream()
    batcher = batcher_for(upstream)
    preload(cache, ["hit"])
    asked: list[int] = []

    def reserve(n: int) -> None:
        asked.append(n)
        raise OverflowError("full")

    with pytest.raises(OverflowError):
        cache.submit(
            SCOPE,
            EmbedOptions(),
            True,
            ["hit", "x", "x", "y"],
            deadline=time.monotonic() + 5,
            use=CacheUse(),
            upstream=submitter(batcher),
            reserve=reserve,
        )
    assert asked == [2]  # only new items count: not the hit, not the repeat
    assert cache.in_flight == 0 and batcher.queue_depth == 0
    await batcher.aclose()


def test_vectors_are_float32_of_the_upstreams_values() -> None:
    stored = f32("t")
    assert stored.dtype == np.float32
    assert np.allclose(stored, vector_of("t"), rtol=1e-7)


async def test_a_finished_flight_is_freed_at_once_not_left_to_the_garbage_collector() -> None:
    """A flight and its futures point at each other; once it ended they must not stay a
    cycle, or every miss's vector (as the upstream sent it: a list of floats) would wait
    for the garbage collector, and memory would grow far past the cache's bound."""
    cache = EmbeddingCache(1 << 20)
    upstream = FakeUpstream()
    batcher = batcher_for(upstream)
    gc.disable()
    try:
        futures = submit(cache, batcher, ["freed"])
        waiter = weakref.ref(futures[0])
        computed = weakref.ref(futures[0]._flight.upstream)  # type: ignore[attr-defined]
        await futures[0]
        del futures
        for _ in range(3):
            await asyncio.sleep(0)
        assert waiter() is None and computed() is None
    finally:
        gc.enable()
        await batcher.aclose()


async def test_json_rows_from_an_http_upstream_are_stored_and_answered_as_sent() -> None:
    """A TEI row (:class:`RawVector`) is kept as the upstream's own JSON and a hit answers
    those very bytes: no float32 round trip on a miss or on a hit."""
    row = b"[0.012345679,-0.5,3.0e-8,1.0]"

    async def process(jobs: list[Job]) -> list[Vector | BaseException]:
        return [RawVector(row, 4) for _ in jobs]

    batcher: Batcher[Job, Vector] = Batcher(process, BatcherConfig(max_batch_size=4))
    cache = EmbeddingCache(1 << 20)
    (miss,) = submit(cache, batcher, ["json"])
    answered = await miss
    stored = cache.lru.get(memory_key(cache, "json"))
    assert type(stored) is JsonRow and stored == row
    (hit,) = submit(cache, batcher, ["json"])
    assert hit.done()
    again = hit.result()
    assert isinstance(again, RawVector) and again.json == row == cast(RawVector, answered).json
    assert list(again) == [0.012345679, -0.5, 3.0e-8, 1.0] and len(again) == 4
    await batcher.aclose()
