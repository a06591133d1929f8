"""OpenTelemetry tracing, optional: on when the standard OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set and the ``otel`` extra is installed. Without
either the proxy runs unchanged: nothing here imports opentelemetry until tracing is on.

* Each POST request gets a SERVER span, continuing the caller's ``traceparent`` when it sent
  one. An embedding request's span is named as the GenAI conventions say,
  ``embeddings {model}``, with ``gen_ai.*`` attributes, the request id, and what the batcher
  did for it: the longest queue wait of its items, the largest batch that carried them, the
  number of upstream calls, and cache hits.
* Each upstream call gets a CLIENT span of its own trace, with a SPAN LINK to every request
  span it served (a batch has many parents, which a parent-child tree cannot say), and the
  call carries that span's ``traceparent`` to the upstream.

The app owns its TracerProvider (none is installed globally); tests hand one in with the
SDK's in-memory exporter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, SpanContext, TracerProvider

log = logging.getLogger(__name__)

INSTRUMENTATION = "embedding-batch-proxy"
DEFAULT_SERVICE_NAME = "embedding-batch-proxy"

# The traceparent of the upstream call in progress; the HTTP upstreams send it. A context
# variable, so the value belongs to the batch task that makes the call and to nothing else.
UPSTREAM_TRACEPARENT: ContextVar[Mapping[str, str] | None] = ContextVar(
    "proxy_upstream_traceparent", default=None
)


def outgoing_headers() -> Mapping[str, str]:
    """Headers an upstream call adds to carry the trace (empty when tracing is off)."""
    return UPSTREAM_TRACEPARENT.get() or {}


def tracing_requested(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


class RequestSpan:
    """One request's server span, and what its items met in the batcher."""

    __slots__ = ("batch_size", "batches", "cache_hits", "queue_wait_s", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.queue_wait_s: float | None = None
        self.batch_size = 0
        self.batches = 0
        self.cache_hits: int | None = None

    @property
    def context(self) -> SpanContext:
        return self.span.get_span_context()

    @property
    def trace_id(self) -> str:
        return format(self.context.trace_id, "032x")

    def note_batch(self, queue_wait_s: float, size: int) -> None:
        """An item of this request was taken into a batch of ``size`` after waiting."""
        if self.queue_wait_s is None or queue_wait_s > self.queue_wait_s:
            self.queue_wait_s = queue_wait_s
        self.batch_size = max(self.batch_size, size)

    def note_call(self) -> None:
        self.batches += 1

    def name_embeddings(self, model: str) -> None:
        self.span.update_name(f"embeddings {model}")

    def finish(self, status: int, attributes: Mapping[str, Any]) -> None:
        from opentelemetry.trace import Status, StatusCode

        span = self.span
        span.set_attribute("http.response.status_code", status)
        for key, value in attributes.items():
            if value is not None:
                span.set_attribute(key, value)
        if self.queue_wait_s is not None:
            span.set_attribute("proxy.queue_wait_s", self.queue_wait_s)
        if self.batches:
            span.set_attribute("proxy.batch_size", self.batch_size)
            span.set_attribute("proxy.upstream_calls", self.batches)
        if self.cache_hits is not None:
            span.set_attribute("proxy.cache_hits", self.cache_hits)
        if status >= 500:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class Tracing:
    """The app's tracer: request spans, upstream call spans with links, propagation."""

    def __init__(self, provider: TracerProvider, *, owned: bool = False) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._owned = owned
        self._tracer = provider.get_tracer(INSTRUMENTATION)
        self._propagator = TraceContextTextMapPropagator()

    def start_request(
        self, headers: Mapping[str, str], method: str, route: str, request_id: str
    ) -> RequestSpan:
        """A server span for one request, continuing the caller's trace when it sent one."""
        from opentelemetry.trace import SpanKind

        parent = self._propagator.extract(headers)
        span = self._tracer.start_span(
            f"{method} {route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "http.route": route,
                "proxy.request_id": request_id,
            },
        )
        return RequestSpan(span)

    @contextmanager
    def upstream_call(
        self,
        model: str,
        provider_name: str,
        served: Sequence[RequestSpan],
        size: int,
    ) -> Iterator[Span]:
        """A client span around one upstream call, linked to each request span it serves;
        within it, :func:`outgoing_headers` gives the call's ``traceparent``."""
        from opentelemetry import context as otel_context
        from opentelemetry.trace import Link, SpanKind, set_span_in_context

        links = [Link(r.context) for r in served]
        span = self._tracer.start_span(
            f"embeddings {model}",
            context=otel_context.Context(),  # a root: a batch has many parents, as links
            kind=SpanKind.CLIENT,
            links=links,
            attributes={
                "gen_ai.operation.name": "embeddings",
                "gen_ai.provider.name": provider_name,
                "gen_ai.request.model": model,
                "proxy.batch_size": size,
                "proxy.requests_served": len(links),
            },
        )
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=set_span_in_context(span))
        token = UPSTREAM_TRACEPARENT.set(carrier)
        try:
            yield span
        except BaseException as exc:
            from opentelemetry.trace import Status, StatusCode

            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
            raise
        finally:
            UPSTREAM_TRACEPARENT.reset(token)
            span.end()

    def shutdown(self) -> None:
        """Flush and stop a provider this object made (one handed in belongs to its owner)."""
        if self._owned:
            shutdown = getattr(self._provider, "shutdown", None)
            if callable(shutdown):
                shutdown()


def build_tracing(
    provider: TracerProvider | None = None, environ: Mapping[str, str] | None = None
) -> Tracing | None:
    """The app's tracing: around ``provider`` when given (tests), else from the standard
    OTEL_* variables; None when tracing is off or the ``otel`` extra is missing."""
    if provider is not None:
        return Tracing(provider)
    env = os.environ if environ is None else environ
    if not tracing_requested(env):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed (%s): "
            "tracing is off; install it with pip install '.[otel]'",
            exc.name,
        )
        return None
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours is only
    # the default name. The exporter reads the endpoint, headers and timeout itself.
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
    sdk_provider = SdkTracerProvider(resource=Resource.create(attributes))
    sdk_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("tracing on: OTLP/HTTP export to %s", _endpoint(env))
    return Tracing(sdk_provider, owned=True)


def _endpoint(env: Mapping[str, str]) -> str:
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )
