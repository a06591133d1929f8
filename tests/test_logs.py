"""LOG_FORMAT=json: one JSON object a line, carrying the request id, model and trace id of the
request it was logged in. Checked on a real proxy process that exports its spans over OTLP
to a collector stand-in on loopback."""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.logs import REQUEST_CONTEXT, JsonFormatter
from proxy.observe import Observation
from tests.processes import LogLines, start_double, start_proxy_process, stop, wait_healthy

pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="otel extra missing")


def record(message: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord("proxy.x", logging.WARNING, __file__, 1, message, None, exc_info)


def test_json_lines_carry_the_request_they_were_logged_in() -> None:
    formatter = JsonFormatter(worker=1)
    outside = json.loads(formatter.format(record("outside")))
    assert outside["message"] == "outside" and outside["level"] == "warning"
    assert outside["worker"] == 1 and "request_id" not in outside
    obs = Observation("rid-1", "/embed", 0.0, model="default")
    token = REQUEST_CONTEXT.set(obs)
    try:
        inside = json.loads(formatter.format(record("inside", exc=True)))
    finally:
        REQUEST_CONTEXT.reset(token)
    assert inside["request_id"] == "rid-1" and inside["model"] == "default"
    assert "trace_id" not in inside  # tracing off
    assert "RuntimeError: boom" in inside["exception"]


async def test_a_json_access_line_names_request_model_and_trace(
    aiohttp_server: Any, unused_tcp_port: int
) -> None:
    exports: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        exports.append(await request.read())
        return web.Response(content_type="application/x-protobuf", body=b"")

    collector = web.Application()
    collector.router.add_post("/v1/traces", collect)
    otlp = await aiohttp_server(collector)
    _, upstream = await start_double(aiohttp_server)
    url = f"http://127.0.0.1:{unused_tcp_port}"
    proc = await start_proxy_process(
        "--upstream-url", upstream, "--port", str(unused_tcp_port),
        LOG_FORMAT="json", ACCESS_LOG="true",
        OTEL_EXPORTER_OTLP_ENDPOINT=str(otlp.make_url("")).rstrip("/"),
        OTEL_BSP_SCHEDULE_DELAY="100", OTEL_SERVICE_NAME="proxy-under-test",
    )  # fmt: skip
    try:
        await wait_healthy(url, proc)
        log = LogLines(proc)
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        async with aiohttp.ClientSession() as session:
            async with session.post(
                url + "/embed",
                json={"inputs": "logged"},
                headers={
                    "X-Request-ID": "json-log-1",
                    "traceparent": f"00-{trace_id}-b7ad6b7169203331-01",
                },
            ) as resp:
                assert resp.status == 200
        await log.count('"json-log-1"', 1)
        lines = [json.loads(line) for line in log.lines if line.startswith("{")]
        assert len(lines) == len([x for x in log.lines if x.strip()])  # every line is JSON
        (access,) = [x for x in lines if x.get("request_id") == "json-log-1"]
        assert access["logger"] == "proxy.access" and access["model"] == "test-double/tei"
        assert access["trace_id"] == trace_id  # the caller's trace, continued
        assert access["status"] == 200 and access["path"] == "/embed"
        assert access["method"] == "POST" and access["duration_ms"] > 0
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
        # The spans went out over OTLP/HTTP, with the trace id in the protobuf body.
        assert exports and any(bytes.fromhex(trace_id) in body for body in exports)
    finally:
        await stop(proc)
