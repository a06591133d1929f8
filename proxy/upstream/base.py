"""The small interface every upstream implements: TEI over HTTP, OpenAI-compatible over HTTP,
and the in-process embedded model. The batcher, routes, limits and metrics see only this:
an upstream is a set of replicas (one for the embedded model), each with ``embed`` and
``health``, plus what it can honour (``unsupported``) and report (``compute_type``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, overload

import orjson

# One input item: a text, or pre-tokenised ids (TEI accepts both).
EmbedInput = str | list[int]
# One embedding. HTTP upstreams give lists of floats; the embedded model gives numpy rows
# (orjson serialises both without a per-item copy).
Vector = Sequence[float]

TruncationDirection = Literal["Left", "Right"]


class RawVector(Sequence[float]):
    """One embedding as the upstream wrote it: the bytes of its JSON array, passed through to
    the caller without ever becoming Python floats (parsing and re-serialising 384 floats
    per item was an eighth of the proxy's CPU at capacity). ``fragment`` puts it into an
    orjson document as is; reading it as a sequence parses it once."""

    __slots__ = ("_floats", "dim", "json")

    def __init__(self, json: bytes, dim: int) -> None:
        self.json = json
        self.dim = dim
        self._floats: list[float] | None = None

    @property
    def fragment(self) -> orjson.Fragment:
        return orjson.Fragment(self.json)

    def tolist(self) -> list[float]:
        if self._floats is None:
            self._floats = orjson.loads(self.json)
        return self._floats

    def __len__(self) -> int:
        return self.dim

    @overload
    def __getitem__(self, index: int) -> float: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[float]: ...

    def __getitem__(self, index: int | slice) -> float | Sequence[float]:
        return self.tolist()[index]

    def __iter__(self) -> Iterator[float]:
        return iter(self.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RawVector):
            return self.json == other.json or self.tolist() == other.tolist()
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-ish, like a list

    def __repr__(self) -> str:
        return f"RawVector({self.json[:40]!r}..., dim={self.dim})"


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


class Replica(Protocol):
    """One server an upstream call can go to: a replica of an HTTP upstream, or the
    in-process model. ``embed`` raises :class:`proxy.errors.ApiError` on failure: errors the
    server answered carry ``from_upstream=True``; transport faults are 502/503/504.
    """

    @property
    def name(self) -> str: ...

    async def embed(self, inputs: Sequence[EmbedInput], options: EmbedOptions) -> list[Vector]:
        """Embed ``inputs`` in one call; the result has one vector per input, in order."""
        ...

    async def health(self) -> bool: ...


class Upstream(Protocol):
    """An embedding backend: one or more replicas that serve the same model.

    Which replica gets a call, retries and the circuit breaker are not the upstream's job:
    :class:`proxy.resilience.ResilientUpstream` does them around ``replicas``.
    """

    kind: str

    @property
    def replicas(self) -> Sequence[Replica]: ...

    @property
    def compute_type(self) -> str | None:
        """What to answer in TEI's ``x-compute-type`` header; None: the upstream never said."""
        ...

    def unsupported(self, options: EmbedOptions) -> str | None:
        """Why ``options`` cannot be honoured by this kind of upstream, or None. Checked when
        a request is validated, before anything is queued."""
        ...

    async def start(self) -> UpstreamInfo:
        """Connect or load; return once the upstream serves. Called once, before any embed."""
        ...

    async def health(self) -> bool:
        """True when at least one replica is healthy."""
        ...

    async def close(self) -> None: ...


class SingleServerUpstream(ABC):
    """Defaults for an upstream that is its own only replica and honours every option (the
    in-process model)."""

    kind: str
    compute_type: str | None = None

    @property
    def name(self) -> str:
        return self.kind

    @property
    def replicas(self) -> Sequence[Replica]:
        return (self,)

    def unsupported(self, options: EmbedOptions) -> str | None:
        return None

    @abstractmethod
    async def embed(self, inputs: Sequence[EmbedInput], options: EmbedOptions) -> list[Vector]: ...

    @abstractmethod
    async def health(self) -> bool: ...
