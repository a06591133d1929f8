"""Build an ONNX graph of a BERT-style sentence encoder (all-MiniLM-L6-v2) from its
``model.safetensors`` with the ``onnx`` helper API, and cache the result on disk.

The graph takes ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64,
``[batch, seq]``) and outputs ``sentence_embedding`` (float32, ``[batch, hidden]``): the
attention-masked mean of the last hidden state, not normalised, so that the ``dimensions``
cut and L2 normalisation can vary per call outside the graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

log = logging.getLogger(__name__)

# Bump whenever the graph this module emits changes, so no stale cached file is reused.
BUILDER_VERSION = 1
OPSET = 17  # the first opset with LayerNormalization
IR_VERSION = 8  # IR version of opset 17: readable by any onnxruntime that knows the opset
OUTPUT_NAME = "sentence_embedding"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
CACHE_DIR_NAME = "embedding-batch-proxy"

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        # Refuse variants this builder would silently get wrong.
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {raw.get('hidden_act')!r}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
        )


@dataclass(frozen=True, slots=True)
class GraphSource:
    """Where the session loads the graph from: a cached file, or bytes when nothing could be
    written. ``built`` tells whether this call had to build the graph."""

    path: Path | None
    data: bytes | None
    built: bool


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / CACHE_DIR_NAME


def weights_fingerprint(weights: Path) -> str:
    """Hash of size, mtime and the safetensors header (names, shapes, offsets): cheap on every
    start, and any change of the weights file changes it."""
    st = weights.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:".encode())
    with weights.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        h.update(f.read(min(header_len, 100 * 1024 * 1024)))
    return h.hexdigest()[:16]


def cache_file_name(model_dir: Path) -> str:
    # The builder version and the weights' fingerprint both change the name: a new builder
    # or new weights never reuse a stale graph.
    fp = weights_fingerprint(model_dir / "model.safetensors")
    return f"bert-mean-v{BUILDER_VERSION}-opset{OPSET}-{fp}.onnx"


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._n = 0

    def const(self, name: str, value: npt.ArrayLike, dtype: npt.DTypeLike = np.float32) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"n{self._n}", **attrs))
        return out

    def ops(self, op_type: str, inputs: list[str], n_out: int, **attrs: Any) -> list[str]:
        self._n += 1
        outs = [f"{op_type.lower()}_{self._n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n{self._n}", **attrs))
        return outs

    def linear(self, x: str, w: FloatArray, b: FloatArray, name: str) -> str:
        # torch Linear keeps weight as [out, in]; MatMul wants [in, out].
        wt = self.const(f"{name}.weight_t", np.ascontiguousarray(w.T))
        return self.op("Add", [self.op("MatMul", [x, wt]), self.const(f"{name}.bias", b)])

    def layer_norm(self, x: str, w: FloatArray, b: FloatArray, name: str, eps: float) -> str:
        return self.op(
            "LayerNormalization",
            [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", b)],
            axis=-1,
            epsilon=eps,
        )


def _strip_prefix(weights: dict[str, Any]) -> dict[str, FloatArray]:
    # Checkpoints saved from BertForX carry a "bert." prefix; sentence-transformers' don't.
    out: dict[str, FloatArray] = {}
    for key, value in weights.items():
        out[key.removeprefix("bert.")] = value
    return out


def build_model(model_dir: Path) -> onnx.ModelProto:
    cfg = BertConfig.from_file(model_dir / "config.json")
    w = _strip_prefix(load_file(str(model_dir / "model.safetensors")))
    hidden, heads = cfg.hidden_size, cfg.num_heads
    head_dim = hidden // heads
    if head_dim * heads != hidden:
        raise ValueError("hidden_size is not a multiple of num_attention_heads")
    eps = cfg.layer_norm_eps
    g = _GraphBuilder()

    def p(name: str) -> FloatArray:
        arr = w[name]
        return arr.astype(np.float32, copy=False)

    i64 = np.int64
    zero = g.const("c_zero_i64", [0], i64)
    axis_seq = g.const("c_axis1", [1], i64)
    one_f = g.const("c_one_f", 1.0)

    # Embeddings: word + absolute position (0..seq-1) + token type, then LayerNorm.
    word = g.op(
        "Gather", [g.const("emb.word", p("embeddings.word_embeddings.weight")), "input_ids"]
    )
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), axis_seq])  # [1]
    positions = g.op(
        "Range",
        [
            g.const("c_zero_scalar", 0, i64),
            g.op("Squeeze", [seq_len, zero]),
            g.const("c_one_scalar", 1, i64),
        ],
    )
    pos = g.op(
        "Gather", [g.const("emb.pos", p("embeddings.position_embeddings.weight")), positions]
    )
    ttype = g.op(
        "Gather",
        [g.const("emb.type", p("embeddings.token_type_embeddings.weight")), "token_type_ids"],
    )
    x = g.op("Add", [g.op("Add", [word, pos]), ttype])
    x = g.layer_norm(
        x, p("embeddings.LayerNorm.weight"), p("embeddings.LayerNorm.bias"), "emb.ln", eps
    )

    # Additive attention bias [batch, 1, 1, seq]: 0 where attended, float32 min at padding
    # (as transformers does), so padded keys get zero weight.
    mask_f = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    neg = g.const("c_mask_min", np.finfo(np.float32).min)
    bias = g.op("Mul", [g.op("Sub", [one_f, mask_f]), neg])
    bias = g.op("Unsqueeze", [bias, g.const("c_axes12", [1, 2], i64)])

    split_sizes = g.const("c_qkv_split", [hidden, hidden, hidden], i64)
    heads_shape = g.const("c_heads_shape", [0, 0, heads, head_dim], i64)
    merge_shape = g.const("c_merge_shape", [0, 0, hidden], i64)
    scale = 1.0 / math.sqrt(head_dim)
    sqrt2 = g.const("c_sqrt2", math.sqrt(2.0))
    half = g.const("c_half", 0.5)

    for i in range(cfg.num_layers):
        pre = f"encoder.layer.{i}"
        # One fused QKV projection; the 1/sqrt(head_dim) score scale is folded into Q.
        wq = p(f"{pre}.attention.self.query.weight") * scale
        bq = p(f"{pre}.attention.self.query.bias") * scale
        w_qkv = np.concatenate(
            [wq, p(f"{pre}.attention.self.key.weight"), p(f"{pre}.attention.self.value.weight")]
        )
        b_qkv = np.concatenate(
            [bq, p(f"{pre}.attention.self.key.bias"), p(f"{pre}.attention.self.value.bias")]
        )
        qkv = g.linear(x, w_qkv, b_qkv, f"l{i}.qkv")
        q, k, v = g.ops("Split", [qkv, split_sizes], 3, axis=-1)
        q = g.op("Transpose", [g.op("Reshape", [q, heads_shape])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, heads_shape])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [v, heads_shape])], perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("MatMul", [q, k]), bias])
        probs = g.op("Softmax", [scores], axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, merge_shape])
        attn = g.linear(
            ctx,
            p(f"{pre}.attention.output.dense.weight"),
            p(f"{pre}.attention.output.dense.bias"),
            f"l{i}.attn_out",
        )
        x = g.layer_norm(
            g.op("Add", [attn, x]),
            p(f"{pre}.attention.output.LayerNorm.weight"),
            p(f"{pre}.attention.output.LayerNorm.bias"),
            f"l{i}.attn_ln",
            eps,
        )
        h = g.linear(
            x,
            p(f"{pre}.intermediate.dense.weight"),
            p(f"{pre}.intermediate.dense.bias"),
            f"l{i}.ffn_in",
        )
        # Exact (erf) GELU, as BERT's "gelu"; onnxruntime fuses this pattern into one kernel.
        erf = g.op("Erf", [g.op("Div", [h, sqrt2])])
        h = g.op("Mul", [g.op("Mul", [h, g.op("Add", [erf, one_f])]), half])
        out = g.linear(
            h, p(f"{pre}.output.dense.weight"), p(f"{pre}.output.dense.bias"), f"l{i}.ffn_out"
        )
        x = g.layer_norm(
            g.op("Add", [out, x]),
            p(f"{pre}.output.LayerNorm.weight"),
            p(f"{pre}.output.LayerNorm.bias"),
            f"l{i}.out_ln",
            eps,
        )

    # Mean pooling over attended tokens, clamped as sentence-transformers does (1e-9).
    mask3 = g.op("Unsqueeze", [mask_f, g.const("c_axis_last", [-1], i64)])  # [b, s, 1]
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask3]), axis_seq], keepdims=0)
    count = g.op("ReduceSum", [mask3, axis_seq], keepdims=0)  # [b, 1]
    count = g.op("Max", [count, g.const("c_min_count", 1e-9)])
    g.nodes.append(helper.make_node("Div", [summed, count], [OUTPUT_NAME], name="pool_div"))

    graph = helper.make_graph(
        g.nodes,
        "bert_mean_pooling",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
            for name in INPUT_NAMES
        ],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", hidden])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="embedding-batch-proxy",
        producer_version=str(BUILDER_VERSION),
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def load_or_build(model_dir: Path, cache_dir: Path | None = None) -> GraphSource:
    """Return the cached graph for these weights, building (and caching) it if needed.
    An unwritable cache directory is not fatal: the graph is then kept in memory."""
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    target = directory / cache_file_name(model_dir)
    if target.is_file():
        return GraphSource(path=target, data=None, built=False)
    data = build_model(model_dir).SerializeToString()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide it from other users
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # Atomic: a concurrent starter sees either no file or a whole one.
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("cannot cache the ONNX graph in %s (%s); keeping it in memory", directory, exc)
        return GraphSource(path=None, data=data, built=True)
    log.info("built ONNX graph %s", target)
    # Load from the file like a warm start does, so the build's buffers can be freed.
    return GraphSource(path=target, data=None, built=True)
