"""Upstream emulators for the benchmarks, each an aiohttp server meant to run in its own process.

Kinds (``python -m benchmarks.emulators KIND --port N``):

* ``tei``: models TEI's own scheduling. Every input item of every request joins one queue; a
  batching task cuts internal batches by a token budget (and optionally an item count), one
  batch runs while the next one is already cut ("prefetched"), and a batch of ``n`` items
  and ``t`` tokens costs ``a + b*n + c*t`` milliseconds (``c``, ``--token-ms``, is 0 unless
  set). Requests past ``max_concurrent_requests`` queued items get TEI's 429, client batches
  past ``max_client_batch_size`` get TEI's 422.
* ``naive``: no batching across requests; one ``/embed`` call at a time (FIFO), each costing
  ``a + b*n + c*t``. Stands in for a plain model server that runs whatever it is sent.
* ``instant``: answers every call at once. As the proxy's upstream it measures the proxy's
  own overhead; hit directly it is the "bare aiohttp server" the proxy is compared with.
* ``stall``: accepts ``/embed`` and never answers (until ``--stall-s``), so work piles up in
  front of it.
* ``passthrough``: a minimal aiohttp forwarder: each ``/embed`` is re-sent as-is to
  ``--upstream-url`` over a pooled client session and its answer relayed byte for byte. It
  does no batching and no parsing; it is the reference for what one extra Python HTTP hop
  costs on this machine.

Costs are ``asyncio.sleep`` calls: the emulated model uses no CPU, as a GPU would not use the
host's, so the CPU the benchmark sees is the HTTP and batching work only.

Every kind serves TEI's ``/info`` and ``/health`` and a ``/stats`` route with counters.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp import web

Kind = Literal["tei", "naive", "instant", "stall", "passthrough"]
KINDS: tuple[Kind, ...] = ("tei", "naive", "instant", "stall", "passthrough")


@dataclass(slots=True)
class EmulatorConfig:
    kind: Kind = "tei"
    a_ms: float = 20.0  # fixed cost of one (internal) batch
    b_ms: float = 0.2  # cost per item in it
    token_ms: float = 0.0  # cost per token in it (tokens = whitespace words + 2)
    max_batch_tokens: int = 16_384
    max_batch_requests: int | None = None  # TEI's --max-batch-requests (items per batch)
    max_client_batch_size: int = 32
    max_concurrent_requests: int = 512
    max_input_length: int = 512
    dim: int = 384
    stall_s: float = 3600.0
    upstream_url: str | None = None  # passthrough only

    def cost_s(self, n: int, tokens: int = 0) -> float:
        return (self.a_ms + self.b_ms * n + self.token_ms * tokens) / 1000.0


@dataclass(slots=True)
class Stats:
    calls: int = 0
    items: int = 0
    batches: int = 0  # internal batches (tei) or model runs (naive)
    batch_items: Counter[int] = field(default_factory=Counter)
    rejected_429: int = 0
    rejected_422: int = 0
    in_flight_items: int = 0
    max_in_flight_items: int = 0
    in_flight_calls: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["batch_items"] = {str(k): v for k, v in sorted(self.batch_items.items())}
        return out


@dataclass(slots=True, eq=False)
class _Call:
    remaining: int
    done: asyncio.Future[None]


def _vector_json(dim: int) -> bytes:
    # Plausible unit-scale floats with full-length decimals, so payload sizes match a real
    # model's (about 20 bytes per float).
    return orjson.dumps([((i * 7919) % 1000 - 500) / 9137.0 for i in range(dim)])


def _error(status: int, message: str, error_type: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": message, "error_type": error_type}),
        status=status,
        content_type="application/json",
    )


class Emulator:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self._vector = _vector_json(config.dim)
        self._queue: deque[tuple[_Call, int]] = deque()  # (call, tokens) per item
        self._queued = asyncio.Event()
        self._serial = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._client: aiohttp.ClientSession | None = None

    # -- app ----------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=4_000_000)
        app.router.add_post("/embed", self.embed)
        app.router.add_get("/info", self.info)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.get_stats)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        if self.config.kind == "tei":
            self._tasks.append(asyncio.create_task(self._tei_scheduler()))
        if self.config.kind == "passthrough":
            connector = aiohttp.TCPConnector(limit=1024)
            self._client = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=60)
            )

    async def _stop(self, _app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    def info_body(self) -> dict[str, Any]:
        c = self.config
        return {
            "model_id": f"emulator/{c.kind}",
            "model_sha": None,
            "model_dtype": "float32",
            "served_model_name": f"emulator/{c.kind}",
            "model_type": {"embedding": {"pooling": "mean"}},
            "max_concurrent_requests": c.max_concurrent_requests,
            "max_input_length": c.max_input_length,
            "max_batch_tokens": c.max_batch_tokens,
            "max_batch_requests": c.max_batch_requests,
            "max_client_batch_size": c.max_client_batch_size,
            "auto_truncate": True,
            "tokenization_workers": 1,
            "version": "1.9.3",
            "sha": None,
            "docker_label": None,
        }

    async def info(self, _request: web.Request) -> web.Response:
        return web.json_response(self.info_body())

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def get_stats(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(self.stats.to_dict()), content_type="application/json"
        )

    # -- /embed -------------------------------------------------------------------------

    def _vectors(self, n: int) -> bytes:
        return _vectors_body(self._vector, n)

    async def embed(self, request: web.Request) -> web.Response:
        if self._client is not None:
            return await self._forward(request)
        try:
            body = orjson.loads(await request.read())
            inputs = body["inputs"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return web.Response(status=422, text="Failed to deserialize the JSON body")
        items: list[Any] = [inputs] if isinstance(inputs, str) else list(inputs)
        n = len(items)
        c = self.config
        st = self.stats
        if n > c.max_client_batch_size:
            st.rejected_422 += 1
            return _error(
                422,
                f"batch size {n} > maximum allowed batch size {c.max_client_batch_size}",
                "Validation",
            )
        if st.in_flight_items + n > c.max_concurrent_requests:
            st.rejected_429 += 1
            return _error(429, "Model is overloaded", "Overloaded")
        st.calls += 1
        st.items += n
        st.in_flight_items += n
        st.in_flight_calls += 1
        st.max_in_flight_items = max(st.max_in_flight_items, st.in_flight_items)
        try:
            if c.kind == "tei":
                await self._tei_call(items)
            elif c.kind == "naive":
                async with self._serial:
                    st.batches += 1
                    st.batch_items[n] += 1
                    tokens = sum(map(_tokens, items)) if c.token_ms else 0
                    await asyncio.sleep(c.cost_s(n, tokens))
            elif c.kind == "stall":
                await asyncio.sleep(c.stall_s)
        finally:
            st.in_flight_items -= n
            st.in_flight_calls -= 1
        return web.Response(body=self._vectors(n), content_type="application/json")

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._client is not None and self.config.upstream_url is not None
        body = await request.read()
        self.stats.calls += 1
        self.stats.in_flight_calls += 1
        try:
            async with self._client.post(
                self.config.upstream_url + "/embed",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as resp:
                payload = await resp.read()
                return web.Response(
                    body=payload, status=resp.status, content_type="application/json"
                )
        finally:
            self.stats.in_flight_calls -= 1

    # -- TEI's scheduling ---------------------------------------------------------------

    async def _tei_call(self, items: list[Any]) -> None:
        call = _Call(len(items), asyncio.get_running_loop().create_future())
        for item in items:
            self._queue.append((call, _tokens(item)))
        self._queued.set()
        await call.done

    def _cut_batch(self) -> tuple[list[_Call], int]:
        c = self.config
        batch: list[_Call] = []
        tokens = 0
        while self._queue:
            call, t = self._queue[0]
            if batch and (
                tokens + t > c.max_batch_tokens
                or (c.max_batch_requests is not None and len(batch) >= c.max_batch_requests)
            ):
                break
            self._queue.popleft()
            batch.append(call)
            tokens += t
        if not self._queue:
            self._queued.clear()
        return batch, tokens

    async def _tei_scheduler(self) -> None:
        # TEI cuts the next batch as soon as the previous one starts running, so one batch
        # runs while the next waits, already cut. ``running`` is that one running batch.
        running: asyncio.Task[None] | None = None
        while True:
            await self._queued.wait()
            batch, tokens = self._cut_batch()
            if running is not None:
                await running
            running = asyncio.create_task(self._run_batch(batch, tokens))

    async def _run_batch(self, batch: list[_Call], tokens: int) -> None:
        st = self.stats
        st.batches += 1
        st.batch_items[len(batch)] += 1
        await asyncio.sleep(self.config.cost_s(len(batch), tokens))
        for call in batch:
            call.remaining -= 1
            if call.remaining == 0 and not call.done.done():
                call.done.set_result(None)


def _tokens(item: Any) -> int:
    # Whitespace words plus [CLS] and [SEP]: close enough to word-piece counts for the
    # English benchmark texts. A list of token ids counts as its length.
    return (len(item.split()) if isinstance(item, str) else len(item)) + 2


@functools.lru_cache(maxsize=2048)
def _vectors_body(vector: bytes, n: int) -> bytes:
    return b"[" + b",".join([vector] * n) + b"]"


async def serve(config: EmulatorConfig, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    runner = web.AppRunner(Emulator(config).make_app(), access_log=None, handle_signals=False)
    await runner.setup()
    # A deep accept backlog: a thousand clients connect at once in the benchmarks.
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"emulator {config.kind} listening on http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def parse_args(argv: list[str] | None = None) -> tuple[EmulatorConfig, str, int]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.emulators", description=__doc__)
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    d = EmulatorConfig()
    p.add_argument("--a-ms", type=float, default=d.a_ms, help="fixed cost per batch (ms)")
    p.add_argument("--b-ms", type=float, default=d.b_ms, help="cost per item (ms)")
    p.add_argument("--token-ms", type=float, default=d.token_ms, help="cost per token (ms)")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens)
    p.add_argument("--max-batch-requests", type=int, default=None)
    p.add_argument("--max-client-batch-size", type=int, default=d.max_client_batch_size)
    p.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests)
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--stall-s", type=float, default=d.stall_s)
    p.add_argument("--upstream-url", default=None, help="passthrough: where to forward")
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("the emulators listen on loopback only")
    if (a.kind == "passthrough") != (a.upstream_url is not None):
        p.error("--upstream-url goes with passthrough, and only with it")
    config = EmulatorConfig(
        kind=a.kind,
        a_ms=a.a_ms,
        b_ms=a.b_ms,
        token_ms=a.token_ms,
        max_batch_tokens=a.max_batch_tokens,
        max_batch_requests=a.max_batch_requests,
        max_client_batch_size=a.max_client_batch_size,
        max_concurrent_requests=a.max_concurrent_requests,
        dim=a.dim,
        stall_s=a.stall_s,
        upstream_url=a.upstream_url.rstrip("/") if a.upstream_url else None,
    )
    return config, a.host, a.port


def main(argv: list[str] | None = None) -> None:
    config, host, port = parse_args(argv)
    asyncio.run(serve(config, host, port))


if __name__ == "__main__":
    main()
