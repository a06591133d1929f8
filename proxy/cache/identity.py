"""What makes two items the same: the cache key.

An item's vector depends on the model, its version, the options that change the vector and
the input itself. The key is the SHA-256 of a canonical encoding of exactly those; the raw
text is never stored or sent anywhere as a key.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.upstream.base import EmbedInput, EmbedOptions, UpstreamInfo

# Bumped whenever the encoding below changes, so old keys can never match new ones.
KEY_SCHEMA = "embedding-cache/1"


@dataclass(frozen=True, slots=True)
class CacheScope:
    """One model version, as the registry names it, plus what its upstream says it serves.

    ``model`` and ``version`` group the entries (a version that leaves the registry takes
    its entries with it); ``upstream`` (:func:`upstream_fingerprint`) is in every key too, so
    a version name reused for other weights never meets the old vectors.
    """

    model: str
    version: str
    upstream: str = ""


def upstream_fingerprint(kind: str, info: UpstreamInfo) -> str:
    """What an upstream serves, as far as its ``/info`` tells: the model id, and what changes
    the numbers for it: the kind of upstream (the embedded ONNX model and TEI do not agree to
    the last bit), the weights' revision (TEI's ``model_sha``), the dtype and the pooling.
    """
    raw = info.raw
    model_type = raw.get("model_type")
    pooling: Any = None
    if isinstance(model_type, dict):
        embedding = model_type.get("embedding")
        pooling = embedding.get("pooling") if isinstance(embedding, dict) else None
    return ";".join(
        (
            f"id={info.model_id}",
            f"kind={kind}",
            f"sha={raw.get('model_sha') or '-'}",
            f"dtype={raw.get('model_dtype') or '-'}",
            f"pooling={pooling or '-'}",
        )
    )


class KeyMaker:
    """SHA-256 keys for the items of one request: the scope and options are hashed once,
    then each input is added to a copy of that state."""

    __slots__ = ("_base",)

    def __init__(self, scope: CacheScope, options: EmbedOptions, truncate: bool) -> None:
        # Only what changes the vector. ``truncate`` is the effective value (the request's,
        # else the upstream's auto_truncate), so an unset option and its default share.
        head = orjson.dumps(
            [
                KEY_SCHEMA,
                scope.model,
                scope.version,
                scope.upstream,
                options.normalize,
                truncate,
                options.truncation_direction,
                options.prompt_name,
                options.dimensions,
            ]
        )
        # Length-prefixed, and the input comes last: no two identities encode alike.
        self._base = hashlib.sha256(struct.pack("<I", len(head)) + head)

    def key(self, item: EmbedInput) -> bytes:
        h = self._base.copy()
        if isinstance(item, str):
            h.update(b"t")
            h.update(item.encode("utf-8", "surrogatepass"))
        else:
            # Token ids are u32 (checked when parsed): a text and its ids never collide.
            h.update(b"i")
            h.update(struct.pack(f"<{len(item)}I", *item))
        return h.digest()
