"""The spec at /openapi.json and the code that validates requests say the same thing.

The request schemas are generated from the pydantic models the routes validate with, so a body
the spec calls valid is accepted and one it calls invalid is refused; and each refusal is
documented under the status the proxy really answers.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from tests.conftest import ProxyFactory

# (route, body): each body is either valid, and then embedded (200), or refused by the
# route's request validation (4xx). None of them is refused later for its content (empty
# text, dimensions over the model's), so "valid per the spec" must mean "200".
# Not here: `4.0` for an integer. JSON Schema counts it as an integer, TEI's serde refuses it
# (422) and so does the proxy; no schema can tell 4.0 from 4.
CORPUS: list[tuple[str, Any]] = [
    ("/embed", {"inputs": "x"}),
    ("/embed", {"inputs": ["a", [101, 102]]}),
    ("/embed", {"inputs": [[1, 2], [3]]}),
    ("/embed", {"inputs": [101, 2023, 102]}),
    ("/embed", {"inputs": 5}),
    ("/embed", {"inputs": [1.5]}),
    ("/embed", {"inputs": [True]}),
    ("/embed", {"inputs": ["a", {"x": 1}]}),
    ("/embed", {"inputs": [-1]}),
    ("/embed", {"inputs": [2**32]}),
    ("/embed", {"inputs": None}),
    ("/embed", {"text": "no inputs"}),
    ("/embed", ["not", "an", "object"]),
    ("/embed", {"inputs": "x", "normalize": None}),
    ("/embed", {"inputs": "x", "normalize": "yes"}),
    ("/embed", {"inputs": "x", "truncate": None}),
    ("/embed", {"inputs": "x", "truncate": 1}),
    ("/embed", {"inputs": "x", "truncation_direction": None}),
    ("/embed", {"inputs": "x", "truncation_direction": "left"}),
    ("/embed", {"inputs": "x", "truncation_direction": "up"}),
    ("/embed", {"inputs": "x", "prompt_name": None}),
    ("/embed", {"inputs": "x", "prompt_name": 5}),
    ("/embed", {"inputs": "x", "dimensions": 4}),
    ("/embed", {"inputs": "x", "dimensions": 0}),
    ("/embed", {"inputs": "x", "dimensions": -1}),
    ("/embed", {"inputs": "x", "dimensions": "8"}),
    ("/embed", {"inputs": "x", "unknown": 1}),
    ("/v1/embeddings", {"input": "x"}),
    ("/v1/embeddings", {"input": ["a", [1, 2]], "model": "m", "user": "u"}),
    ("/v1/embeddings", {"input": 5}),
    ("/v1/embeddings", {"input": "x", "encoding_format": "base64"}),
    ("/v1/embeddings", {"input": "x", "encoding_format": None}),
    ("/v1/embeddings", {"input": "x", "encoding_format": ""}),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}),
    ("/v1/embeddings", {"input": "x", "model": None}),
    ("/v1/embeddings", {"input": "x", "model": 3}),
    ("/v1/embeddings", {"input": "x", "user": 3}),
    ("/v1/embeddings", {"input": "x", "dimensions": 8}),
    ("/v1/embeddings", {"input": "x", "dimensions": -1}),
    ("/v1/embeddings", {"inputs": "wrong field"}),
    ("/predict", {"input": "x"}),
    ("/predict", {"input": "x", "extra": 1}),
    ("/predict", {"input": 5}),
    ("/predict", {"input": None}),
    ("/predict", {"input": ["x"]}),
    ("/predict", "x"),
    ("/batch", [{"id": "a", "data": "x"}, {"id": "b", "data": "y"}]),
    ("/batch", [{"id": "a", "data": "x", "extra": 1}]),
    ("/batch", [{"id": "a"}]),
    ("/batch", [{"id": 1, "data": "x"}]),
    ("/batch", [{"id": "a", "data": None}]),
    ("/batch", {"id": "a", "data": "x"}),
    ("/batch", ["a"]),
]


def request_schema(spec: dict[str, Any], route: str) -> dict[str, Any]:
    """The route's request-body schema, with the spec's components so its $refs resolve."""
    schema = spec["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "components": spec["components"],
    }


@pytest.mark.parametrize(("route", "body"), CORPUS)
async def test_the_spec_accepts_exactly_what_the_route_accepts(
    start_proxy: ProxyFactory, route: str, body: Any
) -> None:
    client = await start_proxy()
    spec = await (await client.get("/openapi.json")).json()
    valid = jsonschema.Draft202012Validator(request_schema(spec, route)).is_valid(body)
    resp = await client.post(route, json=body)
    if valid:
        assert resp.status == 200, await resp.text()
    else:
        assert 400 <= resp.status < 500, await resp.text()
        assert resp.status in (400, 422), resp.status


def test_request_schemas_are_the_validating_models_schemas() -> None:
    from proxy.http.models import (
        BatchRequest,
        EmbeddingRequest,
        EmbedRequest,
        PredictRequest,
        model_schema,
    )
    from proxy.openapi import build_openapi
    from tests.conftest import make_settings

    spec = build_openapi(make_settings())
    components = spec["components"]["schemas"]
    for route, model in (
        ("/embed", EmbedRequest),
        ("/", EmbedRequest),
        ("/invocations", EmbedRequest),
        ("/v1/embeddings", EmbeddingRequest),
        ("/embeddings", EmbeddingRequest),
        ("/predict", PredictRequest),
        ("/batch", BatchRequest),
    ):
        body = spec["paths"][route]["post"]["requestBody"]["content"]["application/json"]
        name = model.__name__
        assert body["schema"] == {"$ref": f"#/components/schemas/{name}"}, route
        schema, defs = model_schema(model)
        assert components[name] == schema
        for def_name, def_schema in defs.items():
            assert components[def_name] == def_schema


# (route, what to send, a phrase the spec must use for it under the status it gets)
REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("/embed", {"json": {"inputs": ["a", "b", "c"]}}, "MAX_CLIENT_BATCH_SIZE"),
    ("/v1/embeddings", {"json": {"input": ["a", "b", "c"]}}, "MAX_CLIENT_BATCH_SIZE"),
    ("/batch", {"json": [{"id": str(i), "data": "x"} for i in range(3)]}, "MAX_BATCH_ITEMS"),
    ("/embed", {"json": {"inputs": "x" * 3000}}, "PAYLOAD_LIMIT"),
    ("/v1/embeddings", {"json": {"input": "x" * 3000}}, "PAYLOAD_LIMIT"),
    ("/predict", {"json": {"input": "x" * 3000}}, "PAYLOAD_LIMIT"),
    ("/batch", {"json": [{"id": "a", "data": "x" * 3000}]}, "PAYLOAD_LIMIT"),
    ("/embed", {"data": b'{"inputs": "x"}'}, "Content-Type"),
    ("/predict", {"data": b'{"input": "x"}'}, "Content-Type"),
    ("/embed", {"json": {"inputs": ""}}, "empty"),
    ("/predict", {"json": {"input": ""}}, "empty"),
    ("/batch", {"json": []}, "empty"),
    ("/embed", {"json": {"inputs": 5}}, "wrong shape"),
    ("/batch", {"json": [{"id": "a", "data": "x"}, {"id": "a", "data": "y"}]}, "duplicate"),
]


@pytest.mark.parametrize(("route", "request_kwargs", "phrase"), REFUSALS)
async def test_the_spec_names_each_refusal_under_the_status_it_gets(
    start_proxy: ProxyFactory, route: str, request_kwargs: dict[str, Any], phrase: str
) -> None:
    client = await start_proxy(max_client_batch_size=2, max_batch_items=2, payload_limit=2000)
    resp = await client.post(route, **request_kwargs)
    assert 400 <= resp.status < 500
    spec = await (await client.get("/openapi.json")).json()
    responses = spec["paths"][route]["post"]["responses"]
    assert str(resp.status) in responses, (route, resp.status)
    described = {
        status: response["description"].lower()
        for status, response in responses.items()
        if int(status) >= 400 and phrase.lower() in response["description"].lower()
    }
    # Named under the status it got, and under no other error status.
    assert list(described) == [str(resp.status)], (route, resp.status, described)
