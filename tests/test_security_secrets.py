"""Secrets that would open a door: an empty, short or placeholder API_KEY or ADMIN_TOKEN
stops start-up instead of enabling a route that a bare `Authorization: Bearer` passes."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import aiohttp
import pytest
import yaml
from pydantic import ValidationError

from proxy.settings import describe_validation_error
from tests.conftest import make_settings
from tests.processes import (
    ROOT,
    proxy_env,
    start_double,
    start_proxy_process,
    stop,
    wait_healthy,
)

# The contract, spelled out here rather than imported, so the tests read as the rule.
MIN_SECRET_LENGTH = 16
GOOD = "0123456789abcdef"  # exactly MIN_SECRET_LENGTH characters
# The values anyone can read in the shipped Kubernetes Secret.
SHIPPED = list(
    yaml.safe_load((ROOT / "deploy" / "k8s" / "secret.yaml").read_text("utf-8"))[
        "stringData"
    ].values()
)


def refusal(**overrides: Any) -> str:
    """The one-line message `python -m proxy` would print for these settings."""
    with pytest.raises(ValidationError) as info:
        make_settings(**overrides)
    return describe_validation_error(info.value)


@pytest.mark.parametrize("name", ["api_key", "admin_token"])
@pytest.mark.parametrize("value", ["", "   ", "short", "x" * (MIN_SECRET_LENGTH - 1)])
def test_empty_or_short_secret_is_refused_naming_the_setting(name: str, value: str) -> None:
    message = refusal(**{name: value})
    assert message.startswith(f"invalid setting {name.upper()}: "), message
    assert "Value error" not in message and ";" not in message  # one clean line
    assert str(MIN_SECRET_LENGTH) in message or "empty" in message


@pytest.mark.parametrize("name", ["api_key", "admin_token"])
@pytest.mark.parametrize("placeholder", SHIPPED)
def test_placeholder_secret_is_refused_without_echoing_it(name: str, placeholder: str) -> None:
    message = refusal(**{name: placeholder})
    assert message.startswith(f"invalid setting {name.upper()}: "), message
    assert "placeholder" in message
    assert placeholder not in message  # never print a secret, even a public one


def test_placeholders_are_refused_whatever_their_case() -> None:
    assert "placeholder" in refusal(admin_token=SHIPPED[0].upper())


def test_every_shipped_placeholder_is_in_the_settings_list() -> None:
    from proxy.settings import PLACEHOLDER_SECRETS

    assert set(SHIPPED) <= set(PLACEHOLDER_SECRETS)


@pytest.mark.parametrize("name", ["api_key", "admin_token"])
def test_secret_of_the_minimum_length_is_accepted(name: str) -> None:
    settings = make_settings(**{name: GOOD})
    secret = getattr(settings, name)
    assert secret is not None and secret.get_secret_value() == GOOD


def test_unset_secrets_stay_off() -> None:
    settings = make_settings()
    assert settings.api_key is None and settings.admin_token is None


def test_empty_upstream_api_key_is_refused_but_a_short_one_is_the_upstreams_business() -> None:
    assert refusal(upstream_api_key="").startswith("invalid setting UPSTREAM_API_KEY: ")
    settings = make_settings(upstream_api_key="abc")
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.get_secret_value() == "abc"


# -- the real process ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_proxy(timeout_s: float = 20, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m proxy` that must stop by itself. The dead upstream keeps a wrongly started
    proxy waiting for it (so the timeout ends it) and no model is loaded."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(free_port()),
         "--upstream-url", f"http://127.0.0.1:{free_port()}"],
        cwd=ROOT, capture_output=True, text=True, env=proxy_env(**env), timeout=timeout_s,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["ADMIN_TOKEN", "API_KEY"])
def test_process_with_an_empty_secret_exits_with_one_line(name: str) -> None:
    result = run_proxy(**{name: ""})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: invalid setting {name}: "), lines[0]


def test_process_with_the_k8s_placeholder_exits_with_one_line() -> None:
    placeholder = SHIPPED[0]
    result = run_proxy(ADMIN_TOKEN=placeholder)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: invalid setting ADMIN_TOKEN: ")
    assert placeholder not in result.stderr


async def test_process_with_a_long_token_serves_and_a_bare_bearer_cannot_shut_it_down(
    aiohttp_server: Any, unused_tcp_port: int
) -> None:
    _, upstream = await start_double(aiohttp_server)
    url = f"http://127.0.0.1:{unused_tcp_port}"
    token = "a-real-operator-token-0123456789"
    proc = await start_proxy_process(
        "--upstream-url", upstream, "--port", str(unused_tcp_port), ADMIN_TOKEN=token
    )
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as session:
            for header in ("Bearer", "Bearer ", "Bearer x"):
                async with session.post(
                    url + "/shutdown", headers={"Authorization": header}
                ) as resp:
                    assert resp.status == 401, header
            async with session.get(url + "/health") as resp:
                assert resp.status == 200  # still serving
            async with session.post(
                url + "/shutdown", headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert resp.status == 202
        assert await proc.wait() == 0
    finally:
        await stop(proc)
