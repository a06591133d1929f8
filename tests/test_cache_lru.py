"""The in-memory level (proxy/cache/lru.py) and the key (proxy/cache/identity.py)."""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cache.identity import CacheScope, KeyMaker, upstream_fingerprint
from proxy.cache.lru import ENTRY_OVERHEAD, VectorLRU
from proxy.upstream.base import EmbedOptions, UpstreamInfo


class ReferenceLRU:
    """The same rule written the obvious way: evict the least recent until the new one fits."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, bytes] = OrderedDict()

    def used(self) -> int:
        return sum(len(k) + len(v) + ENTRY_OVERHEAD for k, v in self.entries.items())

    def get(self, key: bytes) -> bytes | None:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def put(self, key: bytes, value: bytes) -> None:
        cost = len(key) + len(value) + ENTRY_OVERHEAD
        if cost > self.max_bytes:
            return
        self.entries.pop(key, None)
        while self.entries and self.used() + cost > self.max_bytes:
            self.entries.popitem(last=False)
        self.entries[key] = value


ops_st = st.lists(
    st.tuples(
        st.sampled_from(["put", "get", "evict"]),
        st.integers(0, 2),  # version
        st.integers(0, 15),  # text
        st.integers(0, 300),  # floats in the vector
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops_st, max_bytes=st.integers(300, 6000))
def test_lru_matches_a_reference_and_never_exceeds_its_bytes(
    ops: list[tuple[str, int, int, int]], max_bytes: int
) -> None:
    lru = VectorLRU(max_bytes)
    refs = ReferenceLRU(max_bytes)
    for op, version, text, floats in ops:
        key = lru.group("m", f"v{version}") + bytes([text]) * 32
        if op == "put":
            value = bytes([text]) * (4 * floats)
            lru.put(key, value)
            refs.put(key, value)
        elif op == "get":
            assert lru.get(key) == refs.get(key)
        else:
            lru.evict_version("m", f"v{version}")
            for k in [k for k in refs.entries if k[:4] == key[:4]]:
                del refs.entries[k]
        assert lru.used_bytes == refs.used() <= max_bytes
        assert lru.entries == len(refs.entries)


def test_byte_bound_holds_under_a_long_random_workload() -> None:
    rng = random.Random(1234)
    max_bytes = 256 * 1024
    lru = VectorLRU(max_bytes)
    group = lru.group("m", "v")
    kept: dict[bytes, bytes] = {}
    for i in range(50_000):
        key = group + rng.randrange(5000).to_bytes(32, "little")
        if rng.random() < 0.6:
            dim = rng.choice((16, 384, 768, 1024))
            value = rng.randbytes(4 * dim)
            assert lru.put(key, value)
            kept[key] = value
        else:
            got = lru.get(key)
            if got is not None:
                assert got == kept[key]  # never another key's vector
        assert lru.used_bytes <= max_bytes, i
    assert lru.stats().evicted_for_room > 0
    # Full: the bound is used, not left idle.
    assert lru.used_bytes > max_bytes - (4 * 1024 + 36 + ENTRY_OVERHEAD)


def test_the_most_recently_used_survives_eviction() -> None:
    value = bytes(400)
    cost = VectorLRU.cost(bytes(36), value)
    lru = VectorLRU(3 * cost)
    g = lru.group("m", "v")
    a, b, c, d = (g + bytes([i]) * 32 for i in range(4))
    lru.put(a, value)
    lru.put(b, value)
    lru.put(c, value)
    assert lru.get(a) == value  # a is now the most recent; b the least
    lru.put(d, value)
    assert a in lru and c in lru and d in lru and b not in lru


def test_a_value_larger_than_the_cache_is_not_kept() -> None:
    lru = VectorLRU(1000)
    key = lru.group("m", "v") + bytes(32)
    assert not lru.put(key, bytes(1000))
    assert lru.entries == 0 and lru.used_bytes == 0


def test_evict_version_drops_that_version_only_and_its_late_results_stay_out() -> None:
    lru = VectorLRU(1 << 20)
    old, new = lru.group("m", "v1"), lru.group("m", "v2")
    for i in range(10):
        lru.put(old + bytes([i]) * 32, bytes(64))
        lru.put(new + bytes([i]) * 32, bytes(64))
    assert lru.evict_version("m", "v1") == 10
    assert lru.entries == 10 and all(k[:4] == new for k in lru._entries)
    assert lru.used_bytes == 10 * VectorLRU.cost(new + bytes(32), bytes(64))
    # A flight of the old version that ends now finds its key refused.
    assert not lru.put(old + bytes([99]) * 32, bytes(64))
    # If the version comes back, it gets a fresh group and is cached again.
    again = lru.group("m", "v1")
    assert again != old
    assert lru.put(again + bytes(32), bytes(64))
    assert lru.evict_version("m", "never-registered") == 0
    assert lru.stats().evicted_for_version == 10


@pytest.mark.parametrize("dim", [16, 384, 1024])
def test_the_configured_bytes_bound_what_the_process_really_spends(dim: int) -> None:
    """The accounting (vector + key + ENTRY_OVERHEAD) must not undercount: a full cache of
    N bytes costs the process at most N, as tracemalloc measures it."""
    max_bytes = 8 * 1024 * 1024
    rng = np.random.default_rng(7)
    vectors = [rng.random(dim, dtype=np.float32) for _ in range(64)]
    gc.collect()
    tracemalloc.start()
    try:
        lru = VectorLRU(max_bytes)
        group = lru.group("m", "v")
        before = tracemalloc.get_traced_memory()[0]
        i = 0
        while lru.stats().evicted_for_room == 0:
            # A fresh bytes object per entry, as the upstream's answers are.
            lru.put(group + i.to_bytes(32, "little"), vectors[i % 64].tobytes())
            i += 1
        spent = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert lru.used_bytes <= max_bytes
    assert spent <= max_bytes, f"{spent} bytes traced for a {max_bytes}-byte cache"
    # ...and does not grossly overcount either (the bound is worth its memory).
    assert spent >= 0.7 * lru.used_bytes


# -- keys ------------------------------------------------------------------------------------

SCOPE = CacheScope("model", "v1")


def key(
    item: str | list[int],
    scope: CacheScope = SCOPE,
    options: EmbedOptions | None = None,
    truncate: bool = True,
) -> bytes:
    return KeyMaker(scope, options or EmbedOptions(), truncate).key(item)


def test_keys_are_sha256_of_the_identity_and_never_the_text() -> None:
    k = key("a secret text")
    assert len(k) == 32
    assert b"secret" not in k
    assert key("a secret text") == k


def test_everything_that_changes_the_vector_changes_the_key() -> None:
    base = key("text")
    variants = [
        key("text", CacheScope("model", "v2")),
        key("text", CacheScope("other", "v1")),
        key("text", options=EmbedOptions(normalize=False)),
        key("text", truncate=False),
        key("text", options=EmbedOptions(truncation_direction="Left")),
        key("text", options=EmbedOptions(prompt_name="query")),
        key("text", options=EmbedOptions(dimensions=8)),
        key("text "),
        key([1, 2, 3]),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_a_text_never_collides_with_token_ids_or_a_shifted_boundary() -> None:
    assert key("1 2 3") != key([1, 2, 3])
    assert key([1, 2]) != key([1, 2, 0])
    # A model or version string cannot run into the next field.
    assert key("x", CacheScope("ab", "c")) != key("x", CacheScope("a", "bc"))


@settings(max_examples=300, deadline=None)
@given(
    a=st.tuples(
        st.sampled_from(["m1", "m2"]),
        st.sampled_from(["v1", "v2"]),
        st.booleans(),
        st.booleans(),
        st.none() | st.integers(1, 4),
        st.text(max_size=5) | st.lists(st.integers(0, 2**32 - 1), max_size=4),
    ),
    b=st.tuples(
        st.sampled_from(["m1", "m2"]),
        st.sampled_from(["v1", "v2"]),
        st.booleans(),
        st.booleans(),
        st.none() | st.integers(1, 4),
        st.text(max_size=5) | st.lists(st.integers(0, 2**32 - 1), max_size=4),
    ),
)
def test_two_keys_are_equal_exactly_when_their_identities_are(
    a: tuple[str, str, bool, bool, int | None, str | list[int]],
    b: tuple[str, str, bool, bool, int | None, str | list[int]],
) -> None:
    def k(ident: tuple[str, str, bool, bool, int | None, str | list[int]]) -> bytes:
        model, version, normalize, truncate, dims, item = ident
        options = EmbedOptions(normalize=normalize, dimensions=dims)
        return key(item, CacheScope(model, version), options, truncate)

    same = a == b and type(a[5]) is type(b[5])
    assert (k(a) == k(b)) == same


def test_the_upstream_fingerprint_names_the_model_and_what_changes_its_numbers() -> None:
    raw = {
        "model_id": "org/model",
        "model_sha": "abc123",
        "model_dtype": "float16",
        "model_type": {"embedding": {"pooling": "cls"}},
    }
    fingerprint = upstream_fingerprint("tei", UpstreamInfo.from_tei(raw))
    assert fingerprint == "id=org/model;kind=tei;sha=abc123;dtype=float16;pooling=cls"
    other_sha = upstream_fingerprint("tei", UpstreamInfo.from_tei({**raw, "model_sha": "d"}))
    embedded = upstream_fingerprint("embedded", UpstreamInfo.from_tei(raw))
    assert len({fingerprint, other_sha, embedded}) == 3


def test_a_version_name_reused_for_other_weights_never_shares_a_key() -> None:
    old = CacheScope("model", "1", "id=org/a;kind=tei;sha=-;dtype=float32;pooling=mean")
    new = CacheScope("model", "1", "id=org/b;kind=tei;sha=-;dtype=float32;pooling=mean")
    assert key("text", old) != key("text", new)
