"""Shadow traffic: copies go to the shadow version after the caller was answered; a slow or
dead shadow never changes what the caller gets or how long it may take."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from proxy.shadow import cosine
from tests.models import (
    ADMIN,
    Client,
    StartModels,
    Upstream,
    metric,
    source_of,
    wait_until,
)
from tests.tei_double import Fault


def shadowed(up: dict[str, Upstream], percent: float = 100, **v1: Any) -> dict[str, Any]:
    """minilm: all traffic on version 1 (double a), a copy of ``percent`` % to version 2
    (double b)."""
    return {
        "models": {
            "minilm": {
                "versions": {
                    "1": {"upstream": up["a"].url, **v1},
                    "2": {"upstream": up["b"].url},
                },
                "traffic": {"1": 100},
                "shadow": {"version": "2", "percent": percent},
            }
        }
    }


async def shadow_count(client: Client, outcome: str) -> float:
    page = await (await client.get("/metrics")).text()
    labels = {"model": "minilm", "version": "1", "shadow_version": "2"}
    return metric(page, "proxy_shadow_requests_total", **labels, outcome=outcome)


async def call_all(client: Client, up: dict[str, Upstream], texts: list[str]) -> None:
    """Every caller gets 200 and the primary's (double a's) vector."""
    responses = await asyncio.gather(*(client.post("/embed", json={"inputs": t}) for t in texts))
    for text, resp in zip(texts, responses, strict=True):
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Model"] == "minilm@1"
        assert source_of(up, text, (await resp.json())[0]) == "a"


def test_cosine() -> None:
    assert cosine([1.0, 0.0], [2.0, 0.0]) == pytest.approx(1.0)
    assert cosine([1.0, 0.0], [0.0, 3.0]) == pytest.approx(0.0)
    assert cosine([1.0, 1.0], [-1.0, -1.0]) == pytest.approx(-1.0)
    assert cosine([1.0, 0.0], [1.0, 0.0, 0.0]) is None  # other dimensions
    assert cosine([0.0, 0.0], [1.0, 0.0]) is None


async def test_shadow_copies_are_compared_with_the_primary(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    client = await start_models(shadowed(up))
    texts = [f"compare me {i}" for i in range(20)]
    await call_all(client, up, texts)

    async def all_compared() -> bool:
        return await shadow_count(client, "ok") == 20

    await wait_until(all_compared, "20 shadow copies answered")
    sent_to_b = [t for call in up["b"].double.calls for t in call.inputs]
    assert sorted(t for t in sent_to_b if t != "probe") == sorted(texts)
    page = await (await client.get("/metrics")).text()
    labels = {"model": "minilm", "version": "1", "shadow_version": "2"}
    assert metric(page, "proxy_shadow_cosine_count", **labels) == 20
    assert metric(page, "proxy_shadow_duration_seconds_count", **labels) == 20
    # The doubles stand for different models: their vectors differ, and the histogram says
    # by how much (the sum of the cosines is the sum over the pairs).
    expected = sum(cosine(up["a"].vector(t), up["b"].vector(t)) or 0.0 for t in texts)
    assert metric(page, "proxy_shadow_cosine_sum", **labels) == pytest.approx(expected)
    assert not math.isclose(expected, 20.0)


async def test_a_slow_shadow_never_touches_the_callers_budget(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    """The shadow never answers; the primary's REQUEST_TIMEOUT is 1 s. Were a caller to wait
    for its copy, it would get a 504: every caller gets its vector instead. The shadow's
    own small queue fills, and further copies are dropped."""
    up = upstreams
    client = await start_models(
        shadowed(up, request_timeout=1),
        shadow_queue_size=2,
        shadow_concurrency=1,
        shutdown_timeout=1,
    )
    up["b"].double.set_fault(Fault.HANG)
    for round_ in range(3):
        await call_all(client, up, [f"round {round_} text {i}" for i in range(10)])

    async def hanging_and_dropping() -> bool:
        return up["b"].double.in_flight_items >= 1 and await shadow_count(client, "dropped") > 0

    await wait_until(hanging_and_dropping, "a copy hanging in the shadow, later ones dropped")
    assert await shadow_count(client, "ok") == 0
    # The primary's own readiness is untouched.
    assert (await client.get("/health")).status == 200
    # Close the proxy (within SHUTDOWN_TIMEOUT) before the doubles: a double's server would
    # otherwise wait for its hanging handler while the proxy still holds the connection.
    await client.close()


async def test_a_dead_shadow_never_changes_a_callers_status(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    client = await start_models(shadowed(up), upstream_retries=0, breaker_threshold=3)
    await up["b"].server.close()  # the shadow's upstream is gone: connections are refused
    for round_ in range(3):
        await call_all(client, up, [f"round {round_} text {i}" for i in range(10)])

    async def errors_counted() -> bool:
        failed = await shadow_count(client, "error") + await shadow_count(client, "dropped")
        return failed == 30

    await wait_until(errors_counted, "every copy failed or dropped")
    assert await shadow_count(client, "error") >= 3
    assert (await client.get("/health")).status == 200
    # A caller pinning the shadow version itself does see its trouble: it is its version.
    resp = await client.post("/embed", json={"inputs": "x"}, headers={"X-Model": "minilm@2"})
    assert resp.status == 503


async def test_shadow_percent_and_changes_at_run_time(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    client = await start_models(shadowed(up, percent=50))
    await call_all(client, up, [f"half {i}" for i in range(200)])

    async def settled() -> bool:
        return await shadow_count(client, "ok") + await shadow_count(client, "dropped") > 0

    await wait_until(settled, "some copies")
    await asyncio.sleep(0.2)
    copied = await shadow_count(client, "ok") + await shadow_count(client, "dropped")
    assert 60 <= copied <= 140, copied  # 50 % of 200, give or take
    # Shadow off: no more copies.
    resp = await client.put(
        "/admin/models/minilm/shadow",
        data=b"null",
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert resp.status == 200
    await call_all(client, up, [f"after {i}" for i in range(20)])
    await asyncio.sleep(0.1)
    assert await shadow_count(client, "ok") + await shadow_count(client, "dropped") == copied
