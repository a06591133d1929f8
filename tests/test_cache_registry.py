"""The cache with several models and versions (MODELS_CONFIG): versions never share an entry,
a version that leaves the registry takes its vectors with it, a version name reused for other
weights never answers with the old ones, probes always reach the upstream, and a /batch of
several models counts its hits as one request."""

from __future__ import annotations

from typing import Any

from proxy.http.keys import CACHE
from tests.models import (
    ADMIN,
    StartModels,
    Upstream,
    metric,
    source_of,
    two_models,
    wait_until,
)


def items(upstream: Upstream) -> list[Any]:
    return [item for call in upstream.double.calls for item in call.inputs]


async def embed(client: Any, texts: list[str], model: str) -> tuple[list[Any], Any]:
    resp = await client.post("/embed", json={"inputs": texts}, headers={"X-Model": model})
    assert resp.status == 200, await resp.text()
    return await resp.json(), resp.headers


async def test_versions_never_share_an_entry(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    client = await start_models(two_models(up))
    for _ in range(2):
        for model, seed in (("minilm@1", "a"), ("minilm@2", "b"), ("bge", "c")):
            body, headers = await embed(client, ["same text"], model)
            assert source_of(up, "same text", body[0]) == seed
    # Each version computed it once; the second round was three hits.
    assert [items(up[s]).count("same text") for s in "abc"] == [1, 1, 1]
    assert headers["X-Cache-Hits"] == "1"
    page = await (await client.get("/metrics")).text()
    assert metric(page, "proxy_cache_hits_total", model="minilm", version="2") == 1
    assert metric(page, "proxy_cache_hits_total", model="bge", version="1") == 1


async def test_a_version_that_leaves_the_registry_takes_its_vectors(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    client = await start_models(two_models(upstreams))
    cache = client.server.app[CACHE]
    await embed(client, ["x", "y"], "minilm@2")
    await embed(client, ["x"], "minilm@1")
    assert cache.lru.entries == 3
    resp = await client.put("/admin/models/minilm/traffic", json={"1": 100}, headers=ADMIN)
    assert resp.status == 200
    resp = await client.delete("/admin/models/minilm/versions/2", headers=ADMIN)
    assert resp.status == 202

    async def dropped() -> bool:
        return cache.lru.entries == 1

    await wait_until(dropped, "version 2's vectors dropped once it closed")
    assert cache.lru.stats().evicted_for_version == 2
    _, headers = await embed(client, ["x"], "minilm@1")  # version 1's entry is still there
    assert headers["X-Cache-Hits"] == "1"


async def test_a_version_name_reused_for_other_weights_never_answers_with_the_old_ones(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    client = await start_models(two_models(up))
    body, _ = await embed(client, ["reused"], "minilm@2")
    assert source_of(up, "reused", body[0]) == "b"
    # minilm@2 is now served by c's weights: the old vector (b's) must never come back.
    resp = await client.put(
        "/admin/models/minilm/versions/2", json={"upstream": up["c"].url}, headers=ADMIN
    )
    assert resp.status in (200, 201), await resp.text()

    async def replaced() -> bool:
        body, _ = await embed(client, ["probe text"], "minilm@2")
        return source_of(up, "probe text", body[0]) == "c"

    await wait_until(replaced, "the replacement serving")
    body, headers = await embed(client, ["reused"], "minilm@2")
    assert source_of(up, "reused", body[0]) == "c"
    assert headers["X-Cache-Hits"] == "0"


async def test_a_new_versions_probe_reaches_its_upstream_even_when_redis_holds_the_answer(
    start_models: StartModels, upstreams: dict[str, Upstream], redis_url: str
) -> None:
    """Two replicas share Redis; the second registers the same version the first probed. A
    probe answered from Redis would pass for a dead upstream: it must reach the upstream."""
    up = upstreams
    config = two_models(up)
    first = await start_models(config, cache_url=redis_url, cache_timeout_ms=200)
    probes = items(up["b"]).count("probe")
    assert probes == 1
    # A client asks for the same text: the probe stored nothing, so it is computed, and
    # stored (in Redis too) this time.
    await embed(first, ["probe"], "minilm@2")
    assert items(up["b"]).count("probe") == 2
    second = await start_models(config, cache_url=redis_url, cache_timeout_ms=200)
    assert items(up["b"]).count("probe") == 3  # the second replica's probe
    # Ordinary requests do share through Redis.
    _, headers = await embed(second, ["probe"], "minilm@2")
    assert headers["X-Cache-Hits"] == "1"


async def test_a_batch_of_several_models_counts_its_hits_as_one_request(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    client = await start_models(two_models(upstreams))
    await embed(client, ["known"], "bge")
    items_ = [
        {"id": "1", "data": "known", "model": "bge"},
        {"id": "2", "data": "new", "model": "minilm@1"},
        {"id": "3", "data": "known", "model": "minilm@1"},
    ]
    resp = await client.post("/batch", json=items_)
    assert resp.status == 200
    assert (resp.headers["X-Cache-Hits"], resp.headers["X-Cache-Misses"]) == ("1", "2")
