"""``POST /v1/embeddings`` and ``/embeddings``: the OpenAI embeddings API, as TEI serves it;
``GET /v1/models``: the models the proxy routes to.

``model`` picks the model (``name`` or ``name@version``); without MODELS_CONFIG any name means
the one model, as TEI ignores it. ``user`` keeps a caller on one version of an A/B split.
The `openai` SDK asks for base64 by default; errors use TEI's OpenAI-compatible body
``{"message", "code", "type"}``, except an unknown model: OpenAI's own 404 body with code
``model_not_found``.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from aiohttp import web

from proxy.context import context_of
from proxy.errors import ApiError
from proxy.http.common import OPENAI_PATHS, json_response, openai_error_response
from proxy.http.keys import REGISTRY, SETTINGS
from proxy.http.models import EmbeddingRequest
from proxy.http.parsing import (
    DEFAULT_OPTIONS,
    as_inputs,
    check_input_count,
    read_json,
    require_object,
    validate,
)
from proxy.http.pipeline import embed_request
from proxy.token_ids import estimate_tokens
from proxy.upstream.base import EmbedInput, EmbedOptions, RawVector, Vector


def _encode_base64(vec: Vector) -> str:
    # Little-endian float32, as OpenAI and TEI send it.
    if hasattr(vec, "astype"):  # a numpy row from the embedded model: no per-float copy
        raw: bytes = vec.astype("<f4").tobytes()
    else:
        floats = vec.tolist() if isinstance(vec, RawVector) else vec
        raw = struct.pack(f"<{len(floats)}f", *floats)
    return base64.b64encode(raw).decode("ascii")


def parse_openai_request(
    body: Any, max_inputs: int | None = None
) -> tuple[list[EmbedInput], EmbedOptions, str, str | None, str | None]:
    """OpenAI's embeddings request: inputs, options, encoding, model and user.
    ``max_inputs`` (MAX_CLIENT_BATCH_SIZE) is checked before the inputs are validated."""
    if type(body) is dict and len(body) == 1 and type(body.get("input")) is str:
        # The common body: no options.
        return [body["input"]], DEFAULT_OPTIONS, "float", None, None
    check_input_count(require_object(body, "input")["input"], max_inputs)
    request = validate(EmbeddingRequest, body)
    # TEI fixes every other option on this route: auto-truncate, right, no prompt, normalised.
    options = (
        DEFAULT_OPTIONS
        if request.dimensions is None
        else EmbedOptions(dimensions=request.dimensions)
    )
    encoding = request.encoding_format or "float"
    return as_inputs(request.input), options, encoding, request.model, request.user


async def openai_embeddings(request: web.Request) -> web.Response:
    ctx = context_of(request)
    try:
        body = await read_json(request)
        inputs, options, encoding, model, user = parse_openai_request(
            body, request.app[SETTINGS].max_client_batch_size
        )
        if model:
            ctx.requested_model = model
        if user:
            ctx.user = user
        _, inputs, vectors = await embed_request(request, inputs, options, encoding=encoding)
    except ApiError as exc:
        return openai_error_response(exc)
    data = [
        {
            "object": "embedding",
            "embedding": _encode_base64(vec) if encoding == "base64" else vec,
            "index": i,
        }
        for i, vec in enumerate(vectors)
    ]
    tokens = sum(estimate_tokens(item) for item in inputs)
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": ctx.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def list_models(request: web.Request) -> web.Response:
    """OpenAI's ``GET /v1/models``: one entry per model name (pin a version with
    ``name@version`` in ``model``)."""
    created = request.app[REGISTRY].started_at
    return json_response(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "proxy"}
                for name in request.app[REGISTRY].model_names()
            ],
        }
    )


def add_openai_routes(app: web.Application) -> None:
    for path in OPENAI_PATHS:  # one list, so errors raised before the handler match it
        app.router.add_post(path, openai_embeddings)
    app.router.add_get("/v1/models", list_models)
