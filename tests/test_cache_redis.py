"""The shared Redis level of the cache (proxy/cache/l2.py), against a real redis-server:
round trips, coalesced reads, TTL and prefix, values that are not vectors, the timeout and
the breaker with a stopped and a killed Redis, and proxy replicas sharing it."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from proxy.cache.identity import KeyMaker
from proxy.cache.l2 import Breaker, RedisL2, redact
from proxy.http.keys import CACHE, REGISTRY
from proxy.upstream.base import EmbedOptions
from tests.conftest import ProxyFactory
from tests.models import metric
from tests.redis_server import RedisServer
from tests.tei_double import TeiDouble, TeiDoubleConfig, expected_vector

# Generous on a shared machine, where a loopback round trip can take a few ms; the
# default (20 ms) is what production uses.
TIMEOUT_MS = 200
# What "bounded" means while Redis is gone: far below REQUEST_TIMEOUT (60 s) and below
# what a hung Redis call would cost, yet far above TIMEOUT_MS plus the TEI double's work.
BOUND_S = 2.0


def pause(server: RedisServer) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)


def resume(server: RedisServer) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGCONT)


def kill(server: RedisServer) -> None:
    assert server.process is not None
    server.process.kill()
    server.process.wait(5)
    server.process = None


class Calls:
    """An L2Observer that keeps what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, str]] = []
        self.breaker: list[bool] = []
        self.dropped = 0

    def redis_call(self, op: str, seconds: float, ok: bool, reason: str) -> None:
        self.calls.append((op, ok, reason))

    def redis_breaker(self, is_open: bool) -> None:
        self.breaker.append(is_open)

    def redis_dropped_writes(self, n: int) -> None:
        self.dropped += n


async def wait_writes(l2: RedisL2) -> None:
    for _ in range(200):
        if not l2.describe()["pending_writes"] and l2._writing is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("writes never finished")


# -- the level on its own ---------------------------------------------------------------------


async def test_values_round_trip_with_prefix_and_ttl(redis_url: str) -> None:
    l2 = RedisL2(redis_url, prefix="pfx", ttl_s=3600, timeout_s=TIMEOUT_MS / 1000)
    digest = bytes(range(32))
    l2.put(digest, b"\x00\x00\x80\x3f" * 3)
    await wait_writes(l2)
    assert await l2.get_many([digest, bytes(32)]) == [b"\x00\x00\x80\x3f" * 3, None]
    raw = aioredis.Redis.from_url(redis_url)
    key = b"pfx:" + digest.hex().encode()
    assert await raw.get(key) == b"\x00\x00\x80\x3f" * 3
    assert 3_500_000 < await raw.pttl(key) <= 3_600_000
    await raw.aclose()
    await l2.aclose()


async def test_lookups_of_one_turn_go_as_one_call(redis_url: str) -> None:
    calls = Calls()
    l2 = RedisL2(redis_url, prefix="p", ttl_s=60, timeout_s=TIMEOUT_MS / 1000, observer=calls)
    lookups = [l2.get_many([bytes([i]) * 32, bytes([i + 1]) * 32]) for i in range(20)]
    assert all(r == [None, None] for r in await asyncio.gather(*lookups))
    assert calls.calls == [("get", True, "")]
    await l2.aclose()


async def test_a_stopped_redis_costs_a_lookup_at_most_the_timeout_then_the_breaker_skips_it(
    redis_server: RedisServer,
) -> None:
    calls = Calls()
    l2 = RedisL2(
        redis_server.url,
        prefix="p",
        ttl_s=60,
        timeout_s=0.05,
        breaker_threshold=3,
        breaker_cooldown_s=0.5,
        observer=calls,
    )
    digest = bytes(32)
    l2.put(digest, b"\x00" * 16)
    await wait_writes(l2)
    assert await l2.get_many([digest]) == [b"\x00" * 16]
    pause(redis_server)
    try:
        for _ in range(3):
            started = time.monotonic()
            assert await l2.get_many([digest]) == [None]  # a miss, never an error
            assert time.monotonic() - started < BOUND_S
        assert calls.calls[-3:] == [("get", False, "timeout")] * 3
        assert calls.breaker == [True] and l2.breaker.state == "open"
        # Open: Redis is not asked at all; the answer is ready at once.
        skipped = l2.get_many([digest])
        assert skipped.done() and skipped.result() == [None]
        l2.put(bytes([1]) * 32, b"\x00" * 16)  # not even queued
        assert l2.describe()["pending_writes"] == 0
    finally:
        resume(redis_server)
    await asyncio.sleep(0.6)  # the cooldown passes: the next call tries again
    assert l2.breaker.state == "half-open"
    assert await l2.get_many([digest]) == [b"\x00" * 16]
    assert l2.breaker.state == "closed" and calls.breaker == [True, False]
    await l2.aclose()


