"""A TEST DOUBLE of Hugging Face text-embeddings-inference (TEI) 1.9, for tests only.

It is not TEI. It follows TEI's documented HTTP behaviour (routes, bodies, limits, error
bodies and status codes; see TEI's router/src/http/server.rs and core/src/tokenization.rs)
closely enough to test a proxy against, and gives deterministic vectors per text so a test
can prove every caller got its own vector. "Tokens" here are whitespace-separated words plus
two special tokens, which is enough to exercise truncation and the token limit.

Beyond TEI it records what it was sent and can inject faults (see ``Fault``).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from aiohttp import web


class Fault(StrEnum):
    NONE = "none"
    HANG = "hang"  # never answers /embed
    ERROR_500 = "500"
    OVERLOADED_429 = "429"
    GARBAGE = "garbage"  # 200 with a body that is not JSON
    WRONG_COUNT = "wrong_count"  # 200 with one vector too few
    WRONG_DIMS = "wrong_dims"  # 200 with vectors of another dimension
    DROP = "drop"  # closes the connection mid-response


def vector_for(text: str, dim: int) -> list[float]:
    """A deterministic, un-normalised vector for ``text``."""
    out: list[float] = []
    counter = 0
    while len(out) < dim:
        digest = hashlib.blake2b(f"{counter}:{text}".encode(), digest_size=64).digest()
        for (value,) in struct.iter_unpack("<i", digest):
            out.append(value / 2**31 + 1.5)  # positive entries, so norms differ from 1
            if len(out) == dim:
                break
        counter += 1
    return out


def expected_vector(
    text: str,
    dim: int = 16,
    *,
    normalize: bool = True,
    dimensions: int | None = None,
    prompt: str = "",
    seed: str = "",
) -> list[float]:
    """What the double answers for ``text``; tests compare the proxy's answers to this.
    Doubles with different ``seed`` stand for different models: other vectors, same text."""
    vec = vector_for(seed + prompt + text, dim)
    if dimensions is not None:
        vec = vec[:dimensions]
    if normalize:
        norm = math.sqrt(sum(v * v for v in vec))
        vec = [v / norm for v in vec]
    return vec


@dataclass
class TeiDoubleConfig:
    model_id: str = "test-double/tei"
    dim: int = 16
    max_client_batch_size: int = 32
    max_concurrent_requests: int = 512
    max_input_length: int = 512
    max_batch_tokens: int = 16384
    auto_truncate: bool = True
    payload_limit: int = 2_000_000
    api_key: str | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    # Cost model of one /embed call: base + per_item * n seconds.
    delay_base_s: float = 0.0
    delay_per_item_s: float = 0.0
    serial: bool = False  # serve one /embed call at a time (a naive upstream)
    # TEI sends `x-compute-type: gpu+optimized` on every success, whatever the hardware.
    compute_type: str = "gpu+optimized"
    # Mixed into every vector: doubles with different seeds behave as different models.
    seed: str = ""


@dataclass
class CallRecord:
    inputs: list[Any]
    options: dict[str, Any]
    traceparent: str | None = None  # the W3C trace header the call carried, if any


class TeiDouble:
    def __init__(self, config: TeiDoubleConfig | None = None) -> None:
        self.config = config or TeiDoubleConfig()
        self.calls: list[CallRecord] = []
        self.fault = Fault.NONE
        self.fault_remaining: int | None = None  # None: until cleared
        self.in_flight_items = 0
        self.max_in_flight_calls = 0
        self._in_flight_calls = 0
        self._serial_lock = asyncio.Lock()
        self.healthy = True
        self.refused_calls = 0  # calls refused for a missing or wrong key (never in `calls`)

    # -- what tests look at ---------------------------------------------------------------

    @property
    def batch_sizes(self) -> list[int]:
        return [len(c.inputs) for c in self.calls]

    def set_fault(self, fault: Fault, times: int | None = None) -> None:
        self.fault = fault
        self.fault_remaining = times

    def _take_fault(self) -> Fault:
        fault = self.fault
        if fault is Fault.NONE:
            return fault
        if self.fault_remaining is not None:
            self.fault_remaining -= 1
            if self.fault_remaining <= 0:
                self.fault = Fault.NONE
        return fault

    # -- the app --------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.payload_limit, middlewares=[self._auth])
        app.router.add_get("/info", self.info)
        app.router.add_post("/embed", self.embed)
        app.router.add_post("/v1/embeddings", self.openai_embed)
        app.router.add_post("/embeddings", self.openai_embed)
        app.router.add_get("/health", self.health)
        app.router.add_get("/", self.health)
        app.router.add_get("/ping", self.health)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        key = self.config.api_key
        public = request.method == "GET" and request.path in ("/health", "/", "/ping")
        if key and not public and request.headers.get("Authorization") != f"Bearer {key}":
            self.refused_calls += 1
            return web.Response(status=401)  # TEI answers 401 with an empty body
        response: web.StreamResponse = await handler(request)
        return response

    def info_body(self) -> dict[str, Any]:
        c = self.config
        return {
            "model_id": c.model_id,
            "model_sha": None,
            "model_dtype": "float32",
            "served_model_name": c.model_id,
            "model_type": {"embedding": {"pooling": "mean"}},
            "max_concurrent_requests": c.max_concurrent_requests,
            "max_input_length": c.max_input_length,
            "max_batch_tokens": c.max_batch_tokens,
            "max_batch_requests": 8,
            "max_client_batch_size": c.max_client_batch_size,
            "auto_truncate": c.auto_truncate,
            "tokenization_workers": 1,
            "version": "1.9.3",
            "sha": None,
            "docker_label": None,
        }

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(self.info_body())

    async def health(self, request: web.Request) -> web.Response:
        if self.healthy:
            return web.Response(status=200)
        return self._error(503, "unhealthy", "Unhealthy")

    @staticmethod
    def _error(status: int, message: str, error_type: str) -> web.Response:
        return web.json_response({"error": message, "error_type": error_type}, status=status)

    async def _read(self, request: web.Request) -> Any:
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(
                text="Expected request with `Content-Type: application/json`"
            )
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.config.payload_limit,
                actual_size=request.content_length or 0,
                text="Failed to buffer the request body: length limit exceeded",
            ) from None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise web.HTTPBadRequest(text="Failed to parse the request body as JSON") from None

    def _validate_items(self, inputs: Any) -> list[Any] | web.Response:
        if isinstance(inputs, str):
            return [inputs]
        if isinstance(inputs, list):
            if inputs and all(isinstance(x, int) for x in inputs):
                return [inputs]
            if not inputs:
                return [[]]  # TEI parses [] as one empty id list
            return inputs
        return web.Response(
            status=422,
            text="Failed to deserialize the JSON body into the target type: inputs",
        )

    def _embed_one(
        self,
        item: Any,
        *,
        truncate: bool,
        direction: str,
        prompt: str,
        normalize: bool,
        dimensions: int | None,
    ) -> list[float] | web.Response:
        text = " ".join(str(t) for t in item) if isinstance(item, list) else item
        if not isinstance(text, str) or text == "":
            return self._error(400, "Input validation error: `inputs` cannot be empty", "Empty")
        words = (prompt + text).split()
        max_len = self.config.max_input_length
        n_tokens = len(words) + 2
        if n_tokens > max_len:
            if not truncate:
                return self._error(
                    422,
                    f"Input validation error: `inputs` must have less than {max_len} tokens. "
                    f"Given: {n_tokens}",
                    "Validation",
                )
            keep = max_len - 2
            words = words[-keep:] if direction.lower() == "left" else words[:keep]
            text = " ".join(words)
            prompt = ""
        return expected_vector(
            text,
            self.config.dim,
            normalize=normalize,
            dimensions=dimensions,
            prompt=prompt,
            seed=self.config.seed,
        )

    async def embed(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        if not isinstance(body, dict) or "inputs" not in body:
            return web.Response(status=422, text="Failed to deserialize the JSON body")
        items = self._validate_items(body["inputs"])
        if isinstance(items, web.Response):
            return items
        return await self._serve(request, items, body, openai=False)

    async def openai_embed(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        if not isinstance(body, dict) or "input" not in body:
            return web.Response(status=422, text="Failed to deserialize the JSON body")
        items = self._validate_items(body["input"])
        if isinstance(items, web.Response):
            return items
        return await self._serve(request, items, body, openai=True)

    async def _serve(
        self, request: web.Request, items: list[Any], body: dict[str, Any], *, openai: bool
    ) -> web.StreamResponse:
        c = self.config
        if len(items) > c.max_client_batch_size:
            return self._maybe_openai(
                openai,
                self._error(
                    422,
                    f"batch size {len(items)} > maximum allowed batch size "
                    f"{c.max_client_batch_size}",
                    "Validation",
                ),
            )
        if self.in_flight_items + len(items) > c.max_concurrent_requests:
            return self._maybe_openai(openai, self._error(429, "Model is overloaded", "Overloaded"))
        options = {k: v for k, v in body.items() if k not in ("inputs", "input")}
        self.calls.append(CallRecord(list(items), options, request.headers.get("traceparent")))
        self.in_flight_items += len(items)
        self._in_flight_calls += 1
        self.max_in_flight_calls = max(self.max_in_flight_calls, self._in_flight_calls)
        try:
            if c.serial:
                async with self._serial_lock:
                    return await self._compute(request, items, body, openai)
            return await self._compute(request, items, body, openai)
        finally:
            self.in_flight_items -= len(items)
            self._in_flight_calls -= 1

    async def _compute(
        self, request: web.Request, items: list[Any], body: dict[str, Any], openai: bool
    ) -> web.StreamResponse:
        c = self.config
        delay = c.delay_base_s + c.delay_per_item_s * len(items)
        if delay > 0:
            await asyncio.sleep(delay)
        fault = self._take_fault()
        if fault is Fault.HANG:
            await asyncio.sleep(3600)
        if fault is Fault.ERROR_500:
            return self._error(500, "injected failure", "Backend")
        if fault is Fault.OVERLOADED_429:
            return self._error(429, "Model is overloaded", "Overloaded")
        if fault is Fault.GARBAGE:
            return web.Response(status=200, body=b"<html>not json", content_type="application/json")
        if fault is Fault.DROP:
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=200)
        truncate = body.get("truncate")
        if truncate is None or openai:
            truncate = c.auto_truncate
        prompt_name = None if openai else body.get("prompt_name")
        prompt = ""
        if prompt_name is not None:
            if prompt_name not in c.prompts:
                return self._error(
                    422,
                    f"Input validation error: `prompt_name` {prompt_name} is not available",
                    "Validation",
                )
            prompt = c.prompts[prompt_name]
        dimensions = body.get("dimensions")
        if dimensions is not None:
            if dimensions <= 0:
                return self._error(
                    422, "Input validation error: `dimensions` should be positive", "Validation"
                )
            if dimensions > c.dim:
                return self._error(
                    422,
                    "Input validation error: `dimensions` should be smaller than the maximum "
                    "embedding dimension.",
                    "Validation",
                )
        normalize = True if openai else body.get("normalize", True)
        direction = "Right" if openai else str(body.get("truncation_direction") or "Right")
        vectors: list[list[float]] = []
        for item in items:  # all-or-nothing, first failing item wins, as in TEI
            result = self._embed_one(
                item,
                truncate=bool(truncate),
                direction=direction,
                prompt=prompt,
                normalize=bool(normalize),
                dimensions=dimensions,
            )
            if isinstance(result, web.Response):
                return self._maybe_openai(openai, result)
            vectors.append(result)
        if fault is Fault.WRONG_COUNT:
            vectors = vectors[:-1]
        if fault is Fault.WRONG_DIMS:
            vectors = [[*v, 0.0] for v in vectors]
        if openai:
            return self._openai_body(vectors, body)
        return web.json_response(vectors, headers={"x-compute-type": c.compute_type})

    def _openai_body(self, vectors: list[list[float]], body: dict[str, Any]) -> web.Response:
        import base64

        encoding = body.get("encoding_format", "float")
        data = []
        for i, vec in enumerate(vectors):
            emb: Any = vec
            if encoding == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "embedding": emb, "index": i})
        tokens = sum(1 for _ in vectors)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": self.config.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    @staticmethod
    def _maybe_openai(openai: bool, response: web.Response) -> web.Response:
        if not openai or response.content_type != "application/json":
            return response
        assert response.body is not None and isinstance(response.body, bytes)
        err = orjson.loads(response.body)
        return web.json_response(
            {"message": err["error"], "code": response.status, "type": err["error_type"]},
            status=response.status,
        )


def main() -> None:
    """Run the double on its own: ``python -m tests.tei_double --port 3000``."""
    import argparse

    parser = argparse.ArgumentParser(description="TEI test double (not TEI)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--delay-base", type=float, default=0.0)
    parser.add_argument("--delay-per-item", type=float, default=0.0)
    parser.add_argument("--max-client-batch-size", type=int, default=32)
    parser.add_argument("--model-id", default="test-double/tei")
    parser.add_argument("--seed", default="")
    args = parser.parse_args()
    double = TeiDouble(
        TeiDoubleConfig(
            delay_base_s=args.delay_base,
            delay_per_item_s=args.delay_per_item,
            max_client_batch_size=args.max_client_batch_size,
            model_id=args.model_id,
            seed=args.seed,
        )
    )
    web.run_app(double.make_app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
