"""Schemathesis against the proxy's own /openapi.json: no input may produce a 5xx.

The proxy and the TEI double run as real processes; schemathesis sends its generated
requests (valid and invalid) over real HTTP.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from tests.processes import ROOT, proxy_env  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(url: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


@pytest.fixture(scope="module")
def proxy_url() -> Iterator[str]:
    tei_port, proxy_port = free_port(), free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.tei_double", "--port", str(tei_port)],
            cwd=ROOT, env=proxy_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(proxy_port),
             "--upstream-url", f"http://127.0.0.1:{tei_port}", "--request-timeout", "10",
             "--admin-token", "fuzz-admin"],
            cwd=ROOT, env=proxy_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{proxy_port}"
    try:
        wait_for(url + "/health")
        yield url
        assert procs[1].poll() is None, "the proxy crashed during fuzzing"
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def api_schema(proxy_url: str) -> Any:
    schema = schemathesis.openapi.from_url(proxy_url + "/openapi.json")
    # Fuzzing the shutdown route would stop the proxy under test; it has its own tests.
    return schema.exclude(path="/shutdown")


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_produces_a_server_error(api_schema: Any, proxy_url: str, mode: str) -> None:
    """Every operation, with valid (positive) and invalid (negative) generated requests."""
    generation_mode = schemathesis.GenerationMode(mode)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8
    exercised = 0
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode))
        @settings(
            max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def check(case: Any) -> None:
            case.call_and_validate(base_url=proxy_url, checks=[not_a_server_error], timeout=15)

        try:
            check()
        except Unsatisfiable:
            # An operation with nothing to make invalid (e.g. GET /health has no inputs).
            assert generation_mode is schemathesis.GenerationMode.NEGATIVE
            continue
        exercised += 1
    assert exercised >= 3  # the body-taking operations at least
