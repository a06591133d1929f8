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
from proxy.models_config import VersionConfig
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
    models.ModelList,
    models.OpenAIModelNotFound,
    VersionConfig,
    models.TrafficRequest,
    models.ShadowRequest,
    models.AdminModels,
    models.RegisteredVersion,
    models.VersionRemoved,
    models.TrafficSet,
    models.ShadowSet,
    models.ReloadSummary,
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
_NOT_FOUND = (
    "Unknown model or version (`NotFound`): with MODELS_CONFIG, a name the proxy does not "
    "route to; without it, only a `name@version` it does not have"
)

_EMBED_CAUSES: dict[int, str] = {
    400: f"{_MALFORMED}, or an empty input: an empty text, `[]` or an empty id list (`Empty`)",
    413: _TOO_LARGE,
    415: _CONTENT_TYPE,
    422: "JSON of the wrong shape; more inputs than MAX_CLIENT_BATCH_SIZE; an input over the "
    "character limit, or token ids over the model's max_input_length with truncation off; "
    "bad `dimensions` or `prompt_name`; an input the upstream refuses (`Validation`)",
    424: "The upstream failed on this input (`Backend`)",
    404: _NOT_FOUND,
    429: _OVERLOADED,
    500: _INTERNAL,
    502: "The upstream answered something malformed (`Upstream`)",
    503: f"{_UNAVAILABLE}; the model is still loading",
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
    404: f"{_NOT_FOUND}, when every item names the same model (with several, an unknown "
    "model's items get the error in their slots)",
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


_STRING = {"type": "string"}
# The embedding cache: what a request may ask of it, and what the answer tells.
CACHE_CONTROL = {
    "name": "Cache-Control",
    "in": "header",
    "required": False,
    "description": "`no-cache`: do not answer from the cache (the vectors computed are still "
    "stored); `no-store`: neither read nor store. Other directives are ignored.",
    "schema": _STRING,
}
_CACHE_HEADERS = {
    "X-Cache-Hits": {
        "schema": _STRING,
        "description": "Inputs answered from the cache (memory or Redis); absent when the "
        "cache is off",
    },
    "X-Cache-Misses": {
        "schema": _STRING,
        "description": "Inputs the cache did not hold; absent when the cache is off",
    },
}
_SERVED_AS = {"X-Model": {"schema": _STRING, "description": "`name@version` that answered"}}
_EMBEDDED = {**_SERVED_AS, **_CACHE_HEADERS}  # what an embedding answer's headers say
# How a request names its model: a header on TEI's routes, the path under /models/{name}.
X_MODEL = {
    "name": "X-Model",
    "in": "header",
    "required": False,
    "description": "`name` (the traffic split picks the version), `name@version`, or "
    "`default`. Absent: the default model.",
    "schema": _STRING,
}
X_USER = {
    "name": "X-User-Id",
    "in": "header",
    "required": False,
    "description": "Keeps this caller on one version of an A/B split (sticky).",
    "schema": _STRING,
}
NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "`name`, `name@version`, or `default`.",
    "schema": {"type": "string", "minLength": 1},
}


