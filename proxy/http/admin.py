"""Operator routes for the registry of models, behind ADMIN_TOKEN (off when it is unset).

A change applies to the process that received it: with several replicas (or WORKERS > 1),
keep MODELS_CONFIG as the truth and reload it everywhere (SIGHUP, or POST /admin/reload on
each replica) rather than send admin changes to one of them. README: Several models.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import RootModel, ValidationError

from proxy import errors
from proxy.http.common import bearer_matches, json_response
from proxy.http.keys import DRAINING, REGISTRY, SETTINGS
from proxy.http.models import ShadowRequest, TrafficRequest
from proxy.http.parsing import read_json
from proxy.models_config import VersionConfig, describe_error

# Any text (a name may hold a `/`, as in org/model): the registry says what is wrong with a
# name, in the body a client expects, rather than the router's bare 404.
NAME = r"{name:(?s:.+)}"
VERSION = r"{version:(?s:.+)}"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _admin(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        token = request.app[SETTINGS].admin_token
        if token is None or not bearer_matches(request, token.get_secret_value()):
            return web.Response(status=401)
        if request.app[DRAINING].is_set():
            raise errors.unavailable("proxy is shutting down")
        return await handler(request)

    return guarded


def _validated(model: type[RootModel[Any]] | type[VersionConfig], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise errors.validation(describe_error(exc)) from None


async def list_models(request: web.Request) -> web.Response:
    return json_response(request.app[REGISTRY].describe())


async def put_version(request: web.Request) -> web.Response:
    name, version = request.match_info["name"], request.match_info["version"]
    spec: VersionConfig = _validated(VersionConfig, await read_json(request))
    created, mv = await request.app[REGISTRY].put_version(name, version, spec)
    entry = request.app[REGISTRY].snapshot.models[name]
    body = {"model": name, **mv.describe(entry.weight(version))}
    return json_response(body, status=201 if created else 200)


async def delete_version(request: web.Request) -> web.Response:
    name, version = request.match_info["name"], request.match_info["version"]
    mv = await request.app[REGISTRY].delete_version(name, version)
    return json_response({"model": name, "version": version, "state": mv.state.value}, status=202)


async def put_traffic(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    weights: TrafficRequest = _validated(TrafficRequest, await read_json(request))
    entry = await request.app[REGISTRY].set_traffic(name, weights.root)
    return json_response({"model": name, "traffic": entry.weights})


async def put_shadow(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    shadow: ShadowRequest = _validated(ShadowRequest, await read_json(request))
    entry = await request.app[REGISTRY].set_shadow(name, shadow.root)
    current = entry.shadow
    return json_response(
        {
            "model": name,
            "shadow": {"version": current.version, "percent": current.percent} if current else None,
        }
    )


async def reload(request: web.Request) -> web.Response:
    return json_response(await request.app[REGISTRY].reload())


def add_admin_routes(app: web.Application) -> None:
    models = "/admin/models"
    app.router.add_get(models, _admin(list_models))
    app.router.add_put(f"{models}/{NAME}/versions/{VERSION}", _admin(put_version))
    app.router.add_delete(f"{models}/{NAME}/versions/{VERSION}", _admin(delete_version))
    app.router.add_put(f"{models}/{NAME}/traffic", _admin(put_traffic))
    app.router.add_put(f"{models}/{NAME}/shadow", _admin(put_shadow))
    app.router.add_post("/admin/reload", _admin(reload))
