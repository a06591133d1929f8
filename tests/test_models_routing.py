"""Several models behind one proxy: every way of choosing a model and version, the sticky
A/B split, per-model isolation, and the real openai and huggingface_hub clients."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import huggingface_hub as hub
import openai
import pytest

from proxy.context import RequestContext
from proxy.http.keys import REGISTRY
from tests.conftest import ProxyFactory
from tests.models import (
    ADMIN,
    StartModels,
    Upstream,
    listing,
    metric,
    source_of,
    two_models,
    wait_until,
)
from tests.tei_double import Fault, expected_vector


def only(config: dict[str, Any], model: str, version: str) -> dict[str, Any]:
    """``config`` with ``model``'s whole traffic on ``version``."""
    config["models"][model]["traffic"] = {version: 100}
    return config


async def embed(client: Any, path: str, text: str, **headers: str) -> tuple[str, list[float]]:
    resp = await client.post(path, json={"inputs": text}, headers=headers)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    return resp.headers["X-Model"], body[0]


async def test_every_way_of_naming_a_model_reaches_its_upstream(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    client = await start_models(only(two_models(up), "minilm", "1"))
    text = "the same text for every model"
    cases = [
        ("/embed", {}, "minilm@1", "a"),  # the default model
        ("/embed", {"X-Model": "default"}, "minilm@1", "a"),
        ("/embed", {"X-Model": "bge"}, "bge@1", "c"),
        ("/embed", {"X-Model": "minilm@2"}, "minilm@2", "b"),  # pinned, though without traffic
        ("/", {"X-Model": "bge"}, "bge@1", "c"),
        ("/invocations", {"X-Model": "minilm@2"}, "minilm@2", "b"),
        ("/models/bge/embed", {}, "bge@1", "c"),
        ("/models/bge", {}, "bge@1", "c"),  # what InferenceClient(model=URL) posts to
        ("/models/bge/", {}, "bge@1", "c"),
        ("/models/minilm@2/invocations", {}, "minilm@2", "b"),
        ("/models/bge/embed", {"X-Model": "minilm"}, "bge@1", "c"),  # the path wins
    ]
    for path, headers, served, seed in cases:
        got, vector = await embed(client, path, text, **headers)
        assert (got, source_of(up, text, vector)) == (served, seed), (path, headers)

    # OpenAI's `model`, /predict's and /batch's `model` fields.
    resp = await client.post("/v1/embeddings", json={"input": text, "model": "bge"})
    body = await resp.json()
    assert resp.headers["X-Model"] == "bge@1" and body["model"] == "bge"
    assert source_of(up, text, body["data"][0]["embedding"]) == "c"
    resp = await client.post("/predict", json={"input": text, "model": "minilm@2"})
    assert resp.headers["X-Model"] == "minilm@2"
    assert source_of(up, text, (await resp.json())["result"]) == "b"
    resp = await client.post(
        "/batch",
        json=[
            {"id": "x", "data": text, "model": "bge"},
            {"id": "y", "data": text},
            {"id": "z", "data": text, "model": "minilm@2"},
        ],
    )
    assert resp.status == 200
    assert resp.headers["X-Model"] == "bge@1, minilm@1, minilm@2"
    items = {item["id"]: item["embedding"] for item in await resp.json()}
    assert {i: source_of(up, text, v) for i, v in items.items()} == {"x": "c", "y": "a", "z": "b"}

    # /info, /health and /v1/models per model.
    resp = await client.get("/models/bge/info")
    info = await resp.json()
    assert info["model_id"] == "org/model-c" and resp.headers["X-Model"] == "bge@1"
    assert info["proxy"]["model"] == "bge" and info["proxy"]["traffic"] == {"1": 100}
    info = await (await client.get("/info", headers={"X-Model": "minilm@2"})).json()
    assert info["model_id"] == "org/model-b"
    assert (await (await client.get("/info")).json())["model_id"] == "org/model-a"
    for path in ("/models/bge/health", "/models/minilm@2/health", "/models/bge", "/health"):
        assert (await client.get(path)).status == 200, path
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["bge", "minilm"]
    assert models["object"] == "list" and models["data"][0]["object"] == "model"


async def test_unknown_models_are_404_in_each_routes_own_shape(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    client = await start_models(two_models(upstreams))
    for path, headers in [
        ("/embed", {"X-Model": "nope"}),
        ("/embed", {"X-Model": "minilm@9"}),
        ("/models/nope/embed", {}),
        ("/models/nope", {}),
    ]:
        resp = await client.post(path, json={"inputs": "x"}, headers=headers)
        assert resp.status == 404, path
        body = await resp.json()
        assert body["error_type"] == "NotFound" and "not found" in body["error"]
        assert "X-Model" not in resp.headers
    for path in ("/models/nope/info", "/models/nope/health", "/info"):
        resp = await client.get(path, headers={"X-Model": "nope"})
        assert resp.status == 404, path
    resp = await client.post("/v1/embeddings", json={"input": "x", "model": "nope"})
    assert resp.status == 404
    assert (await resp.json()) == {
        "error": {
            "message": "The model `nope` does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    resp = await client.post("/predict", json={"input": "x", "model": "nope"})
    assert resp.status == 404 and (await resp.json())["error_type"] == "NotFound"
    # Async: refused when submitted, not failed later.
    resp = await client.post(
        "/predict", json={"input": "x", "model": "nope"}, headers={"Async-Mode": "true"}
    )
    assert resp.status == 404
    resp = await client.post("/batch", json=[{"id": "a", "data": "x", "model": "nope"}])
    assert resp.status == 404
    # With other models beside it, only the unknown model's items fail.
    resp = await client.post(
        "/batch", json=[{"id": "a", "data": "x", "model": "nope"}, {"id": "b", "data": "x"}]
    )
    body = await resp.json()
    assert resp.status == 200 and body[0]["error_type"] == "NotFound" and "embedding" in body[1]


async def test_the_split_is_90_10_over_users_and_sticky(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    client = await start_models(two_models(up))
    registry = client.app[REGISTRY]

    def version_for(user: str | None, text: str = "hello") -> str:
        ctx = RequestContext(request_id="r", user=user, requested_model="minilm")
        _, mv = registry.resolve(ctx, [text])
        return mv.version

    by_user = Counter(version_for(f"user-{i}") for i in range(10_000))
    assert abs(by_user["1"] / 10_000 - 0.90) <= 0.02, by_user
    by_text = Counter(version_for(None, f"text number {i}") for i in range(10_000))
    assert abs(by_text["1"] / 10_000 - 0.90) <= 0.02, by_text

    # Over HTTP: one user always gets one version, whatever the text, on every route.
    users = [f"user-{i}" for i in range(40)]
    expected = {u: version_for(u) for u in users}
    assert set(expected.values()) == {"1", "2"}  # both versions among these users
    for user in users:
        for n in range(3):
            text = f"{user} asks question {n}"
            served, vector = await embed(client, "/embed", text, **{"X-User-Id": user})
            assert served == f"minilm@{expected[user]}"
            assert source_of(up, text, vector) == {"1": "a", "2": "b"}[expected[user]]
        resp = await client.post("/v1/embeddings", json={"input": "q", "user": user})
        assert resp.headers["X-Model"] == f"minilm@{expected[user]}"
    # Without a user the same text goes to the same version every time.
    for i in range(30):
        text = f"anonymous text {i}"
        first, _ = await embed(client, "/embed", text)
        for _ in range(2):
            assert (await embed(client, "/embed", text))[0] == first


async def test_one_models_trouble_never_blocks_another(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    config = only(two_models(up), "minilm", "1")
    # bge: a small queue behind one slow call at a time.
    config["models"]["bge"]["versions"]["1"].update(max_queue_size=4, max_concurrent_batches=1)
    client = await start_models(config, breaker_threshold=2, upstream_retries=0)

    # Each model batches on its own: concurrent callers of both never share an upstream call.
    texts = [f"text {i}" for i in range(8)]
    answers = await asyncio.gather(
        *(
            embed(client, "/embed", t, **{"X-Model": ("bge", "minilm")[i % 2]})
            for i, t in enumerate(texts)
        )
    )
    for i, (served, vector) in enumerate(answers):
        assert source_of(up, texts[i], vector) == ("c", "a")[i % 2], served
    sent_to_a = {t for call in up["a"].double.calls for t in call.inputs}
    sent_to_c = {t for call in up["c"].double.calls for t in call.inputs}
    assert sent_to_a == set(texts[1::2]) | {"probe"} and sent_to_c == set(texts[::2]) | {"probe"}

    # A full queue on bge: 429 for bge, nothing for minilm.
    up["c"].double.config.delay_base_s = 0.3
    responses = await asyncio.gather(
        *(
            client.post("/embed", json={"inputs": f"q{i}"}, headers={"X-Model": "bge"})
            for i in range(12)
        ),
        *(client.post("/embed", json={"inputs": f"m{i}"}) for i in range(6)),
    )
    statuses = [r.status for r in responses]
    assert 429 in statuses[:12] and statuses[12:] == [200] * 6, statuses
    up["c"].double.config.delay_base_s = 0.0

    # bge's upstream fails: its breaker opens; minilm and the proxy's readiness are fine.
    up["c"].double.set_fault(Fault.ERROR_500)
    for _ in range(5):
        resp = await client.post("/embed", json={"inputs": "x"}, headers={"X-Model": "bge"})
        if resp.status == 503:
            break
    assert resp.status == 503 and "circuit breaker" in (await resp.json())["error"]
    assert (await embed(client, "/embed", "still fine"))[0] == "minilm@1"
    assert (await client.get("/models/bge/health")).status == 503
    assert (await client.get("/models/minilm/health")).status == 200
    assert (await client.get("/health")).status == 200
    listed = {m["name"]: m for m in (await listing(client))["models"]}
    assert listed["bge"]["versions"][0]["breaker_open"] is True
    assert listed["minilm"]["versions"][0]["breaker_open"] is False
    # Metrics carry the model and version.
    page = await (await client.get("/metrics")).text()
    assert metric(page, "proxy_breaker_opened_total", model="bge", version="1") == 1
    assert metric(page, "proxy_breaker_opened_total", model="minilm", version="1") == 0
    assert metric(page, "proxy_batch_size_count", model="minilm", version="1") > 0
    assert metric(page, "proxy_rejected_requests_total", model="bge", version="1") > 0


async def test_async_jobs_remember_their_model_and_version(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    client = await start_models(two_models(up))
    ids = {}
    for model in ("bge", "minilm@2"):
        resp = await client.post(
            "/predict", json={"input": "a job", "model": model}, headers={"Async-Mode": "true"}
        )
        assert resp.status == 202
        ids[model] = (await resp.json())["prediction_id"]

    async def done() -> bool:
        for prediction_id in ids.values():
            if (await client.get(f"/predict/{prediction_id}")).status != 200:
                return False
        return True

    await wait_until(done, "both jobs done")
    for model, seed in (("bge", "c"), ("minilm@2", "b")):
        resp = await client.get(f"/predict/{ids[model]}")
        assert resp.headers["X-Model"] == (model if "@" in model else f"{model}@1")
        result = (await resp.json())["output"]["result"]
        assert source_of(up, "a job", result) == seed


async def test_the_openai_sdk_selects_models_by_name(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    client = await start_models(only(two_models(up), "minilm", "1"))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    try:
        listed = await sdk.models.list()
        assert sorted(m.id for m in listed.data) == ["bge", "minilm"]
        for model, seed in (("bge", "c"), ("minilm", "a"), ("minilm@2", "b")):
            result = await sdk.embeddings.create(model=model, input=["alpha", "beta"])
            assert [
                source_of(up, t, d.embedding)
                for t, d in zip(["alpha", "beta"], result.data, strict=True)
            ] == [seed, seed]
            assert result.model == model.split("@")[0]
        with pytest.raises(openai.NotFoundError) as missing:
            await sdk.embeddings.create(model="text-embedding-3-small", input="x")
        assert missing.value.code == "model_not_found"
    finally:
        await sdk.close()


async def test_huggingface_hub_picks_a_model_through_the_path(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    client = await start_models(only(two_models(up), "minilm", "1"))
    for path, seed in (("/models/bge", "c"), ("/models/minilm@2", "b"), ("/models/default", "a")):
        inference = hub.AsyncInferenceClient(model=str(client.make_url(path)))
        try:
            vectors = await inference.feature_extraction("hello hub", normalize=True)
        finally:
            await inference.close()
        assert source_of(up, "hello hub", [float(x) for x in vectors[0]]) == seed, path


async def test_without_models_config_the_one_model_is_named_after_the_upstream(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy()
    resp = await client.post("/embed", json={"inputs": "hi"})
    assert resp.headers["X-Model"] == "test-double/tei@1"
    assert (await resp.json())[0] == pytest.approx(expected_vector("hi"))
    # Any name means the one model, as TEI ignores OpenAI's `model`; its own name and the
    # alias `default` work too.
    for name in ("text-embedding-3-small", "default", "test-double/tei"):
        resp = await client.post("/v1/embeddings", json={"input": "hi", "model": name})
        assert resp.status == 200 and (await resp.json())["model"] == "test-double/tei"
    resp = await client.post("/models/test-double/tei/embed", json={"inputs": "hi"})
    assert resp.status == 200 and resp.headers["X-Model"] == "test-double/tei@1"
    # A version it does not have is named explicitly: that is a 404.
    resp = await client.post("/embed", json={"inputs": "hi"}, headers={"X-Model": "default@7"})
    assert resp.status == 404
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["test-double/tei"]
    # No admin token: no admin routes.
    assert (await client.get("/admin/models", headers=ADMIN)).status == 404
