"""Sampled capture: SAMPLE_RATE of requests as SageMaker-shaped JSON Lines, rotated by size
and count, dropped (and counted) when the queue is full, raw text only when asked for."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.capture import CaptureWriter, Sampler, _Pending, read_records
from proxy.hooks import HookContext
from tests.conftest import ProxyFactory
from tests.tei_double import expected_vector
from tests.test_hooks import sample


async def wait_for_records(folder: Path, n: int, limit_s: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + limit_s
    while True:
        records = read_records([folder]) if folder.exists() else []
        if len(records) >= n or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.02)


async def test_every_request_is_captured_at_rate_1_without_raw_text(
    start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "capture"
    client = await start_proxy(sample_rate=1.0, sample_path=folder)
    texts = ["first text", "second"]
    resp = await client.post("/embed", json={"inputs": texts}, headers={"X-Request-ID": "cap-1"})
    assert resp.status == 200
    assert (await client.post("/v1/embeddings", json={"input": "third"})).status == 200
    records = await wait_for_records(folder, 2)
    assert len(records) == 2
    first = records[0]
    meta = first["eventMetadata"]
    assert first["eventVersion"] == "0"
    assert meta["requestId"] == "cap-1" and meta["route"] == "/embed"
    assert meta["model"] == "test-double/tei" and meta["version"] == "1"
    assert meta["status"] == 200 and meta["latencyMs"] > 0 and meta["eventId"]
    assert meta["inferenceTime"].endswith("Z")
    data = first["captureData"]
    assert data["endpointInput"]["mode"] == "INPUT" and data["endpointOutput"]["mode"] == "OUTPUT"
    inputs = data["endpointInput"]["data"]["inputs"]
    assert [i["sha256"] for i in inputs] == [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    assert [i["length"] for i in inputs] == [len(t) for t in texts]
    assert [i["tokens"] for i in inputs] == [3, 2] and meta["tokens"] == 5
    output = data["endpointOutput"]["data"]
    assert output["dimensions"] == 16 and "vectors" not in output
    raw = b"".join(p.read_bytes() for p in folder.iterdir())
    for text in [*texts, "third"]:
        assert text.encode() not in raw  # no raw text by default
    assert records[1]["eventMetadata"]["route"] == "/v1/embeddings"
    metrics = await (await client.get("/metrics")).text()
    assert sample(metrics, "proxy_capture_records_total", outcome="written") == 2


async def test_text_and_vectors_only_when_asked_for(
    start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "capture"
    client = await start_proxy(
        sample_rate=1.0, sample_path=folder, sample_text=True, sample_vectors=True
    )
    assert (await client.post("/embed", json={"inputs": ["hello", [101, 102]]})).status == 200
    (record,) = await wait_for_records(folder, 1)
    inputs = record["captureData"]["endpointInput"]["data"]["inputs"]
    assert inputs[0]["text"] == "hello" and inputs[1]["token_ids"] == [101, 102]
    vectors = record["captureData"]["endpointOutput"]["data"]["vectors"]
    assert vectors[0] == pytest.approx(expected_vector("hello"), rel=1e-6)


async def test_rate_0_writes_nothing(start_proxy: ProxyFactory, tmp_path: Path) -> None:
    folder = tmp_path / "capture"
    client = await start_proxy(sample_rate=0.0, sample_path=folder)
    assert (await client.post("/embed", json={"inputs": "x"})).status == 200
    await asyncio.sleep(0.1)
    assert not folder.exists()


def hook_context(i: int) -> HookContext:
    return HookContext(
        request_id=f"r{i}", route="/embed", model="default", inputs=[f"text {i}"],
        vectors=[[0.6, 0.8]], latency_s=0.001, status=200,
    )  # fmt: skip


def test_the_sampler_takes_about_its_rate() -> None:
    offered: list[_Pending] = []

    class Collect:
        def offer(self, pending: _Pending) -> bool:
            offered.append(pending)
            return True

    sampler = Sampler(Collect(), 0.25, seed=7)  # type: ignore[arg-type]
    for i in range(4000):
        sampler.after(hook_context(i))
    assert 900 <= len(offered) <= 1100  # 1000 expected; the seed makes this exact each run
    assert len({p.request_id for p in offered}) == len(offered)


def test_files_rotate_by_size_and_only_the_newest_are_kept(tmp_path: Path) -> None:
    counts: dict[str, int] = {}
    writer = CaptureWriter(
        tmp_path, max_bytes=2048, max_files=3, queue_size=1000, with_text=True,
        with_vectors=True, count=lambda o: counts.__setitem__(o, counts.get(o, 0) + 1),
    )  # fmt: skip
    writer.start()
    sampler = Sampler(writer, 1.0)
    for i in range(200):
        sampler.after(hook_context(i))
    writer.close()
    assert counts == {"written": 200}
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3 and files == sorted(writer.files)
    for path in files:
        assert path.stat().st_size <= 2048
    # The newest survive, in order: the last record written is the last line of the last file.
    kept = read_records(files)
    assert kept[-1]["eventMetadata"]["requestId"] == "r199"
    ids = [int(r["eventMetadata"]["requestId"][1:]) for r in kept]
    assert ids == list(range(200 - len(ids), 200))


async def test_a_full_queue_drops_and_counts_and_never_holds_a_request(
    start_proxy: ProxyFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that stops answering: the writer thread hangs on its first record, the queue
    (size 2) fills, later records are dropped and counted, every request is answered."""
    release = threading.Event()
    original = CaptureWriter._write

    def stuck_write(self: CaptureWriter, pending: _Pending) -> None:
        release.wait(30)
        original(self, pending)

    monkeypatch.setattr(CaptureWriter, "_write", stuck_write)
    folder = tmp_path / "capture"
    client = await start_proxy(sample_rate=1.0, sample_path=folder, sample_queue_size=2)
    try:
        for i in range(10):
            resp = await client.post("/embed", json={"inputs": f"t{i}"})
            assert resp.status == 200
        metrics = await (await client.get("/metrics")).text()
        # One record (two, if the thread took a second before the queue was read) in the
        # stuck write, two queued, the rest dropped.
        dropped = sample(metrics, "proxy_capture_records_total", outcome="dropped")
        assert dropped in (6, 7)
    finally:
        release.set()
    records = await wait_for_records(folder, int(10 - dropped))
    assert len(records) == 10 - dropped
