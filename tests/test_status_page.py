"""GET /status and /status.json: a live page from the package under a strict CSP, guarded like
the data routes when API_KEY is set; loaded in a real headless Chromium under load."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

from proxy.http.keys import REGISTRY
from proxy.http.status import STATUS_ASSETS, quantile
from tests.conftest import ProxyFactory
from tests.test_docs_ui import References, directives

KEY = "status-test-api-key-0123456789"
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def test_quantile_interpolates_within_buckets_as_prometheus_does() -> None:
    # 10 observations in (0, 1], 10 in (1, 2]: the median is the top of the first bucket.
    buckets = [(1.0, 10.0), (2.0, 20.0), (math.inf, 20.0)]
    assert quantile(0.5, buckets) == pytest.approx(1.0)
    assert quantile(0.75, buckets) == pytest.approx(1.5)
    assert quantile(0.99, [(1.0, 0.0), (math.inf, 5.0)]) == 1.0  # past the last bound
    assert quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None


async def test_status_json_counts_requests_per_model_in_a_window(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy()
    first = await (await client.get("/status.json")).json()
    (model,) = first["models"]
    assert model["model"] == "test-double/tei" and model["version"] == "1"
    assert model["requests_per_s"] is None  # one snapshot: no rate yet
    assert model["cache_hit_ratio"] is None  # no window yet
    assert model["ab_split"] == {"1": 1.0}  # the one version has all the traffic
    for i in range(5):
        assert (await client.post("/embed", json={"inputs": [f"a{i}", f"b{i}"]})).status == 200
    await asyncio.sleep(0.05)
    second = await (await client.get("/status.json")).json()
    (model,) = second["models"]
    window = second["window_s"]
    assert window > 0
    assert model["requests_per_s"] == pytest.approx(5 / window, rel=0.01)
    assert model["latency_p50_ms"] > 0 and model["latency_p99_ms"] >= model["latency_p50_ms"]
    assert model["batch_size"]["batches"] >= 5
    assert sum(b["count"] for b in model["batch_size"]["buckets"]) == model["batch_size"]["batches"]
    assert model["concurrency"]["limit"] == 2 and model["breaker"] == "closed"
    assert model["queue_depth"] == 0 and model["in_flight"] == 0
    # status.json itself is not a model request.
    third = await (await client.get("/status.json")).json()
    assert third["models"][0]["requests_per_s"] < model["requests_per_s"]


async def test_status_json_shows_the_cache_hit_ratio_over_its_window(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy()
    await client.get("/status.json")
    for i in range(4):
        await client.post("/embed", json={"inputs": [f"new {i}", f"other {i}"]})
    (model,) = (await (await client.get("/status.json")).json())["models"]
    assert model["cache_hit_ratio"] == 0.0
    for i in range(4):  # the same texts again: 8 hits of 16 items in the window
        await client.post("/embed", json={"inputs": [f"new {i}", f"other {i}"]})
    (model,) = (await (await client.get("/status.json")).json())["models"]
    assert model["cache_hit_ratio"] == 0.5
    off = await start_proxy(cache_size_mb=0)
    await off.get("/status.json")
    await off.post("/embed", json={"inputs": "x"})
    (model,) = (await (await off.get("/status.json")).json())["models"]
    assert model["cache_hit_ratio"] is None


async def test_status_page_is_public_but_its_data_needs_the_key(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy(api_key=KEY)
    assert (await client.get("/status.json")).status == 401
    assert (await client.get("/status.json", headers={"Authorization": "Bearer no"})).status == 401
    ok = await client.get("/status.json", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status == 200 and (await ok.json())["models"]
    page = await client.get("/status")
    assert page.status == 200
    html = await page.text()
    assert 'data-auth="required"' in html and KEY not in html
    for name in STATUS_ASSETS:
        assert (await client.get(f"/status/static/{name}")).status == 200
    # Public means the listed files only: anything else under the prefix still needs the key.
    assert (await client.get("/status/static/nope.js")).status == 401
    open_client = await start_proxy()
    assert 'data-auth="none"' in await (await open_client.get("/status")).text()


async def test_status_page_loads_only_its_own_files_under_a_strict_csp(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy()
    resp = await client.get("/status")
    refs = References()
    refs.feed(await resp.text())
    assert refs.inline_scripts == [] and refs.inline_handlers == []
    assert refs.urls
    for tag, url in refs.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"<{tag}> loads {url} from elsewhere"
        asset = await client.get(urlsplit(urljoin("/status", url)).path)
        assert asset.status == 200, url
        assert asset.headers["X-Content-Type-Options"] == "nosniff"
    rules = directives(resp.headers["Content-Security-Policy"])
    assert rules["script-src"] == ["'self'"] and rules["connect-src"] == ["'self'"]
    assert rules["default-src"] == ["'self'"] and rules["frame-ancestors"] == ["'none'"]
    script = await (await client.get("/status/static/status.js")).text()
    assert "http://" not in script.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in script and "innerHTML" not in script


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")


async def _load(url: str, stop: asyncio.Event, sent: list[int]) -> None:
    """Closed-loop clients until ``stop`` (or 60 s, whichever is first)."""
    import aiohttp

    deadline = time.monotonic() + 60

    async def client(session: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            async with session.post(
                url + "/embed",
                json={"inputs": f"load {n} {i}"},
                headers={"Authorization": f"Bearer {KEY}"},
            ) as resp:
                assert resp.status == 200
                await resp.read()
            sent[0] += 1
            i += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session, n) for n in range(8)))


async def test_status_page_in_headless_chromium_shows_live_throughput(
    start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The page asks for the key, then shows non-zero requests/s under load and updates at
    least every 2 s, with no console error (a CSP violation or a failed load would be one)."""
    async_api = pytest.importorskip("playwright.async_api")
    browser_path = chromium_path()
    client = await start_proxy(api_key=KEY)
    base = str(client.make_url("")).rstrip("/")
    stop = asyncio.Event()
    sent = [0]
    load = asyncio.ensure_future(_load(base, stop, sent))
    problems: list[str] = []
    try:
        async with async_api.async_playwright() as playwright:
            browser = await playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"),  # a fresh user-data-dir
                executable_path=browser_path,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 900, "height": 640},
            )
            try:
                page = await browser.new_page()
                page.on(
                    "console",
                    lambda m: (
                        problems.append(f"console {m.type}: {m.text}")
                        if m.type in ("error", "warning")
                        else None
                    ),
                )
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
                await page.goto(base + "/status")
                # A key is needed: the page asks for it instead of failing a fetch.
                await page.wait_for_selector("#key-form:not([hidden])", timeout=10_000)
                assert await page.locator("#key-form").is_visible()
                await page.fill("#key", KEY)
                await page.click("#key-form button")
                await page.wait_for_selector("#key-form", state="hidden", timeout=5_000)
                rate = page.locator('[data-model="test-double/tei"] [data-field="requests_per_s"]')
                await page.wait_for_function(
                    """() => {
                        const cell = document.querySelector(
                            '[data-model="test-double/tei"] [data-field="requests_per_s"]');
                        return cell !== null && parseFloat(cell.textContent) > 0;
                    }""",
                    timeout=15_000,
                )
                assert float(await rate.text_content() or "0") > 0
                assert sent[0] > 0
                # It keeps updating: a new server timestamp within 2 s.
                updated = page.locator("#updated")
                before = await updated.get_attribute("datetime")
                await page.wait_for_function(
                    "(before) => document.querySelector('#updated').dateTime !== before",
                    arg=before,
                    timeout=2_000,
                )
                p50 = await page.locator('[data-field="latency_p50_ms"]').text_content()
                assert p50 is not None and p50.endswith(" ms")
                bars = await page.locator('[data-model="test-double/tei"] svg rect.bar').count()
                assert bars >= 1  # the batch-size distribution is drawn
                assert await page.locator("#state").text_content() == "live"
                shot = tmp_path / "status.png"
                await page.screenshot(path=str(shot))
                assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                # `SAVE_STATUS_SCREENSHOT=docs/status.png` keeps it (the README's picture).
                keep = os.environ.get("SAVE_STATUS_SCREENSHOT")
                if keep:
                    shutil.copy(shot, ROOT / keep)
            finally:
                await browser.close()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(load, 30)
    assert problems == []


