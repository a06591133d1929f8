"""Schemathesis against the proxy's own /openapi.json: no input may produce a 5xx; every
status, content type and response body the proxy answers is one the spec documents; and a
request the spec calls invalid is refused (so the spec is no stricter than the code).

The proxy (with API_KEY set) and the TEI double run as real processes; schemathesis sends its
generated requests (valid and invalid) over real HTTP with the key.
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
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.processes import ROOT, proxy_env  # noqa: E402

# Secrets must be long (settings refuse short ones); these are for this test only.
API_KEY = "fuzz-api-key-0123456789abcdef"
ADMIN_TOKEN = "fuzz-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Examples per operation and mode: enough to reach every branch of the request models while
# the whole file stays at a few seconds.
MAX_EXAMPLES = 30


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(url: str, procs: list[subprocess.Popen[bytes]], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        # A child that exited (e.g. refused its settings) will never answer: fail at once.
        assert all(p.poll() is None for p in procs), "a child process exited during start-up"
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
             "--upstream-url", f"http://127.0.0.1:{tei_port}", "--request-timeout", "10"],
            cwd=ROOT, env=proxy_env(API_KEY=API_KEY, ADMIN_TOKEN=ADMIN_TOKEN),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{proxy_port}"
    try:
        wait_for(url + "/health", procs)
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
    # The key is sent with every request (AUTH below), so schemathesis must not generate or
    # negate the Authorization header itself: a "missing key" case would still carry ours.
    schema.config.generation.update(with_security_parameters=False)
    # Fuzzing the shutdown route would stop the proxy under test; it has its own tests.
    return schema.exclude(path="/shutdown")


def test_data_routes_need_the_key(proxy_url: str) -> None:
    """The fuzzing below runs with API_KEY set: without the key the data routes refuse."""
    for path in ("/embed", "/v1/embeddings", "/predict", "/batch"):
        request = urllib.request.Request(
            proxy_url + path, data=b"{}", headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 401, path


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_produces_a_server_error(api_schema: Any, proxy_url: str, mode: str) -> None:
    """Every operation, with valid (positive) and invalid (negative) generated requests."""
    generation_mode = schemathesis.GenerationMode(mode)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        seen = statuses.setdefault(f"{operation.method.upper()} {operation.path}", set())

        def record(status: int, seen: set[int] = seen) -> None:
            seen.add(status)

        @given(case=operation.as_strategy(generation_mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: Any) -> None:
            response = case.call_and_validate(
                base_url=proxy_url,
                headers=AUTH,
                checks=[
                    not_a_server_error,
                    status_code_conformance,
                    negative_data_rejection,
                    response_schema_conformance,
                    content_type_conformance,
                ],
                timeout=15,
            )
            record(response.status_code)

        try:
            check()
        except Unsatisfiable:
            # An operation with nothing to make invalid (e.g. GET /health has no inputs).
            assert generation_mode is schemathesis.GenerationMode.NEGATIVE
    # The key got the requests past the auth check to the routes' own validation: valid
    # bodies were embedded, invalid ones refused by the parser, never a 401.
    for route in ("POST /embed", "POST /v1/embeddings", "POST /predict", "POST /batch"):
        assert statuses[route], route
        assert 401 not in statuses[route], route
        if generation_mode is schemathesis.GenerationMode.POSITIVE:
            assert statuses[route] & {200, 202}, (route, statuses[route])
        else:
            assert 422 in statuses[route], (route, statuses[route])
