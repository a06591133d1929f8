"""The request and response bodies, as pydantic models.

The request models are what the routes validate bodies with *and* what /openapi.json
documents (:func:`model_schema`), so the spec cannot drift from the code. The response models
only document: handlers render plain dicts, which is cheaper per request.

Validation is strict, as TEI's serde is: ``"8"`` is not an integer and ``4.0`` is not a token
id. Unknown fields are ignored, as TEI does. Each ``null`` the proxy has always accepted for an
optional field (meaning "the default") stays accepted and documented.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import BaseModel, ConfigDict, Discriminator, Field, RootModel, Tag
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema
from typing_extensions import TypedDict

from proxy.models_config import ShadowConfig

U32_MAX = 2**32 - 1

# Union branch names; they show up in a ValidationError's `loc` after the field's name.
TEXT, TOKEN_IDS, INPUT_LIST = "text", "token-ids", "input-list"
INPUT_TYPE_ERROR = "input_type"  # the custom error type of a value no branch can take

TokenIds = Annotated[
    list[Annotated[int, Field(ge=0, le=U32_MAX)]],
    Field(description="Pre-tokenised input: token ids (u32)."),
]


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def input_branch(value: Any) -> str | None:
    """Which form of TEI's untagged ``Input`` a value is. TEI tries "one id list" first, so
    ``[]`` and ``[101, 102]`` are one input; a list that starts with anything else is a
    batch. Looking at the first element only keeps this O(1) for a list of any length."""
    if isinstance(value, str):
        return TEXT
    if isinstance(value, list):
        return TOKEN_IDS if not value or _is_token_id(value[0]) else INPUT_LIST
    return None


# An item of a batch: a plain union, which pydantic-core resolves without calling Python (a
# callable discriminator per item made a 32-text body 5 us slower). Its errors carry the
# member's name in `loc`; parsing picks the one for the member the value's type matches.
InputItem = str | TokenIds
# The whole `inputs`: a callable discriminator picks the branch from the value's type (one
# call per request), so an error names the one branch that applied, not every one that failed.
Input = Annotated[
    Annotated[str, Tag(TEXT)]
    | Annotated[TokenIds, Tag(TOKEN_IDS)]
    | Annotated[list[InputItem], Tag(INPUT_LIST)],
    Discriminator(
        input_branch,
        custom_error_type=INPUT_TYPE_ERROR,
        custom_error_message="expected a string, a list of token ids, or a list of strings "
        "and token-id lists",
    ),
]

_REQUEST_CONFIG = ConfigDict(strict=True, extra="ignore")
_MODEL_DESCRIPTION = (
    "`name` or `name@version` of a model the proxy routes to; null or absent: the X-Model "
    "header's, else the default model."
)
_DIMENSIONS_DESCRIPTION = "Matryoshka cut: keep the first N values (then normalise)."


class EmbedRequest(BaseModel):
    """TEI's EmbedRequest (`POST /embed`, `/` and `/invocations`)."""

    model_config = _REQUEST_CONFIG

    inputs: Input = Field(
        description="A text, one list of token ids, or a list of texts and id lists. At most "
        "MAX_CLIENT_BATCH_SIZE inputs."
    )
    normalize: bool | None = Field(True, description="L2-normalise; null means true.")
    truncate: bool | None = Field(
        None,
        description="Cut inputs longer than the model's max_input_length instead of refusing "
        "them; null means the upstream's auto_truncate.",
    )
    truncation_direction: Literal["Left", "Right", "left", "right"] | None = Field(
        "Right", description="Which end truncation keeps; null means Right."
    )
    prompt_name: str | None = Field(None, description="A prompt of the model's config.")
    dimensions: int | None = Field(None, ge=1, description=_DIMENSIONS_DESCRIPTION)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, as TEI serves it (`POST /v1/embeddings`)."""

    model_config = _REQUEST_CONFIG

    input: Input = Field(
        description="A text, one list of token ids, or a list of texts and id lists. At most "
        "MAX_CLIENT_BATCH_SIZE inputs."
    )
    model: str | None = Field(
        None,
        description="`name` or `name@version` of a model the proxy routes to (404 "
        "`model_not_found` for an unknown one with MODELS_CONFIG; without it, any name means "
        "the one model, as TEI ignores it). null: the default model.",
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="base64: little-endian float32; null means float."
    )
    dimensions: int | None = Field(None, ge=1, description=_DIMENSIONS_DESCRIPTION)
    user: str | None = Field(
        None,
        description="Keeps this caller on one version of an A/B split (sticky); handed to "
        "request hooks as `ctx.user`.",
    )


class PredictRequest(BaseModel):
    """`POST /predict`."""

    model_config = _REQUEST_CONFIG

    # An empty text is refused as TEI's `Empty` (400), not as a shape error.
    input: str = Field(min_length=1, description="The text to embed.")
    model: str | None = Field(None, description=_MODEL_DESCRIPTION)


class BatchItem(TypedDict):
    # A TypedDict, not a model: validating it builds no object per item (half the time).
    __pydantic_config__ = _REQUEST_CONFIG  # type: ignore[misc]

    id: Annotated[str, Field(description="Unique within the request; the result carries it back.")]
    data: Annotated[str, Field(description="The text to embed.")]
    model: NotRequired[
        Annotated[
            str | None,
            Field(
                description=_MODEL_DESCRIPTION + " Items naming the same model go to one "
                "version together."
            ),
        ]
    ]


class BatchRequest(RootModel[list[BatchItem]]):
    """`POST /batch`: at most MAX_BATCH_ITEMS items, with distinct ids."""

    model_config = ConfigDict(strict=True)


# -- responses (documentation only) ---------------------------------------------------------


class ErrorResponse(BaseModel):
    error: str
    error_type: str = Field(description="TEI's ErrorType: Validation, Empty, Overloaded, ...")


class OpenAIErrorResponse(BaseModel):
    message: str
    code: int = Field(description="The HTTP status.")
    type: str = Field(description="TEI's ErrorType.")


class EmbedResponse(RootModel[list[list[float]]]):
    """One vector per input, in input order."""


class EmbeddingData(BaseModel):
    object: Literal["embedding"]
    embedding: list[float] | str = Field(description="Floats, or base64 of float32 LE.")
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: Usage


class PredictResponse(BaseModel):
    input: str
    result: list[float]


class PredictAccepted(BaseModel):
    message: str
    prediction_id: str


class PredictionDone(BaseModel):
    prediction_id: str
    output: PredictResponse


class PredictionMessage(BaseModel):
    error: str


class PredictionFailed(BaseModel):
    error: str
    error_type: str
    prediction_id: str
    status: Literal["failed"]


class BatchEmbedding(BaseModel):
    id: str
    embedding: list[float]


class BatchItemError(BaseModel):
    id: str
    error: str
    error_type: str


class BatchResponse(RootModel[list[BatchEmbedding | BatchItemError]]):
    """One entry per item, in input order: its embedding, or why that item alone failed."""


class ShutdownAccepted(BaseModel):
    message: str


# -- several models ---------------------------------------------------------------------------


class ModelObject(BaseModel):
    id: str = Field(description="The model's name; `name@version` pins a version.")
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    """OpenAI's `GET /v1/models`."""

    object: Literal["list"]
    data: list[ModelObject]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIModelNotFound(BaseModel):
    """OpenAI's own body for an unknown model; the openai SDK raises NotFoundError with
    `code` model_not_found."""

    error: OpenAIErrorDetail


