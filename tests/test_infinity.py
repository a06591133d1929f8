"""Opt-in: the proxy in front of Infinity, a real third-party OpenAI-compatible server.

Skipped unless INFINITY_URL is set; `scripts/infinity_integration` sets up Infinity in its own
venv (torch 2.13.0 CPU), serves the packaged all-MiniLM-L6-v2 on loopback, and runs this.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ProxyFactory

INFINITY_URL = os.environ.get("INFINITY_URL")
INFINITY_MODEL = os.environ.get("INFINITY_MODEL", "all-MiniLM-L6-v2")

pytestmark = pytest.mark.skipif(
    not INFINITY_URL, reason="opt-in: run scripts/infinity_integration to test against Infinity"
)

REFERENCE = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text())


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def test_proxy_batches_for_infinity(start_proxy: ProxyFactory) -> None:
    client = await start_proxy(
        upstream_url=INFINITY_URL,
        upstream_kind="openai",
        upstream_model=INFINITY_MODEL,
        upstream_embeddings_path="/embeddings",
        max_batch_size=32,
    )
    sentences: list[str] = REFERENCE["sentences"]
    texts = [sentences[i % len(sentences)] for i in range(64)]
    responses = await asyncio.gather(*(client.post("/embed", json={"inputs": t}) for t in texts))
    bodies: list[Any] = [await r.json() for r in responses]
    assert all(r.status == 200 for r in responses), bodies[0]
    for text, body in zip(texts, bodies, strict=True):
        reference = REFERENCE["embeddings"][sentences.index(text)]
        assert cosine(body[0], reference) >= 0.999
    metrics = await (await client.get("/metrics")).text()
    count_line = next(
        line for line in metrics.splitlines()
        if line.startswith(f'proxy_batch_size_count{{model="{INFINITY_MODEL}",version="1"}}')
    )  # fmt: skip
    batches = float(count_line.split()[-1])
    assert batches < 64, "64 concurrent requests must share upstream calls"
    print(f"Infinity: 64 concurrent requests -> {batches:.0f} upstream calls")
