"""The cache in front of the batcher: single-flight dedup, the in-memory LRU, and the
optional Redis level.

For each item of a request, in order:

1. the in-memory LRU (a hit is answered at once);
2. an identical item already in flight, from this request or another: the item joins it
   and shares its one result (a *merge*);
3. otherwise a new *flight*: Redis first when configured (the lookups of one event-loop
   turn go as one MGET), then the upstream through the batcher.

A flight ends once: with a vector, which every waiter gets (the same read-only object) and
which is stored; or with an error, which every waiter gets and which is never stored.
A vector that came as JSON from an HTTP upstream is stored as that JSON (:class:`JsonRow`)
and answered as is, hit or miss: converting 384 floats to float32 and back cost about 20 us
per item, more than everything else the cache does. Other vectors (the embedded model's
rows, values from Redis) are stored as float32 bytes.

A waiter that leaves (its caller disconnected, timed out, or its request failed on another
item) leaves the others alone: the flight's upstream item is cancelled only when its
*last* waiter is gone, so the batcher then drops it if it is still queued.

``Cache-Control`` can skip the lookups (``no-cache``: the vector is still stored) or both
lookups and storing (``no-store``). Such items never take a vector from Redis or the LRU,
but they may share an identical item already on its way to the upstream: that vector is as
fresh as their own would be.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from proxy.batcher import DeadlineExceededError
from proxy.cache.identity import CacheScope, KeyMaker
from proxy.cache.lru import VectorLRU
from proxy.upstream.base import EmbedInput, EmbedOptions, RawVector, Vector

if TYPE_CHECKING:
    from proxy.cache.l2 import RedisL2
    from proxy.metrics import Metrics

# Distinct (scope, options, truncation) hashers kept; past it they are made afresh.
_KEY_MAKERS = 256
# Vectors are kept and answered as little-endian float32, as TEI computes them. orjson
# writes a float32 array in float32's shortest form, which is exactly what TEI sends.
# numpy is imported on first use (a float32 vector: the embedded model, an OpenAI-kind
# upstream, Redis), not at start-up: in front of TEI, rows stay JSON and it is not needed
# (~11 MB of RSS).
F32 = "<f4"
_F32_BYTES = 4

# Sends one item to the upstream (through the batcher) with a deadline, to complete the given
# future (or a new one, if None) with its vector; returns that future. It may raise at once
# (queue full, shutting down): the flight then fails with it.
Submit = Callable[[EmbedInput, float, asyncio.Future[Vector] | None], asyncio.Future[Vector]]


@dataclass(slots=True)
class CacheUse:
    """What one request asks of the cache (from ``Cache-Control``) and what it got: counts
    of items answered from the cache (either level) and of items that were not."""

    read: bool = True  # look items up; False for no-cache and no-store
    write: bool = True  # store what the upstream computes; False for no-store
    hits: int = 0
    misses: int = 0
    counted: bool = False  # a cache took part (the response then says X-Cache-*)

    @property
    def directive(self) -> str | None:
        if not self.read:
            return "no-cache" if self.write else "no-store"
        return None


class _Stage(enum.Enum):
    LOOKUP = "lookup"  # asking Redis
    UPSTREAM = "upstream"  # queued in the batcher or in an upstream call


class _Flight:
    """One item on its way, and everyone waiting for it."""

    __slots__ = (
        "deadline",
        "digest",
        "expected_len",
        "finished",
        "item",
        "key",
        "live",
        "registered",
        "scope",
        "stage",
        "store",
        "submit",
        "upstream",
        "uses",
        "waiters",
    )

    def __init__(
        self,
        key: bytes,
        digest: bytes,
        item: EmbedInput,
        stage: _Stage,
        submit: Submit,
        scope: CacheScope,
        expected_len: int | None,
        registered: bool,
    ) -> None:
        self.key = key  # the LRU's key: the version's group id + digest
        self.digest = digest  # SHA-256 of the identity (Redis's key)
        self.item = item
        self.stage = stage
        self.submit = submit
        self.scope = scope  # for its metrics' labels
        self.expected_len = expected_len  # bytes of a valid vector, when known
        self.registered = registered  # others may join it (False: a private no-cache one)
        self.store = False
        self.deadline = 0.0  # the latest waiter's
        self.waiters: list[_Waiter] = []
        self.uses: list[CacheUse] = []  # each waiter's request, for its hit count
        self.live = 0  # waiters still waiting
        self.upstream: asyncio.Future[Vector] | None = None
        self.finished = False


class _Waiter(asyncio.Future[Vector]):
    """One caller's future for a flight's result. It tells the flight at once when its caller
    leaves (the future is cancelled: a disconnect, a timeout, a sibling item's failure),
    rather than through a done-callback a loop turn later: every item of every request has
    one, so a callback each would cost a scheduled call per item."""

    __slots__ = ("_cache", "_flight")

    def __init__(self, loop: asyncio.AbstractEventLoop, cache: EmbeddingCache, flight: _Flight):
        super().__init__(loop=loop)
        self._cache: EmbeddingCache | None = cache
        self._flight = flight

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        cache, self._cache = self._cache, None
        if cache is not None:
            cache._waiter_gone(self._flight)
        return True


class _Computed(asyncio.Future[Vector]):
    """The future the batcher completes with a flight's vector (or error). It hands the
    outcome to the flight the moment it is set, rather than through a done-callback a loop
    turn later: one scheduled call less per item, on every miss."""

    __slots__ = ("_cache", "_flight")

    def __init__(self, loop: asyncio.AbstractEventLoop, cache: EmbeddingCache, flight: _Flight):
        super().__init__(loop=loop)
        self._cache = cache
        self._flight = flight

    def set_result(self, result: Vector) -> None:
        super().set_result(result)
        self._cache._computed(self._flight, self)

    def set_exception(self, exception: type | BaseException) -> None:
        super().set_exception(exception)
        self._cache._computed(self._flight, self)

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        self._cache._computed(self._flight, self)
        return True


class _Counters:
    """One model version's cache metrics, labelled once."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self.l1_hits = metrics.cache_hits.labels(model, version, "memory")
        self.l1_misses = metrics.cache_misses.labels(model, version, "memory")
        self.l2_hits = metrics.cache_hits.labels(model, version, "redis")
        self.l2_misses = metrics.cache_misses.labels(model, version, "redis")
        self.merged_request = metrics.cache_merges.labels(model, version, "request")
        self.merged_in_flight = metrics.cache_merges.labels(model, version, "in_flight")
        self.bypassed = {
            "no-cache": metrics.cache_bypassed.labels(model, version, "no-cache"),
            "no-store": metrics.cache_bypassed.labels(model, version, "no-store"),
        }


class F32Packer:
    """A vector as little-endian float32 bytes. An HTTP upstream's vectors are lists of
    Python floats: ``struct`` packs those about 3x faster than numpy converts them (same
    rounding); numpy rows (the embedded model) are converted by numpy."""

    def __init__(self) -> None:
        self._structs: dict[int, struct.Struct] = {}

    def pack(self, vector: Vector) -> bytes:
        numpy = sys.modules.get("numpy")  # a numpy row means numpy is loaded already
        if numpy is not None and isinstance(vector, numpy.ndarray):
            return cast(bytes, vector.astype(F32, copy=False).tobytes())
        n = len(vector)
        packer = self._structs.get(n)
        if packer is None:
            if len(self._structs) >= _KEY_MAKERS:
                self._structs.clear()
            packer = self._structs[n] = struct.Struct(f"<{n}f")
        try:
            return packer.pack(*vector)
        except (OverflowError, struct.error):  # out of float32's range: numpy makes it inf
            import numpy as np

            return np.asarray(vector, dtype=F32).tobytes()


class JsonRow(bytes):
    """A stored vector that is the JSON array the upstream wrote (``[0.1,-0.2,...]``), not
    float32 bytes. About 3x the size of float32 for real models' output, but it is answered
    by splicing it into the response, with no parsing and no float formatting."""

    __slots__ = ()


def view(value: bytes) -> Vector:
    """A stored value as a vector, without copying: a :class:`RawVector` over a
    :class:`JsonRow`, a read-only float32 array over float32 bytes. Safe to share."""
    if type(value) is JsonRow:
        # orjson splices only exact bytes: a copy of the row, a fraction of a microsecond.
        return RawVector(bytes(value), value.count(b",") + 1)
    import numpy as np

    return cast(Vector, np.frombuffer(value, dtype=F32))


class EmbeddingCache:
    def __init__(
        self,
        max_bytes: int,
        *,
        l2: RedisL2 | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.lru = VectorLRU(max_bytes)
        self.l2 = l2
        self._metrics = metrics
        self._counters: dict[tuple[str, str], _Counters] = {}
        self._flights: dict[bytes, _Flight] = {}
        # Hashers of the identities' common part, per (scope, options, truncation).
        self._key_makers: dict[tuple[CacheScope, EmbedOptions, bool], KeyMaker] = {}
        self._packer = F32Packer()
        self._lookups = 0  # Redis lookups under way
        self._lookups_done = asyncio.Event()
        self._lookups_done.set()
        if metrics is not None:
            metrics.track(metrics.cache_bytes, lambda: self.lru.used_bytes)
            metrics.track(metrics.cache_entries, lambda: self.lru.entries)

    # -- state --------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Distinct items on their way (in Redis lookups, queued or upstream)."""
        return len(self._flights)

    def describe(self) -> dict[str, Any]:
        s = self.lru.stats()
        return {
            "enabled": True,
            "max_bytes": s.max_bytes,
            "bytes": s.used_bytes,
            "entries": s.entries,
            "evicted_for_room": s.evicted_for_room,
            "evicted_for_version": s.evicted_for_version,
            "in_flight": len(self._flights),
            "redis": self.l2.describe() if self.l2 is not None else None,
        }

    def evict_version(self, model: str, version: str) -> int:
        """Drop a model version's entries from memory (it left the registry); return how
        many. Redis keeps them until their TTL: their keys name the version, so only the
        same version (with the same upstream) can ever read them again."""
        return self.lru.evict_version(model, version)

    async def wait_lookups(self) -> None:
        """Until no Redis lookup is under way (each is bounded by the Redis timeout): a
        drain calls this first, so items still being looked up reach the batcher before it
        stops taking new ones."""
        while self._lookups:
            await self._lookups_done.wait()

    async def aclose(self) -> None:
        if self.l2 is not None:
            await self.l2.aclose()

    # -- the request path ---------------------------------------------------------------

    def submit(
        self,
        scope: CacheScope,
        options: EmbedOptions,
        truncate: bool,
        inputs: Sequence[EmbedInput],
        *,
        deadline: float,
        use: CacheUse,
        upstream: Submit,
        reserve: Callable[[int], None],
        dimension: int | None = None,
    ) -> list[asyncio.Future[Vector]]:
        """One future per input, in order. ``truncate`` is the effective truncation, for
        the key. ``reserve(n)`` is called with the number of new items that may go to the
        upstream before anything is changed, and may raise to refuse the whole request
        (e.g. a full queue); ``dimension`` (when known) checks values read from Redis."""
        loop = asyncio.get_running_loop()
        keys = self._key_maker(scope, options, truncate)
        group = self.lru.group(scope.model, scope.version)
        read = use.read
        l2 = self.l2
        stage = _Stage.LOOKUP if read and l2 is not None and l2.available else _Stage.UPSTREAM
        expected_len = None
        if options.dimensions is not None:
            expected_len = options.dimensions * _F32_BYTES
        elif dimension is not None:
            expected_len = dimension * _F32_BYTES
        # Plan first, with no side effect but LRU recency, so a refusal leaves nothing behind.
        plan: list[bytes | _Flight] = []
        new: dict[bytes, _Flight] = {}
        hits = merged_request = merged_in_flight = 0
        for item in inputs:
            digest = keys.key(item)
            key = group + digest
            if read:
                value = self.lru.get(key)
                if value is not None:
                    plan.append(value)
                    hits += 1
                    continue
            flight = new.get(key)
            if flight is not None:
                plan.append(flight)
                merged_request += 1
                continue
            flight = self._flights.get(key)
            # An item that may not read the cache joins only a flight already past Redis.
            if flight is not None and (read or flight.stage is _Stage.UPSTREAM):
                plan.append(flight)
                merged_in_flight += 1
                continue
            flight = _Flight(
                key,
                digest,
                item,
                stage,
                upstream,
                scope,
                expected_len,
                registered=flight is None,
            )
            new[key] = flight
            plan.append(flight)
        reserve(len(new))

        futures: list[asyncio.Future[Vector]] = []
        for entry in plan:
            if not isinstance(entry, _Flight):
                hit: asyncio.Future[Vector] = loop.create_future()
                hit.set_result(view(entry))
                futures.append(hit)
            else:
                waiter = _Waiter(loop, self, entry)
                self._join(entry, waiter, deadline, use)
                futures.append(waiter)
        lookups: list[_Flight] = []
        for flight in new.values():
            if flight.registered:
                self._flights[flight.key] = flight
            if flight.stage is _Stage.LOOKUP:
                lookups.append(flight)
            else:
                self._send(flight)
        if lookups:
            self._look_up(lookups)

        misses = len(inputs) - hits
        use.hits += hits
        use.misses += misses
        use.counted = True
        if self._metrics is not None:
            c = self._model_counters(scope)
            if read:
                if hits:
                    c.l1_hits.inc(hits)
                if misses:
                    c.l1_misses.inc(misses)
            else:
                c.bypassed[use.directive or "no-cache"].inc(len(inputs))
            if merged_request:
                c.merged_request.inc(merged_request)
            if merged_in_flight:
                c.merged_in_flight.inc(merged_in_flight)
        return futures

    def _key_maker(self, scope: CacheScope, options: EmbedOptions, truncate: bool) -> KeyMaker:
        ident = (scope, options, truncate)
        maker = self._key_makers.get(ident)
        if maker is None:
            if len(self._key_makers) >= _KEY_MAKERS:
                self._key_makers.clear()  # options come from clients: keep this small
            maker = self._key_makers[ident] = KeyMaker(scope, options, truncate)
        return maker

    def _model_counters(self, scope: CacheScope) -> _Counters:
        key = (scope.model, scope.version)
        counters = self._counters.get(key)
        if counters is None:
            assert self._metrics is not None
            counters = self._counters[key] = _Counters(self._metrics, *key)
        return counters

    # -- flights ------------------------------------------------------------------------

    @staticmethod
    def _join(flight: _Flight, fut: _Waiter, deadline: float, use: CacheUse) -> None:
        flight.waiters.append(fut)
        flight.uses.append(use)
        flight.live += 1
        if deadline > flight.deadline:
            flight.deadline = deadline
        flight.store = flight.store or use.write

    def _waiter_gone(self, flight: _Flight) -> None:
        # A waiter was cancelled (its caller left). Only one that left before the flight
        # ended counts.
        if flight.finished:
            return
        flight.live -= 1
        if flight.live == 0:
            # The last waiter left: the item leaves the batch (if still queued) now.
            self._end(flight)
            if flight.upstream is not None and not flight.upstream.done():
                flight.upstream.cancel()
            _release(flight)

    def _end(self, flight: _Flight) -> None:
        flight.finished = True
        if flight.registered and self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def _send(self, flight: _Flight) -> None:
        flight.stage = _Stage.UPSTREAM
        computed = _Computed(asyncio.get_running_loop(), self, flight)
        flight.upstream = computed
        try:
            flight.submit(flight.item, flight.deadline, computed)
        except Exception as exc:  # refused at once (queue full, draining): everyone hears
            flight.upstream = None
            self._fail(flight, exc)

    def _computed(self, flight: _Flight, fut: asyncio.Future[Vector]) -> None:
        """The flight's upstream item ended. Called as the batcher completes it, so it never
        calls back into the batcher itself (a resubmission waits for the next turn)."""
        exc = None if fut.cancelled() else fut.exception()  # retrieved, whoever is left
        if flight.finished or fut is not flight.upstream:
            return
        if fut.cancelled():  # not by us (we cancel only once nobody waits): the loop is ending
            self._end(flight)
            for waiter in flight.waiters:
                waiter.cancel()
            _release(flight)
            return
        if exc is not None:
            if isinstance(exc, DeadlineExceededError) and flight.deadline > time.monotonic():
                # The first waiter's time ran out while queued; a later one's has not.
                flight.upstream = None
                asyncio.get_running_loop().call_soon(self._resend, flight)
                return
            self._fail(flight, exc)
            return
        result = fut.result()
        if type(result) is RawVector:
            self._succeed(flight, JsonRow(result.json), from_upstream=True, vector=result)
            return
        try:
            value = self._packer.pack(result)
        except (TypeError, ValueError) as err:
            self._fail(flight, err)
            return
        self._succeed(flight, value, from_upstream=True)

    def _float32(self, value: bytes) -> bytes:
        if type(value) is JsonRow:
            return self._packer.pack(view(value))
        return value

    def _resend(self, flight: _Flight) -> None:
        if not flight.finished:
            self._send(flight)

    def _succeed(
        self, flight: _Flight, value: bytes, *, from_upstream: bool, vector: Vector | None = None
    ) -> None:
        """``value`` is what is stored; ``vector`` (default: a view of it) what waiters get."""
        self._end(flight)
        if flight.store:
            self.lru.put(flight.key, value)
            if from_upstream and self.l2 is not None:
                # Redis holds float32 bytes whatever the upstream sent: every replica reads it.
                self.l2.put(flight.digest, self._float32(value))
        if vector is None:
            vector = view(value)
        for waiter, use in zip(flight.waiters, flight.uses, strict=True):
            if not waiter.done():
                waiter.set_result(vector)
                if not from_upstream:  # found in Redis: a hit for whoever waited on it
                    use.hits += 1
                    use.misses -= 1
        _release(flight)

    def _fail(self, flight: _Flight, exc: BaseException) -> None:
        # Never stored: the next identical item is tried afresh.
        self._end(flight)
        for waiter in flight.waiters:
            if not waiter.done():
                waiter.set_exception(exc)
        _release(flight)

    # -- Redis --------------------------------------------------------------------------

    def _look_up(self, flights: list[_Flight]) -> None:
        assert self.l2 is not None
        self._lookups += 1
        self._lookups_done.clear()
        lookup = self.l2.get_many([f.digest for f in flights])
        lookup.add_done_callback(functools.partial(self._looked_up, flights))

    def _looked_up(
        self, flights: list[_Flight], lookup: asyncio.Future[list[bytes | None]]
    ) -> None:
        self._lookups -= 1
        if self._lookups == 0:
            self._lookups_done.set()
        values: list[bytes | None] = (
            [None] * len(flights) if lookup.cancelled() else lookup.result()
        )
        hits: dict[CacheScope, int] = {}
        misses: dict[CacheScope, int] = {}
        for flight, value in zip(flights, values, strict=True):
            if value is not None and not _valid(value, flight.expected_len):
                value = None  # not a vector of this model: a miss, never an answer
                if self._metrics is not None:
                    self._metrics.cache_redis_errors.labels("get", "bad_value").inc()
            if value is None:
                misses[flight.scope] = misses.get(flight.scope, 0) + 1
                if not flight.finished:
                    self._send(flight)
                continue
            hits[flight.scope] = hits.get(flight.scope, 0) + 1
            if flight.finished:  # everyone left meanwhile: keep the vector anyway
                self.lru.put(flight.key, value)
            else:
                self._succeed(flight, value, from_upstream=False)
        if self._metrics is not None:
            for scope, n in hits.items():
                self._model_counters(scope).l2_hits.inc(n)
            for scope, n in misses.items():
                self._model_counters(scope).l2_misses.inc(n)


def _release(flight: _Flight) -> None:
    """Drop the flight's references to its futures once it ended: they point back at it, and
    the upstream's future holds the vector as the upstream sent it (a list of floats, 8x the
    stored bytes). Left as cycles, all of it would wait for the garbage collector."""
    flight.waiters = []
    flight.uses = []
    flight.upstream = None


def _valid(value: bytes, expected_len: int | None) -> bool:
    if expected_len is not None:
        return len(value) == expected_len
    return len(value) > 0 and len(value) % _F32_BYTES == 0
