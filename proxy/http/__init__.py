"""The HTTP layer: one module per door, all leading into the same embedding service."""

from __future__ import annotations

from aiohttp import web

from proxy.http.admin import add_admin_routes
from proxy.http.batch import add_batch_routes
from proxy.http.keys import SETTINGS
from proxy.http.openai import add_openai_routes
from proxy.http.predict import add_predict_routes
from proxy.http.status import add_status_routes
from proxy.http.tei import add_tei_routes


def add_routes(app: web.Application) -> None:
    add_tei_routes(app)
    add_openai_routes(app)
    add_predict_routes(app)
    add_batch_routes(app)
    add_status_routes(app)
    if app[SETTINGS].admin_token is not None:
        add_admin_routes(app)
