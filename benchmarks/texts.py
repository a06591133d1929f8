"""Deterministic request texts: short (~8 words), long (~120 word-piece tokens) and mixed.

Texts vary per request so nothing along the way can serve a repeated answer: the proxy's
cache (on by default) would answer a repeat from memory, and a run would then measure the
cache instead of batching. :class:`UniqueBodies` gives every request of a run its own text,
and every run its own texts (a per-run salt), with the same number of words and tokens as
the fixed pool. The fixed pool (``texts``, ``embed_bodies``) is built from a seed so every
run can send the same bytes where that is what a scenario wants.

``mixed`` is 80 % short and 20 % long: in every run of five consecutive indices exactly one
text is long, at a position drawn from the seed, so any stretch of requests has the same mix
and the order does not repeat with a period of five.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal, overload

import orjson

TextKind = Literal["short", "long", "mixed"]
TEXT_KINDS: tuple[TextKind, ...] = ("short", "long", "mixed")

# Common English words, so word-piece tokenisation gives about one token per word.
_WORDS = (
    "the a an of to in for on with at by from about into over after before under between "
    "through during without within along across behind beyond near since until while "
    "people time year day way man woman child world life hand part place case week company "
    "system program question work government number night point home water room mother "
    "area money story fact month lot right study book eye job word business issue side kind "
    "head house service friend father power hour game line end member law car city name "
    "team minute idea kid body information back parent face others level office door health "
    "person art war history party result change morning reason research girl guy moment air "
    "teacher force education good new first last long great little own other old big high "
    "different small large next early young important few public bad same able make know "
    "take see come think look want give use find tell ask seem feel try leave call keep let "
    "begin help show hear play run move live believe bring happen write provide sit stand "
    "lose pay meet include continue set learn lead understand watch follow stop create speak "
    "read allow add spend grow open walk win offer remember love consider appear buy wait "
    "serve die send expect build stay fall cut reach kill remain suggest raise pass sell "
    "require report decide pull"
).split()

SHORT_WORDS = 8
LONG_WORDS = 117  # 120 tokens with [CLS], [SEP] and the full stop
MIXED_BLOCK = 5  # mixed: one long text in every block of five (20 %)


def mixed_kind(index: int, seed: int = 1234) -> Literal["short", "long"]:
    """Whether text ``index`` of the mixed kind is short or long (deterministic, seeded)."""
    block, pos = divmod(index, MIXED_BLOCK)
    long_pos = random.Random(seed * 7_919 + block).randrange(MIXED_BLOCK)
    return "long" if pos == long_pos else "short"


def make_text(kind: TextKind, index: int, seed: int = 1234) -> str:
    if kind == "mixed":
        kind = mixed_kind(index, seed)
    rng = random.Random(seed * 1_000_003 + index * 2 + (kind == "long"))
    n = SHORT_WORDS if kind == "short" else LONG_WORDS
    words = [rng.choice(_WORDS) for _ in range(n)]
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


def texts(kind: TextKind, count: int, seed: int = 1234) -> list[str]:
    return [make_text(kind, i, seed) for i in range(count)]


def embed_bodies(kind: TextKind, count: int = 512, seed: int = 1234) -> list[bytes]:
    """Ready-to-send ``{"inputs": text}`` JSON bodies, one per distinct text."""
    return [orjson.dumps({"inputs": t}) for t in texts(kind, count, seed)]


# Words replaced per text to make it unique: len(_WORDS) ** 5 (about 8e11) texts per run.
_UNIQUE_WORDS = 5
_POOL = 520  # a multiple of five, so `mixed` keeps one long text in every five


class UniqueBodies(Sequence[bytes]):
    """``{"inputs": text}`` bodies, a different text for every index: text ``i`` is pool
    text ``i % 520`` with words 1-5 replaced by common words spelling ``salt + i`` in base
    ``len(_WORDS)``. Same word count, so the same token count as the pool (the emulators
    charge per word). Built on demand, a few microseconds each."""

    def __init__(self, kind: TextKind, salt: int | None = None, seed: int = 1234) -> None:
        self.kind = kind
        self.salt = random.getrandbits(36) if salt is None else salt
        self._pool = [make_text(kind, i, seed).split(" ") for i in range(_POOL)]

    def __len__(self) -> int:
        return 2**62  # loadgen indexes with i % len(bodies): every index is its own text

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            raise TypeError("UniqueBodies is indexed one request at a time")
        return orjson.dumps({"inputs": self.text(index)})

    def text(self, index: int) -> str:
        words = list(self._pool[index % _POOL])
        n = self.salt + index
        base = len(_WORDS)
        for position in range(1, 1 + _UNIQUE_WORDS):
            n, digit = divmod(n, base)
            if position < len(words):
                words[position] = _WORDS[digit]
        return " ".join(words)