async def test_a_killed_redis_fails_fast_and_a_restarted_one_is_used_again(
    redis_server: RedisServer,
) -> None:
    l2 = RedisL2(
        redis_server.url, prefix="p", ttl_s=60, timeout_s=TIMEOUT_MS / 1000, breaker_cooldown_s=0.3
    )
    kill(redis_server)
    for _ in range(3):
        assert await l2.get_many([bytes(32)]) == [None]
    assert l2.breaker.state == "open"
    redis_server.start()
    await asyncio.sleep(0.35)
    l2.put(bytes(32), b"\x01" * 8)
    await wait_writes(l2)
    assert await l2.get_many([bytes(32)]) == [b"\x01" * 8]
    assert l2.breaker.state == "closed"
    await l2.aclose()


def test_breaker_opens_after_threshold_and_half_opens_after_cooldown() -> None:
    now = [0.0]
    breaker = Breaker(3, 5.0, clock=lambda: now[0])
    assert not breaker.failure() and not breaker.failure()
    assert breaker.state == "closed"
    assert breaker.failure() and breaker.is_open
    assert not breaker.try_call()
    now[0] = 5.0
    assert breaker.state == "half-open" and not breaker.is_open
    assert breaker.try_call()  # one call goes...
    assert not breaker.try_call()  # ...and only one, until its outcome is known
    assert breaker.failure()  # a failure in half-open reopens at once
    assert breaker.is_open and not breaker.try_call()
    now[0] = 10.0
    assert breaker.try_call()
    assert breaker.success() and breaker.state == "closed"
    assert breaker.try_call() and breaker.try_call()


