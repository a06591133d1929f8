"""The connection handler of proxy/server.py in-process, over raw sockets: what a connection
keeps while its request is held, and that keeping less never loses a byte (keep-alive,
pipelining, requests split across reads, bodies over several reads, bare-LF line ends)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from proxy.server import _Handler, _Runner, _Server

HELD = "/held"
SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="-")


class App:
    """Echoes method, path, a header and the body; ``/held`` waits until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held: list[web.Request] = []
        self.cancelled: list[str] = []
        self.app = web.Application(middlewares=[self.front])
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    @web.middleware
    async def front(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        assert request.app is self.app
        return await handler(request)

    async def handle(self, request: web.Request) -> web.Response:
        assert request.app is self.app and request.task is asyncio.current_task()
        # What an earlier request of the same connection set must not show here.
        seen = SEEN.get()
        SEEN.set(request.headers.get("X-Tag", "-"))
        body = await request.read()
        if request.path == "/raise":
            raise RuntimeError("a bug")
        if request.path == "/gone":
            raise web.HTTPGone(text="gone")
        if request.path == "/slow":
            raise TimeoutError
        if request.path == HELD:
            self.held.append(request)
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(request.headers.get("X-Tag", "-"))
                raise
        text = f"{request.method} {request.path} {request.headers.get('X-Tag', '-')} {len(body)}"
        return web.Response(text=text, headers={"X-Body-Sum": str(sum(body)), "X-Seen": seen})


@contextlib.asynccontextmanager
async def serving(
    application: web.Application, **options: Any
) -> AsyncIterator[tuple[int, _Runner]]:
    """``application`` behind the proxy's runner on a loopback port: (port, runner)."""
    runner = _Runner(application, access_log=None, header_timeout_s=10.0, **options)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    await web.SockSite(runner, sock).start()
    try:
        yield sock.getsockname()[1], runner
    finally:
        await runner.cleanup()
        sock.close()


@pytest.fixture
async def served() -> AsyncIterator[tuple[App, int, _Runner]]:
    app = App()
    async with serving(app.app, handler_cancellation=True, max_connections=100) as (port, runner):
        try:
            yield app, port, runner
        finally:
            app.release.set()


def request(path: str, body: bytes = b"", tag: str = "-") -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: test", f"X-Tag: {tag}", f"Content-Length: {len(body)}"]
    return "".join(line + "\r\n" for line in head).encode() + b"\r\n" + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, str, int]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length, body_sum = 0, -1
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        if name.strip().lower() == b"x-body-sum":
            body_sum = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return status, body.decode(), body_sum


def handlers(runner: _Runner) -> list[Any]:
    server = runner.server
    assert server is not None
    return [h for h in server.connections if isinstance(h, _Handler)]


async def wait_held(app: App, n: int) -> None:
    for _ in range(200):
        if len(app.held) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(app.held)} of {n} requests reached the handler")


async def test_a_held_request_keeps_no_parser_nor_raw_headers_and_keep_alive_goes_on(
    served: tuple[App, int, _Runner],
) -> None:
    app, port, runner = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request(HELD, b"abc", tag="one"))
        await wait_held(app, 1)
        (handler,) = handlers(runner)
        assert handler._parser is None  # dropped until the next bytes arrive
        held = app.held[0]
        assert held.raw_headers == ()
        assert held.headers["X-Tag"] == "one" and held.headers["Content-Length"] == "3"
        assert held.headers["host"] == "test" and list(held.headers) == [
            "Host",
            "X-Tag",
            "Content-Length",
        ]
        app.release.set()
        assert await read_response(reader) == (200, f"POST {HELD} one 3", sum(b"abc"))
        # The same connection: a parser is made again for the next request.
        for i in range(3):
            writer.write(request("/again", bytes([i]) * 5, tag=str(i)))
            assert await read_response(reader) == (200, f"POST /again {i} 5", 5 * i)
        assert handlers(runner) == [handler]
    finally:
        writer.close()


