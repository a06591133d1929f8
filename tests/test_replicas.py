"""Several upstream replicas: a dead or failing one is ejected, probed, and brought back.

Every replica here is a real server on loopback (the TEI double) or a closed port on
127.0.0.1; counts come from the doubles and from the proxy's /metrics.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import ProxyFactory
from tests.tei_double import Fault, TeiDouble, TeiDoubleConfig, expected_vector
from tests.test_faults_upstream_errors import metric


@pytest.fixture
def tei_config() -> TeiDoubleConfig:
    return TeiDoubleConfig(delay_base_s=0.002)


def closed_port() -> str:
    """The URL of a port on 127.0.0.1 that nobody listens on: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def second_double(aiohttp_server: Any) -> tuple[TeiDouble, str]:
    double = TeiDouble(TeiDoubleConfig(delay_base_s=0.002))
    server: TestServer = await aiohttp_server(double.make_app())
    return double, str(server.make_url("")).rstrip("/")


async def upstream_attempts(client: Any) -> float:
    return metric(await (await client.get("/metrics")).text(), "proxy_upstream_calls_total")


async def run_load(
    client: Any, seconds: float, on_mark: Any, *, mark_at: float = 1.0, callers: int = 6
) -> list[tuple[int, Any, str]]:
    """``callers`` clients post one text after another for ``seconds`` (at most 1000 each);
    ``on_mark`` runs once, ``mark_at`` seconds in."""
    started = time.monotonic()
    results: list[tuple[int, Any, str]] = []

    async def caller(n: int) -> None:
        for i in range(1000):
            if time.monotonic() - started >= seconds:
                return
            text = f"caller {n} text {i}"
            resp = await client.post("/embed", json={"inputs": text})
            results.append((resp.status, await resp.json(), text))

    async def marker() -> None:
        await asyncio.sleep(mark_at)
        await on_mark()

    await asyncio.gather(marker(), *(caller(n) for n in range(callers)))
    return results


def assert_all_served(results: list[tuple[int, Any, str]]) -> None:
    assert results
    for status, body, text in results:
        assert status == 200, body
        assert body == [pytest.approx(expected_vector(text), rel=1e-6)]


async def test_dead_replica_gets_almost_no_traffic(
    start_proxy: ProxyFactory, tei_url: str, tei_double: TeiDouble
) -> None:
    client = await start_proxy(upstream_url=f"{tei_url},{closed_port()}")
    marks: dict[str, float] = {}

    async def mark() -> None:
        marks["attempts"] = await upstream_attempts(client)
        marks["live"] = len(tei_double.calls)

    results = await run_load(client, 2.0, mark)
    assert_all_served(results)  # calls that hit the dead replica were retried on the live one
    attempts = await upstream_attempts(client) - marks["attempts"]
    live = len(tei_double.calls) - marks["live"]
    assert attempts > 0
    assert live / attempts >= 0.95, f"{attempts - live} of {attempts} calls went to the dead one"


async def test_failing_replica_is_ejected_and_returns_when_healthy(
    start_proxy: ProxyFactory, tei_url: str, tei_double: TeiDouble, aiohttp_server: Any
) -> None:
    bad, bad_url = await second_double(aiohttp_server)
    client = await start_proxy(upstream_url=f"{bad_url},{tei_url}", replica_probe_interval=0.1)
    bad.set_fault(Fault.ERROR_500)
    bad.healthy = False
    marks: dict[str, int] = {}

    async def mark() -> None:
        marks["bad"] = len(bad.calls)
        marks["good"] = len(tei_double.calls)

    results = await run_load(client, 2.0, mark)
    assert_all_served(results)
    to_bad = len(bad.calls) - marks["bad"]
    to_good = len(tei_double.calls) - marks["good"]
    assert to_good / (to_bad + to_good) >= 0.95
    # Healthy again: the probe brings it back and it serves calls.
    bad.set_fault(Fault.NONE)
    bad.healthy = True
    served_before = len(bad.calls)
    deadline = time.monotonic() + 5
    rounds = 0
    while len(bad.calls) == served_before:
        assert time.monotonic() < deadline, "the recovered replica never got traffic again"
        rounds += 1  # new texts each round: a repeat would be answered from the cache
        texts = [f"after recovery {rounds}.{i}" for i in range(4)]
        responses = await asyncio.gather(
            *(client.post("/embed", json={"inputs": t}) for t in texts)
        )
        assert all(r.status == 200 for r in responses)
        await asyncio.sleep(0.05)


async def test_call_failing_on_one_replica_is_retried_on_another(
    start_proxy: ProxyFactory, tei_url: str, tei_double: TeiDouble, aiohttp_server: Any
) -> None:
    bad, bad_url = await second_double(aiohttp_server)
    # One retry only: it must go to the replica that did not just fail, even when that one
    # is busy with another call and the failing one, failing fast, has nothing in flight.
    client = await start_proxy(
        upstream_url=f"{bad_url},{tei_url}", upstream_retries=1, max_batch_size=10
    )
    tei_double.config.delay_base_s = 0.1
    bad.set_fault(Fault.ERROR_500)
    texts = [f"text {i}" for i in range(40)]
    for batch in (texts[:20], texts[20:]):
        responses = await asyncio.gather(
            *(client.post("/embed", json={"inputs": t}) for t in batch)
        )
        for text, resp in zip(batch, responses, strict=True):
            assert resp.status == 200
            assert await resp.json() == [pytest.approx(expected_vector(text), rel=1e-6)]


async def test_start_up_reads_info_from_a_live_replica_when_the_first_is_dead(
    start_proxy: ProxyFactory, tei_url: str
) -> None:
    client = await asyncio.wait_for(start_proxy(upstream_url=f"{closed_port()},{tei_url}"), 5)
    info = await (await client.get("/info")).json()
    assert info["model_id"] == "test-double/tei"
    resp = await client.post("/embed", json={"inputs": "served"})
    assert resp.status == 200
    assert await resp.json() == [pytest.approx(expected_vector("served"), rel=1e-6)]


async def test_lone_dead_replica_is_still_tried_and_recovers(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    # Ejecting the only replica must not leave the proxy with nowhere to send calls.
    client = await start_proxy(replica_eject_after=1, upstream_retries=0, breaker_threshold=100)
    tei_double.set_fault(Fault.ERROR_500)
    for _ in range(3):
        assert (await client.post("/embed", json={"inputs": "x"})).status == 500
    tei_double.set_fault(Fault.NONE)
    assert (await client.post("/embed", json={"inputs": "x"})).status == 200
