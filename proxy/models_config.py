"""MODELS_CONFIG: several models behind one proxy, each with versions, a traffic split and
optional shadow traffic. Read from a YAML or JSON file at start-up, on ``POST /admin/reload``
and on SIGHUP.

Every problem is reported as one line naming its place in the file, e.g.
``models.minilm.traffic: version "3" is not defined``, so a bad file stops start-up (or is
refused by a reload) with a message that says where to look.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from proxy.settings import Settings, UpstreamSettings

# Model names may hold one slash, as Hugging Face ids do (org/model); `@` separates a name
# from a version when a caller pins one (name@version), so neither may contain it.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)?")
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_ALIAS = "default"
MAX_NAME_LENGTH = 128


class ModelsConfigError(Exception):
    """A MODELS_CONFIG file (or an admin request body) that cannot be applied; the message
    is one line naming the place of the problem."""


def _urls(value: str) -> tuple[str, ...]:
    urls = tuple(u.strip().rstrip("/") for u in value.split(",") if u.strip())
    if not urls:
        raise PydanticCustomError("no_url", "is empty")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise PydanticCustomError(
                "bad_url", "{url} is not an http:// or https:// URL", {"url": repr(url)}
            )
    return urls


_Positive = Annotated[float, Field(gt=0)]


class VersionConfig(BaseModel):
    """One version of a model: where its upstream is and, optionally, its own limits. A
    setting left out falls back to the flat setting of the same name (UPSTREAM_TIMEOUT,
    MAX_BATCH_SIZE, ...)."""

    model_config = ConfigDict(extra="forbid")

    upstream: str | None = Field(
        None, description="Base URL of the upstream; several replicas comma-separated."
    )
    embedded: bool = Field(False, description="Serve the embedded model in-process.")
    kind: Literal["tei", "openai"] | None = Field(None, description="tei (default) or openai.")
    upstream_model: str | None = Field(None, description="Model name sent to an openai upstream.")
    upstream_api_key: SecretStr | None = Field(None, description="Bearer token for the upstream.")
    upstream_api_key_env: str | None = Field(
        None, description="Name of an environment variable holding that token."
    )
    upstream_embeddings_path: str | None = Field(
        None, description="Path of an openai upstream's embeddings route."
    )
    upstream_timeout: _Positive | None = Field(None, description="UPSTREAM_TIMEOUT.")
    request_timeout: _Positive | None = Field(None, description="REQUEST_TIMEOUT.")
    max_batch_size: Annotated[int, Field(ge=1, le=100_000)] | None = Field(
        None, description="MAX_BATCH_SIZE."
    )
    max_wait_time: Annotated[float, Field(ge=0, le=60_000)] | None = Field(
        None, description="MAX_WAIT_TIME (ms)."
    )
    max_concurrent_batches: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] | None = Field(
        None, description="MAX_CONCURRENT_BATCHES (a number or auto)."
    )
    max_queue_size: Annotated[int, Field(ge=1)] | None = Field(None, description="MAX_QUEUE_SIZE.")

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, value: str | None) -> str | None:
        return None if value is None else ",".join(_urls(value))

    @model_validator(mode="after")
    def _check_shape(self) -> VersionConfig:
        if (self.upstream is None) == (not self.embedded):
            raise PydanticCustomError(
                "upstream_or_embedded", "give either `upstream: <url>` or `embedded: true`"
            )
        if self.kind is not None and self.upstream is None:
            raise PydanticCustomError("kind_needs_upstream", "`kind` needs `upstream`")
        if self.upstream_api_key is not None and self.upstream_api_key_env is not None:
            raise PydanticCustomError(
                "two_keys", "give `upstream_api_key` or `upstream_api_key_env`, not both"
            )
        if self.upstream_api_key is not None and not self.upstream_api_key.get_secret_value():
            raise PydanticCustomError("empty_key", "`upstream_api_key` is empty")
        return self

    def resolve(self, settings: Settings) -> UpstreamSettings:
        """The effective settings: this version's own, else the flat settings'."""
        base = settings.upstream_settings()
        key = self.upstream_api_key
        if self.upstream_api_key_env is not None:
            value = os.environ.get(self.upstream_api_key_env)
            if not value:
                raise ModelsConfigError(
                    f"upstream_api_key_env: environment variable {self.upstream_api_key_env} "
                    "is not set"
                )
            key = SecretStr(value)
        urls = _urls(self.upstream) if self.upstream is not None else ()
        kind = "embedded" if self.embedded else (self.kind or "tei")
        return UpstreamSettings(
            urls=urls,
            kind=kind,
            upstream_model=self.upstream_model
            if self.upstream_model is not None
            else base.upstream_model,
            # A key of the flat settings belongs to UPSTREAM_URL's upstream: another
            # upstream gets it only when its version says nothing of its own.
            upstream_api_key=key if key is not None else base.upstream_api_key,
            upstream_embeddings_path=self.upstream_embeddings_path or base.upstream_embeddings_path,
            upstream_timeout=self.upstream_timeout or base.upstream_timeout,
            request_timeout=self.request_timeout or base.request_timeout,
            max_batch_size=self.max_batch_size or base.max_batch_size,
            max_wait_time=self.max_wait_time
            if self.max_wait_time is not None
            else base.max_wait_time,
            max_concurrent_batches=self.max_concurrent_batches or base.max_concurrent_batches,
            max_queue_size=self.max_queue_size or base.max_queue_size,
        )


class ShadowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(description="The version that also gets a copy of requests.")
    percent: float = Field(gt=0, le=100, description="Share of requests copied, in percent.")

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _keys_as_text(value: Any) -> Any:
    # YAML reads `1:` as an integer key; versions are names, so 1 and "1" are the same.
    if isinstance(value, dict):
        return {
            (str(k) if isinstance(k, int) and not isinstance(k, bool) else k): v
            for k, v in value.items()
        }
    return value


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    versions: dict[str, VersionConfig] = Field(min_length=1)
    traffic: dict[str, Annotated[int, Field(ge=0)]] | None = Field(
        None,
        description="Weights per version; a version missing here gets none. Optional when "
        "the model has one version.",
    )
    shadow: ShadowConfig | None = None

    @field_validator("versions", "traffic", mode="before")
    @classmethod
    def _version_keys(cls, value: Any) -> Any:
        return _keys_as_text(value)


class ModelsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str | None = Field(
        None, description="The model a request that names none gets; optional with one model."
    )
    models: dict[str, ModelConfig] = Field(min_length=1)


def check_model_name(name: str) -> str | None:
    """Why ``name`` cannot name a model, or None."""
    if name == DEFAULT_ALIAS:
        return f'"{DEFAULT_ALIAS}" is the alias of the default model, not a model name'
    if len(name) > MAX_NAME_LENGTH or not MODEL_NAME.fullmatch(name):
        return (
            f"{name!r} is not a model name: letters, digits, `.`, `_` and `-`, with at most "
            f"one `/`, up to {MAX_NAME_LENGTH} characters"
        )
    return None


def check_version_name(version: str) -> str | None:
    if len(version) > MAX_NAME_LENGTH or not VERSION_NAME.fullmatch(version):
        return (
            f"{version!r} is not a version name: letters, digits, `.`, `_` and `-`, up to "
            f"{MAX_NAME_LENGTH} characters"
        )
    return None


def traffic_of(model: ModelConfig) -> dict[str, int]:
    """The model's weights, with the one-version default filled in."""
    if model.traffic is None:
        (only,) = model.versions
        return {only: 100}
    return {v: w for v, w in model.traffic.items() if w > 0}


