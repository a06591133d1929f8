"""GET /docs: Swagger UI from the package itself, never from a CDN, under a strict
Content-Security-Policy, so an API key typed into the page goes nowhere but this proxy and
the page works offline."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.http.docs import ASSETS, STATIC_DIR
from proxy.http.status import STATUS_ASSETS
from tests.conftest import ProxyFactory

ROOT = Path(__file__).resolve().parent.parent

KEY = "docs-test-api-key-0123456789"
EXPECTED_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


class References(HTMLParser):
    """Every URL the page makes the browser load, and the text of any inline script."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str]] = []  # (tag, url)
        self.inline_scripts: list[str] = []
        self.inline_handlers: list[str] = []
        self._in_script_without_src = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.inline_handlers += [k for k in values if k.startswith("on")]
        for attr in ("src", "href"):
            if attr in values and not (tag == "a" and attr == "href"):
                self.urls.append((tag, values[attr]))
        if tag == "style":
            self.inline_scripts.append("<style>")
        self._in_script_without_src = tag == "script" and "src" not in values

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script_without_src = False

    def handle_data(self, data: str) -> None:
        if self._in_script_without_src and data.strip():
            self.inline_scripts.append(data)


async def page(client: TestClient[web.Request, web.Application]) -> tuple[Any, References]:
    resp = await client.get("/docs")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    refs = References()
    refs.feed(await resp.text())
    return resp, refs


def directives(csp: str) -> dict[str, list[str]]:
    parsed: dict[str, list[str]] = {}
    for part in csp.split(";"):
        words = part.split()
        if words:
            parsed[words[0].lower()] = words[1:]
    return parsed


