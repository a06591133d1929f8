"""The proxy's own OpenAPI spec (served at /openapi.json, browsable at /docs)."""

from __future__ import annotations

from typing import Any

from proxy import __version__
from proxy.settings import Settings

_ERROR = {"$ref": "#/components/schemas/ErrorResponse"}


def _json(schema: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
    return {media: {"schema": schema}}


_OPENAI_ERROR = {"$ref": "#/components/schemas/OpenAIErrorResponse"}


def _responses(ok: dict[str, Any], *codes: int, error: dict[str, Any] = _ERROR) -> dict[str, Any]:
    text = {
        400: "Malformed JSON or empty input (`Empty`)",
        401: "Missing or wrong API key (empty body, as TEI)",
        404: "Unknown id",
        413: "Body over PAYLOAD_LIMIT, or too many items",
        415: "Content-Type is not application/json",
        422: "Well-formed JSON of the wrong shape, or a `Validation` error",
        429: "Queue full (`Overloaded`); see Retry-After",
        502: "The upstream answered something malformed",
        503: "Upstream unreachable, breaker open, or draining",
        504: "REQUEST_TIMEOUT or UPSTREAM_TIMEOUT passed",
    }
    responses: dict[str, Any] = {"200": ok}
    for code in codes:
        body = {"application/json": {"schema": error}} if code != 401 else None
        responses[str(code)] = {"description": text[code]}
        if body:
            responses[str(code)]["content"] = body
    return responses


_EMBED_ERRORS = (400, 401, 413, 415, 422, 429, 502, 503, 504)

_TEXT_OR_IDS = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 4294967295}},
    ]
}

_EMBED_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "inputs": {
            "description": "A text, one list of token ids, or a list of texts and id lists.",
            "oneOf": [_TEXT_OR_IDS, {"type": "array", "items": _TEXT_OR_IDS}],
        },
        "normalize": {"type": "boolean", "default": True},
        "truncate": {"type": ["boolean", "null"], "default": None},
        "truncation_direction": {
            "type": "string",
            "enum": ["Left", "Right", "left", "right"],
            "default": "Right",
        },
        "prompt_name": {"type": ["string", "null"]},
        "dimensions": {"type": ["integer", "null"], "minimum": 1},
    },
}

_VECTORS = {
    "type": "array",
    "items": {"type": "array", "items": {"type": "number"}},
}


def _embed_operation(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": {
            "required": True,
            "content": _json({"$ref": "#/components/schemas/EmbedRequest"}),
        },
        "responses": _responses(
            {"description": "One vector per input, in order",
             "content": {"application/json": {"schema": _VECTORS}}},
            *_EMBED_ERRORS,
        ),
    }  # fmt: skip


def _health_operation(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "responses": {
            "200": {"description": "Ready"},
            "503": {"description": "Upstream unhealthy, breaker open, or draining",
                    "content": {"application/json": {"schema": _ERROR}}},
        },
    }  # fmt: skip


