"""Graceful shutdown of the real process: SIGTERM under load, and POST /shutdown."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from typing import Any

import aiohttp
import pytest

from proxy.http.keys import DRAINING
from tests.conftest import ProxyFactory
from tests.processes import start_double, start_proxy_process, stop, wait_healthy
from tests.tei_double import expected_vector


async def test_sigterm_under_load_answers_every_accepted_request(
    aiohttp_server: Any, unused_tcp_port: int
) -> None:
    # A slow upstream (50 ms + 2 ms/item) and small batches keep work queued at SIGTERM.
    double, upstream = await start_double(aiohttp_server, delay_base_s=0.05, delay_per_item_s=0.002)
    url = f"http://127.0.0.1:{unused_tcp_port}"
    proc = await start_proxy_process(
        "--upstream-url", upstream, "--port", str(unused_tcp_port),
        "--max-batch-size", "8", "--max-concurrent-batches", "1", "--shutdown-timeout", "20",
    )  # fmt: skip
    try:
        await wait_healthy(url, proc)
        texts = [f"request {i}" for i in range(120)]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:

            async def call(text: str) -> tuple[int, Any]:
                async with session.post(url + "/embed", json={"inputs": text}) as resp:
                    return resp.status, await resp.json()

            tasks = [asyncio.ensure_future(call(t)) for t in texts]
            # Wait until all 120 are accepted and most still queued, then stop the proxy.
            deadline = time.monotonic() + 10
            while len(double.calls) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            await asyncio.sleep(0.05)
            # While draining: readiness is false and new work is refused with a clear 503.
            async with session.get(url + "/health") as resp:
                assert resp.status == 503
                assert (await resp.json())["error"] == "draining"
            async with session.post(url + "/embed", json={"inputs": "late"}) as resp:
                assert resp.status == 503
                assert "shutting down" in (await resp.json())["error"]
            results = await asyncio.gather(*tasks)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert time.monotonic() - stopped_at < 20
        for text, (status, body) in zip(texts, results, strict=True):
            assert status == 200, body
            assert body == [pytest.approx(expected_vector(text), rel=1e-6)]
        assert len(double.calls) > 10  # the queue really was drained through the upstream
        assert "late" not in {t for c in double.calls for t in c.inputs}
    finally:
        await stop(proc)


TOKEN = "operator-token-for-tests"  # the settings refuse secrets under 16 characters


async def test_admin_shutdown_route_drains_and_exits(
    aiohttp_server: Any, unused_tcp_port: int
) -> None:
    _, upstream = await start_double(aiohttp_server, delay_base_s=0.05)
    url = f"http://127.0.0.1:{unused_tcp_port}"
    proc = await start_proxy_process(
        "--upstream-url", upstream, "--port", str(unused_tcp_port), ADMIN_TOKEN=TOKEN
    )
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as session:
            pending = asyncio.ensure_future(session.post(url + "/embed", json={"inputs": "a"}))
            await asyncio.sleep(0.01)
            async with session.post(
                url + "/shutdown", headers={"Authorization": f"Bearer {TOKEN}"}
            ) as resp:
                assert resp.status == 202
            answer = await pending
            assert answer.status == 200
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        await stop(proc)


async def _queue_depth(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url + "/metrics") as resp:
        match = re.search(r"^proxy_queue_depth\{[^}]*\} (\S+)$", await resp.text(), re.M)
    return float(match[1]) if match else 0.0


async def test_shutdown_timeout_bounds_the_exit_and_every_client_gets_an_answer(
    aiohttp_server: Any, unused_tcp_port: int
) -> None:
    # Every upstream call takes 3 s: with SHUTDOWN_TIMEOUT=1 the drain cannot finish, so the
    # proxy must answer what is left with 503 and exit, never cut a client off.
    double, upstream = await start_double(aiohttp_server, delay_base_s=3.0)
    url = f"http://127.0.0.1:{unused_tcp_port}"
    proc = await start_proxy_process(
        "--upstream-url", upstream, "--port", str(unused_tcp_port),
        "--max-batch-size", "2", "--max-concurrent-batches", "1", "--shutdown-timeout", "1",
    )  # fmt: skip
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as session:

            async def call(path: str, payload: dict[str, Any]) -> tuple[int, Any]:
                async with session.post(url + path, json=payload) as resp:
                    return resp.status, await resp.json()

            calls = [("/embed", {"inputs": f"tei {i}"}) for i in range(6)]
            calls += [("/v1/embeddings", {"input": f"openai {i}"}) for i in range(4)]
            tasks = [asyncio.ensure_future(call(path, body)) for path, body in calls]
            # One batch of 2 in flight upstream, the other 8 items queued behind it.
            for _ in range(500):
                if double.calls and await _queue_depth(session, url) >= 8:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the requests never queued")
            proc.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            exit_code = await asyncio.wait_for(proc.wait(), 10)
            exited_after = time.monotonic() - stopped_at
            results = await asyncio.gather(*tasks, return_exceptions=True)
        assert exit_code == 0
        assert exited_after < 1 + 1, f"exited {exited_after:.2f}s after SIGTERM"
        for (path, _), result in zip(calls, results, strict=True):
            assert not isinstance(result, BaseException), f"{path}: {result!r}"
            status, body = result
            assert status in (200, 503), (path, status, body)
            if status == 503 and path == "/embed":
                assert body["error_type"] == "Unhealthy" and body["error"], body
            elif status == 503:
                assert set(body) == {"message", "code", "type"}, body
                assert body["code"] == 503 and body["type"] == "Unhealthy", body
        # The upstream was too slow for anything to finish: the in-flight and queued
        # callers were all answered 503.
        assert {r[0] for r in results if not isinstance(r, BaseException)} == {503}
    finally:
        await stop(proc)


async def test_draining_answers_openai_routes_with_the_openai_error_body(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy()
    client.app[DRAINING].set()
    for path in ("/v1/embeddings", "/embeddings"):
        resp = await client.post(path, json={"input": "late"})
        assert resp.status == 503, path
        assert await resp.json() == {
            "message": "proxy is shutting down",
            "code": 503,
            "type": "Unhealthy",
        }
    resp = await client.post("/embed", json={"inputs": "late"})
    assert resp.status == 503
    assert await resp.json() == {"error": "proxy is shutting down", "error_type": "Unhealthy"}
