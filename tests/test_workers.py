"""WORKERS=N: N processes share the port through SO_REUSEPORT; SIGTERM drains them all."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import pytest

from tests.processes import (
    embed_each_and_check,
    start_double,
    start_proxy_process,
    stop,
    wait_healthy,
)


@pytest.mark.parametrize("env_name", ["WORKERS", "MODEL_SERVER_WORKERS"])
async def test_two_workers_serve_one_port_and_drain(
    aiohttp_server: Any, unused_tcp_port: int, env_name: str
) -> None:
    _, upstream = await start_double(aiohttp_server, delay_base_s=0.02)
    url = f"http://127.0.0.1:{unused_tcp_port}"
    proc = await start_proxy_process(
        "--upstream-url", upstream, "--port", str(unused_tcp_port), **{env_name: "2"}
    )
    try:
        await wait_healthy(url, proc)
        assert proc.stdout is not None
        log_lines: list[str] = []
        # Both workers must be serving before the load, or the kernel has only one to pick.
        async with asyncio.timeout(30):
            while sum("proxy: listening" in line for line in log_lines) < 2:
                log_lines.append((await proc.stdout.readline()).decode())
        texts = [f"multi worker {i}" for i in range(100)]
        # Separate connections, so the kernel can spread them over both workers.
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=50)
        ) as session:
            await embed_each_and_check(session, url, texts)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        log = "".join(log_lines) + (await proc.stdout.read()).decode()
        assert "started 2 workers" in log
        for index in (0, 1):
            assert f"[worker {index}] proxy: listening" in log
            assert f"[worker {index}] proxy: stopped after draining" in log
    finally:
        await stop(proc)
