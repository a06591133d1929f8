"""The TEI-compatible HTTP surface: /embed, /info, /health, /metrics, and bad input."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ProxyFactory
from tests.tei_double import TeiDouble, expected_vector


def approx_vec(vec: list[float]) -> Any:
    return pytest.approx(vec, rel=1e-6, abs=1e-7)


async def test_single_string_returns_list_of_one_vector(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    resp = await client.post("/embed", json={"inputs": "hello world"})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    assert body == [approx_vec(expected_vector("hello world"))]
    assert int(resp.headers["x-compute-characters"]) == len("hello world")


async def test_list_input_keeps_order(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    texts = [f"text number {i}" for i in range(10)]
    resp = await client.post("/embed", json={"inputs": texts})
    assert resp.status == 200
    body = await resp.json()
    assert body == [approx_vec(expected_vector(t)) for t in texts]


async def test_options_are_forwarded(start_proxy: ProxyFactory, tei_double: TeiDouble) -> None:
    client = await start_proxy()
    resp = await client.post("/embed", json={"inputs": "abc", "normalize": False, "dimensions": 4})
    assert resp.status == 200
    assert await resp.json() == [approx_vec(expected_vector("abc", normalize=False, dimensions=4))]
    assert tei_double.calls[-1].options["normalize"] is False
    assert tei_double.calls[-1].options["dimensions"] == 4


async def test_lowercase_truncation_direction_is_accepted(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    long_text = " ".join(f"w{i}" for i in range(600))
    left = await client.post("/embed", json={"inputs": long_text, "truncation_direction": "left"})
    right = await client.post("/embed", json={"inputs": long_text, "truncation_direction": "Right"})
    assert left.status == right.status == 200
    assert await left.json() != await right.json()
    assert tei_double.calls[0].options["truncation_direction"] == "Left"


async def test_token_id_inputs(start_proxy: ProxyFactory, tei_double: TeiDouble) -> None:
    client = await start_proxy()
    one = await client.post("/embed", json={"inputs": [101, 2023, 102]})
    assert one.status == 200
    assert len(await one.json()) == 1
    many = await client.post("/embed", json={"inputs": [[101, 102], "text", [7]]})
    assert many.status == 200
    assert len(await many.json()) == 3
    assert [101, 2023, 102] in tei_double.calls[0].inputs


async def test_info_shows_proxy_limits(start_proxy: ProxyFactory) -> None:
    client = await start_proxy(max_batch_size=64, max_client_batch_size=500)
    resp = await client.get("/info")
    assert resp.status == 200
    info = await resp.json()
    assert info["model_id"] == "test-double/tei"
    assert info["max_client_batch_size"] == 500
    proxy = info["proxy"]
    assert proxy["dispatch"] == "adaptive"
    assert proxy["max_batch_size"] == 64
    assert proxy["effective_batch_size"] == 32  # capped by the upstream's /info
    assert proxy["upstream"]["max_client_batch_size"] == 32


async def test_health_follows_upstream(start_proxy: ProxyFactory, tei_double: TeiDouble) -> None:
    client = await start_proxy()
    for path in ("/health", "/", "/ping"):
        resp = await client.get(path)
        assert resp.status == 200, path
    tei_double.healthy = False
    resp = await client.get("/health")
    assert resp.status == 503
    assert await resp.json() == {"error": "unhealthy", "error_type": "Unhealthy"}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, keyed by name and label set."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return page[(name, frozenset(labels.items()))]


async def test_metrics_expose_batching(start_proxy: ProxyFactory, tei_double: TeiDouble) -> None:
    # A slow upstream and one call in flight at a time, so requests pile up in the queue and
    # leave in batches: the metrics must show both.
    tei_double.config.delay_base_s = 0.1
    client = await start_proxy(max_concurrent_batches=1)
    before = samples(await (await client.get("/metrics")).text())
    assert value(before, "proxy_queue_depth", model="test-double/tei", version="1") == 0
    loop = asyncio.get_running_loop()

    async def scrape_until(name: str, predicate: Any) -> dict[Any, float]:
        deadline = loop.time() + 5
        while True:
            page = samples(await (await client.get("/metrics")).text())
            if predicate(value(page, name, model="test-double/tei", version="1")):
                return page
            assert loop.time() < deadline, f"{name} never changed"
            await asyncio.sleep(0.005)

    def post(i: int) -> asyncio.Future[Any]:
        return asyncio.ensure_future(client.post("/embed", json={"inputs": f"t{i}"}))

    # One request goes upstream at once; the 19 sent while it is there wait in the queue.
    requests = [post(0)]
    await scrape_until("proxy_upstream_in_flight", lambda v: v == 1)
    requests += [post(i) for i in range(1, 20)]
    during = await scrape_until("proxy_queue_depth", lambda v: v > 0)
    assert value(during, "proxy_upstream_in_flight", model="test-double/tei", version="1") == 1
    responses = await asyncio.gather(*requests)
    assert [r.status for r in responses] == [200] * 20

    page = samples(await (await client.get("/metrics")).text())
    calls = len(tei_double.calls)
    assert 1 < calls < 20  # batched, and in more than one call
    assert value(page, "proxy_requests_total", route="/embed", status="200") == 20
    assert value(page, "proxy_request_duration_seconds_count", route="/embed") == 20
    # The batch-size histogram saw every item once, in as many batches as upstream calls.
    assert value(page, "proxy_batch_size_sum", model="test-double/tei", version="1") == 20
    assert value(page, "proxy_batch_size_count", model="test-double/tei", version="1") == calls
    assert (
        value(page, "proxy_batch_size_bucket", model="test-double/tei", version="1", le="1.0")
        < calls
    )
    assert (
        value(
            page, "proxy_upstream_calls_total", model="test-double/tei", version="1", outcome="200"
        )
        == calls
    )
    assert (
        value(page, "proxy_upstream_duration_seconds_count", model="test-double/tei", version="1")
        == calls
    )
    # Each call took the double's 0.1 s delay.
    assert (
        value(page, "proxy_upstream_duration_seconds_sum", model="test-double/tei", version="1")
        >= 0.1 * calls
    )
    assert value(page, "proxy_queue_depth", model="test-double/tei", version="1") == 0
    assert value(page, "proxy_upstream_in_flight", model="test-double/tei", version="1") == 0


@pytest.mark.parametrize(
    ("body", "status", "error_type", "fragment"),
    [
        ({"inputs": ""}, 400, "Empty", "cannot be empty"),
        ({"inputs": []}, 400, "Empty", "cannot be empty"),
        ({"inputs": ["ok", ""]}, 400, "Empty", "cannot be empty"),
        ({"inputs": 123}, 422, "Validation", "inputs"),
        ({"inputs": [1.5, 2]}, 422, "Validation", "inputs"),
        ({"inputs": ["a", {"x": 1}]}, 422, "Validation", "inputs[1]"),
        ({"inputs": [-1]}, 422, "Validation", "token ids"),
        ({"text": "no inputs"}, 422, "Validation", "missing field `inputs`"),
        (["not", "an", "object"], 422, "Validation", "JSON object"),
        ({"inputs": "x", "normalize": "yes"}, 422, "Validation", "normalize"),
        ({"inputs": "x", "truncation_direction": "up"}, 422, "Validation", "truncation"),
        ({"inputs": "x", "dimensions": 0}, 422, "Validation", "should be positive"),
        ({"inputs": "x", "dimensions": "8"}, 422, "Validation", "dimensions"),
        ({"inputs": "x", "dimensions": 17}, 422, "Validation", "maximum embedding dimension"),
        ({"inputs": "x", "prompt_name": 5}, 422, "Validation", "prompt_name"),
    ],
)
async def test_bad_input_gets_tei_errors(
    start_proxy: ProxyFactory,
    tei_double: TeiDouble,
    body: Any,
    status: int,
    error_type: str,
    fragment: str,
) -> None:
    client = await start_proxy()
    # Learn the model's dimension first so the dimensions check can apply.
    assert (await client.post("/embed", json={"inputs": "warm"})).status == 200
    calls_before = len(tei_double.calls)
    resp = await client.post("/embed", json=body)
    assert resp.status == status
    err = await resp.json()
    assert err["error_type"] == error_type
    assert fragment in err["error"]
    assert len(tei_double.calls) == calls_before, "bad input must never reach the upstream"


DESERIALIZE = "Failed to deserialize the JSON body into the target type: "


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        ("/embed", {"inputs": 123}, "inputs: expected a string, a list of token ids, or a list "
         "of strings and token-id lists, got an integer"),
        ("/embed", {"inputs": ["a", {"x": 1}]},
         "inputs[1]: expected a string or a list of token ids, got an object"),
        ("/embed", {"inputs": [[1, 2], [3, -4]]},
         "inputs[1][1]: token ids must be integers in 0..4294967295, got -4"),
        ("/embed", {"inputs": [1, "a"]},
         "inputs[1]: token ids must be integers in 0..4294967295, got 'a'"),
        ("/embed", {"inputs": "x", "normalize": "yes"},
         "normalize: expected a boolean, got a string"),
        ("/embed", {"inputs": "x", "truncation_direction": "up"},
         "truncation_direction: unknown variant 'up', expected 'Left', 'Right', 'left' or 'right'"),
        ("/embed", {"inputs": "x", "dimensions": -1}, "dimensions: expected a value >= 1, got -1"),
        ("/embed", {"inputs": "x", "dimensions": 4.0},
         "dimensions: expected an integer, got a number"),
        ("/embed", {"normalize": True}, "missing field `inputs`"),
        ("/v1/embeddings", {"input": "x", "encoding_format": ""},
         "encoding_format: unknown variant '', expected 'float' or 'base64'"),
        ("/v1/embeddings", {"input": "x", "user": 1}, "user: expected a string, got an integer"),
        ("/predict", {"input": ["x"]}, "input: expected a string, got a list"),
        ("/predict", "x", "expected a JSON object, got a string"),
    ],
)  # fmt: skip
async def test_wrong_shapes_name_the_field_and_what_was_expected(
    start_proxy: ProxyFactory, tei_double: TeiDouble, route: str, body: Any, message: str
) -> None:
    """Strict as TEI's serde ("8" is no integer, 4.0 no token id), with the path of the
    offending value; the body on /v1/embeddings is OpenAI's."""
    client = await start_proxy()
    resp = await client.post(route, json=body)
    assert resp.status == 422
    err = await resp.json()
    if route == "/v1/embeddings":
        assert err == {"message": DESERIALIZE + message, "code": 422, "type": "Validation"}
    else:
        assert err == {"error": DESERIALIZE + message, "error_type": "Validation"}
    assert tei_double.calls == []


