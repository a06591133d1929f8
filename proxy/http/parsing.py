"""Reading and validating request bodies, with TEI's status codes for each kind of bad input."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy import errors
from proxy.errors import ApiError, ErrorType
from proxy.upstream.base import EmbedInput, EmbedOptions, TruncationDirection

_U32_MAX = 2**32 - 1


def unprocessable(message: str) -> ApiError:
    # axum's Json extractor answers 422 for well-formed JSON of the wrong shape.
    return ApiError(
        422,
        f"Failed to deserialize the JSON body into the target type: {message}",
        ErrorType.VALIDATION,
    )


async def read_json(request: web.Request) -> Any:
    """Parse the body as JSON: 415 for a wrong Content-Type, 413 past the size limit,
    400 for malformed JSON (as TEI's axum extractor does)."""
    content_type = request.content_type
    if not (content_type == "application/json" or content_type.endswith("+json")):
        raise ApiError(
            415,
            "Expected request with `Content-Type: application/json`",
            ErrorType.VALIDATION,
        )
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(
            413,
            f"Failed to buffer the request body: length limit exceeded "
            f"(the limit is {request.client_max_size} bytes)",
            ErrorType.VALIDATION,
        ) from exc
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            400, f"Failed to parse the request body as JSON: {exc}", ErrorType.VALIDATION
        ) from exc


def _is_token_ids(value: list[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _token_ids(value: list[Any], where: str) -> list[int]:
    for v in value:
        if not (isinstance(v, int) and not isinstance(v, bool)) or not 0 <= v <= _U32_MAX:
            raise unprocessable(f"{where}: token ids must be integers in 0..{_U32_MAX}")
    return value


def parse_inputs(value: Any, field: str = "inputs") -> list[EmbedInput]:
    """TEI's untagged ``Input``: a string, one id list, or a list of strings and id lists.

    ``[]`` parses as one empty id list (as in TEI), which later fails as ``Empty``.
    """
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if _is_token_ids(value):
            return [_token_ids(value, field)]
        items: list[EmbedInput] = []
        for i, entry in enumerate(value):
            if isinstance(entry, str):
                items.append(entry)
            elif isinstance(entry, list) and _is_token_ids(entry):
                items.append(_token_ids(entry, f"{field}[{i}]"))
            else:
                raise unprocessable(
                    f"{field}[{i}]: expected a string or a list of token ids, "
                    f"got {type_name(entry)}"
                )
        return items
    if value is None:
        raise unprocessable(f"missing field `{field}`")
    raise unprocessable(f"{field}: expected a string or a list of strings, got {type_name(value)}")


def type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _optional_bool(body: dict[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise unprocessable(f"{key}: expected a boolean, got {type_name(value)}")


def _truncation_direction(body: dict[str, Any]) -> TruncationDirection:
    value = body.get("truncation_direction")
    if value is None:
        return "Right"
    # TEI 1.9 accepts both cases (serde aliases); huggingface_hub sends lowercase.
    if value in ("Right", "right"):
        return "Right"
    if value in ("Left", "left"):
        return "Left"
    raise unprocessable(
        f"truncation_direction: unknown variant {value!r}, expected `Left` or `Right`"
    )


def _dimensions(body: dict[str, Any]) -> int | None:
    value = body.get("dimensions")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise unprocessable(f"dimensions: expected a non-negative integer, got {value!r}")
    if value == 0:
        raise errors.validation("Input validation error: `dimensions` should be positive")
    return value


def _prompt_name(body: dict[str, Any]) -> str | None:
    value = body.get("prompt_name")
    if value is None or isinstance(value, str):
        return value
    raise unprocessable(f"prompt_name: expected a string, got {type_name(value)}")


def parse_embed_request(body: Any) -> tuple[list[EmbedInput], EmbedOptions]:
    """TEI's ``EmbedRequest``. Unknown fields are ignored, as TEI does."""
    if not isinstance(body, dict):
        raise unprocessable(f"expected a JSON object, got {type_name(body)}")
    if "inputs" not in body:
        raise unprocessable("missing field `inputs`")
    inputs = parse_inputs(body["inputs"])
    normalize = _optional_bool(body, "normalize")
    options = EmbedOptions(
        normalize=True if normalize is None else normalize,
        truncate=_optional_bool(body, "truncate"),
        truncation_direction=_truncation_direction(body),
        prompt_name=_prompt_name(body),
        dimensions=_dimensions(body),
    )
    return inputs, options
