"""Shared parts of the cache tests: an in-process upstream behind a real batcher, and the
answer a model without any cache would give."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from proxy.batcher import Batcher, BatcherConfig
from proxy.cache import CacheScope, CacheUse, EmbeddingCache
from proxy.cache.front import F32, Submit
from proxy.cache.identity import KeyMaker
from proxy.upstream.base import EmbedInput, EmbedOptions, Vector

OPTIONS = EmbedOptions()
SCOPE = CacheScope("test/model", "v1")


def vector_of(text: str, dim: int = 4) -> list[float]:
    """A deterministic vector of doubles (so storing it as float32 really rounds)."""
    digest = hashlib.sha256(text.encode()).digest()
    return [v / 2**31 + 0.123456789 for (v,) in struct.iter_unpack("<i", digest[: 4 * dim])]


def f32(text: str, dim: int = 4) -> np.ndarray:
    return np.asarray(vector_of(text, dim), dtype=F32)


class ItemRefused(Exception):
    """The upstream refused this one text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class BatchFailed(Exception):
    """The upstream failed a whole call; every text in it gets this."""

    def __init__(self, texts: Sequence[str]) -> None:
        super().__init__(sorted(texts))
        self.texts = frozenset(texts)


@dataclass(frozen=True, slots=True)
class Job:
    text: str
    deadline: float


@dataclass
class FakeUpstream:
    """Embeds texts in-process. ``refused`` texts fail alone; the calls numbered in
    ``failing_calls`` fail whole. Records every text sent and whether one text was ever in
    two upstream items at once (what single flight must prevent)."""

    refused: frozenset[str] = frozenset()
    failing_calls: frozenset[int] = frozenset()
    turns: int = 1  # event-loop turns one call takes
    gate: asyncio.Event | None = None  # when set: calls wait for it
    sent: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    overlaps: list[str] = field(default_factory=list)
    _in_flight: Counter[str] = field(default_factory=Counter)

    async def process(self, jobs: list[Job]) -> list[Vector | BaseException]:
        number = self.calls
        self.calls += 1
        texts = [job.text for job in jobs]
        for text in texts:
            if self._in_flight[text] or texts.count(text) > 1:
                self.overlaps.append(text)
        self._in_flight.update(texts)
        self.sent.update(texts)
        try:
            if self.gate is not None:
                await self.gate.wait()
            for _ in range(self.turns):
                await asyncio.sleep(0)
        finally:
            self._in_flight.subtract(texts)
        if number in self.failing_calls:
            raise BatchFailed(texts)
        return [ItemRefused(t) if t in self.refused else vector_of(t) for t in texts]


def batcher_for(
    upstream: FakeUpstream, batch: int = 4, concurrent: int = 2
) -> Batcher[Job, Vector]:
    return Batcher(
        upstream.process, BatcherConfig(max_batch_size=batch, max_concurrent_batches=concurrent)
    )


def submitter(batcher: Batcher[Job, Vector]) -> Submit:
    def submit(
        item: EmbedInput, deadline: float, future: asyncio.Future[Vector] | None
    ) -> asyncio.Future[Vector]:
        assert isinstance(item, str)
        return batcher.submit_nowait(Job(item, deadline), deadline=deadline, future=future)

    return submit


def submit(
    cache: EmbeddingCache,
    batcher: Batcher[Job, Vector],
    texts: Sequence[str],
    use: CacheUse | None = None,
    *,
    scope: CacheScope = SCOPE,
    options: EmbedOptions = OPTIONS,
    timeout_s: float = 30.0,
) -> list[asyncio.Future[Vector]]:
    return cache.submit(
        scope,
        options,
        True,
        list(texts),
        deadline=time.monotonic() + timeout_s,
        use=use if use is not None else CacheUse(),
        upstream=submitter(batcher),
        reserve=lambda n: None,
    )


def memory_key(cache: EmbeddingCache, text: str, scope: CacheScope = SCOPE) -> bytes:
    return cache.lru.group(scope.model, scope.version) + KeyMaker(scope, OPTIONS, True).key(text)


def preload(cache: EmbeddingCache, texts: Sequence[str], scope: CacheScope = SCOPE) -> None:
    for text in texts:
        cache.lru.put(memory_key(cache, text, scope), f32(text).tobytes())