async def test_malformed_json_is_400(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    resp = await client.post(
        "/embed", data=b'{"inputs": ', headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert (await resp.json())["error_type"] == "Validation"


async def test_wrong_content_type_is_415(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    resp = await client.post(
        "/embed", data=b'{"inputs": "x"}', headers={"Content-Type": "text/plain"}
    )
    assert resp.status == 415
    assert "Content-Type: application/json" in (await resp.json())["error"]
    resp = await client.post("/embed", data=b'{"inputs": "x"}')
    assert resp.status == 415


async def test_body_over_limit_is_413(start_proxy: ProxyFactory, tei_double: TeiDouble) -> None:
    client = await start_proxy(payload_limit=10_000)
    resp = await client.post("/embed", json={"inputs": "x" * 20_000})
    assert resp.status == 413
    assert "length limit exceeded" in (await resp.json())["error"]
    assert tei_double.calls == []


async def test_too_many_inputs_is_422(start_proxy: ProxyFactory) -> None:
    client = await start_proxy(max_client_batch_size=50)
    resp = await client.post("/embed", json={"inputs": ["a"] * 51})
    assert resp.status == 422
    assert await resp.json() == {
        "error": "batch size 51 > maximum allowed batch size 50",
        "error_type": "Validation",
    }


async def test_too_long_input_without_truncation_is_422(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy()
    # Over TEI's character rule (max_input_length * 250): refused before the upstream.
    resp = await client.post("/embed", json={"inputs": "a" * 128_001, "truncate": False})
    assert resp.status == 422
    assert "must have less than 128000 characters" in (await resp.json())["error"]
    assert tei_double.calls == []
    # Over the token limit only: the upstream's own 422 comes back in TEI's shape.
    text = " ".join(["w"] * 600)
    resp = await client.post("/embed", json={"inputs": text, "truncate": False})
    assert resp.status == 422
    body = await resp.json()
    assert body["error_type"] == "Validation"
    assert "must have less than 512 tokens. Given: 602" in body["error"]


async def test_unknown_route_is_404(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    resp = await client.post("/nope", json={})
    assert resp.status == 404
