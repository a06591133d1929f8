"""ACCESS_LOG: off by default; one line per request with a request id, echoed in
X-Request-ID; client-chosen text (paths) escaped so it cannot inject log lines."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from proxy.http.common import escape_for_log
from tests.conftest import ProxyFactory

ACCESS = "proxy.access"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ACCESS]


async def test_access_log_is_off_by_default(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    client = await start_proxy()
    resp = await client.post("/embed", json={"inputs": "quiet"})
    assert resp.status == 200
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-ID"])  # ids even so
    assert access_lines(caplog) == []


async def test_access_log_line_carries_the_request_id(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    client = await start_proxy(access_log=True)
    # A sane incoming id is kept and echoed.
    resp = await client.post(
        "/embed", json={"inputs": "hello"}, headers={"X-Request-ID": "lb-1234.abc_DEF"}
    )
    assert resp.status == 200
    assert resp.headers["X-Request-ID"] == "lb-1234.abc_DEF"
    # An insane one (spaces, quotes, too long) is replaced by a fresh id.
    for bad in ("two words", 'quote"d', "x" * 129):
        resp = await client.get("/health", headers={"X-Request-ID": bad})
        assert resp.status == 200
        fresh = resp.headers["X-Request-ID"]
        assert fresh != bad and re.fullmatch(r"[0-9a-f]{32}", fresh)
    lines = access_lines(caplog)
    assert len(lines) == 4, lines
    assert re.fullmatch(r'lb-1234\.abc_DEF 127\.0\.0\.1 "POST /embed" 200 \d+ [\d.]+ms', lines[0])
    assert lines[3].startswith(fresh + ' 127.0.0.1 "GET /health" 200 ')


async def test_access_log_escapes_the_path(
    start_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    client = await start_proxy(access_log=True)
    # Raw bytes on the wire, as a hostile client sends them: an encoded newline, a quote and
    # a backslash (aiohttp's parser refuses raw control characters itself, with 400).
    target = b'/predict/x%0a%0d2020-01-01%20INFO%20forged"line\\'
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 404")
    writer.close()
    (line,) = access_lines(caplog)
    assert "\n" not in line and "\r" not in line
    # The path appears as sent (%-escapes kept); its quote and backslash are escaped, so the
    # quoted field ends where the proxy ended it.
    assert '"GET /predict/x%0a%0d2020-01-01%20INFO%20forged\\x22line\\x5c" 404' in line


def test_log_escaping_covers_raw_control_characters() -> None:
    # Whatever reaches the log (a path, a method, an address) cannot break the line.
    raw = '/a\nb\r\x1b[31m\x00\x7f"\\é\u2028'
    escaped = escape_for_log(raw)
    assert escaped == "/a\\x0ab\\x0d\\x1b[31m\\x00\\x7f\\x22\\x5c\\xe9\\u2028"
    assert escaped.isascii() and escaped.isprintable()
