"""HTTP handlers. They parse, call the service and render; they know nothing of batching."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any

import orjson
from aiohttp import web

from proxy.errors import ApiError, ErrorType
from proxy.metrics import Metrics
from proxy.openapi import SWAGGER_UI_HTML, build_openapi
from proxy.parsing import parse_embed_request, read_json
from proxy.service import EmbeddingService
from proxy.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
SERVICE = web.AppKey("service", EmbeddingService)
SHUTDOWN = web.AppKey("shutdown", asyncio.Event)

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def json_response(
    payload: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload, option=_JSON_OPTIONS),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(exc: ApiError) -> web.Response:
    return json_response(exc.tei_body(), status=exc.status, headers=exc.headers or None)


UNHEALTHY = ApiError(503, "unhealthy", ErrorType.UNHEALTHY)


async def embed(request: web.Request) -> web.Response:
    started = time.perf_counter()
    body = await read_json(request)
    inputs, options = parse_embed_request(body)
    app = request.app
    deadline = time.monotonic() + app[SETTINGS].request_timeout
    vectors = await app[SERVICE].embed(inputs, options, deadline=deadline)
    elapsed_ms = str(int((time.perf_counter() - started) * 1000))
    # TEI's response metadata headers (router/src/lib.rs), so clients that read them still can.
    headers = {
        "x-compute-type": "gpu+optimized",
        "x-compute-time": elapsed_ms,
        "x-total-time": elapsed_ms,
        "x-compute-characters": str(sum(len(i) for i in inputs)),
    }
    return json_response(vectors, headers=headers)


async def health(request: web.Request) -> web.Response:
    reason = await request.app[SERVICE].unhealthy_reason()
    if reason is None:
        return web.Response(status=200)
    if reason == "unhealthy":
        return error_response(UNHEALTHY)  # TEI's exact body
    return error_response(ApiError(503, reason, ErrorType.UNHEALTHY))


async def info(request: web.Request) -> web.Response:
    return json_response(request.app[SERVICE].describe())


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


def bearer_matches(request: web.Request, expected: str) -> bool:
    """Constant-time comparison of the request's Bearer token with ``expected``."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())


async def shutdown(request: web.Request) -> web.Response:
    token = request.app[SETTINGS].admin_token
    if token is None or not bearer_matches(request, token.get_secret_value()):
        return web.Response(status=401)
    request.app[SHUTDOWN].set()
    return json_response(
        {"message": "Shutting down: new requests are refused and accepted work is finished."},
        status=202,
    )


async def openapi_spec(request: web.Request) -> web.Response:
    return json_response(build_openapi(request.app[SETTINGS]))


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=SWAGGER_UI_HTML, content_type="text/html")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/embed", embed)
    # TEI routes POST / and /invocations (SageMaker) to /embed for an embedding model.
    app.router.add_post("/", embed)
    app.router.add_post("/invocations", embed)
    app.router.add_get("/health", health)
    app.router.add_get("/", health)
    app.router.add_get("/ping", health)
    app.router.add_get("/info", info)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_spec)
    app.router.add_get("/docs", docs)
    if app[SETTINGS].admin_token is not None:
        app.router.add_post("/shutdown", shutdown)