class TrafficRequest(RootModel[dict[str, Annotated[int, Field(ge=0)]]]):
    """Weights per version, e.g. {"1": 90, "2": 10}; versions left out get none."""


class ShadowRequest(RootModel[ShadowConfig | None]):
    """`{"version", "percent"}`, or null to stop shadow traffic."""


class VersionState(BaseModel):
    """A version as GET /admin/models lists it."""

    model_config = ConfigDict(extra="allow")

    version: str
    state: Literal["loading", "ready", "draining", "failed"]
    error: str | None
    traffic: int = Field(description="Its weight in the model's split.")
    kind: str
    upstream_model_id: str | None
    replicas: list[dict[str, Any]] = Field(description="url, ejected, in_flight per replica.")
    queue_depth: int
    in_flight: int
    concurrency_limit: int | None
    breaker_open: bool
    settings: dict[str, Any]


class RegisteredVersion(VersionState):
    model: str


class AdminModel(BaseModel):
    name: str
    aliases: list[str]
    traffic: dict[str, int]
    shadow: ShadowConfig | None
    versions: list[VersionState]


class AdminModels(BaseModel):
    default: str
    models_config: str | None
    shadow_queued: int
    models: list[AdminModel]


class VersionRemoved(BaseModel):
    model: str
    version: str
    state: Literal["draining"]


