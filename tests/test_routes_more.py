"""OpenAI embeddings, /predict (sync and async jobs with the memory store), /batch, and the
real client libraries (openai SDK, huggingface_hub) against the proxy over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from typing import Any

import pytest

from tests.conftest import ProxyFactory
from tests.tei_double import Fault, TeiDouble, TeiDoubleConfig, expected_vector


def approx(text: str, **kwargs: Any) -> Any:
    return pytest.approx(expected_vector(text, **kwargs), rel=1e-5, abs=1e-6)


# -- OpenAI embeddings ------------------------------------------------------------------------


async def test_openai_float_response_shape(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    resp = await client.post(
        "/v1/embeddings", json={"input": ["first", "second"], "model": "anything", "user": "u"}
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list"
    assert body["model"] == "test-double/tei"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    assert body["data"][0]["embedding"] == approx("first")
    assert body["data"][1]["embedding"] == approx("second")
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


async def test_openai_base64_is_little_endian_float32(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    resp = await client.post(
        "/embeddings", json={"input": "packed", "encoding_format": "base64", "dimensions": 8}
    )
    assert resp.status == 200
    raw = base64.b64decode((await resp.json())["data"][0]["embedding"])
    assert len(raw) == 8 * 4
    assert list(struct.unpack("<8f", raw)) == approx("packed", dimensions=8)


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"input": ""}, 400, "Empty"),
        ({"input": []}, 400, "Empty"),
        ({"input": 5}, 422, "Validation"),
        ({"input": "x", "encoding_format": "int8"}, 422, "Validation"),
        ({"input": "x", "dimensions": -1}, 422, "Validation"),
        ({"input": "x", "model": 3}, 422, "Validation"),
        ({"inputs": "wrong field"}, 422, "Validation"),
        ("not an object", 422, "Validation"),
    ],
)
async def test_openai_errors_use_tei_openai_shape(
    start_proxy: ProxyFactory, body: Any, status: int, error_type: str
) -> None:
    client = await start_proxy()
    resp = await client.post("/v1/embeddings", json=body)
    assert resp.status == status
    err = await resp.json()
    assert set(err) == {"message", "code", "type"}
    assert err["code"] == status and err["type"] == error_type


async def test_openai_malformed_json_uses_openai_shape(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    resp = await client.post(
        "/v1/embeddings", data=b"{", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert (await resp.json())["code"] == 400


async def test_openai_sdk_with_default_settings(start_proxy: ProxyFactory) -> None:
    openai = pytest.importorskip("openai")
    client = await start_proxy()
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused")
    try:
        result = await sdk.embeddings.create(model="m", input=["alpha", "beta", "gamma"])
    finally:
        await sdk.close()
    # The SDK asked for base64 (its default) and decoded it back to floats.
    assert [d.index for d in result.data] == [0, 1, 2]
    for text, item in zip(("alpha", "beta", "gamma"), result.data, strict=True):
        assert item.embedding == approx(text)


async def test_huggingface_inference_client_on_the_bare_url(start_proxy: ProxyFactory) -> None:
    hub = pytest.importorskip("huggingface_hub")
    client = await start_proxy()
    base = str(client.make_url("")).rstrip("/")
    inference = hub.AsyncInferenceClient(model=base)
    try:
        single = await inference.feature_extraction("hello hub")
        many = await inference.feature_extraction(
            ["one", "two"], truncate=True, truncation_direction="left", normalize=True
        )
    finally:
        await inference.close()
    assert single.shape == (1, 16)
    assert list(single[0]) == approx("hello hub")
    assert [list(row) for row in many] == [approx("one"), approx("two")]


# -- /predict ---------------------------------------------------------------------------------


async def test_predict_sync(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    resp = await client.post("/predict", json={"input": "sync text"})
    assert resp.status == 200
    body = await resp.json()
    assert body["input"] == "sync text"
    assert body["result"] == approx("sync text")


async def poll(client: Any, prediction_id: str, limit_s: float = 10) -> Any:
    deadline = time.monotonic() + limit_s
    while True:
        resp = await client.get(f"/predict/{prediction_id}")
        if resp.status != 400:
            return resp
        assert time.monotonic() < deadline, "job never finished"
        await asyncio.sleep(0.02)


async def test_predict_async_lifecycle(start_proxy: ProxyFactory, tei_double: TeiDouble) -> None:
    client = await start_proxy()
    tei_double.config.delay_base_s = 0.2
    resp = await client.post("/predict", json={"input": "job text"}, headers={"Async-Mode": "true"})
    assert resp.status == 202
    body = await resp.json()
    assert body["message"] == "Request received. Processing asynchronously."
    prediction_id = body["prediction_id"]
    assert len(prediction_id) >= 16
    pending = await client.get(f"/predict/{prediction_id}")
    assert pending.status == 400
    assert await pending.json() == {"error": "Prediction is still being processed."}
    done = await poll(client, prediction_id)
    assert done.status == 200
    result = await done.json()
    assert result["prediction_id"] == prediction_id
    assert result["output"]["input"] == "job text"
    assert result["output"]["result"] == approx("job text")


async def test_async_jobs_are_batched_together(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    tei_double.config.delay_base_s = 0.05
    responses = await asyncio.gather(
        *(
            client.post("/predict", json={"input": f"job {i}"}, headers={"Async-Mode": "true"})
            for i in range(40)
        )
    )
    ids = [(await r.json())["prediction_id"] for r in responses]
    assert len(set(ids)) == 40
    for i, prediction_id in enumerate(ids):
        done = await poll(client, prediction_id)
        assert (await done.json())["output"]["result"] == approx(f"job {i}")
    assert len(tei_double.calls) < 40


async def test_unknown_prediction_is_404(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    resp = await client.get("/predict/does-not-exist")
    assert resp.status == 404
    assert await resp.json() == {"error": "Prediction ID not found."}


async def test_failed_job_is_424(start_proxy: ProxyFactory, tei_double: TeiDouble) -> None:
    client = await start_proxy(upstream_retries=0)
    tei_double.set_fault(Fault.ERROR_500)
    resp = await client.post("/predict", json={"input": "doomed"}, headers={"Async-Mode": "1"})
    prediction_id = (await resp.json())["prediction_id"]
    done = await poll(client, prediction_id)
    assert done.status == 424
    body = await done.json()
    assert body["status"] == "failed" and body["prediction_id"] == prediction_id
    assert "injected failure" in body["error"]


async def test_full_job_queue_is_429(start_proxy: ProxyFactory, tei_double: TeiDouble) -> None:
    client = await start_proxy(max_jobs=2)
    tei_double.config.delay_base_s = 0.5
    statuses = []
    for i in range(4):
        resp = await client.post(
            "/predict", json={"input": f"j{i}"}, headers={"Async-Mode": "true"}
        )
        statuses.append(resp.status)
        if resp.status == 429:
            assert resp.headers["Retry-After"]
            assert (await resp.json())["error_type"] == "Overloaded"
    assert statuses[:2] == [202, 202] and 429 in statuses[2:]


@pytest.mark.parametrize(
    ("body", "status"),
    [({"input": ""}, 400), ({"input": 5}, 422), ({"text": "x"}, 422), (["x"], 422)],
)
async def test_predict_bad_input(start_proxy: ProxyFactory, body: Any, status: int) -> None:
    client = await start_proxy()
    for headers in ({}, {"Async-Mode": "true"}):
        resp = await client.post("/predict", json=body, headers=headers)
        assert resp.status == status
        assert "error_type" in await resp.json()


# -- /batch -----------------------------------------------------------------------------------


async def test_batch_with_ids_keeps_order(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    items = [{"id": f"id-{i}", "data": f"doc {i}"} for i in range(20)]
    resp = await client.post("/batch", json=items)
    assert resp.status == 200
    body = await resp.json()
    assert [b["id"] for b in body] == [i["id"] for i in items]
    for item, out in zip(items, body, strict=True):
        assert out["embedding"] == approx(item["data"])


@pytest.fixture
def tei_config() -> TeiDoubleConfig:
    return TeiDoubleConfig(auto_truncate=False)


async def test_batch_items_fail_alone(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    too_long = " ".join(["w"] * 600)  # the upstream refuses it: truncation is off there
    items = [
        {"id": "a", "data": "fine"},
        {"id": "b", "data": ""},
        {"id": "c", "data": too_long},
        {"id": "d", "data": "also fine"},
    ]
    resp = await client.post("/batch", json=items)
    assert resp.status == 200
    a, b, c, d = await resp.json()
    assert a == {"id": "a", "embedding": approx("fine")}
    assert b["id"] == "b" and b["error_type"] == "Empty" and "empty" in b["error"]
    assert c["id"] == "c" and c["error_type"] == "Validation" and "512 tokens" in c["error"]
    assert d == {"id": "d", "embedding": approx("also fine")}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"id": "1", "data": "x"}, "JSON list"),
        ([{"id": "1", "data": "x"}, {"data": "no id"}], "#1"),
        ([{"id": "1", "data": "x"}, {"id": 2, "data": "y"}], "#1"),
        ([{"id": "1", "data": "x"}, {"id": "bad", "data": 7}], "'bad'"),
        ([{"id": "1", "data": "x"}, "text"], "#1"),
        ([{"id": "dup", "data": "x"}, {"id": "dup", "data": "y"}], "duplicate ids: 'dup'"),
        ([{"id": str(i), "data": "x"} for i in range(101)], "batch size 101 > maximum"),
    ],
)
async def test_malformed_batch_is_refused_whole(
    start_proxy: ProxyFactory, tei_double: TeiDouble, body: Any, fragment: str
) -> None:
    client = await start_proxy()
    resp = await client.post("/batch", json=body)
    assert resp.status == 422
    err = await resp.json()
    assert err["error_type"] == "Validation" and fragment in err["error"]
    assert tei_double.calls == []
