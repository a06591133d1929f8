"""`python -m proxy` as a real process, in front of the TEI double, over real sockets."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.processes import (
    ROOT,
    embed_each_and_check,
    proxy_env,
    start_double,
    start_proxy_process,
    stop,
    wait_healthy,
)
from tests.tei_double import TeiDouble, expected_vector


@pytest.fixture
async def proxy_process(
    aiohttp_server: Any, unused_tcp_port: int
) -> AsyncIterator[tuple[TeiDouble, str, asyncio.subprocess.Process]]:
    double, upstream = await start_double(
        aiohttp_server, max_client_batch_size=32, delay_base_s=0.02
    )
    proc = await start_proxy_process(
        "--upstream-url", upstream, "--port", str(unused_tcp_port), "--max-batch-size", "64"
    )
    url = f"http://127.0.0.1:{unused_tcp_port}"
    try:
        await wait_healthy(url, proc)
        yield double, url, proc
    finally:
        await stop(proc)


async def test_256_concurrent_callers_each_get_their_own_vector(
    proxy_process: tuple[TeiDouble, str, asyncio.subprocess.Process],
) -> None:
    double, url, proc = proxy_process
    texts = [f"caller {i} says hello" for i in range(256)]
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:
        await embed_each_and_check(session, url, texts)
    sizes = double.batch_sizes
    assert sum(sizes) == 256 and max(sizes) <= 32
    assert len(sizes) <= 32, sizes
    print(f"256 concurrent requests -> {len(sizes)} upstream calls, sizes {sizes}")

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert proc.stdout is not None
    log = (await proc.stdout.read()).decode()
    assert "effective batch size 32 = min(MAX_BATCH_SIZE=64" in log


def test_invalid_setting_stops_start_up_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy"], cwd=ROOT, capture_output=True, text=True,
        env=proxy_env(MAX_BATCH_SIZE="0"), timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "MAX_BATCH_SIZE" in lines[0]


def test_help_lists_the_settings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--help"], cwd=ROOT, capture_output=True, text=True,
        env=proxy_env(), timeout=30,
    )  # fmt: skip
    assert result.returncode == 0
    for flag in (
        "--upstream-url",
        "--max-wait-time",
        "--max-batch-size",
        "--max-concurrent-batches",
        "--dispatch",
        "--upstream-timeout",
    ):
        assert flag in result.stdout


async def test_uvloop_event_loop_serves(aiohttp_server: Any, unused_tcp_port: int) -> None:
    pytest.importorskip("uvloop")
    _, upstream = await start_double(aiohttp_server)
    proc = await start_proxy_process(
        "--upstream-url", upstream, "--port", str(unused_tcp_port), "--event-loop", "uvloop"
    )
    url = f"http://127.0.0.1:{unused_tcp_port}"
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/embed", json={"inputs": "on uvloop"}) as resp:
                assert resp.status == 200
                assert await resp.json() == [pytest.approx(expected_vector("on uvloop"), rel=1e-6)]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        await stop(proc)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_taken_port_is_one_line_and_a_failed_start(
    aiohttp_server: Any, unused_tcp_port: int, workers: str
) -> None:
    _, upstream = await start_double(aiohttp_server)
    with socket.create_server(("127.0.0.1", unused_tcp_port)):  # someone else has the port
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "--host", "127.0.0.1",
            "--port", str(unused_tcp_port), "--upstream-url", upstream,
            cwd=ROOT, env=proxy_env(WORKERS=workers), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            await stop(proc)
    assert proc.returncode not in (0, None)
    # Before anything else started: one line on stderr, no traceback, nothing logged.
    assert err.decode().splitlines() == [
        f"error: port {unused_tcp_port} on 127.0.0.1 is already in use"
    ]
    assert out == b""
