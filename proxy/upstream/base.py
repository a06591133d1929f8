"""The small interface every upstream implements: TEI over HTTP, OpenAI-compatible over HTTP,
and the in-process embedded model. The batcher, routes, limits and metrics see only this."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# One input item: a text, or pre-tokenised ids (TEI accepts both).
EmbedInput = str | list[int]
# One embedding. HTTP upstreams give lists of floats; the embedded model gives numpy rows
# (orjson serialises both without a per-item copy).
Vector = Sequence[float]

TruncationDirection = Literal["Left", "Right"]


@dataclass(frozen=True, slots=True)
class EmbedOptions:
    """Per-request options. Items whose options differ never share an upstream call."""

    normalize: bool = True
    truncate: bool | None = None  # None: the upstream's auto_truncate
    truncation_direction: TruncationDirection = "Right"
    prompt_name: str | None = None
    dimensions: int | None = None


@dataclass(slots=True)
class UpstreamInfo:
    """What the proxy needs from TEI's ``/info``; ``raw`` keeps TEI's full body in its shape."""

    model_id: str
    max_client_batch_size: int
    max_input_length: int
    max_concurrent_requests: int = 512
    max_batch_tokens: int = 16384
    auto_truncate: bool = True
    embedding_dimension: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_tei(cls, body: dict[str, Any]) -> UpstreamInfo:
        return cls(
            model_id=str(body.get("model_id", "unknown")),
            max_client_batch_size=int(body.get("max_client_batch_size") or 32),
            max_input_length=int(body.get("max_input_length") or 512),
            max_concurrent_requests=int(body.get("max_concurrent_requests") or 512),
            max_batch_tokens=int(body.get("max_batch_tokens") or 16384),
            auto_truncate=bool(body.get("auto_truncate", True)),
            raw=dict(body),
        )


class Upstream(Protocol):
    """An embedding backend. ``embed`` raises :class:`proxy.errors.ApiError` on failure:
    errors the upstream answered carry ``from_upstream=True``; transport faults are 502/503/504.
    """

    kind: str

    async def start(self) -> UpstreamInfo:
        """Connect or load; return once the upstream serves. Called once, before any embed."""
        ...

    async def embed(self, inputs: Sequence[EmbedInput], options: EmbedOptions) -> list[Vector]:
        """Embed ``inputs`` in one call; the result has one vector per input, in order."""
        ...

    async def health(self) -> bool: ...

    async def close(self) -> None: ...
