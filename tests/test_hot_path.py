"""The cheaper per-request path: TEI's vectors passed through as the bytes TEI wrote, one
input without a gather, request ids without a uuid4 each."""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.http.common import dumps, vectors_json
from proxy.upstream.base import RawVector
from proxy.upstream.tei import split_rows
from tests.conftest import ProxyFactory
from tests.tei_double import Fault, TeiDouble, expected_vector

ROWS = [[0.25, -1.5, 3e-05], [1.0, 2.0, -0.0]]


@pytest.mark.parametrize("body", [orjson.dumps(ROWS), json.dumps(ROWS).encode()])
def test_split_rows_slices_teis_body_into_its_rows(body: bytes) -> None:
    rows = split_rows(body, 2)
    assert rows is not None
    assert [type(r) for r in rows] == [RawVector, RawVector]
    assert rows == ROWS  # they read as the floats TEI sent
    assert [len(r) for r in rows] == [3, 3]
    # ...and are passed on as the very bytes TEI wrote.
    assert orjson.loads(b"[" + b",".join(r.json for r in rows) + b"]") == ROWS  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "body",
    [
        b"[[1,2],[3]]",  # rows of different lengths
        b"[[1,2],[3,4]",  # cut short
        b"[[1,2][3,4]]",  # no comma between rows
        b"[[1,[2]],[3,4]]",  # nested
        b"[[1,2],[3,[4]]]",
        b'[["a",2],[3,4]]',  # not numbers
        b"[[null,2],[3,4]]",
        b"[[]]",
        b"[[1,2],[3,4],[5,6]]",  # one too many
        b"[[1,2]]",  # one too few
        b"<html>not json",
        b'{"error": "x"}',
        b"[[1,2],[3,4]] ",
    ],
)
def test_split_rows_leaves_anything_unusual_to_the_full_parse(body: bytes) -> None:
    assert split_rows(body, 2) is None


def test_raw_vectors_serialise_as_their_bytes() -> None:
    raw = RawVector(b"[0.5,1e-05]", 2)
    assert dumps({"embedding": raw, "n": 1}) == b'{"embedding":[0.5,1e-05],"n":1}'
    assert vectors_json([raw, raw]) == b"[[0.5,1e-05],[0.5,1e-05]]"
    assert vectors_json([raw, [1.5]]) == b"[[0.5,1e-05],[1.5]]"  # mixed: orjson, same bytes
    assert raw.tolist() == [0.5, 1e-05] and raw[1] == 1e-05 and list(raw) == [0.5, 1e-05]
    assert raw == [0.5, 1e-05] and raw != [0.5]
    with pytest.raises(TypeError):
        dumps(object())


async def test_embed_answers_with_teis_own_bytes(
    start_proxy: ProxyFactory, tei_double: TeiDouble, tei_url: str
) -> None:
    # With the cache off: the cache keeps (and answers) every vector as float32.
    client = await start_proxy(cache_size_mb=0)

    async def direct(text: str) -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.post(tei_url + "/embed", json={"inputs": text}) as resp:
                return await resp.read()

    resp = await client.post("/embed", json={"inputs": "pass me through"})
    assert resp.status == 200
    # The very bytes the upstream wrote for that text, not floats parsed and printed again.
    assert await resp.read() == await direct("pass me through")
    rows = [(await direct(t))[1:-1] for t in ("a", "b")]  # each answer's one row
    many = await client.post("/embed", json={"inputs": ["a", "b"]})
    assert await many.read() == b"[" + b",".join(rows) + b"]"


async def test_other_doors_read_the_raw_vectors(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    expect = expected_vector("x")
    body: Any = await (await client.post("/v1/embeddings", json={"input": "x"})).json()
    assert body["data"][0]["embedding"] == pytest.approx(expect, rel=1e-6)
    b64: Any = await (
        await client.post("/v1/embeddings", json={"input": "x", "encoding_format": "base64"})
    ).json()
    assert isinstance(b64["data"][0]["embedding"], str)
    pred: Any = await (await client.post("/predict", json={"input": "x"})).json()
    assert pred["result"] == pytest.approx(expect, rel=1e-6)
    batch: Any = await (await client.post("/batch", json=[{"id": "a", "data": "x"}])).json()
    assert batch[0]["embedding"] == pytest.approx(expect, rel=1e-6)


async def test_a_wrong_dimension_still_fails_the_batch(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    assert (await client.post("/embed", json={"inputs": "first"})).status == 200
    tei_double.set_fault(Fault.WRONG_DIMS, times=1)
    resp = await client.post("/embed", json={"inputs": "second"})
    assert resp.status == 502
    assert "dimensions" in (await resp.json())["error"]


@pytest.mark.parametrize("cache_size_mb", [0, 64])
async def test_a_lone_request_times_out_at_its_deadline(
    start_proxy: ProxyFactory, tei_double: TeiDouble, cache_size_mb: float
) -> None:
    client = await start_proxy(request_timeout=0.3, cache_size_mb=cache_size_mb)
    tei_double.config.delay_base_s = 2.0
    resp = await client.post("/embed", json={"inputs": "slow"})
    assert resp.status == 504
    assert "REQUEST_TIMEOUT" in (await resp.json())["error"]


async def test_request_ids_are_unique_without_a_uuid_each(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    ids = [(await client.get("/health")).headers["X-Request-ID"] for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len({i[:16] for i in ids}) == 1  # one random prefix per process, then a counter
