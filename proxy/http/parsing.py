"""Reading and validating request bodies, with TEI's status codes for each kind of bad input.

Bodies are validated with the pydantic models of :mod:`proxy.http.models` (the same models
/openapi.json documents); their errors are turned into TEI's answers here: 422 "Failed to
deserialize the JSON body into the target type: ..." for a wrong shape, as TEI's axum
extractor answers, and TEI's own messages where TEI has one (``Empty``, ``dimensions``).
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from proxy import errors
from proxy.errors import ApiError, ErrorType
from proxy.http.models import (
    INPUT_LIST,
    INPUT_TYPE_ERROR,
    TOKEN_IDS,
    U32_MAX,
    EmbedRequest,
    input_branch,
)
from proxy.upstream.base import EmbedInput, EmbedOptions, TruncationDirection

Model = TypeVar("Model", bound=BaseModel)

# Options of a body that sets none: shared, since EmbedOptions is frozen.
DEFAULT_OPTIONS = EmbedOptions()
_MAX_SHOWN = 40  # characters of a client's value quoted back in an error message


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


def _shown(value: Any) -> str:
    """A client's scalar, quoted back but bounded; containers only by their type."""
    if isinstance(value, list | dict):
        return type_name(value)
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def error_path(loc: tuple[int | str, ...]) -> str:
    """``('inputs', 'input-list', 1, 'str')`` -> ``inputs[1]``. The request models are flat,
    so the first name in ``loc`` is the field; names after it are union members."""
    path = ""
    named = False
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not named:
            path += f".{part}" if path else part
            named = True
    return path


_INT_ERRORS = frozenset({"int_type", "greater_than_equal", "less_than_equal"})


def _first_error(exc: ValidationError) -> ErrorDetails:
    """The first error, leaving out a union member the value is not even of the type of: for
    ``[1, -2]`` in a list of "string or id list", the id-list member's error says why."""
    details = exc.errors(include_url=False)
    for error in details:
        if not (_is_union_member(error) and isinstance(error["input"], list)):
            return error
    return details[0]


def _is_union_member(error: ErrorDetails) -> bool:
    # A union member's type error: its name (a string) follows the field's in `loc`.
    loc = error["loc"]
    return (
        error["type"] in ("string_type", "list_type") and len(loc) > 1 and isinstance(loc[-1], str)
    )


def _describe(error: ErrorDetails) -> str:
    """One pydantic error as a short message naming where it is and what was expected."""
    loc = error["loc"]
    path = error_path(loc)
    where = f"{path}: " if path else ""
    kind = error["type"]
    value = error["input"]
    if kind == "missing":
        return f"missing field `{path}`"
    if kind in _INT_ERRORS and loc and isinstance(loc[-1], int):
        # The only integers inside a list in these models are token ids.
        return f"{where}token ids must be integers in 0..{U32_MAX}, got {_shown(value)}"
    if kind == INPUT_TYPE_ERROR:
        return f"{where}{error['msg']}, got {type_name(value)}"
    if _is_union_member(error):
        # A batch item that is neither member of "string or list of token ids".
        return f"{where}expected a string or a list of token ids, got {type_name(value)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where}expected a JSON object, got {type_name(value)}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{where}unknown variant {_shown(value)}, expected {expected}"
    expected_type = {
        "bool_type": "a boolean",
        "string_type": "a string",
        "int_type": "an integer",
        "list_type": "a list",
    }.get(kind)
    if expected_type is not None:
        return f"{where}expected {expected_type}, got {type_name(value)}"
    bound = {"greater_than_equal": ">=", "less_than_equal": "<="}.get(kind)
    if bound is not None:
        limit = error.get("ctx", {}).get("ge" if bound == ">=" else "le")
        return f"{where}expected a value {bound} {limit}, got {_shown(value)}"
    return f"{where}{error['msg'].lower()}, got {_shown(value)}"


def validate(model: type[Model], body: Any) -> Model:
    """``body`` as ``model``, or the ApiError TEI would answer for its first fault."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = _first_error(exc)
        if first["loc"] == ("dimensions",) and first["input"] == 0:
            # serde takes 0 as a usize; TEI refuses it afterwards with its own message.
            raise errors.validation(
                "Input validation error: `dimensions` should be positive"
            ) from None
        if first["type"] == "string_too_short":
            raise errors.empty_input() from None
        raise unprocessable(_describe(first)) from None


def require_object(body: Any, field: str) -> dict[str, Any]:
    """The checks every JSON-object body gets before its fields are read."""
    if not isinstance(body, dict):
        raise unprocessable(f"expected a JSON object, got {type_name(body)}")
    if field not in body:
        raise unprocessable(f"missing field `{field}`")
    return body


def check_input_count(value: Any, max_inputs: int | None) -> None:
    """Refuse a batch over ``max_inputs`` from its length alone, before any item is read: a
    2 MB list of id lists costs the event loop a second to validate item by item."""
    if max_inputs is not None and input_branch(value) == INPUT_LIST and len(value) > max_inputs:
        raise errors.batch_too_large(len(value), max_inputs)


def as_inputs(value: str | list[int] | list[str | list[int]]) -> list[EmbedInput]:
    """A validated ``Input`` as a list of items: a text or one id list is one item."""
    if isinstance(value, str) or input_branch(value) == TOKEN_IDS:
        return [cast(EmbedInput, value)]
    return cast(list[EmbedInput], value)


def _direction(value: str | None) -> TruncationDirection:
    # TEI 1.9 accepts both cases (serde aliases); huggingface_hub sends lowercase.
    return "Left" if value in ("Left", "left") else "Right"


def parse_embed_request(
    body: Any, max_inputs: int | None = None
) -> tuple[list[EmbedInput], EmbedOptions]:
    """TEI's ``EmbedRequest``. Unknown fields are ignored, as TEI does. ``max_inputs`` (the
    proxy's MAX_CLIENT_BATCH_SIZE) is checked before the inputs are validated."""
    if type(body) is dict and len(body) == 1 and type(body.get("inputs")) is str:
        # The common body, {"inputs": "text"}: nothing else to validate.
        return [body["inputs"]], DEFAULT_OPTIONS
    check_input_count(require_object(body, "inputs")["inputs"], max_inputs)
    request = validate(EmbedRequest, body)
    if request.model_fields_set == {"inputs"}:
        return as_inputs(request.inputs), DEFAULT_OPTIONS  # building EmbedOptions costs 1 us
    options = EmbedOptions(
        normalize=True if request.normalize is None else request.normalize,
        truncate=request.truncate,
        truncation_direction=_direction(request.truncation_direction),
        prompt_name=request.prompt_name,
        dimensions=request.dimensions,
    )
    return as_inputs(request.inputs), options