def test_the_url_is_shown_without_its_password() -> None:
    assert redact("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("rediss://user:s3cret@host/1") == "rediss://user:***@host/1"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


# -- proxy replicas sharing it ----------------------------------------------------------------


def cache_settings(redis_url: str, **more: Any) -> dict[str, Any]:
    return {
        "cache_url": redis_url,
        "cache_timeout_ms": TIMEOUT_MS,
        "cache_breaker_cooldown": 0.3,
        **more,
    }


async def embed(client: Any, texts: list[str]) -> tuple[int, int, int, float]:
    """(status, hits, misses, seconds), checking every vector."""
    started = time.monotonic()
    resp = await client.post("/embed", json={"inputs": texts})
    elapsed = time.monotonic() - started
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body == [pytest.approx(expected_vector(t), rel=1e-6, abs=1e-7) for t in texts]
    return (
        resp.status,
        int(resp.headers["X-Cache-Hits"]),
        int(resp.headers["X-Cache-Misses"]),
        elapsed,
    )


async def redis_hits(client: Any) -> float:
    return metric(
        await (await client.get("/metrics")).text(), "proxy_cache_hits_total", level="redis"
    )


async def test_a_second_replica_is_served_from_the_firsts_traffic(
    start_proxy: ProxyFactory, tei_double: TeiDouble, redis_url: str
) -> None:
    first = await start_proxy(**cache_settings(redis_url))
    second = await start_proxy(**cache_settings(redis_url))
    texts = [f"shared text {i}" for i in range(20)]
    assert (await embed(first, texts))[1:3] == (0, 20)
    l2 = first.server.app[CACHE].l2
    assert l2 is not None
    await wait_writes(l2)
    calls = len(tei_double.calls)
    assert (await embed(second, texts))[1:3] == (20, 0)
    assert len(tei_double.calls) == calls  # nothing recomputed
    assert await redis_hits(second) == 20
    # Now in the second's memory too: no Redis lookup the next time.
    assert (await embed(second, texts))[1:3] == (20, 0)
    assert await redis_hits(second) == 20
    info = (await (await second.get("/info")).json())["proxy"]["cache"]["redis"]
    assert info["breaker"] == "closed" and info["key_prefix"] == "ebp:cache"


async def test_replicas_of_different_model_versions_never_share_through_redis(
    start_proxy: ProxyFactory, redis_url: str, aiohttp_server: Any
) -> None:
    other = TeiDouble(TeiDoubleConfig())
    real_info = other.info_body
    other.info_body = lambda: {**real_info(), "model_sha": "another-revision"}  # type: ignore[method-assign]
    server: TestServer = await aiohttp_server(other.make_app())
    first = await start_proxy(**cache_settings(redis_url))
    second = await start_proxy(
        upstream_url=str(server.make_url("")).rstrip("/"), **cache_settings(redis_url)
    )
    await embed(first, ["versioned"])
    l2 = first.server.app[CACHE].l2
    assert l2 is not None
    await wait_writes(l2)
    assert (await embed(second, ["versioned"]))[1:3] == (0, 1)
    assert [c.inputs for c in other.calls] == [["versioned"]]


async def test_a_value_that_is_not_a_vector_of_this_model_is_a_miss(
    start_proxy: ProxyFactory, tei_double: TeiDouble, redis_url: str
) -> None:
    client = await start_proxy(**cache_settings(redis_url))
    await embed(client, ["probe"])  # learns the dimension (16)
    l2 = client.server.app[CACHE].l2
    assert l2 is not None
    scope = client.server.app[REGISTRY].service().cache_scope
    assert scope is not None
    digest = KeyMaker(scope, EmbedOptions(), True).key("poisoned")
    raw = aioredis.Redis.from_url(redis_url)
    await raw.set(l2.redis_key(digest), b"\x00" * 12)  # 3 floats, not 16
    await raw.aclose()
    assert (await embed(client, ["poisoned"]))[1:3] == (0, 1)
    assert items(tei_double).count("poisoned") == 1
    text = await (await client.get("/metrics")).text()
    assert 'proxy_cache_redis_errors_total{op="get",reason="bad_value"} 1.0' in text


def items(double: TeiDouble) -> list[Any]:
    return [item for call in double.calls for item in call.inputs]


async def test_redis_killed_and_restarted_mid_run_no_client_error_and_hits_resume(
    start_proxy: ProxyFactory, tei_double: TeiDouble, redis_server: RedisServer
) -> None:
    first = await start_proxy(**cache_settings(redis_server.url))
    second = await start_proxy(**cache_settings(redis_server.url))
    round_no = 0

    async def round_trip() -> tuple[int, list[float]]:
        """New texts through the first replica, then the same through the second: how many
        the second found in Redis, and both requests' latencies. Every answer is checked."""
        nonlocal round_no
        round_no += 1
        texts = [f"round {round_no} text {i}" for i in range(8)]
        _, _, _, t1 = await embed(first, texts)
        l2 = first.server.app[CACHE].l2
        assert l2 is not None
        await wait_writes(l2)
        _, hits, _, t2 = await embed(second, texts)
        return hits, [t1, t2]

    assert (await round_trip())[0] == 8
    # Killed: every request still answers 200 with the right vectors, in bounded time.
    kill(redis_server)
    latencies: list[float] = []
    for _ in range(4):
        latencies += (await round_trip())[1]
    # Stopped (a Redis that accepts connections and never answers: the timeout's case).
    redis_server.start()
    pause(redis_server)
    try:
        for _ in range(3):
            latencies += (await round_trip())[1]
    finally:
        resume(redis_server)
    assert max(latencies) < BOUND_S, latencies
    # Back (empty, as restarted): after the breaker's cooldown, sharing resumes.
    await asyncio.sleep(0.4)
    for _ in range(20):
        if (await round_trip())[0] == 8:
            break
        await asyncio.sleep(0.2)  # the half-open call may still have met the stopped one
    else:
        raise AssertionError("hits never resumed after Redis came back")
    assert (await round_trip())[0] == 8
    text = await (await first.get("/metrics")).text()
    assert 'proxy_cache_redis_errors_total{op="get"' in text
    assert "proxy_cache_redis_breaker_open 0.0" in text