def build_openapi(settings: Settings) -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/embed": {"post": _embed_operation("Embed texts (TEI's /embed), batched with others")},
        "/": {
            "post": _embed_operation("Same as /embed (TEI routes POST / to /embed)"),
            "get": _health_operation("Same as /health"),
        },
        "/invocations": {"post": _embed_operation("SageMaker: same as /embed")},
        "/health": {"get": _health_operation("Readiness: 200, or 503 with the reason")},
        "/ping": {"get": _health_operation("SageMaker: same as /health")},
        "/info": {
            "get": {
                "summary": "TEI's /info with the proxy's own limits and a `proxy` object",
                "responses": {"200": {"description": "Model and limits",
                                      "content": _json({"type": "object"})},
                              "401": {"description": "Missing or wrong API key"}},
            }
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics",
                    "responses": {"200": {"description": "Prometheus text format",
                                          "content": _json({"type": "string"}, "text/plain")}}}
        },
    }  # fmt: skip
    openai_op = {
        "summary": "OpenAI embeddings API (as TEI serves it), batched with others",
        "requestBody": {
            "required": True,
            "content": _json({"$ref": "#/components/schemas/OpenAIRequest"}),
        },
        "responses": _responses(
            {
                "description": "Embeddings",
                "content": _json(
                    {"type": "object", "required": ["object", "data", "model", "usage"]}
                ),
            },
            *_EMBED_ERRORS,
            error=_OPENAI_ERROR,
        ),
    }
    paths["/v1/embeddings"] = {"post": openai_op}
    paths["/embeddings"] = {"post": {**openai_op, "summary": "Alias of /v1/embeddings"}}
    paths["/predict"] = {
        "post": {
            "summary": "Embed one text; with `Async-Mode: true`, accept it as a job (202)",
            "parameters": [
                {
                    "name": "Async-Mode",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "enum": ["true", "false"]},
                }
            ],
            "requestBody": {
                "required": True,
                "content": _json(
                    {
                        "type": "object",
                        "required": ["input"],
                        "properties": {"input": {"type": "string", "minLength": 1}},
                    }
                ),
            },
            "responses": {
                **_responses(
                    {"description": "`{input, result}`", "content": _json({"type": "object"})},
                    *_EMBED_ERRORS,
                ),
                "202": {
                    "description": "Accepted: `{message, prediction_id}`",
                    "content": _json({"type": "object", "required": ["message", "prediction_id"]}),
                },
            },
        }
    }
    paths["/predict/{prediction_id}"] = {
        "get": {
            "summary": "Poll an async prediction",
            "parameters": [
                {
                    "name": "prediction_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                }
            ],
            "responses": {
                "200": {
                    "description": "Done: `{prediction_id, output: {input, result}}`",
                    "content": _json({"type": "object"}),
                },
                "400": {
                    "description": "Still being processed",
                    "content": _json({"type": "object", "required": ["error"]}),
                },
                "401": {"description": "Missing or wrong API key"},
                "404": {
                    "description": "Unknown or expired id",
                    "content": _json({"type": "object", "required": ["error"]}),
                },
                "424": {
                    "description": "The job failed; `error` says why",
                    "content": _json({"type": "object", "required": ["error"]}),
                },
                "503": {"description": "Job store unavailable", "content": _json(_ERROR)},
            },
        }
    }
    paths["/batch"] = {
        "post": {
            "summary": "Embed `[{id, data}]`; each result tied to its id, in input order",
            "requestBody": {
                "required": True,
                "content": _json(
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["id", "data"],
                            "properties": {"id": {"type": "string"}, "data": {"type": "string"}},
                        },
                    }
                ),
            },
            "responses": _responses(
                {
                    "description": "`[{id, embedding}]`, or `{id, error, error_type}` for an "
                    "item that failed on its own",
                    "content": _json({"type": "array"}),
                },
                *_EMBED_ERRORS,
            ),
        }
    }
    if settings.admin_token is not None:
        paths["/shutdown"] = {
            "post": {
                "summary": "Graceful shutdown (needs ADMIN_TOKEN as Bearer)",
                "responses": {"202": {"description": "Draining"},
                              "401": {"description": "Missing or wrong admin token"}},
            }
        }  # fmt: skip
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Embedding batch proxy",
            "version": __version__,
            "description": "Speaks Hugging Face TEI's HTTP API and merges concurrent requests "
            "into batched upstream calls.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "EmbedRequest": _EMBED_REQUEST,
                "ErrorResponse": {
                    "type": "object",
                    "required": ["error", "error_type"],
                    "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
                },
                "OpenAIRequest": {
                    "type": "object",
                    "required": ["input"],
                    "properties": {
                        "input": _EMBED_REQUEST["properties"]["inputs"],  # type: ignore[index]
                        "model": {"type": ["string", "null"]},
                        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                        "dimensions": {"type": ["integer", "null"], "minimum": 1},
                        "user": {"type": ["string", "null"]},
                    },
                },
                "OpenAIErrorResponse": {
                    "type": "object",
                    "required": ["message", "code", "type"],
                    "properties": {
                        "message": {"type": "string"},
                        "code": {"type": "integer"},
                        "type": {"type": "string"},
                    },
                },
            }
        },
    }
    if settings.api_key is not None:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
    return spec