@pytest.mark.parametrize("cut", [1, 4, 30, -1])
async def test_a_pipelined_request_begun_in_the_same_read_is_kept(
    served: tuple[App, int, _Runner], cut: int
) -> None:
    """The first request ends inside a read that also holds the start of the next one (one
    byte of it, its request line, part of its headers, all but its last body byte): the
    parser holds that start and must stay."""
    app, port, runner = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    second = request("/second", b"xyz", tag="two")
    try:
        writer.write(request(HELD, b"P" * 7, tag="one") + second[:cut])
        await wait_held(app, 1)
        await asyncio.sleep(0.05)  # the start of the second request is in
        (handler,) = handlers(runner)
        assert handler._parser is not None
        writer.write(second[cut:])
        await asyncio.sleep(0.05)
        app.release.set()
        assert await read_response(reader) == (200, f"POST {HELD} one 7", 7 * ord("P"))
        assert await read_response(reader) == (200, "POST /second two 3", sum(b"xyz"))
    finally:
        writer.close()


async def test_whole_pipelined_requests_in_one_read_are_all_answered_in_order(
    served: tuple[App, int, _Runner],
) -> None:
    _, port, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(request(f"/p{i}", b"q" * i, tag=str(i)) for i in range(4)))
        for i in range(4):
            assert await read_response(reader) == (200, f"POST /p{i} {i} {i}", i * ord("q"))
    finally:
        writer.close()


async def test_requests_split_across_reads_and_large_bodies(
    served: tuple[App, int, _Runner],
) -> None:
    app, port, runner = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    big = bytes(range(256)) * 2048  # 512 KB: many reads
    try:
        # Headers in two writes, then the body: the parser stays while it holds a part.
        data = request(HELD, b"12345", tag="s")
        writer.write(data[:10])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(data[10:-2])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(data[-2:])
        await wait_held(app, 1)
        (handler,) = handlers(runner)
        assert handler._parser is None  # counted over three reads: it ended with the last
        app.release.set()
        assert await read_response(reader) == (200, f"POST {HELD} s 5", sum(b"12345"))
        writer.write(request("/big", big, tag="b"))
        assert await read_response(reader) == (200, f"POST /big b {len(big)}", sum(big))
        # A held request with a body over many reads, on the same connection.
        app.release.clear()
        writer.write(request(HELD, big, tag="h"))
        await wait_held(app, 2)
        assert handler._parser is None
        app.release.set()
        assert await read_response(reader) == (200, f"POST {HELD} h {len(big)}", sum(big))
    finally:
        writer.close()


async def test_empty_lines_before_a_request_and_requests_without_body(
    served: tuple[App, int, _Runner],
) -> None:
    """Empty lines before a request line are allowed: that request is not followed (its
    parser stays); the next one starts clean again once a parser is made anew."""
    app, port, runner = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\r\n" + request(HELD, b"body", tag="e"))
        await wait_held(app, 1)
        (handler,) = handlers(runner)
        assert handler._parser is not None
        app.release.set()
        assert await read_response(reader) == (200, f"POST {HELD} e 4", sum(b"body"))
        writer.write(b"GET /get HTTP/1.1\r\nHost: test\r\nX-Tag: g\r\n\r\n")
        assert await read_response(reader) == (200, "GET /get g 0", 0)
    finally:
        writer.close()


