"""Deadlines, disconnects, backpressure, upstream faults, the breaker and bad-item isolation.

Every test runs the real proxy app and the TEI double as real servers on loopback.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from proxy.http.keys import REGISTRY
from tests.conftest import ProxyFactory
from tests.tei_double import Fault, TeiDouble, TeiDoubleConfig, expected_vector


@pytest.fixture
def tei_config() -> TeiDoubleConfig:
    return TeiDoubleConfig(max_client_batch_size=64, delay_base_s=0.05)


def texts_sent(double: TeiDouble) -> set[str]:
    return {t for call in double.calls for t in call.inputs if isinstance(t, str)}


async def post_embed(client: Any, text: str, **options: Any) -> tuple[int, Any, float]:
    started = time.monotonic()
    resp = await client.post("/embed", json={"inputs": text, **options})
    return resp.status, await resp.json(), time.monotonic() - started


# -- deadlines, disconnects, backpressure ---------------------------------------------------


async def test_request_timeout_answers_504(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(request_timeout=0.3)
    tei_double.config.delay_base_s = 2.0
    status, body, elapsed = await post_embed(client, "slow")
    assert status == 504
    assert body["error_type"] == "Timeout"
    assert 0.25 <= elapsed < 1.5


async def test_expired_requests_are_never_sent_upstream(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(request_timeout=0.3, max_concurrent_batches=1, max_batch_size=1)
    tei_double.config.delay_base_s = 0.6
    # Holds the only slot until its own deadline cuts it at 0.3 s.
    first = asyncio.ensure_future(post_embed(client, "occupies the only slot"))
    await asyncio.sleep(0.1)
    # Ten items sharing one deadline (0.4 s): the first goes at 0.3 s and is cut at 0.4 s;
    # by then the other nine have expired in the queue and must never be sent.
    queued = [f"queued item {i}" for i in range(10)]
    resp = await client.post("/embed", json={"inputs": queued})
    assert resp.status == 504
    assert (await first)[0] == 504
    await asyncio.sleep(0.1)
    sent = texts_sent(tei_double) & set(queued)
    assert sent == {"queued item 0"}


async def test_disconnected_caller_is_dropped_before_dispatch(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(max_concurrent_batches=1)
    tei_double.config.delay_base_s = 0.5
    first = asyncio.ensure_future(post_embed(client, "occupies the only slot"))
    await asyncio.sleep(0.1)
    url = str(client.make_url("/embed"))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TimeoutError):
            async with session.post(
                url, json={"inputs": "caller who leaves"}, timeout=aiohttp.ClientTimeout(0.1)
            ) as resp:
                await resp.read()
    await first
    await asyncio.sleep(0.2)
    assert "caller who leaves" not in texts_sent(tei_double)
    metrics = await (await client.get("/metrics")).text()
    assert (
        'proxy_dropped_items_total{model="test-double/tei",reason="cancelled",version="1"} 1.0'
    ) in metrics


async def test_full_queue_answers_429_at_once(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(max_queue_size=5, max_concurrent_batches=1)
    tei_double.config.delay_base_s = 0.5
    first = asyncio.ensure_future(post_embed(client, "in flight"))
    await asyncio.sleep(0.1)
    queued = [asyncio.ensure_future(post_embed(client, f"queued {i}")) for i in range(5)]
    await asyncio.sleep(0.05)
    started = time.monotonic()
    resp = await client.post("/embed", json={"inputs": "one too many"})
    assert time.monotonic() - started < 0.3  # rejected, not blocked
    assert resp.status == 429
    assert await resp.json() == {"error": "Model is overloaded", "error_type": "Overloaded"}
    assert int(resp.headers["Retry-After"]) >= 1
    results = await asyncio.gather(first, *queued)
    assert all(status == 200 for status, _, _ in results)


async def test_list_that_does_not_fit_now_is_refused_whole(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    # A list that could fit an empty queue but not what is free now: 429, and none of its
    # items is queued. (A list longer than the whole queue is a 422: tests/test_faults_batch.)
    client = await start_proxy(max_queue_size=10, max_concurrent_batches=1)
    tei_double.config.delay_base_s = 0.5
    first = asyncio.ensure_future(post_embed(client, "in flight"))
    await asyncio.sleep(0.1)
    queued = [asyncio.ensure_future(post_embed(client, f"queued {i}")) for i in range(5)]
    await asyncio.sleep(0.05)
    listed = [f"listed {i}" for i in range(6)]
    resp = await client.post("/embed", json={"inputs": listed})
    assert resp.status == 429
    results = await asyncio.gather(first, *queued)
    assert all(status == 200 for status, _, _ in results)
    assert not texts_sent(tei_double) & set(listed)


# -- upstream faults -------------------------------------------------------------------------


async def test_hanging_upstream_answers_504_and_recovers(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(upstream_timeout=0.3)
    tei_double.set_fault(Fault.HANG)
    status, body, elapsed = await post_embed(client, "x")
    assert status == 504 and body["error_type"] == "Timeout"
    assert elapsed < 1.5
    tei_double.set_fault(Fault.NONE)
    status, body, _ = await post_embed(client, "x")
    assert status == 200 and body == [pytest.approx(expected_vector("x"), rel=1e-6)]


async def test_refused_connection_answers_503_fast_and_recovers(
    start_proxy: ProxyFactory, unused_tcp_port: int
) -> None:
    client = await start_proxy()
    replica = client.app[REGISTRY].service().upstream._replicas[0]  # type: ignore[attr-defined]
    real_url = replica.base_url
    replica.base_url = f"http://127.0.0.1:{unused_tcp_port}"
    status, body, elapsed = await post_embed(client, "x")
    assert status == 503 and "unreachable" in body["error"]
    assert elapsed < 2.0
    replica.base_url = real_url
    status, _, _ = await post_embed(client, "x")
    assert status == 200


async def test_transient_500_is_retried(start_proxy: ProxyFactory, tei_double: TeiDouble) -> None:
    client = await start_proxy()
    tei_double.set_fault(Fault.ERROR_500, times=2)
    status, body, _ = await post_embed(client, "x")
    assert status == 200 and body == [pytest.approx(expected_vector("x"), rel=1e-6)]
    assert len(tei_double.calls) == 3


async def test_upstream_429_is_retried_with_backoff(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    tei_double.set_fault(Fault.OVERLOADED_429, times=4)  # more than the 5xx retry budget
    status, _, _ = await post_embed(client, "x")
    assert status == 200
    assert len(tei_double.calls) == 5


async def test_upstream_429_past_the_deadline_is_429(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(request_timeout=0.5)
    tei_double.set_fault(Fault.OVERLOADED_429)
    status, body, elapsed = await post_embed(client, "x")
    assert status == 429 and body["error_type"] == "Overloaded"
    assert elapsed < 1.5


async def test_connection_dropped_mid_response(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    tei_double.set_fault(Fault.DROP, times=1)
    status, _, _ = await post_embed(client, "retried after a drop")
    assert status == 200
    tei_double.set_fault(Fault.DROP)
    status, body, _ = await post_embed(client, "dropped every time")
    assert status == 503 and body["error_type"] == "Unhealthy"
    tei_double.set_fault(Fault.NONE)
    assert (await post_embed(client, "well again"))[0] == 200


@pytest.mark.parametrize(
    ("fault", "fragment"),
    [
        (Fault.GARBAGE, "malformed JSON"),
        (Fault.WRONG_COUNT, "embeddings for"),
        (Fault.WRONG_DIMS, "dimensions"),
    ],
)
async def test_malformed_answers_fail_the_batch_with_502(
    start_proxy: ProxyFactory, tei_double: TeiDouble, fault: Fault, fragment: str
) -> None:
    client = await start_proxy()
    assert (await post_embed(client, "learn the dimension"))[0] == 200
    tei_double.set_fault(fault, times=1)
    results = await asyncio.gather(*(post_embed(client, f"t{i}") for i in range(8)))
    failed = [body for status, body, _ in results if status != 200]
    assert failed, "the faulty call must fail its callers"
    for status, body, _ in results:
        if status == 200:
            continue  # callers in a later, healthy call
        assert status == 502
        assert body["error_type"] == "Upstream" and fragment in body["error"]
    assert (await post_embed(client, "well again"))[0] == 200


async def test_breaker_opens_fails_fast_and_closes_by_itself(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(breaker_threshold=3, breaker_cooldown=0.2, upstream_retries=0)
    tei_double.config.delay_base_s = 0.0
    tei_double.set_fault(Fault.ERROR_500)
    for _ in range(3):
        assert (await post_embed(client, "x"))[0] == 500
    calls = len(tei_double.calls)
    status, body, elapsed = await post_embed(client, "x")
    assert status == 503 and "circuit breaker" in body["error"]
    assert elapsed < 0.5  # failing fast
    assert len(tei_double.calls) == calls  # not sent: the breaker answered
    health = await client.get("/health")
    assert health.status == 503
    assert "breaker" in (await health.json())["error"]
    tei_double.set_fault(Fault.NONE)
    deadline = time.monotonic() + 5
    while (await client.get("/health")).status != 200:
        assert time.monotonic() < deadline, "breaker never closed"
        await asyncio.sleep(0.05)
    assert (await post_embed(client, "x"))[0] == 200


# -- isolation of bad items ------------------------------------------------------------------


async def test_one_poisoned_request_among_63_good_ones_fails_alone(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(max_batch_size=64, max_concurrent_batches=1)
    tei_double.config.delay_base_s = 0.02
    blocker = asyncio.ensure_future(post_embed(client, "first", truncate=False))
    await asyncio.sleep(0.005)
    poison = " ".join(["word"] * 600)  # over the double's 512 tokens; truncation off
    texts = [f"good text {i}" for i in range(63)]
    texts.insert(17, poison)
    results = await asyncio.gather(*(post_embed(client, t, truncate=False) for t in texts))
    await blocker
    # The 64 requests went upstream together, were refused as a whole, and were split.
    assert 64 in tei_double.batch_sizes
    for text, (status, body, _) in zip(texts, results, strict=True):
        if text is poison:
            assert status == 422
            assert body == {
                "error": "Input validation error: `inputs` must have less than 512 tokens. "
                "Given: 602",
                "error_type": "Validation",
            }
        else:
            assert status == 200, body
            assert body == [pytest.approx(expected_vector(text), rel=1e-6)]
    metrics = await (await client.get("/metrics")).text()
    # The sample exists from start-up at 0: only its value says a split happened.
    prefix = 'proxy_batch_splits_total{model="test-double/tei",version="1"} '
    samples = [
        float(line[len(prefix) :]) for line in metrics.splitlines() if line.startswith(prefix)
    ]
    assert len(samples) == 1 and samples[0] > 0, samples


async def test_failed_item_in_a_list_fails_its_request_like_tei(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy()
    resp = await client.post(
        "/embed", json={"inputs": ["fine", " ".join(["w"] * 600)], "truncate": False}
    )
    assert resp.status == 422
    assert "must have less than 512 tokens" in (await resp.json())["error"]
