"""``POST /batch``: ``[{"id", "data"}]`` in, ``[{"id", "embedding"}]`` out, in input order.

An item that fails on its own gets ``{"id", "error", "error_type"}`` in its slot while the
others succeed; a malformed request is refused whole with 422 naming the offending ids.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from proxy import errors
from proxy.errors import ApiError
from proxy.http.common import json_response
from proxy.http.keys import SERVICE, SETTINGS
from proxy.http.models import BatchRequest
from proxy.http.parsing import read_json, type_name
from proxy.http.pipeline import embed_each_request
from proxy.upstream.base import EmbedOptions

_MAX_NAMED = 10  # ids quoted in one error message


def _named(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_MAX_NAMED])
    more = len(ids) - _MAX_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


def parse_batch(body: Any, max_items: int) -> tuple[list[str], list[str]]:
    """``[{"id", "data"}]`` as its ids and texts. The count is checked before any item is
    read; every malformed item is named, not just the first."""
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
    return ids, [item["data"] for item in items]


async def batch(request: web.Request) -> web.Response:
    body = await read_json(request)
    ids, texts = parse_batch(body, request.app[SETTINGS].max_batch_items)
    results = await embed_each_request(request, request.app[SERVICE], texts, EmbedOptions())
    out: list[dict[str, Any]] = []
    for item_id, result in zip(ids, results, strict=True):
        if isinstance(result, ApiError):
            out.append({"id": item_id, "error": result.message, "error_type": result.error_type})
        else:
            out.append({"id": item_id, "embedding": result})
    return json_response(out)


def add_batch_routes(app: web.Application) -> None:
    app.router.add_post("/batch", batch)
