"""The one path every synchronous embedding request takes between its parser and its
renderer: ``before`` hooks, the service, ``after`` hooks (the sampler among them), and what
tracing and the logs learn on the way. Handlers parse and render; this runs the request."""

from __future__ import annotations

import time
from collections.abc import Sequence

from aiohttp import web

from proxy.errors import ApiError
from proxy.hooks import HookContext
from proxy.http.common import deadline_for
from proxy.http.keys import OBSERVER
from proxy.observe import OBSERVATION, Observation
from proxy.service import EmbeddingService
from proxy.token_ids import estimate_tokens
from proxy.upstream.base import EmbedInput, EmbedOptions, Vector


def _context(obs: Observation, inputs: list[EmbedInput], user: str | None) -> HookContext:
    return HookContext(
        request_id=obs.request_id,
        route=obs.route,
        model=obs.model or "",
        version=obs.version,
        inputs=inputs,
        user=user,
    )


def _start(
    request: web.Request,
    service: EmbeddingService,
    inputs: Sequence[EmbedInput],
    *,
    requested_model: str | None,
    encoding: str | None,
) -> Observation:
    obs = request[OBSERVATION]
    obs.model = service.name
    if obs.span is not None:
        obs.span.name_embeddings(requested_model or service.served_model_name)
        obs.attributes.update({
            "gen_ai.operation.name": "embeddings",
            "gen_ai.provider.name": service.upstream.kind,
            "gen_ai.request.model": requested_model or service.served_model_name,
            "gen_ai.response.model": service.served_model_name,
            "gen_ai.request.encoding_formats": [encoding or "float"],
            "gen_ai.usage.input_tokens": sum(estimate_tokens(i) for i in inputs),
            "proxy.model": service.name,
            "proxy.input_count": len(inputs),
        })  # fmt: skip
    return obs


async def before_hooks(
    request: web.Request, obs: Observation, inputs: Sequence[EmbedInput], user: str | None
) -> tuple[list[EmbedInput], HookContext | None]:
    hooks = request.app[OBSERVER].hooks
    if hooks is None:
        return list(inputs), None
    ctx = _context(obs, list(inputs), user)
    if hooks.has_before:
        await hooks.before(ctx)
    return ctx.inputs, ctx


async def after_hooks(
    request: web.Request,
    obs: Observation,
    ctx: HookContext | None,
    vectors: Sequence[Vector | None],
) -> None:
    hooks = request.app[OBSERVER].hooks
    if hooks is None or ctx is None or not hooks.has_after:
        return
    ctx.vectors = vectors
    ctx.latency_s = time.perf_counter() - obs.started
    ctx.status = 200
    await hooks.after(ctx)


def _dimensions(obs: Observation, vectors: Sequence[Vector | None]) -> None:
    if obs.span is not None:
        first = next((v for v in vectors if v is not None), None)
        if first is not None:
            obs.attributes["gen_ai.embeddings.dimension.count"] = len(first)


async def embed_request(
    request: web.Request,
    service: EmbeddingService,
    inputs: Sequence[EmbedInput],
    options: EmbedOptions,
    *,
    user: str | None = None,
    requested_model: str | None = None,
    encoding: str | None = None,
) -> tuple[list[EmbedInput], list[Vector]]:
    """Embed one request's inputs; returns the inputs as embedded (after ``before`` hooks)
    and their vectors."""
    obs = _start(request, service, inputs, requested_model=requested_model, encoding=encoding)
    embedded, ctx = await before_hooks(request, obs, inputs, user)
    vectors = await service.embed(embedded, options, deadline=deadline_for(request), trace=obs.span)
    _dimensions(obs, vectors)
    await after_hooks(request, obs, ctx, vectors)
    return embedded, vectors


async def embed_each_request(
    request: web.Request,
    service: EmbeddingService,
    inputs: Sequence[EmbedInput],
    options: EmbedOptions,
) -> list[Vector | ApiError]:
    """Like :func:`embed_request` for ``/batch``: an item's own fault stays in its slot;
    ``after`` hooks see ``None`` in those slots."""
    obs = _start(request, service, inputs, requested_model=None, encoding=None)
    embedded, ctx = await before_hooks(request, obs, inputs, None)
    results = await service.embed_each(
        embedded, options, deadline=deadline_for(request), trace=obs.span
    )
    vectors = [None if isinstance(r, ApiError) else r for r in results]
    _dimensions(obs, vectors)
    await after_hooks(request, obs, ctx, vectors)
    return results
