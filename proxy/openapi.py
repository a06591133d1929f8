"""The proxy's own OpenAPI spec (served at /openapi.json, browsable at /docs).

Request bodies are documented from the pydantic models the routes validate them with
(:mod:`proxy.http.models`), so the spec and the validation cannot disagree. Each operation
lists the statuses that route really answers, each with the causes that lead to it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel

from proxy import __version__
from proxy.http import models
from proxy.http.docs import asset_route_spec
from proxy.http.status import status_route_specs
from proxy.settings import Settings

_ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
_OPENAI_ERROR = {"$ref": "#/components/schemas/OpenAIErrorResponse"}

# Every model the spec refers to; each becomes components/schemas/<its class name>.
_MODELS: tuple[type[BaseModel], ...] = (
    models.EmbedRequest,
    models.EmbeddingRequest,
    models.PredictRequest,
    models.BatchRequest,
    models.ErrorResponse,
    models.OpenAIErrorResponse,
    models.EmbedResponse,
    models.EmbeddingResponse,
    models.PredictResponse,
    models.PredictAccepted,
    models.PredictionDone,
    models.PredictionMessage,
    models.PredictionFailed,
    models.BatchResponse,
    models.ShutdownAccepted,
    models.StatusDocument,
)


@cache
def component_schemas() -> dict[str, Any]:
    """components/schemas: every model's schema and the schemas they refer to."""
    schemas: dict[str, Any] = {}
    for model in _MODELS:
        schema, defs = models.model_schema(model)
        schemas[model.__name__] = schema
        schemas.update(defs)
    return schemas


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": models.REF_TEMPLATE.format(model=model.__name__)}


def _json(schema: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
    return {media: {"schema": schema}}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": _json(_ref(model))}


# Why each status is answered, per kind of route. A cause is listed under the one status the
# proxy answers for it (tests/test_requests_spec.py checks this against real answers).
_MALFORMED = "Malformed JSON"
_UNAUTHORIZED = "Missing or wrong API key (no body, as TEI)"
_TOO_LARGE = "Body over PAYLOAD_LIMIT"
_CONTENT_TYPE = "Content-Type is not application/json"
_OVERLOADED = "Queue full (MAX_QUEUE_SIZE items; `Overloaded`); see Retry-After"
_UNAVAILABLE = "Upstream unreachable, circuit breaker open, or the proxy is draining"
_TIMEOUT = "REQUEST_TIMEOUT or UPSTREAM_TIMEOUT passed (`Timeout`)"
_INTERNAL = "The upstream's own 5xx after retries, or an internal error"

_EMBED_CAUSES: dict[int, str] = {
    400: f"{_MALFORMED}, or an empty input: an empty text, `[]` or an empty id list (`Empty`)",
    413: _TOO_LARGE,
    415: _CONTENT_TYPE,
    422: "JSON of the wrong shape; more inputs than MAX_CLIENT_BATCH_SIZE; an input over the "
    "character limit, or token ids over the model's max_input_length with truncation off; "
    "bad `dimensions` or `prompt_name`; an input the upstream refuses (`Validation`)",
    424: "The upstream failed on this input (`Backend`)",
    429: _OVERLOADED,
    500: _INTERNAL,
    502: "The upstream answered something malformed (`Upstream`)",
    503: _UNAVAILABLE,
    504: _TIMEOUT,
}
_PREDICT_CAUSES: dict[int, str] = {
    **_EMBED_CAUSES,
    400: f"{_MALFORMED}, or an empty `input` (`Empty`)",
    422: "JSON of the wrong shape; an input over the character limit; an input the upstream "
    "refuses (`Validation`)",
    429: f"{_OVERLOADED}; with Async-Mode, MAX_JOBS unfinished jobs",
    503: f"{_UNAVAILABLE}; with Async-Mode, the job store is unavailable",
}
# Items that fail on their own (empty, too long, refused by the upstream) get their error in
# their slot of the 200; these statuses are for the request as a whole.
_BATCH_CAUSES: dict[int, str] = {
    400: f"{_MALFORMED}, or an empty list `[]` (`Empty`)",
    413: _TOO_LARGE,
    415: _CONTENT_TYPE,
    422: "JSON of the wrong shape (not a list of `{id, data}` with string id and data); more "
    "items than MAX_BATCH_ITEMS; duplicate ids (`Validation`)",
    424: "The upstream failed as a whole (`Backend`)",
    429: _OVERLOADED,
    500: _INTERNAL,
    502: "The upstream answered something malformed (`Upstream`)",
    503: _UNAVAILABLE,
    504: _TIMEOUT,
}


def _errors(
    causes: dict[int, str], settings: Settings, error: dict[str, Any] = _ERROR
) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if settings.api_key is not None:
        responses["401"] = {"description": _UNAUTHORIZED}
    for status, cause in causes.items():
        responses[str(status)] = {"description": cause, "content": _json(error)}
    return responses


def _embed_operation(summary: str, settings: Settings) -> dict[str, Any]:
    header = {"schema": {"type": "string"}}
    return {
        "summary": summary,
        "requestBody": _body(models.EmbedRequest),
        "responses": {
            "200": {
                "description": "One vector per input, in input order",
                "headers": {
                    "x-compute-time": {**header, "description": "Milliseconds"},
                    "x-total-time": {**header, "description": "Milliseconds"},
                    "x-compute-characters": {**header, "description": "Characters embedded"},
                },
                "content": _json(_ref(models.EmbedResponse)),
            },
            **_errors(_EMBED_CAUSES, settings),
        },
    }


def _health_operation(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [],
        "responses": {
            "200": {"description": "Ready (no body)"},
            "503": {
                "description": "Upstream unhealthy, circuit breaker open, starting, or draining",
                "content": _json(_ERROR),
            },
        },
    }


def _openai_operation(summary: str, settings: Settings) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": _body(models.EmbeddingRequest),
        "responses": {
            "200": {"description": "Embeddings", "content": _json(_ref(models.EmbeddingResponse))},
            **_errors(_EMBED_CAUSES, settings, _OPENAI_ERROR),
        },
    }


