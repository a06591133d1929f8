"""The registry at run time: the admin routes, a rollout under steady load, registrations
that fail and change nothing, and reloads of MODELS_CONFIG."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import yaml

from proxy.http.keys import REGISTRY, SETTINGS
from tests.models import (
    ADMIN,
    Client,
    StartModels,
    Upstream,
    listing,
    source_of,
    start_upstream,
    two_models,
    wait_until,
)
from tests.tei_double import Fault
from tests.test_faults_batch import closed_port_url

SEED_OF = {"1": "a", "2": "b"}


def minilm_only(up: dict[str, Upstream]) -> dict[str, Any]:
    return {"models": {"minilm": {"versions": {"1": {"upstream": up["a"].url}}}}}


async def routed(client: Client, model: str = "minilm") -> dict[str, Any]:
    return next(m for m in (await listing(client))["models"] if m["name"] == model)


async def test_admin_routes_need_the_token(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    client = await start_models(minilm_only(upstreams))
    wrong = {"Authorization": "Bearer not-the-admin-token-at-all"}
    for method, path in [
        ("GET", "/admin/models"),
        ("PUT", "/admin/models/minilm/versions/2"),
        ("DELETE", "/admin/models/minilm/versions/1"),
        ("PUT", "/admin/models/minilm/traffic"),
        ("PUT", "/admin/models/minilm/shadow"),
        ("POST", "/admin/reload"),
    ]:
        for headers in ({}, wrong):
            resp = await client.request(method, path, json={}, headers=headers)
            assert resp.status == 401 and await resp.read() == b"", (method, path)
    assert len((await routed(client))["versions"]) == 1


async def test_listing_shows_every_model_and_version(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    client = await start_models(two_models(up, shadow={"version": "2", "percent": 5}))
    body = await listing(client)
    assert body["default"] == "minilm" and body["models_config"].endswith("models.yaml")
    minilm = next(m for m in body["models"] if m["name"] == "minilm")
    assert minilm["aliases"] == ["default"] and minilm["traffic"] == {"1": 90, "2": 10}
    assert minilm["shadow"] == {"version": "2", "percent": 5.0}
    one, two = minilm["versions"]
    assert (one["version"], one["state"], one["traffic"], two["traffic"]) == ("1", "ready", 90, 10)
    assert one["replicas"] == [{"url": up["a"].url, "ejected": False, "in_flight": 0}]
    assert one["upstream_model_id"] == "org/model-a" and one["kind"] == "tei"
    assert one["queue_depth"] == 0 and one["concurrency_limit"] == 2
    assert one["settings"]["max_batch_size"] == 32


async def test_a_version_added_shifted_and_the_old_one_deleted_under_steady_load(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    """A rollout while clients keep calling: no caller sees an error, and every vector is the
    one of the version its answer names (X-Model)."""
    up = upstreams
    for upstream in up.values():
        upstream.double.config.delay_base_s = 0.005  # calls overlap every change
    client = await start_models(minilm_only(up))
    stop = asyncio.Event()
    seen: list[tuple[float, str]] = []
    problems: list[str] = []

    async def caller(worker: int) -> None:
        # Bounded in count and time, whatever happens.
        deadline = time.monotonic() + 30
        for n in range(100_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            text = f"worker {worker} request {n}"
            if n % 2:
                resp = await client.post("/v1/embeddings", json={"input": text, "model": "minilm"})
                body = await resp.json()
                vector = body["data"][0]["embedding"] if resp.status == 200 else None
            else:
                resp = await client.post("/embed", json={"inputs": text})
                body = await resp.json()
                vector = body[0] if resp.status == 200 else None
            if vector is None:
                problems.append(f"{resp.status} {body}")
                continue
            served = resp.headers["X-Model"]
            seen.append((time.monotonic(), served))
            if source_of(up, text, vector) != SEED_OF[served.split("@")[1]]:
                problems.append(f"misrouted: {served} answered {text!r} with another vector")

    callers = [asyncio.create_task(caller(w)) for w in range(8)]
    try:
        await asyncio.sleep(0.3)
        resp = await client.put(
            "/admin/models/minilm/versions/2", json={"upstream": up["b"].url}, headers=ADMIN
        )
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["state"] == "ready" and (await resp.json())["traffic"] == 0
        await asyncio.sleep(0.3)
        resp = await client.put("/admin/models/minilm/traffic", json={"2": 100}, headers=ADMIN)
        assert resp.status == 200 and (await resp.json())["traffic"] == {"2": 100}
        await asyncio.sleep(0.3)
        resp = await client.delete("/admin/models/minilm/versions/1", headers=ADMIN)
        assert resp.status == 202 and (await resp.json())["state"] == "draining"
        deleted_at = time.monotonic()
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*callers)
    assert problems == []
    served = [s for _, s in seen]
    assert served.count("minilm@1") > 20 and served.count("minilm@2") > 20
    assert {s for t, s in seen if t > deleted_at} == {"minilm@2"}

    async def v1_closed() -> bool:
        return [v["version"] for v in (await routed(client))["versions"]] == ["2"]

    await wait_until(v1_closed, "version 1 drained and closed")
    assert (await routed(client))["traffic"] == {"2": 100}


async def test_a_failing_registration_changes_nothing(
    start_models: StartModels, upstreams: dict[str, Upstream], aiohttp_server: Any
) -> None:
    up = upstreams
    client = await start_models(two_models(up), model_load_timeout=0.5)
    before = await routed(client)

    # An upstream that never answers /info: refused after MODEL_LOAD_TIMEOUT, with why.
    resp = await client.put(
        "/admin/models/minilm/versions/3", json={"upstream": closed_port_url()}, headers=ADMIN
    )
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert "minilm@3 was not registered: start: not ready within MODEL_LOAD_TIMEOUT=0.5s" in error
    assert "ClientConnectorError" in error  # the last reason it was not ready

    # An upstream whose /info answers but that fails the probe embedding, replacing version 2:
    # version 2 keeps serving from its old upstream.
    broken = await start_upstream(aiohttp_server, "broken")
    broken.double.set_fault(Fault.ERROR_500)
    resp = await client.put(
        "/admin/models/minilm/versions/2", json={"upstream": broken.url}, headers=ADMIN
    )
    assert resp.status == 502
    assert "probe embedding: 500 injected failure" in (await resp.json())["error"]
    resp = await client.post("/embed", json={"inputs": "still b"}, headers={"X-Model": "minilm@2"})
    assert source_of(up, "still b", (await resp.json())[0]) == "b"

    after = await routed(client)
    assert after["traffic"] == before["traffic"] and after["shadow"] == before["shadow"]
    states = [(v["version"], v["state"]) for v in after["versions"]]
    assert states == [("1", "ready"), ("2", "ready"), ("2", "failed"), ("3", "failed")]
    # Nothing routes to a failed version.
    resp = await client.post("/embed", json={"inputs": "x"}, headers={"X-Model": "minilm@3"})
    assert resp.status == 404

    # Bad requests are refused with the reason, and change nothing either.
    for method, path, body, status, message in [
        ("PUT", "/admin/models/minilm/versions/4", {"upstream": "ftp://x"}, 422, "upstream:"),
        ("PUT", "/admin/models/minilm/versions/4", {"embedded": True, "upstream": "http://x"},
         422, "give either"),
        ("PUT", "/admin/models/minilm/versions/4", {"upstream": up["a"].url, "max_bach": 1},
         422, "max_bach: unknown setting"),
        ("PUT", "/admin/models/default/versions/1", {"upstream": up["a"].url}, 422, "alias"),
        ("PUT", "/admin/models/minilm/traffic", {"3": 100}, 422, 'version "3" is not defined'),
        ("PUT", "/admin/models/minilm/traffic", {"1": 0}, 422, "at least one version"),
        ("PUT", "/admin/models/minilm/traffic", {"1": -1}, 422, "greater than or equal to 0"),
        ("PUT", "/admin/models/nope/traffic", {"1": 1}, 404, "not found"),
        ("PUT", "/admin/models/minilm/shadow", {"version": "7", "percent": 5}, 422, '"7"'),
        ("PUT", "/admin/models/minilm/shadow", {"version": "2", "percent": 0}, 422, "percent"),
        ("DELETE", "/admin/models/minilm/versions/9", None, 404, "minilm@9"),
    ]:  # fmt: skip
        resp = await client.request(method, path, json=body, headers=ADMIN)
        assert resp.status == status, (path, body, await resp.text())
        assert message in (await resp.json())["error"], (path, body)
    assert (await routed(client))["traffic"] == before["traffic"]


async def test_delete_is_refused_for_the_last_version_with_traffic_or_a_shadow_target(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    config = two_models(up, shadow={"version": "2", "percent": 5})
    config["models"]["minilm"]["traffic"] = {"1": 100}
    client = await start_models(config)
    resp = await client.delete("/admin/models/minilm/versions/1", headers=ADMIN)
    assert resp.status == 409 and "only version with traffic" in (await resp.json())["error"]
    resp = await client.delete("/admin/models/minilm/versions/2", headers=ADMIN)
    assert resp.status == 409 and "shadow target" in (await resp.json())["error"]
    resp = await client.delete("/admin/models/bge/versions/1", headers=ADMIN)
    assert resp.status == 409
    # Once the shadow is off, version 2 may go.
    resp = await client.put(
        "/admin/models/minilm/shadow",
        data=b"null",
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert resp.status == 200 and (await resp.json())["shadow"] is None
    resp = await client.delete("/admin/models/minilm/versions/2", headers=ADMIN)
    assert resp.status == 202
    # A new model gets all its traffic at once.
    resp = await client.put(
        "/admin/models/org/new-model/versions/v1", json={"upstream": up["c"].url}, headers=ADMIN
    )
    assert resp.status == 201 and (await resp.json())["traffic"] == 100
    resp = await client.post("/models/org/new-model/embed", json={"inputs": "n"})
    assert resp.headers["X-Model"] == "org/new-model@v1"
    assert source_of(up, "n", (await resp.json())[0]) == "c"


async def write(client: Client, config: dict[str, Any] | str) -> None:
    path: Path = client.app[SETTINGS].models_config
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))


async def test_reload_applies_the_difference_at_once_or_not_at_all(
    start_models: StartModels, upstreams: dict[str, Upstream]
) -> None:
    up = upstreams
    client = await start_models(minilm_only(up), model_load_timeout=0.5)
    registry = client.app[REGISTRY]
    kept = registry.service("minilm", "1")

    # An invalid file: 422 with the one line, nothing changes.
    await write(
        client,
        {"models": {"minilm": {"versions": {"1": {"upstream": up["a"].url}}, "traffic": {"3": 1}}}},
    )
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 422
    assert (await resp.json())["error"].endswith(
        'models.yaml: models.minilm.traffic: version "3" is not defined'
    )
    # A new version that cannot start: 502, nothing changes (not even the other new ones).
    broken = two_models(up)
    broken["models"]["minilm"]["versions"]["2"] = {"upstream": closed_port_url()}
    await write(client, broken)
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 502 and "minilm@2 was not registered" in (await resp.json())["error"]
    assert [m["name"] for m in (await listing(client))["models"]] == ["minilm"]
    assert registry.service("minilm", "1") is kept

    # A good file: bge and minilm@2 start, minilm@1 (unchanged) is kept as it is.
    await write(client, two_models(up))
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {
        "started": ["bge@1", "minilm@2"],
        "kept": ["minilm@1"],
        "removed": [],
        "default": "minilm",
    }
    assert registry.service("minilm", "1") is kept
    resp = await client.post("/embed", json={"inputs": "r"}, headers={"X-Model": "bge"})
    assert source_of(up, "r", (await resp.json())[0]) == "c"

    # A changed version is replaced (once its replacement is ready); a removed model drains.
    changed = minilm_only(up)
    changed["models"]["minilm"]["versions"]["1"]["max_batch_size"] = 8
    await write(client, changed)
    resp = await client.post("/admin/reload", headers=ADMIN)
    body = await resp.json()
    assert body["started"] == ["minilm@1"] and body["kept"] == []
    assert body["removed"] == ["bge@1", "minilm@1", "minilm@2"]
    assert registry.service("minilm", "1") is not kept
    assert registry.service("minilm", "1").config.max_batch_size == 8
    resp = await client.post("/embed", json={"inputs": "r"}, headers={"X-Model": "bge"})
    assert resp.status == 404

    async def old_ones_closed() -> bool:
        return [m["name"] for m in (await listing(client))["models"]] == ["minilm"] and len(
            (await routed(client))["versions"]
        ) == 1

    await wait_until(old_ones_closed, "bge and the old minilm versions closed")


async def test_reload_without_models_config_is_a_conflict(start_proxy: Any) -> None:
    client = await start_proxy(admin_token=ADMIN["Authorization"].split()[1])
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 409 and "MODELS_CONFIG is not set" in (await resp.json())["error"]
    # The one model is listed, as a model named after its upstream.
    body = await listing(client)
    assert body["default"] == "test-double/tei" and body["models_config"] is None
    assert body["models"][0]["aliases"] == ["default"]