class TrafficSet(BaseModel):
    model: str
    traffic: dict[str, int]


class ShadowSet(BaseModel):
    model: str
    shadow: ShadowConfig | None


class ReloadSummary(BaseModel):
    started: list[str] = Field(description="`name@version` of the versions started.")
    kept: list[str] = Field(description="Unchanged versions, kept as they were.")
    removed: list[str] = Field(description="Versions taken out of routing (they drain).")
    default: str


# -- schema generation ----------------------------------------------------------------------

REF_TEMPLATE = "#/components/schemas/{model}"


class StatusBucket(BaseModel):
    le: float | None = Field(description="Upper bound of the bucket; null: above the last.")
    count: float


class StatusBatchSize(BaseModel):
    batches: float = Field(description="Upstream calls in the window.")
    mean: float | None = Field(description="Items per upstream call, on average.")
    buckets: list[StatusBucket] = Field(description="Upstream calls per batch-size bucket.")


class StatusConcurrency(BaseModel):
    limit: int | None = Field(description="Upstream calls in flight at most (this worker).")
    limit_all_workers: float | None = Field(description="The limits of every worker, added.")
    max_concurrent_batches: int | str = Field(
        description="MAX_CONCURRENT_BATCHES of the version: a number or auto."
    )
    adaptive: dict[str, Any] | None = Field(
        description="The adaptive limit's state; null while the limit is fixed."
    )


class StatusModel(BaseModel):
    model: str
    version: str | None
    model_id: str
    requests_per_s: float | None = Field(description="Null until a second snapshot exists.")
    errors_per_s: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    queue_depth: float | None
    in_flight: float | None
    batch_size: StatusBatchSize
    concurrency: StatusConcurrency
    breaker: Literal["closed", "open"]
    cache_hit_ratio: float | None = Field(description="Null without an embedding cache.")
    ab_split: dict[str, float] | None = Field(
        description="Share of traffic per version; null without an A/B split."
    )


class StatusDocument(BaseModel):
    """`GET /status.json`: what the /status page shows."""

    generated_at: str
    window_s: float | None = Field(description="Seconds the rates and percentiles cover.")
    workers: int
    models: list[StatusModel]


class _SpecSchema(GenerateJsonSchema):
    def tagged_union_schema(self, schema: core_schema.TaggedUnionSchema) -> JsonSchemaValue:
        # pydantic writes a tagged union as oneOf, but `[]` matches both the id-list and the
        # batch branch (it is one empty id list to TEI): anyOf is what the union accepts.
        generated = super().tagged_union_schema(schema)
        if "oneOf" in generated:
            generated["anyOf"] = generated.pop("oneOf")
        generated.pop("discriminator", None)
        return generated


def model_schema(model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's JSON schema for /openapi.json, and the schemas it refers to (its
    ``$defs``, to go under ``components/schemas``)."""
    schema = model.model_json_schema(
        ref_template=REF_TEMPLATE, schema_generator=_SpecSchema, mode="validation"
    )
    defs: dict[str, Any] = schema.pop("$defs", {})
    return schema, defs