async def test_docs_page_loads_only_same_origin_assets_and_no_inline_script(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy()
    _, refs = await page(client)
    assert refs.urls, "the page loads nothing"
    for tag, url in refs.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"<{tag}> loads {url} from elsewhere"
        assert not url.startswith("//"), url
    tags = {tag for tag, _ in refs.urls}
    assert {"script", "link"} <= tags
    assert refs.inline_scripts == [] and refs.inline_handlers == []


async def test_every_referenced_asset_is_served_with_its_content_type(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy()
    _, refs = await page(client)
    for _, url in refs.urls:
        path = urlsplit(urljoin("/docs", url)).path
        resp = await client.get(path)
        assert resp.status == 200, path
        body = await resp.read()
        assert len(body) > 0, path
        suffix = path[path.rfind(".") :]
        assert resp.content_type == EXPECTED_TYPES[suffix], (path, resp.content_type)
        assert resp.headers.get("X-Content-Type-Options") == "nosniff", path
    paths = [urlsplit(urljoin("/docs", u)).path for _, u in refs.urls]
    bundle = next(p for p in paths if p.endswith("swagger-ui-bundle.js"))
    text = await (await client.get(bundle)).text()
    assert "SwaggerUIBundle" in text and len(text) > 500_000  # the real bundle, not a stub


async def test_docs_page_starts_swagger_ui_on_this_proxys_spec_without_outside_calls(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy()
    _, refs = await page(client)
    scripts = [urljoin("/docs", u) for tag, u in refs.urls if tag == "script"]
    init = [await (await client.get(s)).text() for s in scripts if "bundle" not in s]
    assert len(init) == 1, scripts
    assert "SwaggerUIBundle(" in init[0]
    # The spec URL is this proxy's own, and the default validator (which sends the spec to
    # validator.swagger.io) is off.
    assert "openapi.json" in init[0]
    assert 'validatorUrl: "none"' in init[0]
    assert "http://" not in init[0] and "https://" not in init[0]


async def test_docs_csp_allows_this_origin_only(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    resp, _ = await page(client)
    csp = resp.headers.get("Content-Security-Policy")
    assert csp, "no Content-Security-Policy on /docs"
    rules = directives(csp)
    assert rules["default-src"] == ["'self'"]
    assert rules["script-src"] == ["'self'"]  # no inline script, no eval
    assert rules["connect-src"] == ["'self'"]  # the key typed in goes to this proxy only
    assert rules["object-src"] == ["'none'"]
    assert rules["frame-ancestors"] == ["'none'"]
    for name, sources in rules.items():
        for source in sources:
            # 'self', 'none' and data: images (swagger-ui.css draws its icons with data: URLs)
            assert source in {"'self'", "'none'"} or (name == "img-src" and source == "data:"), (
                f"{name} allows {source}"
            )
    assert resp.headers.get("X-Content-Type-Options") == "nosniff"
    assert resp.headers.get("Referrer-Policy") == "no-referrer"


async def test_docs_and_its_assets_are_public_when_an_api_key_is_set(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy(api_key=KEY)
    assert (await client.get("/info")).status == 401
    _, refs = await page(client)
    for _, url in refs.urls:
        path = urlsplit(urljoin("/docs", url)).path
        assert (await client.get(path)).status == 200, path
    # Public means the page and its files only, not anything under the prefix.
    assert (await client.get("/docs/static/../info")).status in {401, 404}


async def test_unknown_asset_is_404(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    for name in ("nope.js", "..%2Fsettings.py", "%2e%2e/__init__.py"):
        assert (await client.get(f"/docs/static/{name}")).status == 404, name


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed (apt-get install chromium)")


async def test_docs_renders_in_headless_chromium_without_csp_violations(
    start_proxy: ProxyFactory, tmp_path: Any
) -> None:
    """A real browser: the page renders the spec's operations from the packaged files, with
    background networking off, and the CSP blocks nothing the page needs."""
    browser = chromium()
    client = await start_proxy()
    url = str(client.make_url("/docs"))
    proc = await asyncio.create_subprocess_exec(
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={tmp_path}",
        "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", "--dump-dom", url,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    dom, log = out.decode(errors="replace"), err.decode(errors="replace")
    assert proc.returncode == 0, log[-2000:]
    assert 'class="swagger-ui' in dom, dom[:2000]
    assert "opblock" in dom and "/embed" in dom, dom[:2000]  # the operations rendered
    assert "Content Security Policy" not in log, log[-3000:]


# -- the vendored files ----------------------------------------------------------------------


def test_vendored_swagger_ui_files_are_the_npm_releases_unchanged() -> None:
    """SHA256SUMS was written when the files were copied from the npm tarball (SOURCE.md):
    an edited, truncated or missing file shows here, before a browser shows a blank page."""
    folder = STATIC_DIR / "swagger-ui"
    listed: set[str] = set()
    for line in (folder / "SHA256SUMS").read_text("utf-8").splitlines():
        digest, name = line.split()
        listed.add(name)
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert {"LICENSE", "NOTICE"} <= listed  # Apache-2.0 wants both shipped with the files
    served = {Path(relative).name for relative, _ in ASSETS.values() if "/" in relative}
    assert served <= listed
    assert "5.35.0" in (folder / "SOURCE.md").read_text("utf-8")


def test_package_build_ships_the_docs_files(tmp_path: Path) -> None:
    """`pip install .` (the Docker image) must carry the static files, or /docs is blank.
    build_py is the step that copies packages and their data into a wheel."""
    source, built = tmp_path / "src", tmp_path / "lib"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "proxy", source / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py",
         "--build-lib", str(built)],
        cwd=source, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    names = {p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file()}
    assert "proxy/http/docs.py" in names  # the build itself worked
    for relative, _ in [*ASSETS.values(), *STATUS_ASSETS.values()]:  # /docs and /status
        assert f"proxy/http/static/{relative}" in names, relative
    for name in ("LICENSE", "NOTICE", "swagger-ui-bundle.js.LICENSE.txt"):
        assert f"proxy/http/static/swagger-ui/{name}" in names, name
