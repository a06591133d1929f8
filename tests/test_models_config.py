"""MODELS_CONFIG files: what they may say, and one line naming the place of each mistake."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.models_config import ModelsConfigError, load_models_config, parse_models_config
from tests.conftest import make_settings

EXAMPLE = """
default: minilm
models:
  minilm:
    versions:
      "1": {upstream: "http://tei-a:80"}                 # kind tei by default
      "2": {upstream: "http://tei-b:80,http://tei-c:80", max_batch_size: 64}
    traffic: {"1": 90, "2": 10}
    shadow: {version: "2", percent: 5}
  bge:
    versions:
      "1": {upstream: "http://infinity:7997", kind: openai,
            upstream_model: "BAAI/bge-small-en-v1.5"}
  local:
    versions:
      "1": {embedded: true}
"""


def test_the_readme_example_parses_with_fallbacks_to_the_flat_settings(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(EXAMPLE)
    settings = make_settings(upstream_timeout=7, max_batch_size=16, upstream_model="ignored")
    config = load_models_config(path, settings)
    assert config.default == "minilm" and list(config.models) == ["minilm", "bge", "local"]
    two = config.models["minilm"].versions["2"].resolve(settings)
    assert two.urls == ("http://tei-b:80", "http://tei-c:80") and two.kind == "tei"
    assert (two.max_batch_size, two.upstream_timeout) == (64, 7)  # its own, then the global
    one = config.models["minilm"].versions["1"].resolve(settings)
    assert one.max_batch_size == 16
    bge = config.models["bge"].versions["1"].resolve(settings)
    assert (bge.kind, bge.upstream_model) == ("openai", "BAAI/bge-small-en-v1.5")
    assert config.models["local"].versions["1"].resolve(settings).kind == "embedded"
    # The same file as JSON.
    json_path = tmp_path / "models.json"
    json_path.write_text(json.dumps(yaml.safe_load(EXAMPLE)))
    assert load_models_config(json_path, settings) == config


def with_change(change: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE)
    for dotted, value in change.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"models.minilm.traffic": {"1": 90, "3": 10}},
         'models.minilm.traffic: version "3" is not defined'),
        ({"models.minilm.traffic": {"1": 0, "2": 0}},
         "models.minilm.traffic: at least one version needs a weight above 0"),
        ({"models.minilm.traffic": None},
         "models.minilm.traffic: is required when a model has several versions"),
        ({"models.minilm.shadow": {"version": "9", "percent": 5}},
         'models.minilm.shadow.version: version "9" is not defined'),
        ({"models.minilm.shadow": {"version": "2", "percent": 150}},
         "models.minilm.shadow.percent: Input should be less than or equal to 100"),
        ({"models.minilm.versions.2": {"upstream": "http://x", "max_batch_sise": 3}},
         "models.minilm.versions.2.max_batch_sise: unknown setting"),
        ({"models.minilm.versions.2": {"upstream": "tei-b:80"}},
         "models.minilm.versions.2.upstream: 'tei-b:80' is not an http:// or https:// URL"),
        ({"models.minilm.versions.2": {}},
         "models.minilm.versions.2: give either `upstream: <url>` or `embedded: true`"),
        ({"models.minilm.versions.2": {"embedded": True, "kind": "openai"}},
         "models.minilm.versions.2: `kind` needs `upstream`"),
        ({"models.minilm.versions.2": {"upstream": "http://x", "max_batch_size": 0}},
         "models.minilm.versions.2.max_batch_size: Input should be greater than or equal to 1"),
        ({"models.minilm.versions.2": {"upstream": "http://x", "upstream_api_key_env": "NOPE_X"}},
         "models.minilm.versions.2.upstream_api_key_env: environment variable NOPE_X is not set"),
        ({"models.minilm.versions": {}}, "models.minilm.versions: Dictionary should have at least"),
        ({"default": "nope"}, 'default: model "nope" is not defined'),
        ({"default": None}, "default: is required when there are several models"),
        ({"models.default": {"versions": {"1": {"embedded": True}}}},
         'models.default: "default" is the alias of the default model'),
        ({"models.a@b": {"versions": {"1": {"embedded": True}}}},
         "models.a@b: 'a@b' is not a model name"),
        ({"models.bge.versions": {"v 1": {"embedded": True}}},
         "models.bge.versions.v 1: 'v 1' is not a version name"),
        ({"extra": 1}, "extra: unknown setting"),
    ],
)  # fmt: skip
def test_each_mistake_is_one_line_naming_its_place(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelsConfigError) as refused:
        parse_models_config(with_change(change), make_settings())
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


def test_unreadable_files_are_one_line_too(tmp_path: Path) -> None:
    settings = make_settings()
    cases = [
        ("missing.yaml", None, "cannot read the file: No such file or directory"),
        ("broken.yaml", "models: [", "not valid YAML: line 1, column 10"),
        ("broken.json", "{", "not valid JSON:"),
        ("list.yaml", "- a", "expected a mapping with `models`"),
    ]
    for name, text, message in cases:
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ModelsConfigError) as refused:
            load_models_config(path, settings)
        assert str(refused.value).startswith(message), str(refused.value)
        assert "\n" not in str(refused.value)


def test_a_key_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGE_KEY", "from-the-environment")
    data = with_change(
        {"models.bge.versions.1": {"upstream": "http://x", "upstream_api_key_env": "BGE_KEY"}}
    )
    settings = make_settings(upstream_url="http://y", upstream_api_key="global-key")
    config = parse_models_config(data, settings)
    assert config.models["bge"].versions["1"].resolve(settings).api_key == "from-the-environment"
    # Without one of its own, a version falls back to UPSTREAM_API_KEY.
    assert config.models["minilm"].versions["1"].resolve(settings).api_key == "global-key"
