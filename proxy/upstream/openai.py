"""An OpenAI-compatible ``/v1/embeddings`` upstream (Infinity, vLLM, Ollama, OpenAI itself)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import aiohttp

# Imported with this upstream, not at its first answer: its vectors are cached as float32
# and answered as numpy views (proxy/cache/front.py); importing numpy then would stall the
# event loop ~0.1 s under the first batch.
import numpy  # noqa: F401
import orjson

from proxy.errors import (
    REFUSAL_STATUSES,
    ApiError,
    ErrorType,
    bad_upstream,
    upstream_refused,
    validation,
)
from proxy.upstream.base import EmbedInput, EmbedOptions, UpstreamInfo, Vector
from proxy.upstream.tei import HttpUpstreamBase, NotReadyError, check_vectors

log = logging.getLogger(__name__)

# OpenAI's documented limit of inputs per request; other servers accept at least as many
# as the proxy's default batch size.
OPENAI_MAX_INPUTS = 2048


def openai_error(status: int, body: bytes) -> ApiError:
    """Map an OpenAI-style error (``{"error": {"message", "type"}}`` or TEI's
    ``{"message", "code", "type"}``) onto ours."""
    message = body.decode("utf-8", "replace").strip()[:500] or f"upstream answered {status}"
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error", parsed)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"]
        elif isinstance(err, str):
            message = err
    if status in REFUSAL_STATUSES:
        # Our credentials, path or model name are wrong: that is the operator's problem,
        # not the caller's, so it must not look like the caller's 401 or 404.
        return upstream_refused(status, message)
    if status == 429:
        return ApiError(429, message, ErrorType.OVERLOADED, from_upstream=True)
    if 400 <= status < 500:
        return ApiError(
            422 if status == 400 else status, message, ErrorType.VALIDATION, from_upstream=True
        )
    return ApiError(status, message, ErrorType.BACKEND, from_upstream=True)


def _normalise(vec: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vec))
    return [v / norm for v in vec] if norm > 0 else list(vec)


class OpenAIUpstream(HttpUpstreamBase):
    kind = "openai"

    def __init__(
        self,
        urls: Sequence[str],
        *,
        model: str | None = None,
        path: str = "/v1/embeddings",
        **kwargs: Any,
    ) -> None:
        super().__init__(urls, **kwargs)
        self.model = model
        self.path = path if path.startswith("/") else "/" + path

    async def start(self) -> UpstreamInfo:
        """Probe with one tiny embedding on any replica: it proves reachability and
        credentials, and tells the dimension. Transport faults are retried; refusals stop
        start-up."""

        async def probe(base_url: str) -> list[Vector]:
            try:
                return await self._call(base_url, ["ping"])
            except ApiError as exc:
                if exc.status in (502, 503, 504) and not exc.message.startswith("upstream refused"):
                    raise NotReadyError(exc.message) from exc
                raise RuntimeError(f"openai upstream refused the probe: {exc.message}") from exc

        urls = ", ".join(r.base_url for r in self._replicas)
        vectors = await self._from_any_replica(probe, f"the openai upstream at {urls}")
        dim = len(vectors[0])
        model_id = self.model or "openai-compatible"
        raw: dict[str, Any] = {
            "model_id": model_id,
            "model_sha": None,
            "model_dtype": "float32",
            "served_model_name": model_id,
            "model_type": {"embedding": {"pooling": "unknown"}},
            "max_concurrent_requests": 512,
            "max_input_length": 8192,
            "max_batch_tokens": 16384,
            "max_batch_requests": None,
            "max_client_batch_size": OPENAI_MAX_INPUTS,
            "auto_truncate": True,
            "tokenization_workers": None,
            "version": "openai-compatible",
            "sha": None,
            "docker_label": None,
        }
        info = UpstreamInfo.from_tei(raw)
        info.embedding_dimension = dim
        return info

    async def _call(self, base_url: str, inputs: Sequence[EmbedInput]) -> list[Vector]:
        payload: dict[str, Any] = {"input": list(inputs), "encoding_format": "float"}
        if self.model:
            payload["model"] = self.model
        status, body, _ = await self._post_json(base_url, self.path, payload)
        if status != 200:
            raise openai_error(status, body)
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise bad_upstream("upstream answered malformed JSON") from exc
        data = parsed.get("data") if isinstance(parsed, dict) else None
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise bad_upstream("upstream answered no `data` list")
        if len(data) != len(inputs):
            raise bad_upstream(f"upstream answered {len(data)} embeddings for {len(inputs)}")
        try:
            ordered = sorted(data, key=lambda d: int(d["index"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise bad_upstream("upstream answered embeddings without a valid `index`") from exc
        if [int(d["index"]) for d in ordered] != list(range(len(inputs))):
            raise bad_upstream("upstream answered embeddings with wrong indices")
        return check_vectors([d.get("embedding") for d in ordered], len(inputs))

    def unsupported(self, options: EmbedOptions) -> str | None:
        # The OpenAI API has none of TEI's per-request options but `dimensions` (cut here, as
        # TEI does): refuse what cannot be honoured rather than lie. Refused at validation,
        # so a caller's option never reaches the upstream nor counts as its failure.
        if not options.normalize:
            return "`normalize: false` is not available with an openai upstream"
        if options.prompt_name is not None:
            return "`prompt_name` is not available with an openai upstream"
        if options.truncation_direction != "Right":
            return "`truncation_direction: Left` is not available with an openai upstream"
        return None

    async def embed_at(
        self, base_url: str, inputs: Sequence[EmbedInput], options: EmbedOptions
    ) -> list[Vector]:
        reason = self.unsupported(options)
        if reason is not None:  # validation refuses these first; never send them regardless
            raise validation(reason)
        vectors = await self._call(base_url, inputs)
        if options.dimensions is not None:
            # Matryoshka cut as TEI does it: keep the first N values, then normalise.
            return [_normalise(v[: options.dimensions]) for v in vectors]
        return vectors

    async def health_at(self, base_url: str) -> bool:
        for path in ("/health", "/v1/models"):
            try:
                status, _ = await self._get(base_url, path, 2.0)
            except (aiohttp.ClientError, TimeoutError):
                return False
            if 200 <= status < 300:
                return True
        return False
