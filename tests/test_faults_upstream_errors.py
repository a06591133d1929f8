"""Which upstream errors blame the upstream, which blame one item, and what each one costs.

Only faults of the upstream itself (refused or reset connections, 5xx, timeouts, garbage
bodies, refused credentials or routes) may count toward the circuit breaker. Errors the proxy
raises itself, or that blame the caller's input, never do. Only TEI's item errors (422, 413)
split a batch, and a batch-wide error stops the split at once.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from proxy import errors
from proxy.errors import ApiError, ErrorType
from proxy.resilience import counts_against_upstream
from proxy.upstream.tei import tei_error
from tests.conftest import ProxyFactory
from tests.tei_double import TeiDouble, TeiDoubleConfig, expected_vector


@pytest.fixture
def tei_config() -> TeiDoubleConfig:
    return TeiDoubleConfig(api_key="current-key", max_client_batch_size=64)


def metric(text: str, name: str) -> float:
    """The sum of every sample of ``name`` in Prometheus text."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        # The proxy's own refusals: the upstream was never asked, or answered sanely.
        (errors.validation("`normalize: false` is not available"), False),
        (errors.empty_input(), False),
        (errors.overloaded(), False),
        # The upstream blamed the input, or was busy.
        (ApiError(422, "too many tokens", ErrorType.VALIDATION, from_upstream=True), False),
        (ApiError(413, "body too large", ErrorType.VALIDATION, from_upstream=True), False),
        (ApiError(429, "Model is overloaded", ErrorType.OVERLOADED, from_upstream=True), False),
        # The upstream is unwell.
        (ApiError(500, "boom", ErrorType.BACKEND, from_upstream=True), True),
        (ApiError(424, "Backend error", ErrorType.BACKEND, from_upstream=True), True),
        (errors.unavailable("upstream unreachable: ClientConnectorError"), True),
        (errors.timeout("upstream did not answer within 30s"), True),
        (errors.bad_upstream("upstream answered malformed JSON"), True),
        # The upstream refused our credentials or route: the operator's fault, not the input's.
        (tei_error(401, b"", ""), True),
        (tei_error(403, b"", ""), True),
        (tei_error(404, b"", "text/plain"), True),
        (tei_error(405, b"", ""), True),
    ],
)
def test_only_upstream_faults_count_against_the_upstream(error: ApiError, counts: bool) -> None:
    assert counts_against_upstream(error) is counts


@pytest.mark.parametrize("status", [401, 403, 404, 405])
def test_upstream_auth_and_route_errors_are_502_naming_the_answer(status: int) -> None:
    error = tei_error(status, b"", "")
    assert error.status == 502
    assert error.error_type == "Upstream"
    assert str(status) in error.message


async def test_rotated_upstream_key_fails_every_caller_with_502_and_never_splits(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(upstream_api_key="current-key", breaker_threshold=1000)
    assert (await client.post("/embed", json={"inputs": "before the rotation"})).status == 200
    tei_double.config.api_key = "rotated-key"
    # One caller with a list of 32 items (one full batch) and 8 callers with one item each.
    requests = [client.post("/embed", json={"inputs": [f"listed {i}" for i in range(32)]})]
    requests += [client.post("/embed", json={"inputs": f"single {i}"}) for i in range(8)]
    responses = await asyncio.gather(*requests)
    for resp in responses:
        assert resp.status == 502
        body = await resp.json()
        assert body["error_type"] == "Upstream"
        assert "401" in body["error"]
    # One upstream call per batch: a refused key is never retried and never split
    # (splitting 32 items down to single ones would take 63 calls).
    metrics = await (await client.get("/metrics")).text()
    batches_after_rotation = metric(metrics, "proxy_batch_size_count") - 1
    assert tei_double.refused_calls == batches_after_rotation
    assert tei_double.refused_calls <= 9


async def test_rotated_upstream_key_opens_the_breaker(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(
        upstream_api_key="current-key", breaker_threshold=3, breaker_cooldown=30
    )
    tei_double.config.api_key = "rotated-key"
    for i in range(3):
        resp = await client.post("/embed", json={"inputs": f"batch {i}"})
        assert resp.status == 502
    assert tei_double.refused_calls == 3
    health = await client.get("/health")
    assert health.status == 503
    assert "breaker" in (await health.json())["error"]
    resp = await client.post("/embed", json={"inputs": "while open"})
    assert resp.status == 503
    assert tei_double.refused_calls == 3  # failing fast: not sent


async def test_batch_wide_item_error_stops_the_split(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    # The double knows no prompts: every call with a prompt_name fails with the same 422,
    # whatever its inputs. Once both halves fail alike, splitting further cannot help.
    client = await start_proxy(upstream_api_key="current-key")
    resp = await client.post(
        "/embed", json={"inputs": [f"item {i}" for i in range(32)], "prompt_name": "nope"}
    )
    assert resp.status == 422
    assert await resp.json() == {
        "error": "Input validation error: `prompt_name` nope is not available",
        "error_type": "Validation",
    }
    # The whole batch, its two halves and one probe with a harmless input; not 63 calls.
    assert len(tei_double.calls) <= 4


async def test_identical_item_errors_in_both_halves_still_isolate_the_items(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    # Two over-long inputs of the same length fail with byte-identical errors, one in each
    # half: the split must not mistake that for a batch-wide error and fail the good items.
    tei_double.config.auto_truncate = False
    client = await start_proxy(upstream_api_key="current-key")
    poison = " ".join(["word"] * 600)
    items: list[dict[str, Any]] = [{"id": str(i), "data": f"good {i}"} for i in range(32)]
    items[3]["data"] = poison
    items[20]["data"] = poison
    resp = await client.post("/batch", json=items)
    assert resp.status == 200
    results = await resp.json()
    assert len(results) == 32
    for item, result in zip(items, results, strict=True):
        assert result["id"] == item["id"]
        if item["data"] is poison:
            assert result["error_type"] == "Validation"
            assert "must have less than 512 tokens" in result["error"]
        else:
            assert result["embedding"] == pytest.approx(expected_vector(item["data"]), rel=1e-6)
