"""GET /docs: a Swagger UI page for /openapi.json, served entirely from this package.

The page once loaded swagger-ui from a CDN with no integrity check: whatever that CDN served
could read the API key typed into the page, and the page was blank offline. Now every file
comes from ``static/`` (swagger-ui-dist, vendored unchanged; see static/swagger-ui/SOURCE.md)
and a Content-Security-Policy lets the page load and call this origin only.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiohttp import web

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSET_PREFIX = "/docs/static"
ASSET_ROUTE = ASSET_PREFIX + "/{name}"

# URL name -> (file under static/, content type). A fixed table rather than a directory
# listing: nothing else under static/ is reachable, and each type is stated, not guessed.
ASSETS: dict[str, tuple[str, str]] = {
    "swagger-ui-bundle.js": ("swagger-ui/swagger-ui-bundle.js", "text/javascript"),
    "swagger-ui.css": ("swagger-ui/swagger-ui.css", "text/css"),
    "favicon-32x32.png": ("swagger-ui/favicon-32x32.png", "image/png"),
    "docs.js": ("docs.js", "text/javascript"),
}

# The page and its files are documentation: public even when API_KEY is set (the key is
# typed into the page). Exact paths, so nothing else under the prefix becomes public.
PUBLIC_DOCS_ROUTES = frozenset(
    {("GET", "/docs")} | {("GET", f"{ASSET_PREFIX}/{name}") for name in ASSETS}
)

# data: images only because swagger-ui.css draws its icons with data: URLs. No inline
# script and no eval; connect-src 'self' keeps a typed-in key on this origin.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])  # fmt: skip

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# Relative URLs resolve against /docs, so the page also works behind a path prefix.
_STATIC = ASSET_PREFIX.lstrip("/")
DOCS_HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Embedding batch proxy API</title>
<link rel="icon" type="image/png" href="{_STATIC}/favicon-32x32.png">
<link rel="stylesheet" href="{_STATIC}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{_STATIC}/swagger-ui-bundle.js"></script>
<script src="{_STATIC}/docs.js"></script>
</body>
</html>
"""


async def docs(request: web.Request) -> web.Response:
    return web.Response(
        text=DOCS_HTML,
        content_type="text/html",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


async def docs_asset(request: web.Request) -> web.StreamResponse:
    entry = ASSETS.get(request.match_info["name"])
    if entry is None:
        raise web.HTTPNotFound()
    return static_file(*entry)


def static_file(relative: str, content_type: str) -> web.FileResponse:
    """One of the package's static files (the docs' and the status page's)."""
    # FileResponse answers conditional requests (ETag, Last-Modified) and HEAD; no-cache
    # makes browsers revalidate, so an upgraded bundle is never served stale.
    return web.FileResponse(
        STATIC_DIR / relative,
        headers={
            "Content-Type": content_type,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )


def add_docs_routes(app: web.Application) -> None:
    app.router.add_get("/docs", docs)
    app.router.add_get(ASSET_ROUTE, docs_asset)


def static_asset_operation(
    summary: str, operation_id: str, tag: str, names: Iterable[str]
) -> dict[str, Any]:
    """The OpenAPI operation of a public route serving one of the package's static files."""
    return {
        "summary": summary,
        "operationId": operation_id,
        "tags": [tag],
        "security": [],
        "parameters": [
            {
                "name": "name",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "enum": sorted(names)},
            }
        ],
        "responses": {
            "200": {"description": "The file."},
            "404": {"description": "No such file."},
        },
    }


def asset_route_spec() -> dict[str, Any]:
    """The OpenAPI path item of the asset route, for /openapi.json to list it."""
    return {
        ASSET_ROUTE: {
            "get": static_asset_operation(
                "A static file of the /docs page (Swagger UI)",
                "docs_asset",
                "Documentation",
                ASSETS,
            )
        }
    }
