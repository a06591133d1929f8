"""The documentation lists what the code has: every setting, every route."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.openapi import build_openapi
from proxy.settings import Settings, env_example
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parent.parent
# Secrets must be long (settings refuse short ones); this one is for tests only.
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


def test_env_example_is_generated_from_the_settings() -> None:
    assert (ROOT / ".env.example").read_text() == env_example()


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [n.upper() for n in Settings.model_fields if f"`{n.upper()}`" not in readme]
    assert missing == []


def test_readme_and_spec_document_every_route() -> None:
    readme = (ROOT / "README.md").read_text()
    spec = build_openapi(make_settings(admin_token=ADMIN_TOKEN))
    for path in spec["paths"]:
        assert f"{path}" in readme, path


def routes_missing_from_spec(app: web.Application, spec: dict[str, Any]) -> list[str]:
    """``METHOD path`` of every route the app serves that the spec does not document.

    HEAD is skipped: aiohttp adds it to every GET route by itself, and the spec's GET entry
    covers it (OpenAPI has no HEAD convention for that)."""
    missing: list[str] = []
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        path = route.resource.canonical
        if route.method.lower() not in spec["paths"].get(path, {}):
            missing.append(f"{route.method} {path}")
    return missing


def served_routes(app: web.Application) -> set[str]:
    return {
        f"{r.method} {r.resource.canonical}"
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }


def documented_routes(spec: dict[str, Any]) -> set[str]:
    return {f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item}


@pytest.mark.parametrize("admin_token", [None, ADMIN_TOKEN])
def test_every_served_route_is_in_the_spec_and_back(admin_token: str | None) -> None:
    # Every route, the spec and doc routes included: they are routes a client calls too.
    settings = make_settings(admin_token=admin_token, upstream_url="http://127.0.0.1:9")
    app = create_app(settings)
    spec = build_openapi(settings)
    assert routes_missing_from_spec(app, spec) == []
    assert documented_routes(spec) == served_routes(app)


def test_route_check_sees_an_undocumented_route() -> None:
    """The check above can fail: a route the spec does not list is reported."""
    settings = make_settings(admin_token=ADMIN_TOKEN, upstream_url="http://127.0.0.1:9")
    app = create_app(settings)

    async def extra(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_post("/extra", extra)
    app.router.add_get("/info/extra", extra)
    spec = build_openapi(settings)
    assert routes_missing_from_spec(app, spec) == ["POST /extra", "GET /info/extra"]
    assert documented_routes(spec) != served_routes(app)
