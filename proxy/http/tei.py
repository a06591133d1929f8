"""TEI's own routes: /embed (and POST /, /invocations), /health, /info, /metrics, plus the
proxy's /openapi.json, /docs and /shutdown. Handlers parse, call the registry and render;
they know nothing of batching.

A model is chosen by the X-Model header, or by serving the same routes under
``/models/{name}/`` (and ``/models/{name}`` itself), so a client that only takes a base URL,
such as huggingface_hub's ``InferenceClient(model=URL)``, can pick one."""

from __future__ import annotations

import time

from aiohttp import web

from proxy.context import context_of
from proxy.errors import ApiError, ErrorType
from proxy.http.common import bearer_matches, error_response, json_response, vectors_json
from proxy.http.docs import add_docs_routes
from proxy.http.keys import DRAINING, METRICS, REGISTRY, SETTINGS, SHUTDOWN
from proxy.http.parsing import parse_embed_request, read_json
from proxy.http.pipeline import embed_request
from proxy.openapi import build_openapi


async def embed(request: web.Request) -> web.Response:
    started = time.perf_counter()
    # The parsed body is not kept in this frame, which lives as long as the request waits.
    inputs, options = parse_embed_request(
        await read_json(request), request.app[SETTINGS].max_client_batch_size
    )
    version, inputs, vectors = await embed_request(request, inputs, options)
    elapsed_ms = str(int((time.perf_counter() - started) * 1000))
    # TEI's response metadata headers (router/src/lib.rs), so clients that read them still can.
    headers = {
        "x-compute-time": elapsed_ms,
        "x-total-time": elapsed_ms,
        "x-compute-characters": str(sum(len(i) for i in inputs)),
    }
    # The upstream's own word (TEI's header, or `cpu` for the embedded model), never a claim.
    compute_type = version.service.upstream.compute_type
    if compute_type is not None:
        headers["x-compute-type"] = compute_type
    return web.Response(
        body=vectors_json(vectors), content_type="application/json", headers=headers
    )


async def health(request: web.Request) -> web.Response:
    if request.app[DRAINING].is_set():
        return error_response(ApiError(503, "draining", ErrorType.UNHEALTHY))
    reason = await request.app[REGISTRY].unhealthy_reason(context_of(request))
    if reason is None:
        return web.Response(status=200)
    # "unhealthy" gives TEI's exact body; other reasons say why (breaker, starting).
    return error_response(ApiError(503, reason, ErrorType.UNHEALTHY))


async def info(request: web.Request) -> web.Response:
    return json_response(request.app[REGISTRY].info(context_of(request)))


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


# `{name}` in a path: a model name (one `/` allowed, as in org/model), maybe `@version`. Any
# text matches, so an unknown name gets the registry's 404 body, not the router's.
MODEL_PREFIX = r"/models/{name:(?s:.+)}"


def add_tei_routes(app: web.Application) -> None:
    # Under the prefix first: the bare `/models/{name}` must not swallow `.../embed`.
    for prefix in ("", MODEL_PREFIX):
        app.router.add_post(prefix + "/embed", embed)
        # TEI routes POST / and /invocations (SageMaker) to /embed for an embedding model.
        app.router.add_post(prefix + "/", embed)
        app.router.add_post(prefix + "/invocations", embed)
        app.router.add_get(prefix + "/health", health)
        app.router.add_get(prefix + "/", health)
        app.router.add_get(prefix + "/ping", health)
        app.router.add_get(prefix + "/info", info)
    # huggingface_hub's InferenceClient(model=URL) posts to the URL itself.
    app.router.add_post(MODEL_PREFIX, embed)
    app.router.add_get(MODEL_PREFIX, health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_spec)
    add_docs_routes(app)  # /docs and its static files (proxy/http/docs.py)
    if app[SETTINGS].admin_token is not None:
        app.router.add_post("/shutdown", shutdown)