async def test_the_versions_adaptive_limiter_shows_its_state(start_proxy: ProxyFactory) -> None:
    """Each version's service has its own limiter (DISPATCH=adaptive, the default): the page
    shows its live limit and state instead of the fixed bound, and follows it when it moves."""
    client = await start_proxy()
    service = client.app[REGISTRY].service()
    limiter = service.limiter
    assert limiter is not None
    (model,) = (await (await client.get("/status.json")).json())["models"]
    adaptive = model["concurrency"]["adaptive"]
    assert adaptive is not None and adaptive["limit"] == limiter.limit
    assert model["concurrency"]["limit"] == limiter.limit and "gradient" in adaptive
    assert adaptive["ceiling"] == service.batcher.config.max_concurrent_batches
    limiter.limiter.set_ceiling(1)  # the limit follows the ceiling down
    (model,) = (await (await client.get("/status.json")).json())["models"]
    assert model["concurrency"]["limit"] == 1 == model["concurrency"]["adaptive"]["limit"]


async def test_a_timer_version_shows_its_fixed_bound(start_proxy: ProxyFactory) -> None:
    client = await start_proxy(dispatch="timer")
    assert client.app[REGISTRY].service().limiter is None
    (model,) = (await (await client.get("/status.json")).json())["models"]
    assert model["concurrency"]["adaptive"] is None
    assert model["concurrency"]["limit"] == 16  # the double's 512 permits / 32 items