def _embed_operation(summary: str, settings: Settings) -> dict[str, Any]:
    header = {"schema": _STRING}
    return {
        "summary": summary,
        "parameters": [X_MODEL, X_USER, CACHE_CONTROL],
        "requestBody": _body(models.EmbedRequest),
        "responses": {
            "200": {
                "description": "One vector per input, in input order",
                "headers": {
                    "x-compute-time": {**header, "description": "Milliseconds"},
                    "x-total-time": {**header, "description": "Milliseconds"},
                    "x-compute-characters": {**header, "description": "Characters embedded"},
                    **_EMBEDDED,
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
        "parameters": [X_MODEL],
        "responses": {
            "200": {"description": "Ready (no body)"},
            "404": {"description": _NOT_FOUND, "content": _json(_ERROR)},
            "503": {
                "description": "Upstream unhealthy, circuit breaker open, starting, or "
                "draining. Without a model named: no model can serve",
                "content": _json(_ERROR),
            },
        },
    }


def _info_operation(settings: Settings) -> dict[str, Any]:
    unauthorized = {"401": {"description": _UNAUTHORIZED}} if settings.api_key else {}
    return {
        "summary": "TEI's /info of a model's version, with the proxy's own limits and a "
        "`proxy` object (the model, its version and its traffic split)",
        "parameters": [X_MODEL],
        "responses": {
            "200": {
                "description": "Model and limits",
                "headers": _SERVED_AS,
                "content": _json({"type": "object"}),
            },
            **unauthorized,
            "404": {"description": _NOT_FOUND, "content": _json(_ERROR)},
            "503": {"description": "The model is still loading", "content": _json(_ERROR)},
        },
    }


def _openai_operation(summary: str, settings: Settings) -> dict[str, Any]:
    responses = _errors(_EMBED_CAUSES, settings, _OPENAI_ERROR)
    responses["404"] = {
        "description": "Unknown model: OpenAI's own body, code `model_not_found` (only with "
        "MODELS_CONFIG, or for a `name@version` the proxy does not have)",
        "content": _json(_ref(models.OpenAIModelNotFound)),
    }
    return {
        "summary": summary,
        "parameters": [X_USER, CACHE_CONTROL],
        "requestBody": _body(models.EmbeddingRequest),
        "responses": {
            "200": {
                "description": "Embeddings",
                "headers": _EMBEDDED,
                "content": _json(_ref(models.EmbeddingResponse)),
            },
            **responses,
        },
    }


def _under_model(operation: dict[str, Any]) -> dict[str, Any]:
    """The same operation under /models/{name}: the path names the model, not X-Model."""
    parameters = [p for p in operation.get("parameters", []) if p is not X_MODEL]
    return {**operation, "parameters": [NAME, *parameters]}


def _predict_paths(settings: Settings) -> dict[str, Any]:
    unauthorized = {"401": {"description": _UNAUTHORIZED}} if settings.api_key else {}
    return {
        "/predict": {
            "post": {
                "summary": "Embed one text; with `Async-Mode: true`, accept it as a job (202)",
                "parameters": [
                    X_MODEL,
                    X_USER,
                    {
                        "name": "Async-Mode",
                        "in": "header",
                        "required": False,
                        "description": "`true`, `1` or `yes` (any case): run as a job and "
                        "answer 202 at once. Anything else: answer the embedding.",
                        "schema": {"type": "string"},
                    },
                    CACHE_CONTROL,
                ],
                "requestBody": _body(models.PredictRequest),
                "responses": {
                    "200": {
                        "description": "The embedding",
                        "headers": _EMBEDDED,
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
                        "headers": {
                            "X-Model": {
                                "schema": _STRING,
                                "description": "`name@version` the job was accepted for",
                            }
                        },
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
        "/info": {"get": _info_operation(settings)},
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
        "/v1/models": {
            "get": {
                "summary": "The models the proxy routes to, in OpenAI's shape",
                "responses": {
                    "200": {"description": "Models", "content": _json(_ref(models.ModelList))},
                    **unauthorized,
                },
            }
        },
        **_predict_paths(settings),
        "/batch": {
            "post": {
                "summary": "Embed `[{id, data}]`; each result tied to its id, in input order",
                "parameters": [X_MODEL, X_USER, CACHE_CONTROL],
                "requestBody": _body(models.BatchRequest),
                "responses": {
                    "200": {
                        "description": "`{id, embedding}` per item, or `{id, error, error_type}` "
                        "for an item that failed on its own (empty, too long)",
                        "headers": {
                            "X-Model": {
                                "schema": _STRING,
                                "description": "`name@version` that answered; with several "
                                "models, each, comma-separated",
                            },
                            **_CACHE_HEADERS,
                        },
                        "content": _json(_ref(models.BatchResponse)),
                    },
                    **_errors(_BATCH_CAUSES, settings),
                },
            }
        },
    }
    paths["/status.json"] = {
        "get": {
            "summary": "What the /status page shows: per model and version, rates, latency, "
            "queue, batches, the traffic split",
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
    # TEI's routes again under /models/{name}/, for clients that only take a base URL.
    prefix = "/models/{name}"
    for path in ("/embed", "/", "/invocations", "/health", "/ping", "/info"):
        paths[prefix + path] = {
            method: _under_model(operation) for method, operation in paths[path].items()
        }
    paths[prefix] = {
        "post": _under_model(_embed_operation("Same as /models/{name}/embed", settings)),
        "get": _under_model(_health_operation("Same as /models/{name}/health")),
    }
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
    if settings.admin_token is not None:
        paths.update(_admin_paths())
    if schemes:
        spec["components"]["securitySchemes"] = schemes
    return spec


def _admin_paths() -> dict[str, Any]:
    admin: list[dict[str, list[str]]] = [{"adminToken": []}]
    refused = {"401": {"description": "Missing or wrong ADMIN_TOKEN (no body)"}}
    draining = {"503": {"description": "The proxy is draining", "content": _json(_ERROR)}}
    invalid = {
        "422": {"description": "A body or name that cannot be applied", "content": _json(_ERROR)}
    }
    unknown = {"404": {"description": "Unknown model or version", "content": _json(_ERROR)}}
    conflict = "409"
    name = {**NAME, "description": "A model name (one `/` allowed, as in org/model)."}
    version = {
        "name": "version",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
    }

    def ok(model: type[BaseModel], description: str, status: str = "200") -> dict[str, Any]:
        return {status: {"description": description, "content": _json(_ref(model))}}

    return {
        "/admin/models": {
            "get": {
                "summary": "Every model and version: state, replicas, traffic, queue depth, "
                "concurrency limit",
                "security": admin,
                "responses": {**ok(models.AdminModels, "The registry"), **refused, **draining},
            }
        },
        "/admin/models/{name}/versions/{version}": {
            "put": {
                "summary": "Start a version, check its /info and a probe embedding, then make "
                "it routable (a new model gets all its traffic; a replaced version keeps its "
                "weight). On failure nothing routable changes.",
                "security": admin,
                "parameters": [name, version],
                "requestBody": _body(VersionConfig),
                "responses": {
                    **ok(models.RegisteredVersion, "Replaced"),
                    **ok(models.RegisteredVersion, "Added", "201"),
                    **refused,
                    **invalid,
                    "502": {
                        "description": "Not registered: the step that failed and why",
                        "content": _json(_ERROR),
                    },
                    **draining,
                },
            },
            "delete": {
                "summary": "Out of routing: it finishes what it holds, then closes",
                "security": admin,
                "parameters": [name, version],
                "responses": {
                    **ok(models.VersionRemoved, "Draining", "202"),
                    **refused,
                    **unknown,
                    conflict: {
                        "description": "The only version with traffic, or the shadow target",
                        "content": _json(_ERROR),
                    },
                    **draining,
                },
            },
        },
        "/admin/models/{name}/traffic": {
            "put": {
                "summary": "Set the model's traffic split (weights per version)",
                "security": admin,
                "parameters": [name],
                "requestBody": _body(models.TrafficRequest),
                "responses": {
                    **ok(models.TrafficSet, "The new split"),
                    **refused,
                    **unknown,
                    conflict: {
                        "description": "A weight for a version that is not ready",
                        "content": _json(_ERROR),
                    },
                    **invalid,
                    **draining,
                },
            }
        },
        "/admin/models/{name}/shadow": {
            "put": {
                "summary": "Set (or, with null, stop) the model's shadow traffic",
                "security": admin,
                "parameters": [name],
                "requestBody": _body(models.ShadowRequest),
                "responses": {
                    **ok(models.ShadowSet, "The new shadow"),
                    **refused,
                    **unknown,
                    **invalid,
                    **draining,
                },
            }
        },
        "/admin/reload": {
            "post": {
                "summary": "Re-read MODELS_CONFIG and apply the difference at once (as SIGHUP)",
                "security": admin,
                "responses": {
                    **ok(models.ReloadSummary, "Applied"),
                    **refused,
                    conflict: {"description": "MODELS_CONFIG is not set", "content": _json(_ERROR)},
                    "422": {
                        "description": "The file is invalid (one line naming the place)",
                        "content": _json(_ERROR),
                    },
                    "502": {
                        "description": "A new version failed its checks; nothing changed",
                        "content": _json(_ERROR),
                    },
                    **draining,
                },
            }
        },
    }
