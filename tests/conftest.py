from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app
from proxy.settings import Settings
from tests.tei_double import TeiDouble, TeiDoubleConfig

ProxyFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def make_settings(**overrides: Any) -> Settings:
    """Settings for tests: never read a developer's .env."""
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


@pytest.fixture
def tei_config() -> TeiDoubleConfig:
    return TeiDoubleConfig()


@pytest.fixture
async def tei(aiohttp_server: Any, tei_config: TeiDoubleConfig) -> tuple[TeiDouble, TestServer]:
    double = TeiDouble(tei_config)
    server = await aiohttp_server(double.make_app())
    return double, server


@pytest.fixture
def tei_url(tei: tuple[TeiDouble, TestServer]) -> str:
    return str(tei[1].make_url("")).rstrip("/")


@pytest.fixture
def tei_double(tei: tuple[TeiDouble, TestServer]) -> TeiDouble:
    return tei[0]


@pytest.fixture
def start_proxy(aiohttp_client: Any, tei_url: str) -> ProxyFactory:
    """Start the real proxy app on a loopback port in front of the TEI double."""

    async def start(**overrides: Any) -> TestClient[web.Request, web.Application]:
        overrides.setdefault("upstream_url", tei_url)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            create_app(make_settings(**overrides))
        )
        return client

    return start


# A private redis-server per test, for the Redis job store (tests/redis_server.py).
# Several models behind one proxy (tests/models.py).
from tests.models import start_models, upstreams  # noqa: E402, F401
from tests.redis_server import (  # noqa: E402
    NO_REDIS,
    find_redis_server,
    redis_server,  # noqa: F401
    redis_url,  # noqa: F401
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Skipped Redis tests must not pass unnoticed in a green run: say so at the end."""
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if isinstance(report.longrepr, tuple) and NO_REDIS in str(report.longrepr[2])
    ]
    if skipped:
        tests = "test" if len(skipped) == 1 else "tests"
        terminalreporter.write_sep(
            "!",
            f"REDIS TESTS DID NOT RUN: {len(skipped)} {tests} skipped, {find_redis_server()[1]}",
            red=True,
            bold=True,
        )
