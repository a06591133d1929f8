"""The one path every synchronous embedding request takes between its parser and its
renderer: the registry picks the model's version, then ``before`` hooks, that version's
service, ``after`` hooks (the sampler among them), and what tracing and the logs learn on the
way. Handlers parse and render; this runs the request."""

from __future__ import annotations

import time
from collections.abc import Sequence

from aiohttp import web

from proxy.context import RequestContext, context_of
from proxy.errors import ApiError
from proxy.hooks import HookContext
from proxy.http.keys import OBSERVER, REGISTRY
from proxy.observe import OBSERVATION, Observation
from proxy.registry import ModelVersion
from proxy.service import EmbeddingService, RetiredError
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
    ctx: RequestContext,
    service: EmbeddingService,
    inputs: Sequence[EmbedInput],
    *,
    encoding: str | None,
) -> Observation:
    """What the request's observation learns once the registry routed it."""
    obs = request[OBSERVATION]
    obs.model, obs.version = ctx.model, ctx.version
    requested_model = ctx.requested_model
    if obs.span is not None:
        obs.span.name_embeddings(requested_model or service.served_model_name)
        obs.attributes.update({
            "gen_ai.operation.name": "embeddings",
            "gen_ai.provider.name": service.upstream.kind,
            "gen_ai.request.model": requested_model or service.served_model_name,
            "gen_ai.response.model": service.served_model_name,
            "gen_ai.request.encoding_formats": [encoding or "float"],
            "gen_ai.usage.input_tokens": sum(estimate_tokens(i) for i in inputs),
            "proxy.model": ctx.model,
            "proxy.model_version": ctx.version,
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
    inputs: Sequence[EmbedInput],
    options: EmbedOptions,
    *,
    encoding: str | None = None,
) -> tuple[ModelVersion, list[EmbedInput], list[Vector]]:
    """Embed one request's inputs on the version the registry picks (from the request's
    context: its model, its user); returns that version, the inputs as embedded (after
    ``before`` hooks) and their vectors."""
    ctx = context_of(request)
    registry = request.app[REGISTRY]
    # Routed on the caller's own inputs (the A/B split hashes them when there is no user).
    entry, version = registry.resolve(ctx, inputs)
    obs = _start(request, ctx, version.service, inputs, encoding=encoding)
    embedded, hook_ctx = await before_hooks(request, obs, inputs, ctx.user)
    # Registry.embed_routed's steps, in this frame: every frame of a waiting request is kept
    # while it waits (about 300 bytes each, benchmarks/ scenario f).
    try:
        vectors = await version.service.embed(embedded, options, ctx, trace=obs.span)
    except RetiredError:
        # It left routing between the pick and the queue: pick again, once.
        entry, version = registry.resolve(ctx, embedded)
        vectors = await version.service.embed(embedded, options, ctx, trace=obs.span)
    registry.shadow_copy(entry, version, embedded, options, ctx, vectors)
    obs.model, obs.version = ctx.model, ctx.version
    _dimensions(obs, vectors)
    await after_hooks(request, obs, hook_ctx, vectors)
    return version, embedded, vectors


async def embed_each_request(
    request: web.Request,
    inputs: Sequence[EmbedInput],
    options: EmbedOptions,
    ctx: RequestContext | None = None,
) -> list[Vector | ApiError]:
    """Like :func:`embed_request` for ``/batch``: an item's own fault stays in its slot;
    ``after`` hooks see ``None`` in those slots. ``ctx``: one model's part of a request
    (its own context); by default the request's."""
    ctx = ctx if ctx is not None else context_of(request)
    registry = request.app[REGISTRY]
    entry, version = registry.resolve(ctx, inputs)
    obs = _start(request, ctx, version.service, inputs, encoding=None)
    embedded, hook_ctx = await before_hooks(request, obs, inputs, ctx.user)
    _, results = await registry.embed_each_routed(
        entry, version, embedded, options, ctx, trace=obs.span
    )
    obs.model, obs.version = ctx.model, ctx.version
    vectors = [None if isinstance(r, ApiError) else r for r in results]
    _dimensions(obs, vectors)
    await after_hooks(request, obs, hook_ctx, vectors)
    return results
