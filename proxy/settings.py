"""One typed settings object, read from CLI flags, env vars and ``.env`` (in that priority)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from proxy.batcher import DispatchPolicy

# Secrets we ship as examples (deploy/k8s/secret.yaml): the proxy refuses to start with any
# of them (compared case-insensitively), so an example is never a live key.
PLACEHOLDER_SECRETS: tuple[str, ...] = (
    "CHANGE-ME-placeholder-api-key",
    "CHANGE-ME-placeholder-admin-token",
)
_PLACEHOLDERS = frozenset(p.lower() for p in PLACEHOLDER_SECRETS)
MAX_CONCURRENT_BATCHES_LIMIT = 1024
# API_KEY and ADMIN_TOKEN: long enough that guessing is hopeless (openssl rand -hex 32 gives 64).
MIN_SECRET_LENGTH = 16


def _refuse_empty(secret: str) -> None:
    if not secret.strip():
        raise PydanticCustomError(
            "empty_secret", "is set but empty: unset it, or give it a real secret"
        )


UpstreamKind = Literal["tei", "openai", "embedded"]


class UpstreamSettings(BaseModel):
    """The per-model part of the settings: one model version's upstream and its batching
    limits. Built from the flat settings (one model, no MODELS_CONFIG) or from a version of
    MODELS_CONFIG, whose missing entries fall back to the flat settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    urls: tuple[str, ...] = ()  # empty for the embedded model
    kind: UpstreamKind = "embedded"
    upstream_model: str | None = None
    upstream_api_key: SecretStr | None = None
    upstream_embeddings_path: str = "/v1/embeddings"
    upstream_timeout: float = 30.0
    request_timeout: float = 60.0
    max_batch_size: int = 32
    max_wait_time: float = 5.0
    max_concurrent_batches: int | Literal["auto"] = "auto"
    max_queue_size: int = 2048

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_time / 1000.0

    @property
    def api_key(self) -> str | None:
        return self.upstream_api_key.get_secret_value() if self.upstream_api_key else None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
        populate_by_name=True,
    )

    # -- upstream -------------------------------------------------------------------------
    upstream_url: str | None = Field(
        None,
        description="Base URL of the upstream (TEI by default). Several replicas may be given, "
        "comma-separated. Unset: serve the embedded all-MiniLM-L6-v2 model in-process.",
    )
    upstream_kind: Literal["tei", "openai"] | None = Field(
        None,
        description="tei or openai (an OpenAI-compatible /v1/embeddings server). "
        "Default: tei when UPSTREAM_URL is set.",
    )
    upstream_model: str | None = Field(
        None, description="Model name sent to an openai-kind upstream."
    )
    upstream_api_key: SecretStr | None = Field(
        None, description="Bearer token sent to the upstream."
    )
    upstream_embeddings_path: str = Field(
        "/v1/embeddings", description="Path of the embeddings route of an openai-kind upstream."
    )
    upstream_timeout: float = Field(30.0, gt=0, description="Seconds one upstream call may take.")

    # -- several models -------------------------------------------------------------------
    models_config: Path | None = Field(
        None,
        description="Path of a YAML or JSON file naming several models, their versions, "
        "traffic split and shadow traffic (README: Several models). Unset: one model from "
        "the UPSTREAM_* settings.",
    )
    model_load_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a version added at run time (admin route, reload, SIGHUP) may "
        "take to answer /info and a probe embedding; past it the change is refused.",
    )
    shadow_queue_size: int = Field(
        64,
        ge=1,
        description="Shadow requests waiting to be sent; past it new ones are dropped.",
    )
    shadow_concurrency: int = Field(
        4, ge=1, description="Shadow requests in flight at once, over all models."
    )

    # -- server ---------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Bind address.")
    port: int = Field(8080, ge=1, le=65535, description="Port.")
    workers: int = Field(
        1,
        ge=1,
        le=256,
        validation_alias=AliasChoices("workers", "model_server_workers"),
        description="Serving processes sharing one listening socket; each batches on its "
        "own. Alias: MODEL_SERVER_WORKERS.",
    )
    worker_heartbeat_timeout: float = Field(
        30.0,
        gt=0,
        description="WORKERS > 1: seconds a worker's event loop may go without a heartbeat "
        "before the supervisor kills and restarts it.",
    )
    event_loop: Literal["asyncio", "uvloop"] = Field(
        "asyncio",
        description="asyncio's own loop, or uvloop (the `fast` extra); see benchmarks/README.md "
        "for how they compared here.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    access_log: bool = Field(
        False,
        description="Log one line per request (logger proxy.access), with its request id.",
    )
    keepalive_timeout: float = Field(
        75.0,
        gt=0,
        description="Seconds an idle keep-alive connection stays open. Keep it above the "
        "idle timeout of a load balancer in front (60 s on AWS's ALB), so the balancer closes "
        "idle connections first.",
    )
    header_read_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client may take to send a request's headers, from their first "
        "byte; past it the connection is closed.",
    )
    body_read_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a client may take to send a request's body; 408 past it.",
    )
    max_connections: int = Field(
        10_000,
        ge=1,
        description="Open client connections per serving process; past it a new connection "
        "is answered 503 and closed, while the open ones keep working.",
    )

    # -- batching -------------------------------------------------------------------------
    max_wait_time: float = Field(
        5.0,
        ge=0,
        le=60_000,
        description="Milliseconds a request may wait for others to join its batch: timer "
        "waits this long; adaptive never holds an item longer, whatever it measured.",
    )
    max_batch_size: int = Field(
        32,
        ge=1,
        le=100_000,
        description="Items per upstream call; capped by the upstream's max_client_batch_size.",
    )
    max_concurrent_batches: int | Literal["auto"] = Field(
        "auto",
        description="Hard ceiling on upstream calls in flight. auto: the upstream's "
        "max_concurrent_requests (from /info) / the effective batch size, times the number of "
        "replicas (16 for TEI's defaults). A number is capped the same way. adaptive dispatch "
        "learns the limit below it; timer uses it as is.",
    )
    backlog: int = Field(
        2048,
        ge=1,
        description="Listen backlog: connections the kernel holds before the proxy accepts "
        "them, so a burst of new clients is not dropped.",
    )
    dispatch: Literal["adaptive", "timer"] = Field(
        "adaptive",
        description="adaptive: learn how many calls the upstream serves best and send what "
        "is queued when one of those slots is free (holding a batch only where waiting costs "
        "less than the upstream's fixed cost per call); timer: send when a batch is full or "
        "its oldest item waited MAX_WAIT_TIME.",
    )
    max_batch_chars: int = Field(
        250_000,
        ge=1,
        description="Total characters per upstream call, so a batch stays well under TEI's "
        "2 MB payload limit even when every character is JSON-escaped.",
    )

    # -- client-facing limits ---------------------------------------------------------------
    max_client_batch_size: int = Field(
        1024,
        ge=1,
        description="Most inputs one client request may carry; longer lists are spread over "
        "several upstream calls.",
    )
    payload_limit: int = Field(
        2_000_000, ge=1024, description="Largest request body in bytes (413 above it)."
    )
    max_input_chars: int | None = Field(
        None,
        ge=1,
        description="Longest input in characters (422 above it). Default: TEI's own rule, "
        "max_input_length * 250 when truncation is off.",
    )
    request_timeout: float = Field(
        60.0,
        gt=0,
        validation_alias=AliasChoices("request_timeout", "model_server_timeout"),
        description="Seconds a request may live in the proxy (504 past it). Alias: "
        "MODEL_SERVER_TIMEOUT.",
    )
    max_queue_size: int = Field(
        2048,
        ge=1,
        description="Queued items before new requests get 429. Size it to a few seconds of "
        "the upstream's throughput: a deeper queue only adds waiting.",
    )

    # -- reliability ----------------------------------------------------------------------
    upstream_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Retries of an upstream call that failed with 5xx, 424 or a refused or "
        "reset connection. TEI's 429 is retried with backoff until the request's deadline.",
    )
    breaker_threshold: int = Field(
        5,
        ge=1,
        description="Consecutive failed upstream calls that open the circuit breaker.",
    )
    breaker_cooldown: float = Field(
        2.0,
        gt=0,
        description="Seconds between health probes of the upstream while the breaker is open.",
    )
    replica_eject_after: int = Field(
        3,
        ge=1,
        description="Consecutive failed calls (refused or reset connections, 5xx, timeouts, "
        "malformed answers) after which an upstream replica is ejected: no calls go to it "
        "until its health check passes. If all are ejected, the one that failed longest ago "
        "is still tried.",
    )
    replica_probe_interval: float = Field(
        1.0,
        gt=0,
        description="Seconds before the first health probe of an ejected replica; doubles "
        "after each failed probe, up to 30 s.",
    )
    shutdown_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a graceful shutdown may take to finish accepted work.",
    )

    # -- access control ---------------------------------------------------------------------
    api_key: SecretStr | None = Field(
        None,
        description="When set, data routes need `Authorization: Bearer <key>` (as TEI's "
        "--api-key); /health, /ping, /metrics and /docs stay public. At least 16 characters; "
        "an empty or example value stops start-up.",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token for operator routes (POST /shutdown). Unset: they are off. "
        "At least 16 characters; an empty or example value stops start-up.",
    )

    @field_validator("api_key", "admin_token")
    @classmethod
    def _check_own_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # A set secret switches a route on (or guards every route), so one that anybody can
        # guess or read in our examples would open the door instead of closing it.
        if value is None:
            return None
        secret = value.get_secret_value()
        _refuse_empty(secret)
        if secret.strip().lower() in _PLACEHOLDERS:
            raise PydanticCustomError(
                "placeholder_secret",
                "is a placeholder from this project's examples, which anyone can read: set "
                "a real secret, e.g. openssl rand -hex 32",
            )
        if len(secret) < MIN_SECRET_LENGTH:
            raise PydanticCustomError(
                "short_secret",
                "is {length} characters, fewer than {minimum}: use e.g. openssl rand -hex 32",
                {"length": len(secret), "minimum": MIN_SECRET_LENGTH},
            )
        return value

    @field_validator("upstream_api_key")
    @classmethod
    def _check_upstream_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # The upstream's key is not ours to judge for strength, but an empty one is a
        # mistake (e.g. an unset variable in a template) that would send `Bearer ` upstream.
        if value is not None:
            _refuse_empty(value.get_secret_value())
        return value

    # -- async jobs and batch-with-ids ------------------------------------------------------
    job_store: str = Field(
        "memory",
        description="memory (bounded, lost on restart) or a redis:// URL (a Redis Stream "
        "shared by replicas; survives restarts).",
    )
    max_jobs: int = Field(
        10_000, ge=1, description="Unfinished async jobs before POST /predict answers 429."
    )
    max_job_records: int = Field(
        20_000,
        ge=1,
        description="Job records kept at most, unfinished and finished (finished ones are "
        "evicted oldest first past it, even before RESULT_TTL). At least MAX_JOBS.",
    )
    max_job_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="Bytes of job inputs and results kept at most (each unfinished job also "
        "holds room for its result). Past it the oldest finished records are evicted; a job "
        "that would not fit beside the unfinished ones is refused with 429. At least twice "
        "PAYLOAD_LIMIT.",
    )
    job_timeout: float = Field(
        600.0,
        gt=0,
        description="Seconds an async job may take from acceptance to its result: queueing, "
        "attempts and retries of temporary faults (429, 502, 503, 504) together. Past it the "
        "job fails with its last fault.",
    )
    result_ttl: float = Field(
        3600.0, gt=0, description="Seconds a finished job's result stays readable."
    )
    job_workers: int = Field(
        64,
        ge=1,
        description="Jobs one replica runs at once (they meet in the batcher, so this is "
        "also the largest batch async jobs alone can form).",
    )
    job_visibility_timeout: float = Field(
        120.0,
        gt=0,
        description="Seconds before a job held by a replica that stopped answering is "
        "re-claimed by another (Redis store).",
    )
    max_batch_items: int = Field(
        100, ge=1, description="Most items one POST /batch request may carry."
    )

    # -- observe: hooks, sampled capture, logs ---------------------------------------------
    hooks: str | None = Field(
        None,
        description="Request hooks, comma-separated `package.module:attr` (a module, class or "
        "instance with `before(ctx)` and/or `after(ctx)`, sync or async); they run in order. "
        "A class is instantiated with no arguments.",
    )
    hook_timeout: float = Field(
        50.0,
        gt=0,
        le=60_000,
        description="Milliseconds one hook call may take; past it the call counts as failed "
        "(HOOK_FAILURE says what then).",
    )
    hook_failure: Literal["open", "closed"] = Field(
        "open",
        description="What a hook that raises (anything but ValueError) or times out does to "
        "its request: open, the request goes on as if the hook had not run; closed, 500.",
    )
    sample_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of requests per model written to SAMPLE_PATH as JSON Lines "
        "(0: capture off).",
    )
    sample_path: Path = Field(
        Path("capture"),
        description="Folder the sampled capture is written to (one file set per serving process).",
    )
    sample_text: bool = Field(
        False,
        description="Also write each input's raw text into the capture (otherwise only its "
        "SHA-256, length and token count).",
    )
    sample_vectors: bool = Field(
        False,
        description="Also write the embeddings into the capture (the drift report needs them; "
        "vectors can reveal something of their text).",
    )
    sample_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Size in bytes at which a capture file is closed and a new one begun.",
    )
    sample_max_files: int = Field(
        10,
        ge=1,
        description="Capture files kept per serving process; past it the oldest is deleted.",
    )
    sample_queue_size: int = Field(
        1000,
        ge=1,
        description="Capture records waiting for the disk at most; past it records are "
        "dropped and counted, never waited for.",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text, or json: one JSON object per line with the request id, model "
        "and trace id.",
    )

    # -- the embedding cache ------------------------------------------------------------------
    cache_size_mb: float = Field(
        64.0,
        ge=0,
        description="Memory for the in-process cache of vectors, in MiB (float32 vectors, "
        "keys and bookkeeping all counted; least recently used evicted). 0 switches the "
        "cache and the merging of identical items in flight off.",
    )
    cache_url: str | None = Field(
        None,
        description="A redis://, rediss:// or unix:// URL: a second cache level shared by "
        "every replica using it. Fail-open: a slow or dead Redis only costs CACHE_TIMEOUT_MS "
        "per lookup. Needs CACHE_SIZE_MB > 0.",
    )
    cache_ttl: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="Seconds a vector stays in Redis (the in-memory level has no TTL: a model "
        "version's vectors never change).",
    )
    cache_timeout_ms: float = Field(
        20.0,
        gt=0,
        le=60_000,
        description="Milliseconds one Redis lookup may take before its items count as misses.",
    )
    cache_key_prefix: str = Field(
        "ebp:cache",
        min_length=1,
        description="Prefix of the cache's Redis keys (<prefix>:<sha256 hex>).",
    )
    cache_breaker_cooldown: float = Field(
        5.0,
        gt=0,
        description="Seconds the cache stops asking Redis after 3 failed calls in a row.",
    )

    # -- embedded model ---------------------------------------------------------------------
    embedded_cache_dir: Path | None = Field(
        None, description="Where the embedded model's built ONNX graph is cached."
    )
    embedded_threads: int | None = Field(
        None, ge=1, description="ONNX Runtime intra-op threads (default: ORT's choice)."
    )

    @field_validator("hooks")
    @classmethod
    def _check_hooks(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for spec in value.split(","):
            module, _, attr = spec.strip().partition(":")
            if not module or not attr:
                raise ValueError(f"{spec.strip()!r} is not of the form package.module:attr")
        return value

    @field_validator("max_concurrent_batches", mode="before")
    @classmethod
    def _check_concurrency(cls, value: object) -> int | str:
        # One clear message instead of one per member of the union.
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            number = int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            number = 0
        if isinstance(value, bool) or not 1 <= number <= MAX_CONCURRENT_BATCHES_LIMIT:
            raise PydanticCustomError(
                "concurrency",
                "must be auto or a whole number from 1 to {limit}",
                {"limit": MAX_CONCURRENT_BATCHES_LIMIT},
            )
        return number

    @field_validator("job_store")
    @classmethod
    def _check_job_store(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be `memory` or a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("cache_url")
    @classmethod
    def _check_cache_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _check_cache(self) -> Settings:
        if self.cache_url is not None and self.cache_size_mb == 0:
            raise ValueError("CACHE_URL needs CACHE_SIZE_MB > 0 (0 switches the cache off)")
        return self

    @model_validator(mode="after")
    def _check_job_bounds(self) -> Settings:
        if self.max_job_records < self.max_jobs:
            raise ValueError("MAX_JOB_RECORDS must be at least MAX_JOBS")
        if self.max_job_bytes < 2 * self.payload_limit:
            # Room for a job of the largest body the proxy accepts, with its result.
            raise ValueError("MAX_JOB_BYTES must be at least twice PAYLOAD_LIMIT")
        return self

    @field_validator("upstream_url")
    @classmethod
    def _check_urls(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return ",".join(urls)

    @model_validator(mode="after")
    def _check_kind(self) -> Settings:
        if self.upstream_kind is not None and self.upstream_url is None:
            raise ValueError("UPSTREAM_KIND needs UPSTREAM_URL")
        return self

    @property
    def upstream_urls(self) -> list[str]:
        return self.upstream_url.split(",") if self.upstream_url else []

    def upstream_settings(self) -> UpstreamSettings:
        """The one model's upstream settings, from the flat settings."""
        return UpstreamSettings(
            urls=tuple(self.upstream_urls),
            kind=self.effective_upstream_kind,
            upstream_model=self.upstream_model,
            upstream_api_key=self.upstream_api_key,
            upstream_embeddings_path=self.upstream_embeddings_path,
            upstream_timeout=self.upstream_timeout,
            request_timeout=self.request_timeout,
            max_batch_size=self.max_batch_size,
            max_wait_time=self.max_wait_time,
            max_concurrent_batches=self.max_concurrent_batches,
            max_queue_size=self.max_queue_size,
        )

    @property
    def effective_upstream_kind(self) -> UpstreamKind:
        if self.upstream_url is None:
            return "embedded"
        return self.upstream_kind or "tei"

    @property
    def dispatch_policy(self) -> DispatchPolicy:
        return DispatchPolicy(self.dispatch)

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_time / 1000.0

    @property
    def hook_specs(self) -> list[str]:
        return [s.strip() for s in self.hooks.split(",") if s.strip()] if self.hooks else []


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, naming the setting as the user spells it (env var name)."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "__root__"]
        name = loc[0].upper() if loc else "settings"
        msg = err.get("msg", "invalid")
        lines.append(f"invalid setting {name}: {msg}")
    return "; ".join(lines)


def env_example() -> str:
    """The text of `.env.example`: every setting with its default and what it does."""
    lines = [
        "# Every setting of the proxy, with its default. Copy to .env and uncomment what you",
        "# change. CLI flags (python -m proxy --help) override env vars, which override .env.",
        "",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default is None else str(getattr(default, "value", default))
        lines.append(f"# {field.description}")
        lines.append(f"# {name.upper()}={shown}")
        lines.append("")
    return "\n".join(lines)
