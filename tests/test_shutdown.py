"""Graceful shutdown of the real process: SIGTERM under load, and POST /shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp
import pytest

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
