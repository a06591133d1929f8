"""The cache through the proxy's HTTP API, in front of the TEI double: merging, hits,
exact slots and bytes, Cache-Control, X-Cache-* headers, usage, /info and /metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from proxy.http.keys import CACHE, REGISTRY
from tests.conftest import ProxyFactory
from tests.models import metric as sample
from tests.tei_double import TeiDouble, expected_vector

MODEL = {"model": "test-double/tei", "version": "1"}  # the one model, as the registry names it


def approx(text: str, **kwargs: Any) -> Any:
    return pytest.approx(expected_vector(text, **kwargs), rel=1e-6, abs=1e-7)


def items_sent(double: TeiDouble) -> list[Any]:
    return [item for call in double.calls for item in call.inputs]


async def metric(client: Any, name: str, **labels: str) -> float:
    return sample(await (await client.get("/metrics")).text(), name, **labels)


async def test_200_concurrent_requests_for_one_text_make_one_upstream_item(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    tei_double.config.delay_base_s = 0.3  # all 200 arrive while the first is upstream
    responses = await asyncio.gather(
        *(client.post("/embed", json={"inputs": "one popular text"}) for _ in range(200))
    )
    bodies = [await r.read() for r in responses]
    assert all(r.status == 200 for r in responses)
    assert len(set(bodies)) == 1
    assert items_sent(tei_double) == ["one popular text"]
    merged = await metric(client, "proxy_cache_dedup_merges_total", **MODEL, scope="in_flight")
    hits = await metric(client, "proxy_cache_hits_total", **MODEL, level="memory")
    assert merged + hits == 199


async def test_a_list_mixing_hits_misses_and_repeats_gets_every_vector_in_its_slot(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    warm = await client.post("/embed", json={"inputs": ["hit one", "hit two"]})
    assert warm.headers["X-Cache-Hits"] == "0" and warm.headers["X-Cache-Misses"] == "2"
    texts = ["miss a", "hit one", "miss a", "hit two", "miss b", "hit one", "miss a"]
    resp = await client.post("/embed", json={"inputs": texts})
    assert resp.status == 200
    assert await resp.json() == [approx(t) for t in texts]
    assert tei_double.calls[-1].inputs == ["miss a", "miss b"]
    assert resp.headers["X-Cache-Hits"] == "3"
    assert resp.headers["X-Cache-Misses"] == "4"


async def test_a_hit_answers_the_very_bytes_of_a_miss(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    for path, body in (
        ("/embed", {"inputs": ["same bytes", "twice"]}),
        ("/v1/embeddings", {"input": ["same bytes 2"], "encoding_format": "float"}),
        ("/v1/embeddings", {"input": "same bytes 3", "encoding_format": "base64"}),
        ("/predict", {"input": "same bytes 4"}),
        ("/batch", [{"id": "a", "data": "same bytes 5"}]),
    ):
        miss = await client.post(path, json=body)
        hit = await client.post(path, json=body)
        assert miss.status == hit.status == 200, path
        assert int(miss.headers["X-Cache-Hits"]) == 0 and int(hit.headers["X-Cache-Misses"]) == 0
        assert await miss.read() == await hit.read(), path


async def test_usage_counts_the_same_tokens_for_a_hit_as_for_a_miss(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy()
    body = {"input": ["some words to count", [1, 2, 3, 4, 5]]}
    miss = await (await client.post("/v1/embeddings", json=body)).json()
    resp = await client.post("/v1/embeddings", json=body)
    assert resp.headers["X-Cache-Hits"] == "2"
    hit = await resp.json()
    assert hit["usage"] == miss["usage"] == {"prompt_tokens": 5 + 5, "total_tokens": 10}


async def test_cache_control_no_cache_recomputes_and_stores_no_store_neither_reads_nor_stores(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    await client.post("/embed", json={"inputs": "kept"})
    resp = await client.post(
        "/embed", json={"inputs": "kept"}, headers={"Cache-Control": "no-cache"}
    )
    assert resp.headers["X-Cache-Hits"] == "0" and resp.headers["X-Cache-Misses"] == "1"
    assert items_sent(tei_double) == ["kept", "kept"]
    # no-cache still stored what it computed: a new text, then a normal request hits.
    await client.post("/embed", json={"inputs": "fresh"}, headers={"Cache-Control": "no-cache"})
    resp = await client.post("/embed", json={"inputs": "fresh"})
    assert resp.headers["X-Cache-Hits"] == "1"
    # no-store: not read, not stored.
    resp = await client.post(
        "/embed", json={"inputs": "private"}, headers={"Cache-Control": "max-age=0, No-Store"}
    )
    assert resp.status == 200 and resp.headers["X-Cache-Hits"] == "0"
    resp = await client.post("/embed", json={"inputs": "private"})
    assert resp.headers["X-Cache-Hits"] == "0"
    assert items_sent(tei_double).count("private") == 2
    bypassed = await metric(client, "proxy_cache_bypassed_items_total")
    assert bypassed == 3


async def test_a_caller_who_leaves_does_not_cancel_the_others(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    """The last-waiter rule over real connections: 9 of 10 callers disconnect; the tenth
    still gets its vector, from one upstream item."""
    client = await start_proxy(max_concurrent_batches=1)
    tei_double.config.delay_base_s = 0.4
    url = str(client.make_url("/embed"))
    # One call occupies the only slot, so the shared item is still queued when callers leave.
    blocker = asyncio.ensure_future(client.post("/embed", json={"inputs": "blocker"}))
    await asyncio.sleep(0.1)

    async def leaver(session: aiohttp.ClientSession) -> None:
        with pytest.raises(TimeoutError):
            async with session.post(
                url, json={"inputs": "shared"}, timeout=aiohttp.ClientTimeout(total=0.15)
            ) as resp:
                await resp.read()

    async with aiohttp.ClientSession() as session:
        stayer = asyncio.ensure_future(client.post("/embed", json={"inputs": "shared"}))
        await asyncio.gather(*(leaver(session) for _ in range(9)))
        resp = await stayer
        assert resp.status == 200
        assert await resp.json() == [approx("shared")]
    assert (await blocker).status == 200
    assert items_sent(tei_double) == ["blocker", "shared"]


async def test_when_every_caller_leaves_the_item_is_never_sent(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(max_concurrent_batches=1)
    tei_double.config.delay_base_s = 0.5
    url = str(client.make_url("/embed"))
    blocker = asyncio.ensure_future(client.post("/embed", json={"inputs": "blocker"}))
    await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as session:

        async def leaver() -> None:
            with pytest.raises(TimeoutError):
                async with session.post(
                    url, json={"inputs": "nobody waits"}, timeout=aiohttp.ClientTimeout(0.1)
                ) as resp:
                    await resp.read()

        await asyncio.gather(*(leaver() for _ in range(5)))
    assert (await blocker).status == 200
    await asyncio.sleep(0.1)
    assert "nobody waits" not in items_sent(tei_double)
    assert client.server.app[CACHE].in_flight == 0


async def test_different_options_never_share_an_entry(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    variants: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({}, {}),
        ({"normalize": False}, {"normalize": False}),
        ({"dimensions": 4}, {"dimensions": 4}),
        ({"normalize": False, "dimensions": 4}, {"normalize": False, "dimensions": 4}),
    ]
    for _ in range(2):
        for options, expect in variants:
            resp = await client.post("/embed", json={"inputs": "one text", **options})
            assert await resp.json() == [approx("one text", **expect)]
    assert items_sent(tei_double) == ["one text"] * len(variants)
    # truncate unset is the upstream's auto_truncate (true): it shares with truncate: true.
    resp = await client.post("/embed", json={"inputs": "one text", "truncate": True})
    assert resp.headers["X-Cache-Hits"] == "1"


async def test_an_upstream_refusal_is_never_cached(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    too_long = " ".join(f"w{i}" for i in range(600))  # over the double's 512 tokens
    for _ in range(2):
        resp = await client.post("/embed", json={"inputs": too_long, "truncate": False})
        assert resp.status == 422
    assert items_sent(tei_double).count(too_long) == 2


async def test_batch_keeps_per_item_slots_with_repeats_and_a_bad_item(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    await client.post("/embed", json={"inputs": "b"})
    items = [
        {"id": "1", "data": "a"},
        {"id": "2", "data": ""},
        {"id": "3", "data": "b"},
        {"id": "4", "data": "a"},
    ]
    resp = await client.post("/batch", json=items)
    assert resp.status == 200
    body = await resp.json()
    assert body[0] == {"id": "1", "embedding": approx("a")}
    assert body[1]["id"] == "2" and "error" in body[1]
    assert body[2] == {"id": "3", "embedding": approx("b")}
    assert body[3] == {"id": "4", "embedding": approx("a")}
    # Counted over the items that reached the cache: the empty one never did.
    assert (resp.headers["X-Cache-Hits"], resp.headers["X-Cache-Misses"]) == ("1", "2")
    assert items_sent(tei_double) == ["b", "a"]


async def test_info_and_metrics_show_the_cache(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    await client.post("/embed", json={"inputs": ["x", "y", "x"]})
    await client.post("/embed", json={"inputs": "x"})
    info = (await (await client.get("/info")).json())["proxy"]["cache"]
    assert info["enabled"] is True
    assert info["max_bytes"] == 64 * 1024 * 1024
    assert info["entries"] == 2 and 0 < info["bytes"] < 4096
    assert (info["model"], info["version"]) == ("test-double/tei", "1")
    assert info["upstream"] == "id=test-double/tei;kind=tei;sha=-;dtype=float32;pooling=mean"
    assert info["redis"] is None and info["in_flight"] == 0
    assert await metric(client, "proxy_cache_entries") == 2
    assert await metric(client, "proxy_cache_bytes") == info["bytes"]
    assert await metric(client, "proxy_cache_hits_total", **MODEL, level="memory") == 1
    assert await metric(client, "proxy_cache_misses_total", **MODEL, level="memory") == 3
    assert await metric(client, "proxy_cache_dedup_merges_total", **MODEL, scope="request") == 1


async def test_evicting_the_version_empties_its_entries(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    await client.post("/embed", json={"inputs": ["p", "q"]})
    app = client.server.app
    info = (await (await client.get("/info")).json())["proxy"]["cache"]
    assert app[CACHE].evict_version(info["model"], info["version"]) == 2
    assert app[CACHE].lru.entries == 0
    assert app[REGISTRY].service().cache is app[CACHE]


async def test_cache_size_0_switches_cache_and_dedup_off(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(cache_size_mb=0)
    tei_double.config.delay_base_s = 0.2
    responses = await asyncio.gather(
        *(client.post("/embed", json={"inputs": "no dedup"}) for _ in range(10))
    )
    assert all(r.status == 200 for r in responses)
    assert all("X-Cache-Hits" not in r.headers for r in responses)
    assert items_sent(tei_double) == ["no dedup"] * 10
    info = (await (await client.get("/info")).json())["proxy"]["cache"]
    assert info == {"enabled": False}
    assert CACHE not in client.server.app
