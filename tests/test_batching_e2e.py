"""Batching through the real proxy app in front of the TEI double, both on loopback."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from proxy.app import create_app
from proxy.http.keys import REGISTRY
from tests.conftest import ProxyFactory, make_settings
from tests.tei_double import Fault, TeiDouble, TeiDoubleConfig, expected_vector


@pytest.fixture
def tei_config() -> TeiDoubleConfig:
    # A per-call cost, so concurrent requests pile up while a call runs.
    return TeiDoubleConfig(max_client_batch_size=32, delay_base_s=0.02)


async def test_256_concurrent_requests_become_few_calls_within_limits(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(max_batch_size=64)  # capped to the upstream's 32
    texts = [f"sentence number {i}" for i in range(256)]
    responses = await asyncio.gather(*(client.post("/embed", json={"inputs": t}) for t in texts))
    bodies = [await r.json() for r in responses]
    assert all(r.status == 200 for r in responses)
    for text, body in zip(texts, bodies, strict=True):
        assert body == [pytest.approx(expected_vector(text), rel=1e-6)]
    sizes = tei_double.batch_sizes
    assert sum(sizes) == 256
    assert max(sizes) <= 32
    assert len(sizes) <= 24, sizes  # 256 / 32 = 8 full calls, plus a few partial ones
    info = await (await client.get("/info")).json()
    assert tei_double.max_in_flight_calls <= info["proxy"]["concurrency"]["ceiling"] == 16


async def test_options_are_never_mixed_in_one_call(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    variants = [
        {},
        {"normalize": False},
        {"dimensions": 8},
        {"truncate": False},
        {"truncation_direction": "Left"},
    ]
    jobs = []
    for i in range(100):
        opts = variants[i % len(variants)]
        jobs.append((i, opts, client.post("/embed", json={"inputs": f"t{i}", **opts})))
    responses = await asyncio.gather(*(job[2] for job in jobs))
    for (i, opts, _), resp in zip(jobs, responses, strict=True):
        assert resp.status == 200
        expect = expected_vector(
            f"t{i}", normalize=opts.get("normalize", True), dimensions=opts.get("dimensions")
        )
        assert await resp.json() == [pytest.approx(expect, rel=1e-6)]
    for call in tei_double.calls:
        # Every call carries exactly one variant's options for all its inputs.
        indices = {int(str(t)[1:]) % len(variants) for t in call.inputs}
        assert len(indices) == 1, call


async def test_timer_lone_request_waits_at_most_max_wait(start_proxy: ProxyFactory) -> None:
    client = await start_proxy(dispatch="timer", max_wait_time=300)
    await client.post("/embed", json={"inputs": "warm up the connection"})
    started = time.monotonic()
    resp = await client.post("/embed", json={"inputs": "alone"})
    elapsed = time.monotonic() - started
    assert resp.status == 200
    # 300 ms of timer + 20 ms of upstream; generous slack above, none below.
    assert 0.3 <= elapsed < 1.5, elapsed


async def test_adaptive_lone_request_is_sent_at_once(start_proxy: ProxyFactory) -> None:
    client = await start_proxy(dispatch="adaptive", max_wait_time=5000)
    await client.post("/embed", json={"inputs": "warm up the connection"})
    started = time.monotonic()
    resp = await client.post("/embed", json={"inputs": "alone"})
    elapsed = time.monotonic() - started
    assert resp.status == 200
    assert elapsed < 1.0, elapsed  # far below the 5 s timer


async def test_long_list_is_split_and_put_back_in_order(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    texts = [f"item {i}" for i in range(200)]  # TEI itself would refuse more than 32
    resp = await client.post("/embed", json={"inputs": texts})
    assert resp.status == 200
    body = await resp.json()
    assert body == [pytest.approx(expected_vector(t), rel=1e-6) for t in texts]
    assert max(tei_double.batch_sizes) <= 32
    assert sum(tei_double.batch_sizes) == 200


async def test_batches_respect_the_character_budget(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(max_batch_chars=1000)
    texts = [("x" * 95) + f"{i:05d}" for i in range(50)]  # 100 characters each
    resp = await client.post("/embed", json={"inputs": texts})
    assert resp.status == 200
    for call in tei_double.calls:
        assert sum(len(t) for t in call.inputs) <= 1000


async def test_upstream_errors_come_back_in_tei_shape(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    tei_double.set_fault(Fault.ERROR_500, times=3)  # the first try and both retries
    resp = await client.post("/embed", json={"inputs": "x"})
    assert resp.status == 500
    assert await resp.json() == {"error": "injected failure", "error_type": "Backend"}


async def test_unreachable_upstream_is_503(start_proxy: ProxyFactory, unused_tcp_port: int) -> None:
    client = await start_proxy()
    # Point the running service at a port nobody listens on.
    upstream = client.app[REGISTRY].service().upstream
    upstream._replicas[0].base_url = f"http://127.0.0.1:{unused_tcp_port}"  # type: ignore[attr-defined]
    resp = await client.post("/embed", json={"inputs": "x"})
    assert resp.status == 503
    body = await resp.json()
    assert body["error_type"] == "Unhealthy"
    assert "unreachable" in body["error"]
    assert (await client.get("/health")).status == 503


async def test_concurrency_never_exceeds_what_the_upstream_admits(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    tei_double.config.max_concurrent_requests = 64  # two calls of 32 items
    client = await start_proxy(max_concurrent_batches=8)
    info = await (await client.get("/info")).json()
    assert info["proxy"]["max_concurrent_batches"] == 8
    assert info["proxy"]["effective_concurrent_batches"] == 2
    texts = [f"t{i}" for i in range(300)]
    responses = await asyncio.gather(*(client.post("/embed", json={"inputs": t}) for t in texts))
    assert all(r.status == 200 for r in responses)
    assert tei_double.max_in_flight_calls <= 2


async def test_start_up_waits_for_tei_to_bind(
    aiohttp_client: Any, aiohttp_server: Any, unused_tcp_port: int
) -> None:
    # TEI binds its port only once its model is loaded: the proxy must wait, not fail.
    settings = make_settings(upstream_url=f"http://127.0.0.1:{unused_tcp_port}")
    starting = asyncio.ensure_future(aiohttp_client(create_app(settings)))
    await asyncio.sleep(0.6)
    assert not starting.done()
    double = TeiDouble(TeiDoubleConfig())
    await aiohttp_server(double.make_app(), port=unused_tcp_port)
    client = await asyncio.wait_for(starting, 10)
    resp = await client.post("/embed", json={"inputs": "late upstream"})
    assert resp.status == 200
