"""Several models behind one proxy, for tests: three TEI doubles that stand for different
models (same text, different vectors), and a proxy started on a MODELS_CONFIG file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app
from tests.conftest import make_settings
from tests.tei_double import TeiDouble, TeiDoubleConfig, expected_vector

# Secrets must be long (settings refuse short ones); this one is for tests only.
ADMIN_TOKEN = "models-admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

Client = TestClient[web.Request, web.Application]


@dataclass
class Upstream:
    """A TEI double standing for one model: its vectors are seeded with ``seed``."""

    double: TeiDouble
    server: TestServer
    url: str
    seed: str

    def vector(self, text: str) -> list[float]:
        return expected_vector(text, seed=self.seed)


async def start_upstream(aiohttp_server: Any, seed: str, **config: Any) -> Upstream:
    double = TeiDouble(TeiDoubleConfig(model_id=f"org/model-{seed}", seed=seed, **config))
    server = await aiohttp_server(double.make_app())
    return Upstream(double, server, str(server.make_url("")).rstrip("/"), seed)


@pytest.fixture
async def upstreams(aiohttp_server: Any) -> dict[str, Upstream]:
    """Doubles a, b and c: three models' worth of different vectors for the same text."""
    return {seed: await start_upstream(aiohttp_server, seed) for seed in "abc"}


def two_models(up: dict[str, Upstream], **minilm: Any) -> dict[str, Any]:
    """minilm (versions 1 on a and 2 on b, split 90/10) and bge (on c); minilm is the
    default."""
    return {
        "default": "minilm",
        "models": {
            "minilm": {
                "versions": {"1": {"upstream": up["a"].url}, "2": {"upstream": up["b"].url}},
                "traffic": {"1": 90, "2": 10},
                **minilm,
            },
            "bge": {"versions": {"1": {"upstream": up["c"].url}}},
        },
    }


StartModels = Callable[..., Awaitable[Client]]


@pytest.fixture
def start_models(aiohttp_client: Any, tmp_path: Path) -> StartModels:
    """The real proxy app on MODELS_CONFIG (written as YAML), with the admin routes on;
    returns once every version is ready."""

    async def start(config: dict[str, Any], **overrides: Any) -> Client:
        path = tmp_path / "models.yaml"
        path.write_text(yaml.safe_dump(config))
        overrides.setdefault("admin_token", ADMIN_TOKEN)
        client: Client = await aiohttp_client(
            create_app(make_settings(models_config=path, **overrides))
        )
        await wait_until(lambda: all_ready(client), "every version ready")
        return client

    return start


async def listing(client: Client) -> dict[str, Any]:
    resp = await client.get("/admin/models", headers=ADMIN)
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def all_ready(client: Client) -> bool:
    models = (await listing(client))["models"]
    return all(v["state"] == "ready" for m in models for v in m["versions"])


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, limit_s: float = 10.0
) -> None:
    deadline = time.monotonic() + limit_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


def source_of(up: dict[str, Upstream], text: str, vector: list[float]) -> str | None:
    """Which double's vector for ``text`` this is (None: none of them)."""
    for seed, upstream in up.items():
        if vector == pytest.approx(upstream.vector(text), rel=1e-6):
            return seed
    return None


def metric(page: str, name: str, **labels: str) -> float:
    """A sample's value on a /metrics page (0 when absent); labels in any order."""
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for line in page.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        head, _, value = line.rpartition(" ")
        found = set(head[len(name) + 1 : -1].split(",")) if "{" in head else set()
        if wanted <= found:
            total += float(value)
    return total
