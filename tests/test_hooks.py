"""HOOKS: before/after hooks in order, refusing with 422, cut off at HOOK_TIMEOUT, and what
HOOK_FAILURE=open|closed does with a hook that fails; the built-in LatencyGuard."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from proxy.app import create_app
from proxy.hooks import HookContext, LatencyGuard
from tests import hook_examples
from tests.conftest import ProxyFactory, make_settings
from tests.tei_double import TeiDouble, expected_vector

EX = "tests.hook_examples"


@pytest.fixture(autouse=True)
def fresh_recorder() -> Iterator[None]:
    hook_examples.recorder.seen.clear()
    yield
    hook_examples.recorder.seen.clear()


def sample(metrics_text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def test_hooks_run_in_order_and_before_hooks_change_what_is_embedded(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(hooks=f"{EX}:PrefixA,{EX}:PrefixB,{EX}:recorder")
    resp = await client.post(
        "/embed", json={"inputs": ["one", "two"]}, headers={"X-Request-ID": "req-42"}
    )
    assert resp.status == 200
    # A ran first, then B (which changed the list in place): the upstream saw both prefixes.
    assert [c.inputs for c in tei_double.calls] == [["b:a:one", "b:a:two"]]
    assert await resp.json() == [
        pytest.approx(expected_vector("b:a:one"), rel=1e-6),
        pytest.approx(expected_vector("b:a:two"), rel=1e-6),
    ]
    (seen,) = hook_examples.recorder.seen
    assert seen["order"] == ["A.before", "B.before", "A.after", "B.after"]  # one shared state
    assert seen["inputs"] == ["b:a:one", "b:a:two"]
    assert seen["vectors"] == [
        pytest.approx(expected_vector("b:a:one"), rel=1e-6),
        pytest.approx(expected_vector("b:a:two"), rel=1e-6),
    ]
    assert seen["status"] == 200 and seen["latency_s"] > 0
    assert (seen["request_id"], seen["route"], seen["model"]) == (
        "req-42",
        "/embed",
        "test-double/tei",
    )


async def test_every_route_runs_the_hooks_with_its_own_context(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(hooks=f"{EX}:PrefixA,{EX}:recorder")
    resp = await client.post("/v1/embeddings", json={"input": ["x"], "model": "m", "user": "alice"})
    assert resp.status == 200
    assert (await client.post("/predict", json={"input": "p"})).status == 200
    resp = await client.post("/batch", json=[{"id": "1", "data": "q"}])
    assert resp.status == 200
    assert (await resp.json())[0]["embedding"] == pytest.approx(expected_vector("a:q"), rel=1e-6)
    routes = [(s["route"], s["user"]) for s in hook_examples.recorder.seen]
    assert routes == [("/v1/embeddings", "alice"), ("/predict", None), ("/batch", None)]
    assert [c.inputs for c in tei_double.calls] == [["a:x"], ["a:p"], ["a:q"]]


async def test_after_hooks_see_none_in_a_failed_batch_slot(start_proxy: ProxyFactory) -> None:
    client = await start_proxy(hooks=f"{EX}:recorder")
    resp = await client.post("/batch", json=[{"id": "1", "data": "q"}, {"id": "2", "data": ""}])
    assert resp.status == 200
    assert (await resp.json())[1]["error_type"] == "Empty"
    (seen,) = hook_examples.recorder.seen
    assert seen["vectors"][0] == pytest.approx(expected_vector("q"), rel=1e-6)
    assert seen["vectors"][1] is None


async def test_a_whole_module_can_be_a_hook(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(hooks="tests:hook_module_example")
    assert (await client.post("/embed", json={"inputs": "m"})).status == 200
    assert tei_double.calls[0].inputs == ["module:m"]


async def test_value_error_refuses_the_request_with_422_and_its_message(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(hooks=f"{EX}:RefuseSecrets,{EX}:recorder")
    resp = await client.post("/embed", json={"inputs": ["fine", "my secret"]})
    assert resp.status == 422
    assert await resp.json() == {
        "error": "inputs must not contain secrets",
        "error_type": "Validation",
    }
    resp = await client.post("/v1/embeddings", json={"input": "secret"})
    assert resp.status == 422
    assert (await resp.json())["message"] == "inputs must not contain secrets"  # OpenAI's body
    assert tei_double.calls == [] and hook_examples.recorder.seen == []  # nothing went on
    metrics = await (await client.get("/metrics")).text()
    hook = f"{EX}:RefuseSecrets"
    assert sample(metrics, "proxy_hook_rejections_total", hook=hook, phase="before") == 2
    assert (await client.post("/embed", json={"inputs": "fine"})).status == 200


async def test_value_error_after_the_vectors_fails_the_request(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(hooks=f"{EX}:RefuseAfter")
    resp = await client.post("/embed", json={"inputs": "x"})
    assert resp.status == 422
    assert (await resp.json())["error"] == "vectors refused by policy"
    assert len(tei_double.calls) == 1  # the vectors were computed, then refused


@pytest.mark.parametrize("hook", ["SlowAsync", "SlowSync"])
async def test_a_slow_hook_is_cut_off_and_open_lets_the_request_go_on_unchanged(
    start_proxy: ProxyFactory,
    tei_double: TeiDouble,
    caplog: pytest.LogCaptureFixture,
    hook: str,
) -> None:
    caplog.set_level(logging.ERROR, logger="proxy.hooks")
    client = await start_proxy(hooks=f"{EX}:{hook},{EX}:PrefixA", hook_timeout=50)
    resp = await client.post("/embed", json={"inputs": "t"})
    assert resp.status == 200
    # The slow hook's change never applies (it came too late); the next hook still ran.
    assert tei_double.calls[0].inputs == ["a:t"]
    metrics = await (await client.get("/metrics")).text()
    name = f"{EX}:{hook}"
    labels = {"hook": name, "phase": "before"}
    assert sample(metrics, "proxy_hook_failures_total", reason="timeout", **labels) == 1
    assert sample(metrics, "proxy_hook_duration_seconds_count", **labels) == 1
    assert any("HOOK_TIMEOUT=50ms" in r.getMessage() for r in caplog.records)


async def test_a_failing_hook_open_goes_on_without_its_changes(
    start_proxy: ProxyFactory, tei_double: TeiDouble, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="proxy.hooks")
    client = await start_proxy(hooks=f"{EX}:Broken,{EX}:DropsAnInput", hook_failure="open")
    resp = await client.post("/embed", json={"inputs": ["x", "y"]})
    assert resp.status == 200
    assert tei_double.calls[0].inputs == ["x", "y"]  # neither hook's change survived
    metrics = await (await client.get("/metrics")).text()
    for hook in ("Broken", "DropsAnInput"):
        assert (
            sample(metrics, "proxy_hook_failures_total", hook=f"{EX}:{hook}", reason="error") == 1
        )
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "a bug in the hook" in messages and "same length" in messages


@pytest.mark.parametrize("hook", ["Broken", "SlowAsync"])
async def test_a_failing_hook_closed_fails_the_request_with_500(
    start_proxy: ProxyFactory, tei_double: TeiDouble, hook: str
) -> None:
    client = await start_proxy(hooks=f"{EX}:{hook}", hook_failure="closed", hook_timeout=50)
    resp = await client.post("/embed", json={"inputs": "x"})
    assert resp.status == 500
    body = await resp.json()
    assert body["error_type"] == "Backend" and hook in body["error"]
    assert tei_double.calls == []


async def test_async_jobs_run_before_hooks_on_what_they_queue(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(hooks=f"{EX}:PrefixA,{EX}:RefuseSecrets")
    resp = await client.post("/predict", json={"input": "job"}, headers={"Async-Mode": "true"})
    assert resp.status == 202
    refused = await client.post(
        "/predict", json={"input": "secret job"}, headers={"Async-Mode": "true"}
    )
    assert refused.status == 422
    prediction_id = (await resp.json())["prediction_id"]
    for _ in range(200):
        poll = await client.get(f"/predict/{prediction_id}")
        if poll.status == 200:
            break
        await asyncio.sleep(0.01)
    assert poll.status == 200
    assert [c.inputs for c in tei_double.calls] == [["a:job"]]


async def test_latency_guard_passes_good_vectors(
    start_proxy: ProxyFactory, tei_double: TeiDouble
) -> None:
    client = await start_proxy(hooks="proxy.hooks:LatencyGuard")
    assert (await client.post("/embed", json={"inputs": ["x", "y"]})).status == 200


def test_latency_guard_refuses_nan_zero_and_huge_vectors_and_flags_slow_requests() -> None:
    guard = LatencyGuard(max_latency_s=0.5)

    def ctx(vectors: list[list[float] | None], latency_s: float = 0.01) -> HookContext:
        return HookContext(
            request_id="r", route="/embed", model="m", inputs=["x"] * len(vectors),
            vectors=vectors, latency_s=latency_s,
        )  # fmt: skip

    guard.after(ctx([[0.6, 0.8], None]))  # a failed /batch slot is skipped
    with pytest.raises(ValueError, match="embedding 1 is not finite"):
        guard.after(ctx([[1.0, 0.0], [math.nan, 0.0]]))
    with pytest.raises(ValueError, match="norm 0"):
        guard.after(ctx([[0.0, 0.0]]))
    with pytest.raises(ValueError, match="outside"):
        guard.after(ctx([[1e7, 0.0]]))
    slow = ctx([[1.0, 0.0]], latency_s=0.7)
    guard.after(slow)  # only flagged
    assert slow.state["slow"] is True
    with pytest.raises(ValueError, match="latency budget"):
        LatencyGuard(max_latency_s=0.5, fail_slow=True).after(ctx([[1.0]], latency_s=0.7))


def test_hooks_setting_is_checked_and_an_unknown_hook_stops_start_up() -> None:
    with pytest.raises(ValidationError, match=r"package\.module:attr"):
        make_settings(hooks="no_colon_here")
    with pytest.raises(RuntimeError, match="cannot load"):
        create_app(make_settings(hooks="tests.hook_examples:Nope", upstream_url="http://x:1"))
    with pytest.raises(RuntimeError, match="neither a before"):
        create_app(make_settings(hooks="tests.conftest:make_settings", upstream_url="http://x:1"))


async def test_the_readme_example_hook_module_works(
    start_proxy: ProxyFactory,
    tei_double: TeiDouble,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The README's `myhooks.py`, as printed there, with its HOOKS line."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
    intro = readme.index("An example module, `myhooks.py`")
    hooks_line = re.search(r"`HOOKS=([^`]+)`", readme[intro:])
    code = re.search(r"```python\n(.*?)```", readme[intro:], flags=re.S)
    assert hooks_line and code
    (tmp_path / "myhooks.py").write_text(code.group(1), "utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    client = await start_proxy(hooks=hooks_line.group(1))
    resp = await client.post(
        "/v1/embeddings", json={"input": ["mail ann@example.com", [101, 102]], "user": "u1"}
    )
    assert resp.status == 200
    assert tei_double.calls[0].inputs == ["query: mail <email>", [101, 102]]
    refused = await client.post("/embed", json={"inputs": "my Password is x"})
    assert refused.status == 422
    assert (await refused.json())["error"] == "inputs must not contain passwords"