async def test_one_task_per_request_none_while_idle_and_a_fresh_context_each(
    served: tuple[App, int, _Runner],
) -> None:
    app, port, runner = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("/a", tag="a"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r")[0]))
        assert b"X-Seen: -" in head
        (handler,) = handlers(runner)
        assert handler._task_handler is None  # idle: no task waits for the next request
        writer.write(request(HELD, tag="b"))
        await wait_held(app, 1)
        assert handler._task_handler is app.held[0].task
        app.release.set()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"X-Seen: -" in head  # not "a": each request has its own context
        # The middleware chain has no wrapper for sub-applications (there are none).
        assert all(
            not getattr(m, "__qualname__", "").startswith("_fix_request_current_app")
            for m, _ in app.app._middlewares_handlers or ()
        )
    finally:
        writer.close()


async def test_a_client_that_goes_away_cancels_its_held_request(
    served: tuple[App, int, _Runner],
) -> None:
    app, port, runner = served
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request(HELD, tag="gone"))
    await wait_held(app, 1)
    writer.close()
    for _ in range(200):
        if app.cancelled:
            break
        await asyncio.sleep(0.01)
    assert app.cancelled == ["gone"]
    assert handlers(runner) == []


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout() -> None:
    """Not while its request is in progress, however long; once idle that long, or never
    used, it is closed (by the server's sweep: no timer per connection)."""
    app = App()
    async with serving(
        app.app, handler_cancellation=True, keepalive_timeout=0.3, max_connections=10
    ) as (port, runner):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(HELD, tag="slow"))
        await wait_held(app, 1)
        await asyncio.sleep(0.6)  # past the timeout, but a request is in progress
        app.release.set()
        assert await read_response(reader) == (200, f"POST {HELD} slow 0", 0)
        assert all(h._keepalive_handle is None for h in handlers(runner))  # the sweep's job
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed once idle
        assert asyncio.get_running_loop().time() - started < 2
        writer.close()
        # A connection that never sends a byte is closed too.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.25 < asyncio.get_running_loop().time() - started < 2
        writer.close()


async def test_handler_errors_are_answered_as_aiohttp_does(
    served: tuple[App, int, _Runner],
) -> None:
    """An HTTPException is its own answer (the connection stays); a TimeoutError is 504 and
    any other exception 500, both closing the connection; a request that cannot be parsed
    is 400."""
    _, port, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("/gone"))
        assert (await read_response(reader))[:2] == (410, "gone")
        writer.write(request("/slow"))
        assert (await read_response(reader))[0] == 504
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("/raise"))
        assert (await read_response(reader))[0] == 500
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        assert (await read_response(reader))[0] == 400
    finally:
        writer.close()


async def test_held_requests_share_common_values_but_never_credentials(
    served: tuple[App, int, _Runner],
) -> None:
    app, port, _ = served
    writers = []
    try:
        for i in range(2):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            writer.write(
                f"POST {HELD} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer secret-token\r\nX-Tag: {i}\r\n"
                "Content-Length: 2\r\n\r\n{}".encode()
            )
            await wait_held(app, i + 1)
        first, second = (request.headers for request in app.held)
        assert first["Content-Type"] is second["Content-Type"]  # one string for both
        assert first["Host"] is second["Host"]
        assert first["Authorization"] == second["Authorization"] == "Bearer secret-token"
        assert first["Authorization"] is not second["Authorization"]  # never kept in common
        assert (first["X-Tag"], second["X-Tag"]) == ("0", "1")
        # The listening address and the client's host: one copy for both connections.
        one, two = (request.transport for request in app.held)
        assert one is not None and two is not None
        assert one.get_extra_info("sockname") is two.get_extra_info("sockname")
        assert one.get_extra_info("peername")[0] is two.get_extra_info("peername")[0]
        assert [request.remote for request in app.held] == ["127.0.0.1", "127.0.0.1"]
    finally:
        app.release.set()
        for writer in writers:
            writer.close()


async def test_routing_done_inline_answers_404_405_and_expect_as_aiohttp_does() -> None:
    seen: list[str] = []

    @web.middleware
    async def front(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        seen.append(request.path)
        return await handler(request)

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=(await request.read()).decode())

    application = web.Application(middlewares=[front])
    application.router.add_post("/echo", echo)
    async with serving(application, max_connections=10) as (port, runner):
        assert isinstance(runner.server, _Server) and runner.server.app_handler is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await read_response(reader))[0] == 404
        writer.write(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await read_response(reader))[0] == 405
        writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n")
        writer.write(b"Content-Length: 5\r\n\r\n")
        continued = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert continued.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        assert (await read_response(reader))[:2] == (200, "hello")
        assert seen == ["/nope", "/echo", "/echo"]  # the middleware saw every request
        writer.close()
