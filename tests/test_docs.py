"""The documentation lists what the code has: every setting, every route."""

from __future__ import annotations

from pathlib import Path

from proxy.openapi import build_openapi
from proxy.settings import Settings, env_example
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parent.parent
# Secrets must be long (settings refuse short ones); this one is for tests only.
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


def test_env_example_is_generated_from_the_settings() -> None:
    assert (ROOT / ".env.example").read_text() == env_example()


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [n.upper() for n in Settings.model_fields if f"`{n.upper()}`" not in readme]
    assert missing == []


def test_readme_and_spec_document_every_route() -> None:
    readme = (ROOT / "README.md").read_text()
    spec = build_openapi(make_settings(admin_token=ADMIN_TOKEN))
    for path in spec["paths"]:
        assert f"{path}" in readme, path
