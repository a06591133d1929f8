"""Slow and idle clients, over raw sockets against the real process: a bound on reading
headers and body, a cap on open connections, and an idle keep-alive timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.processes import start_double, start_proxy_process, stop, wait_healthy
from tests.tei_double import expected_vector

StartProxy = Callable[..., Awaitable[int]]

HEALTH = b"GET /health HTTP/1.1\r\nHost: proxy\r\n\r\n"


@pytest.fixture
async def start(aiohttp_server: Any, unused_tcp_port: int) -> AsyncIterator[StartProxy]:
    """Start the proxy process with the given settings (env vars); returns its port."""
    procs: list[asyncio.subprocess.Process] = []

    async def go(**env: str) -> int:
        _, upstream = await start_double(aiohttp_server)
        proc = await start_proxy_process(
            "--upstream-url", upstream, "--port", str(unused_tcp_port), **env
        )
        procs.append(proc)
        await wait_healthy(f"http://127.0.0.1:{unused_tcp_port}", proc)
        return unused_tcp_port

    yield go
    for proc in procs:
        await stop(proc)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """One HTTP/1.1 response: status, raw headers, body (by Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return status, head, body


async def closed_within(reader: asyncio.StreamReader, limit_s: float) -> bool:
    """True when the server closes the connection within ``limit_s`` (anything it sent before
    closing, e.g. a 408, is read and skipped)."""
    try:
        async with asyncio.timeout(limit_s):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


async def test_headers_sent_one_byte_a_second_are_cut_off(start: StartProxy) -> None:
    port = await start(HEADER_READ_TIMEOUT="1", KEEPALIVE_TIMEOUT="60")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    cut = False
    try:
        # A slowloris: a header line that never ends, one byte a second for up to 8 s.
        for byte in b"GET /health HTTP/1.1\r\nHost: proxy\r\nX-Slow: " + b"a" * 20:
            writer.write(bytes([byte]))
            await writer.drain()
            if await closed_within(reader, 0.5 if byte != ord("a") else 1.0):
                cut = True
                break
            if time.monotonic() - started > 8:
                break
    except ConnectionError:
        cut = True  # the write found the connection closed
    finally:
        writer.close()
    elapsed = time.monotonic() - started
    assert cut, "the slow client was never cut off"
    # Cut after the bound (1 s) plus slack, long before the keep-alive timeout (60 s).
    assert elapsed < 1 + 3, elapsed
    # Other clients are served meanwhile.
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/health") as resp:
            assert resp.status == 200


async def test_the_header_bound_leaves_idle_keepalive_connections_alone(
    start: StartProxy,
) -> None:
    # Between requests a connection is idle, not slow: only KEEPALIVE_TIMEOUT applies.
    port = await start(HEADER_READ_TIMEOUT="1", KEEPALIVE_TIMEOUT="60")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = b'{"inputs": "split body"}'
        writer.write(
            b"POST /embed HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        await writer.drain()
        await asyncio.sleep(0.3)  # the body comes as bytes of its own
        writer.write(body)
        assert (await read_response(reader))[0] == 200
        assert not await closed_within(reader, 2.5)  # idle past HEADER_READ_TIMEOUT
        writer.write(HEALTH)
        assert (await read_response(reader))[0] == 200
    finally:
        writer.close()


async def test_a_body_that_never_arrives_gets_408(start: StartProxy) -> None:
    port = await start(BODY_READ_TIMEOUT="1", KEEPALIVE_TIMEOUT="60")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /embed HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n"
            b'{"inputs": "'
        )
        await writer.drain()
        # The rest of the body never comes: the proxy answers 408 and closes.
        status, head, body = await read_response(reader)
        assert status == 408
        assert b"connection: close" in head.lower()
        assert b"Timeout" in body
        assert await closed_within(reader, 5)
    finally:
        writer.close()


async def test_connection_cap_refuses_the_extra_connection_and_keeps_the_others(
    start: StartProxy,
) -> None:
    port = await start(MAX_CONNECTIONS="2", KEEPALIVE_TIMEOUT="60")
    first = await asyncio.open_connection("127.0.0.1", port)
    second = await asyncio.open_connection("127.0.0.1", port)
    conns = [first, second]
    try:
        for reader, writer in conns:  # both open and served: the cap is reached
            writer.write(HEALTH)
            assert (await read_response(reader))[0] == 200
        extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", port)
        conns.append((extra_reader, extra_writer))
        status, head, _ = await read_response(extra_reader)
        assert status == 503
        assert b"connection: close" in head.lower()
        assert await closed_within(extra_reader, 5)
        for reader, writer in (first, second):  # the open ones keep working
            writer.write(HEALTH)
            assert (await read_response(reader))[0] == 200
        # Once one closes, a new connection is served again.
        first[1].close()
        await first[1].wait_closed()
        for _ in range(50):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            conns.append((reader, writer))
            writer.write(HEALTH)
            if (await read_response(reader))[0] == 200:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the freed slot was never reused")
    finally:
        for _, writer in conns:
            writer.close()


async def test_idle_keepalive_connection_is_closed_after_the_timeout(start: StartProxy) -> None:
    port = await start(KEEPALIVE_TIMEOUT="1")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(HEALTH)
        status, head, _ = await read_response(reader)
        assert status == 200 and b"connection: close" not in head.lower()  # kept alive
        assert await closed_within(reader, 1 + 3), "the idle connection stayed open"
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order(start: StartProxy) -> None:
    """Three requests in one write on one connection (HTTP/1.1 pipelining): the connection's
    queue of parsed requests (a list in place of aiohttp's deque, proxy/server.py) hands them
    to the handler one after the other, and each answer comes back in order."""
    port = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    bodies = [f'{{"inputs": "pipelined {i}"}}'.encode() for i in range(3)]
    writer.write(
        b"".join(
            b"POST /embed HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
            for body in bodies
        )
        + HEALTH
    )
    await writer.drain()
    answers = [await read_response(reader) for _ in range(4)]
    writer.close()
    assert [status for status, _, _ in answers] == [200, 200, 200, 200]
    vectors = [orjson.loads(body) for _, _, body in answers[:3]]
    for i, vector in enumerate(vectors):  # in the order sent, each its own text's
        assert vector == [pytest.approx(expected_vector(f"pipelined {i}"), rel=1e-6)]
    assert answers[3][2] == b""  # /health last, as sent