def _predict_paths(settings: Settings) -> dict[str, Any]:
    unauthorized = {"401": {"description": _UNAUTHORIZED}} if settings.api_key else {}
    return {
        "/predict": {
            "post": {
                "summary": "Embed one text; with `Async-Mode: true`, accept it as a job (202)",
                "parameters": [
                    {
                        "name": "Async-Mode",
                        "in": "header",
                        "required": False,
                        "description": "`true`, `1` or `yes` (any case): run as a job and "
                        "answer 202 at once. Anything else: answer the embedding.",
                        "schema": {"type": "string"},
                    }
                ],
                "requestBody": _body(models.PredictRequest),
                "responses": {
                    "200": {
                        "description": "The embedding",
                        "content": _json(_ref(models.PredictResponse)),
                    },
                    "202": {
                        "description": "Accepted as a job; poll GET /predict/{prediction_id}",
                        "content": _json(_ref(models.PredictAccepted)),
                    },
                    **_errors(_PREDICT_CAUSES, settings),
                },
            }
        },
        "/predict/{prediction_id}": {
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
                        "description": "Done",
                        "content": _json(_ref(models.PredictionDone)),
                    },
                    "400": {
                        "description": "Still being processed",
                        "content": _json(_ref(models.PredictionMessage)),
                    },
                    **unauthorized,
                    "404": {
                        "description": "Unknown or expired id",
                        "content": _json(_ref(models.PredictionMessage)),
                    },
                    "424": {
                        "description": "The job failed; `error` says why",
                        "content": _json(_ref(models.PredictionFailed)),
                    },
                    "503": {"description": "Job store unavailable", "content": _json(_ERROR)},
                },
            }
        },
    }


def _public(summary: str, ok: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "security": [], "responses": {"200": ok}}}


