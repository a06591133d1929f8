"""OpenTelemetry tracing, checked with the SDK's in-memory exporter: a server span per request
named `embeddings {model}` with gen_ai.* attributes, one client span per upstream call linked
to every request span it served, traceparent to the upstream and from the caller."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from proxy.tracing import build_tracing, tracing_requested
from tests.conftest import make_settings
from tests.tei_double import Fault, TeiDouble, TeiDoubleConfig

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind

MODEL = "test-double/tei"


@pytest.fixture
def tei_config() -> TeiDoubleConfig:
    return TeiDoubleConfig(delay_base_s=0.05)  # each call takes 50 ms: requests pile up


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced(
    aiohttp_client: Any, tei_url: str, exporter: InMemorySpanExporter
) -> TestClient[web.Request, web.Application]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # One call at a time: concurrent requests must share batches.
    settings = make_settings(upstream_url=tei_url, max_concurrent_batches=1)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(
        create_app(settings, tracer_provider=provider)
    )
    return client


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind]


async def test_upstream_call_spans_link_to_every_request_span_they_served(
    traced: TestClient[web.Request, web.Application],
    exporter: InMemorySpanExporter,
    tei_double: TeiDouble,
) -> None:
    async def call(i: int) -> str:
        resp = await traced.post("/embed", json={"inputs": [f"t{i}", f"u{i}"]})
        assert resp.status == 200
        return resp.headers["X-Request-ID"]

    request_ids = await asyncio.gather(*(call(i) for i in range(8)))
    spans = exporter.get_finished_spans()
    servers = by_kind(spans, SpanKind.SERVER)
    clients = by_kind(spans, SpanKind.CLIENT)
    assert len(servers) == 8
    assert len(clients) == len(tei_double.calls) < 8  # batched: fewer calls than requests
    assert {s.attributes["proxy.request_id"] for s in servers} == set(request_ids)

    server_ids = {s.context.span_id for s in servers}
    linked: set[int] = set()
    for span in clients:
        assert span.name == f"embeddings {MODEL}"
        assert span.parent is None  # its own trace; the requests are links, not a parent
        links = {link.context.span_id for link in span.links}
        assert links <= server_ids and len(links) == span.attributes["proxy.requests_served"]
        linked |= links
    assert linked == server_ids  # every request span is linked from a call that served it
    assert max(len(s.links) for s in clients) >= 2  # one call served several requests

    # Each call carried its own span's traceparent to the upstream.
    sent = sorted(c.traceparent or "" for c in tei_double.calls)
    expected = sorted(
        f"00-{s.context.trace_id:032x}-{s.context.span_id:016x}-{s.context.trace_flags:02x}"
        for s in clients
    )
    assert sent == expected

    for span in servers:
        attrs = span.attributes
        assert span.name == f"embeddings {MODEL}"
        assert attrs["gen_ai.operation.name"] == "embeddings"
        assert attrs["gen_ai.provider.name"] == "tei"
        assert attrs["gen_ai.request.model"] == MODEL
        assert attrs["gen_ai.embeddings.dimension.count"] == 16
        assert attrs["gen_ai.usage.input_tokens"] == 2
        assert attrs["http.route"] == "/embed" and attrs["http.response.status_code"] == 200
        assert attrs["proxy.queue_wait_s"] >= 0
        assert 2 <= attrs["proxy.batch_size"] <= 16 and attrs["proxy.upstream_calls"] >= 1


async def test_an_incoming_traceparent_and_request_id_are_continued(
    traced: TestClient[web.Request, web.Application], exporter: InMemorySpanExporter
) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    resp = await traced.post(
        "/v1/embeddings",
        json={"input": "x", "model": "my-model", "encoding_format": "base64"},
        headers={"traceparent": f"00-{trace_id}-{parent_id}-01", "X-Request-ID": "caller-7"},
    )
    assert resp.status == 200
    assert resp.headers["X-Request-ID"] == "caller-7"
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert format(server.context.trace_id, "032x") == trace_id
    assert server.parent is not None and format(server.parent.span_id, "016x") == parent_id
    assert server.name == "embeddings my-model"  # the model the caller asked for
    assert server.attributes["proxy.request_id"] == "caller-7"
    assert server.attributes["gen_ai.response.model"] == MODEL
    assert server.attributes["gen_ai.request.encoding_formats"] == ("base64",)


async def test_failed_requests_end_their_span_as_errors(
    traced: TestClient[web.Request, web.Application],
    exporter: InMemorySpanExporter,
    tei_double: TeiDouble,
) -> None:
    tei_double.fault = Fault.ERROR_500
    resp = await traced.post("/embed", json={"inputs": "x"})
    assert resp.status == 500
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    assert server.attributes["http.response.status_code"] == 500
    assert server.status.is_ok is False
    assert all(s.status.is_ok is False for s in by_kind(spans, SpanKind.CLIENT))
    bad = await traced.post("/embed", json={"inputs": ""})  # refused before any call
    assert bad.status == 400
    assert len(by_kind(exporter.get_finished_spans(), SpanKind.SERVER)) == 2


def test_tracing_is_off_unless_an_otlp_endpoint_is_set() -> None:
    assert not tracing_requested({})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318"})
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert not tracing_requested({**on, "OTEL_SDK_DISABLED": "true"})
    assert not tracing_requested({**on, "OTEL_TRACES_EXPORTER": "none"})
    assert build_tracing(environ={}) is None


def test_without_the_otel_extra_the_proxy_runs_untraced(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # None in sys.modules makes `import` fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert build_tracing(environ=env) is None
    assert "pip install '.[otel]'" in caplog.text
