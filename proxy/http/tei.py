"""TEI's own routes: /embed (and POST /, /invocations), /health, /info, /metrics, plus the
proxy's /openapi.json, /docs and /shutdown. Handlers parse, call the service and render;
they know nothing of batching."""

from __future__ import annotations

import time

from aiohttp import web

from proxy.errors import ApiError, ErrorType
from proxy.http.common import bearer_matches, error_response, json_response
from proxy.http.docs import add_docs_routes
from proxy.http.keys import DRAINING, METRICS, SERVICE, SETTINGS, SHUTDOWN
from proxy.http.parsing import parse_embed_request, read_json
from proxy.http.pipeline import embed_request
from proxy.openapi import build_openapi


async def embed(request: web.Request) -> web.Response:
    started = time.perf_counter()
    body = await read_json(request)
    inputs, options = parse_embed_request(body, request.app[SETTINGS].max_client_batch_size)
    service = request.app[SERVICE]
    inputs, vectors = await embed_request(request, service, inputs, options)
    elapsed_ms = str(int((time.perf_counter() - started) * 1000))
    # TEI's response metadata headers (router/src/lib.rs), so clients that read them still can.
    headers = {
        "x-compute-time": elapsed_ms,
        "x-total-time": elapsed_ms,
        "x-compute-characters": str(sum(len(i) for i in inputs)),
    }
    # The upstream's own word (TEI's header, or `cpu` for the embedded model), never a claim.
    compute_type = service.upstream.compute_type
    if compute_type is not None:
        headers["x-compute-type"] = compute_type
    return json_response(vectors, headers=headers)


async def health(request: web.Request) -> web.Response:
    if request.app[DRAINING].is_set():
        return error_response(ApiError(503, "draining", ErrorType.UNHEALTHY))
    reason = await request.app[SERVICE].unhealthy_reason()
    if reason is None:
        return web.Response(status=200)
    # "unhealthy" gives TEI's exact body; other reasons say why (breaker, starting).
    return error_response(ApiError(503, reason, ErrorType.UNHEALTHY))


async def info(request: web.Request) -> web.Response:
    return json_response(request.app[SERVICE].describe())


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


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


def add_tei_routes(app: web.Application) -> None:
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
    add_docs_routes(app)  # /docs and its static files (proxy/http/docs.py)
    if app[SETTINGS].admin_token is not None:
        app.router.add_post("/shutdown", shutdown)
