"""``POST /batch``: ``[{"id", "data"}]`` in, ``[{"id", "embedding"}]`` out, in input order.

An item that fails on its own gets ``{"id", "error", "error_type"}`` in its slot while the
others succeed; a malformed request is refused whole with 422 naming the offending ids.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from proxy import errors
from proxy.context import RequestContext, context_of
from proxy.errors import ApiError
from proxy.http.common import json_response
from proxy.http.keys import SETTINGS
from proxy.http.models import BatchRequest
from proxy.http.parsing import read_json, type_name
from proxy.http.pipeline import embed_each_request
from proxy.upstream.base import EmbedOptions

_MAX_NAMED = 10  # ids quoted in one error message


def _named(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_MAX_NAMED])
    more = len(ids) - _MAX_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


def parse_batch(body: Any, max_items: int) -> tuple[list[str], list[str], list[str | None]]:
    """``[{"id", "data"}]`` as its ids, texts and models. The count is checked before any
    item is read; every malformed item is named, not just the first."""
    if not isinstance(body, list):
        raise errors.validation(
            f'expected a JSON list of {{"id", "data"}} objects, got {type_name(body)}'
        )
    if not body:
        raise errors.empty_input()
    if len(body) > max_items:
        raise errors.batch_too_large(len(body), max_items)
    try:
        items = BatchRequest.model_validate(body).root
    except ValidationError as exc:
        bad_positions = sorted({e["loc"][0] for e in exc.errors() if isinstance(e["loc"][0], int)})
        bad: list[str] = []
        for index in bad_positions:
            item_id = body[index].get("id") if isinstance(body[index], dict) else None
            bad.append(item_id if isinstance(item_id, str) else f"#{index}")
        raise errors.validation(
            f"items without a string `id` and a string `data` (ids, or #position where the "
            f"id is missing): {_named(bad)}"
        ) from None
    ids = [item["id"] for item in items]
    seen: set[str] = set()
    duplicates: list[str] = []
    for item_id in ids:
        if item_id in seen and item_id not in duplicates:
            duplicates.append(item_id)
        seen.add(item_id)
    if duplicates:
        raise errors.validation(f"duplicate ids: {_named(duplicates)}")
    return ids, [item["data"] for item in items], [item.get("model") for item in items]


async def _embed_group(
    request: web.Request, texts: list[str], ctx: RequestContext, whole: bool
) -> list[Any]:
    """One model's items. With several models in one request, a fault of one model as a
    whole (its breaker, its queue) goes into its own items' slots: the other models'
    items still get their vectors."""
    try:
        results: list[Any] = await embed_each_request(request, texts, EmbedOptions(), ctx)
    except ApiError as exc:
        if whole:
            raise
        return [exc] * len(texts)
    return results


async def batch(request: web.Request) -> web.Response:
    body = await read_json(request)
    ids, texts, models = parse_batch(body, request.app[SETTINGS].max_batch_items)
    ctx = context_of(request)
    groups: dict[str | None, list[int]] = {}
    for index, model in enumerate(models):
        groups.setdefault(model or None, []).append(index)
    results: list[Any] = [None] * len(ids)
    if len(groups) == 1:
        (model,) = groups
        if model is not None:
            ctx.requested_model = model
        results = await _embed_group(request, texts, ctx, whole=True)
    else:
        contexts = {
            model: dataclasses.replace(ctx, requested_model=model or ctx.requested_model)
            for model in groups
        }
        answers = await asyncio.gather(
            *(
                _embed_group(request, [texts[i] for i in indices], contexts[model], False)
                for model, indices in groups.items()
            )
        )
        for indices, answer in zip(groups.values(), answers, strict=True):
            for index, result in zip(indices, answer, strict=True):
                results[index] = result
    out: list[dict[str, Any]] = []
    for item_id, result in zip(ids, results, strict=True):
        if isinstance(result, ApiError):
            out.append({"id": item_id, "error": result.message, "error_type": result.error_type})
        else:
            out.append({"id": item_id, "embedding": result})
    headers = None
    if len(groups) > 1:
        served = (c.served_as for c in contexts.values())
        headers = {"X-Model": ", ".join(dict.fromkeys(s for s in served if s))}
    return json_response(out, headers=headers)


def add_batch_routes(app: web.Application) -> None:
    app.router.add_post("/batch", batch)