def check_traffic(weights: dict[str, int], versions: set[str], where: str) -> None:
    for version in weights:
        if version not in versions:
            raise ModelsConfigError(f'{where}: version "{version}" is not defined')
    if not any(w > 0 for w in weights.values()):
        raise ModelsConfigError(f"{where}: at least one version needs a weight above 0")


def check_shadow(shadow: ShadowConfig, versions: set[str], where: str) -> None:
    if shadow.version not in versions:
        raise ModelsConfigError(f'{where}.version: version "{shadow.version}" is not defined')


def _check(config: ModelsConfig, settings: Settings) -> None:
    """What the types alone cannot say: names, references between entries, secrets."""
    for name, model in config.models.items():
        where = f"models.{name}"
        problem = check_model_name(name)
        if problem is not None:
            raise ModelsConfigError(f"{where}: {problem}")
        for version, spec in model.versions.items():
            problem = check_version_name(version)
            if problem is not None:
                raise ModelsConfigError(f"{where}.versions.{version}: {problem}")
            try:
                spec.resolve(settings)
            except ModelsConfigError as exc:
                raise ModelsConfigError(f"{where}.versions.{version}.{exc}") from None
        versions = set(model.versions)
        if model.traffic is None:
            if len(versions) > 1:
                raise ModelsConfigError(
                    f"{where}.traffic: is required when a model has several versions"
                )
        else:
            check_traffic(model.traffic, versions, f"{where}.traffic")
        if model.shadow is not None:
            check_shadow(model.shadow, versions, f"{where}.shadow")
    if config.default is None:
        if len(config.models) > 1:
            raise ModelsConfigError("default: is required when there are several models")
    elif config.default not in config.models:
        raise ModelsConfigError(f'default: model "{config.default}" is not defined')


def default_model(config: ModelsConfig) -> str:
    return config.default if config.default is not None else next(iter(config.models))


def describe_error(exc: ValidationError) -> str:
    """The first problem as one line: ``path.inside.the.file: what is wrong``."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        message = "unknown setting"
    elif kind == "missing":
        message = "is required"
    else:
        message = err["msg"]
        # pydantic prefixes messages of plain ValueErrors; ours are custom errors.
        message = message.removeprefix("Value error, ")
    return f"{loc}: {message}" if loc else message


def parse_models_config(data: Any, settings: Settings) -> ModelsConfig:
    """A parsed file's contents as a checked config, or ModelsConfigError."""
    if not isinstance(data, dict):
        raise ModelsConfigError("expected a mapping with `models` (and `default`) at the top")
    try:
        config = ModelsConfig.model_validate(data)
    except ValidationError as exc:
        raise ModelsConfigError(describe_error(exc)) from None
    _check(config, settings)
    return config


def _parse_text(text: str, suffix: str) -> Any:
    if suffix == ".json":
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ModelsConfigError(f"not valid JSON: {exc}") from None
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is a dependency
        raise ModelsConfigError("reading YAML needs PyYAML: pip install pyyaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ModelsConfigError(f"not valid YAML: {where}{problem}") from None


def load_models_config(path: Path, settings: Settings) -> ModelsConfig:
    """Read and check the file. JSON when its name ends in .json, YAML otherwise (JSON is
    YAML too)."""
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ModelsConfigError(f"cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ModelsConfigError("cannot read the file: not UTF-8 text") from None
    return parse_models_config(_parse_text(text, path.suffix.lower()), settings)
