"""UPSTREAM_KIND=openai: the proxy batches for an OpenAI-compatible /v1/embeddings server.

The upstream here is the TEI double's OpenAI-compatible route, a real HTTP server on loopback.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from proxy.app import create_app
from tests.conftest import ProxyFactory, make_settings
from tests.tei_double import Fault, TeiDouble, TeiDoubleConfig, expected_vector


@pytest.fixture
def tei_config() -> TeiDoubleConfig:
    return TeiDoubleConfig(api_key="upstream-secret", delay_base_s=0.01)


async def start_openai_proxy(start_proxy: ProxyFactory, **overrides: Any) -> Any:
    overrides.setdefault("upstream_api_key", "upstream-secret")
    return await start_proxy(upstream_kind="openai", upstream_model="test-model", **overrides)


async def test_concurrent_requests_are_batched_and_correct(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_openai_proxy(start_proxy)
    probe_calls = len(tei_double.calls)
    texts = [f"openai text {i}" for i in range(64)]
    responses = await asyncio.gather(*(client.post("/embed", json={"inputs": t}) for t in texts))
    for text, resp in zip(texts, responses, strict=True):
        assert resp.status == 200
        assert await resp.json() == [pytest.approx(expected_vector(text), rel=1e-6)]
    calls = tei_double.calls[probe_calls:]
    assert sum(len(c.inputs) for c in calls) == 64
    assert len(calls) < 64
    assert all(c.options.get("model") == "test-model" for c in calls)


async def test_dimensions_are_cut_and_renormalised(start_proxy: ProxyFactory) -> None:
    client = await start_openai_proxy(start_proxy)
    resp = await client.post("/embed", json={"inputs": "abc", "dimensions": 4})
    assert resp.status == 200
    assert await resp.json() == [pytest.approx(expected_vector("abc", dimensions=4), rel=1e-6)]


async def test_options_the_api_lacks_are_refused(start_proxy: ProxyFactory) -> None:
    client = await start_openai_proxy(start_proxy)
    resp = await client.post("/embed", json={"inputs": "abc", "normalize": False})
    assert resp.status == 422
    assert "normalize" in (await resp.json())["error"]


@pytest.mark.parametrize(
    "option",
    [{"normalize": False}, {"prompt_name": "query"}, {"truncation_direction": "Left"}],
)
async def test_options_the_api_lacks_never_open_the_breaker(
    start_proxy: ProxyFactory, tei_double: TeiDouble, option: dict[str, Any]
) -> None:
    # A client's request the upstream kind cannot honour is the client's problem: it must be
    # refused before anything is queued, and never count as an upstream failure.
    client = await start_openai_proxy(start_proxy)
    calls = len(tei_double.calls)
    for i in range(50):
        resp = await client.post("/embed", json={"inputs": f"text {i}", **option})
        assert resp.status == 422, (i, await resp.text())
        body = await resp.json()
        assert body["error_type"] == "Validation"
        assert "not available with an openai upstream" in body["error"]
    assert len(tei_double.calls) == calls  # nothing went upstream
    assert (await client.get("/health")).status == 200
    resp = await client.post("/embed", json={"inputs": "a normal request"})
    assert resp.status == 200
    assert await resp.json() == [pytest.approx(expected_vector("a normal request"), rel=1e-6)]


async def test_upstream_errors_are_mapped(start_proxy: ProxyFactory, tei_double: TeiDouble) -> None:
    client = await start_openai_proxy(start_proxy)
    tei_double.set_fault(Fault.ERROR_500, times=3)  # the first try and both retries
    resp = await client.post("/embed", json={"inputs": "x"})
    assert resp.status == 500
    assert await resp.json() == {"error": "injected failure", "error_type": "Backend"}
    # A 200 whose body is not JSON is the upstream's fault: 502, never a guess.
    tei_double.set_fault(Fault.GARBAGE, times=1)
    resp = await client.post("/embed", json={"inputs": "y"})
    assert resp.status == 502
    assert (await resp.json())["error_type"] == "Upstream"


async def test_wrong_upstream_key_stops_start_up(tei_url: str, aiohttp_client: Any) -> None:
    settings = make_settings(upstream_url=tei_url, upstream_kind="openai", upstream_api_key="wrong")
    app: web.Application = create_app(settings)
    with pytest.raises(RuntimeError, match="refused"):
        await aiohttp_client(app)


async def test_tei_kind_forwards_the_upstream_key(start_proxy: ProxyFactory) -> None:
    client = await start_proxy(upstream_api_key="upstream-secret")
    resp = await client.post("/embed", json={"inputs": "x"})
    assert resp.status == 200


async def test_tei_kind_with_wrong_key_stops_start_up(tei_url: str, aiohttp_client: Any) -> None:
    app = create_app(make_settings(upstream_url=tei_url, upstream_api_key="wrong"))
    with pytest.raises(RuntimeError, match="UPSTREAM_API_KEY"):
        await aiohttp_client(app)