def build_openapi(settings: Settings) -> dict[str, Any]:
    unauthorized = {"401": {"description": _UNAUTHORIZED}} if settings.api_key else {}
    paths: dict[str, Any] = {
        "/embed": {
            "post": _embed_operation("Embed texts (TEI's /embed), batched with others", settings)
        },
        "/": {
            "post": _embed_operation("Same as /embed (TEI routes POST / to /embed)", settings),
            "get": _health_operation("Same as /health"),
        },
        "/invocations": {"post": _embed_operation("SageMaker: same as /embed", settings)},
        "/health": {"get": _health_operation("Readiness: 200, or 503 with the reason")},
        "/ping": {"get": _health_operation("SageMaker: same as /health")},
        "/info": {
            "get": {
                "summary": "TEI's /info with the proxy's own limits and a `proxy` object",
                "responses": {
                    "200": {
                        "description": "Model and limits",
                        "content": _json({"type": "object"}),
                    },
                    **unauthorized,
                },
            }
        },
        "/metrics": _public(
            "Prometheus metrics",
            {
                "description": "Prometheus text format",
                "content": _json({"type": "string"}, "text/plain"),
            },
        ),
        "/openapi.json": _public(
            "This spec", {"description": "OpenAPI 3.1", "content": _json({"type": "object"})}
        ),
        "/docs": _public(
            "Swagger UI for this spec",
            {"description": "An HTML page", "content": _json({"type": "string"}, "text/html")},
        ),
        "/v1/embeddings": {
            "post": _openai_operation(
                "OpenAI embeddings API (as TEI serves it), batched with others", settings
            )
        },
        "/embeddings": {"post": _openai_operation("Alias of /v1/embeddings", settings)},
        **_predict_paths(settings),
        "/batch": {
            "post": {
                "summary": "Embed `[{id, data}]`; each result tied to its id, in input order",
                "requestBody": _body(models.BatchRequest),
                "responses": {
                    "200": {
                        "description": "`{id, embedding}` per item, or `{id, error, error_type}` "
                        "for an item that failed on its own (empty, too long)",
                        "content": _json(_ref(models.BatchResponse)),
                    },
                    **_errors(_BATCH_CAUSES, settings),
                },
            }
        },
    }
    paths["/status.json"] = {
        "get": {
            "summary": "What the /status page shows: per model, rates, latency, queue, batches",
            "responses": {
                "200": {
                    "description": "The status document",
                    "content": _json(_ref(models.StatusDocument)),
                },
                **unauthorized,
            },
        }
    }
    paths.update(status_route_specs())
    for path, item in asset_route_spec().items():
        paths[path] = {method: {**op, "security": []} for method, op in item.items()}
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Embedding batch proxy",
            "version": __version__,
            "description": "Speaks Hugging Face TEI's HTTP API and merges concurrent requests "
            "into batched upstream calls.",
        },
        "paths": paths,
        "components": {"schemas": dict(component_schemas())},
    }
    schemes: dict[str, Any] = {}
    if settings.api_key is not None:
        schemes["apiKey"] = {"type": "http", "scheme": "bearer", "description": "API_KEY"}
        spec["security"] = [{"apiKey": []}]
    if settings.admin_token is not None:
        schemes["adminToken"] = {"type": "http", "scheme": "bearer", "description": "ADMIN_TOKEN"}
        paths["/shutdown"] = {
            "post": {
                "summary": "Graceful shutdown, for operators",
                "security": [{"adminToken": []}],
                "responses": {
                    "202": {
                        "description": "Draining: new requests are refused, accepted work finishes",
                        "content": _json(_ref(models.ShutdownAccepted)),
                    },
                    "401": {"description": "Missing or wrong ADMIN_TOKEN (no body)"},
                    "503": {"description": "Already draining", "content": _json(_ERROR)},
                },
            }
        }
    if schemes:
        spec["components"]["securitySchemes"] = schemes
    return spec
