"""WORKERS=N: N processes share one listening socket, bound once by the supervisor; SIGTERM
or POST /shutdown drains them all; a crashed or hung worker is restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import (
    ROOT,
    LogLines,
    embed_each_and_check,
    proxy_env,
    start_double,
    start_proxy_process,
    stop,
    wait_healthy,
)

TOKEN = "operator-token-for-tests"  # the settings refuse secrets under 16 characters


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
        log = LogLines(proc)
        await log.count("proxy: listening", 2)
        texts = [f"multi worker {i}" for i in range(100)]
        # Separate connections, so both workers can take some.
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=50)
        ) as session:
            await embed_each_and_check(session, url, texts)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await log.read_rest()
        assert "started 2 workers" in log.text
        for index in (0, 1):
            assert f"[worker {index}] proxy: listening" in log.text
            assert f"[worker {index}] proxy: stopped after draining" in log.text
    finally:
        await stop(proc)


async def test_admin_shutdown_drains_every_worker_and_the_supervisor_exits(
    aiohttp_server: Any, unused_tcp_port: int
) -> None:
    _, upstream = await start_double(aiohttp_server)
    url = f"http://127.0.0.1:{unused_tcp_port}"
    proc = await start_proxy_process(
        "--upstream-url", upstream, "--port", str(unused_tcp_port), WORKERS="2", ADMIN_TOKEN=TOKEN
    )
    try:
        await wait_healthy(url, proc)
        log = LogLines(proc)
        await log.count("proxy: listening", 2)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                url + "/shutdown", headers={"Authorization": f"Bearer {TOKEN}"}
            ) as resp:
                assert resp.status == 202
        # Not one worker drained and restarted: the whole server stops, and exits 0.
        code = await asyncio.wait_for(proc.wait(), 30)
        await log.read_rest()
        assert code == 0, log.text
        for index in (0, 1):
            assert f"[worker {index}] proxy: stopped after draining" in log.text
        assert "restarting" not in log.text
    finally:
        await stop(proc)


async def test_a_second_instance_cannot_share_the_port(
    aiohttp_server: Any, unused_tcp_port: int
) -> None:
    _, upstream = await start_double(aiohttp_server)
    url = f"http://127.0.0.1:{unused_tcp_port}"
    args = ("--upstream-url", upstream, "--port", str(unused_tcp_port))
    first = await start_proxy_process(*args, WORKERS="2")
    second: asyncio.subprocess.Process | None = None
    try:
        await wait_healthy(url, first)
        # The same command again: it must refuse, not join the port and split the traffic.
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "--host", "127.0.0.1", *args,
            cwd=ROOT, env=proxy_env(WORKERS="2"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        _, err = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode not in (0, None)
        assert err.decode().splitlines() == [
            f"error: port {unused_tcp_port} on 127.0.0.1 is already in use"
        ]
        async with aiohttp.ClientSession() as session:  # the first one is unaffected
            await embed_each_and_check(session, url, ["still served"])
    finally:
        if second is not None:
            await stop(second)
        await stop(first)


def worker_pids(supervisor: int) -> set[int]:
    """The supervisor's worker processes (its children but multiprocessing's tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    pids = set()
    for pid in map(int, children):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"resource_tracker" not in cmdline:
            pids.add(pid)
    return pids


async def test_a_hung_worker_is_killed_and_restarted(
    aiohttp_server: Any, unused_tcp_port: int
) -> None:
    _, upstream = await start_double(aiohttp_server)
    url = f"http://127.0.0.1:{unused_tcp_port}"
    proc = await start_proxy_process(
        "--upstream-url", upstream, "--port", str(unused_tcp_port),
        WORKERS="2", WORKER_HEARTBEAT_TIMEOUT="2",
    )  # fmt: skip
    try:
        await wait_healthy(url, proc)
        log = LogLines(proc)
        await log.count("proxy: listening", 2)
        before = worker_pids(proc.pid)
        assert len(before) == 2
        hung = min(before)
        os.kill(hung, signal.SIGSTOP)  # its event loop stops turning, as if blocked
        await log.count("missed its heartbeat", 1, limit_s=40)
        assert f"(pid {hung}) missed its heartbeat" in log.text
        await log.count("proxy: listening", 3, limit_s=40)  # its replacement serves
        after = worker_pids(proc.pid)
        assert len(after) == 2 and hung not in after
        with pytest.raises(ProcessLookupError):  # killed and reaped, not left stopped
            os.kill(hung, 0)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as session:
            await embed_each_and_check(session, url, [f"after restart {i}" for i in range(20)])
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        await stop(proc)


def scraped(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_one_scrape_counts_every_worker(aiohttp_server: Any, unused_tcp_port: int) -> None:
    """Each worker counts its own requests, yet every scrape, whichever worker answers it,
    shows the total over both (prometheus-client's multiprocess mode)."""
    _, upstream = await start_double(aiohttp_server, delay_base_s=0.01)
    url = f"http://127.0.0.1:{unused_tcp_port}"
    proc = await start_proxy_process(
        "--upstream-url", upstream, "--port", str(unused_tcp_port),
        WORKERS="2", ACCESS_LOG="true",
    )  # fmt: skip
    try:
        await wait_healthy(url, proc)
        log = LogLines(proc)
        await log.count("proxy: listening", 2)
        texts = [f"counted {i}" for i in range(80)]
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=40)
        ) as session:
            await embed_each_and_check(session, url, texts)
            await log.count('"POST /embed" 200', len(texts))
            served = {index: log.text.count(f"[worker {index}] proxy.access") for index in (0, 1)}
            assert served[0] > 0 and served[1] > 0, served  # both workers took requests
            # Scrape on new connections until each worker has answered at least one scrape
            # (bounded); every answer must hold the total over both workers.
            scrapes = 0
            for _ in range(60):
                async with session.get(url + "/metrics") as resp:
                    text = await resp.text()
                scrapes += 1
                embeds = scraped(text, "proxy_requests_total", route="/embed", status="200")
                assert embeds == len(texts)
                items = scraped(text, "proxy_request_items_total", model="test-double/tei")
                assert items == len(texts)
                assert scraped(text, "proxy_model_requests_total", model="test-double/tei") == len(
                    texts
                )
                # Each worker learns its own limit, between its floor of 1 and its ceiling of
                # 16 (it starts at 2, but a latency spike may cut it to 1); the sum of the
                # ceilings below shows the gauges are summed over the workers.
                limit = scraped(text, "proxy_concurrency_limit", model="test-double/tei")
                assert 1 + 1 <= limit <= 16 + 16
                ceiling = scraped(text, "proxy_concurrency_ceiling", model="test-double/tei")
                assert ceiling == 16 + 16
                await log.count('"GET /metrics"', scrapes)
                scrapers = {
                    index
                    for line in log.lines
                    if '"GET /metrics"' in line
                    for index in (0, 1)
                    if f"[worker {index}] proxy.access" in line
                }
                if scrapers == {0, 1}:
                    break
            assert scrapers == {0, 1}  # both workers answered scrapes, each with the total
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        await stop(proc)
