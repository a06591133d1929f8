"""A timer-batcher baseline: a small aiohttp server that batches with ``async-batcher`` (PyPI).

``python -m benchmarks.timer_batcher --port N --upstream-url URL [--max-wait-ms 10]
[--max-batch-size 32] [--concurrency 2]``

It serves ``POST /embed`` (``{"inputs": "text"}`` or a list of texts), hands every input to one
``AsyncBatcher`` and answers with the vectors of its inputs; the batcher sends its batches to
the upstream's ``POST /embed`` as ``{"inputs": [...]}``. ``GET /health`` answers 200.

This is the usual way to add batching in front of a model server with an off-the-shelf
library: collect items for up to ``max_queue_time`` or until ``max_batch_size``, then send.
How ``async-batcher`` 0.2 cuts a batch (read from its source, ``async_batcher/batcher.py``):
the run loop takes a concurrency permit, waits for a first item, then keeps taking items
while each next one arrives within ``max_queue_time`` and the batch is younger than
``max_queue_time``; once the batch is that old it only takes what is already queued. A batch
is sent when it is full or when that wait runs out. With ``concurrency`` N, up to N batches
are in flight at once (the run loop waits for a permit before cutting the next batch).

The benchmark runs it with a 10 ms wait, 32 items per batch and 2 batches in flight (the
number of upstream calls the proxy had in flight by default when this baseline was added;
the library's own default is 1). Upstream errors are passed on as 502 with the message.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from async_batcher.batcher import AsyncBatcher


class UpstreamError(Exception):
    pass


class EmbedBatcher(AsyncBatcher[str, Any]):
    """Sends each batch of texts as one upstream ``/embed`` call; returns one vector each."""

    def __init__(self, session: aiohttp.ClientSession, upstream_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.session = session
        self.url = upstream_url.rstrip("/") + "/embed"
        self.batches = 0
        self.items = 0

    async def process_batch(self, batch: list[str]) -> list[Any]:
        self.batches += 1
        self.items += len(batch)
        body = orjson.dumps({"inputs": batch})
        async with self.session.post(
            self.url, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            payload = await resp.read()
            if resp.status != 200:
                raise UpstreamError(f"upstream answered {resp.status}: {payload[:200]!r}")
        vectors: list[Any] = orjson.loads(payload)
        return vectors


class App:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.session: aiohttp.ClientSession | None = None
        self.batcher: EmbedBatcher | None = None

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=4_000_000)
        app.router.add_post("/embed", self.embed)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.stats)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        a = self.args
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        self.batcher = EmbedBatcher(
            self.session,
            a.upstream_url,
            max_batch_size=a.max_batch_size,
            max_queue_time=a.max_wait_ms / 1000.0,
            concurrency=a.concurrency,
        )

    async def _stop(self, _app: web.Application) -> None:
        if self.batcher is not None:
            await self.batcher.stop(force=True)
        if self.session is not None:
            await self.session.close()

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def stats(self, _request: web.Request) -> web.Response:
        b = self.batcher
        body = {"batches": b.batches if b else 0, "items": b.items if b else 0}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def embed(self, request: web.Request) -> web.Response:
        assert self.batcher is not None
        try:
            inputs = orjson.loads(await request.read())["inputs"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return web.Response(status=422, text="Failed to deserialize the JSON body")
        items = [inputs] if isinstance(inputs, str) else list(inputs)
        try:
            vectors = await asyncio.gather(*(self.batcher.process(item) for item in items))
        except Exception as exc:
            return web.Response(
                status=502,
                body=orjson.dumps({"error": str(exc), "error_type": "Upstream"}),
                content_type="application/json",
            )
        return web.Response(body=orjson.dumps(vectors), content_type="application/json")


async def serve(args: argparse.Namespace) -> None:
    runner = web.AppRunner(App(args).make_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"timer batcher listening on http://{args.host}:{args.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.timer_batcher", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-url", required=True)
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="max_queue_time, ms")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=2, help="batches in flight at once")
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("listens on loopback only")
    return a


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
