"""The optional shared second level of the cache: Redis, shared by every proxy replica.

Reads are ``MGET``: the lookups of one event-loop turn (every request that arrived in it)
go as one command. Writes are pipelined ``SET key value PX ttl`` in the background, off the
request path. Values are the vectors' raw float32 bytes.

It fails open. Every read is bounded by ``timeout_s``: a slow or dead Redis costs a lookup
at most that, and the items are then simply misses. After ``breaker_threshold`` failed calls
in a row the breaker opens and Redis is not asked at all for ``breaker_cooldown_s``; then
one call is let through, and its outcome closes or reopens the breaker. Nothing here ever
raises into a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

# Imported with the Redis level, not at its first hit: Redis holds float32, answered as
# numpy views (proxy/cache/front.py); importing numpy then would stall the event loop ~0.1 s.
import numpy  # noqa: F401
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# Writes wait in memory while Redis is slow; past this many, new ones are dropped.
MAX_PENDING_WRITES = 4096
# Keys per pipeline of writes, and per MGET when many lookups meet in one turn.
CHUNK = 512
# Writes are off the request path, so they may take longer than a read; still bounded.
WRITE_TIMEOUT_FACTOR = 10


class L2Observer(Protocol):
    """Where the second level reports (metrics); every method must be cheap, never raise."""

    def redis_call(self, op: str, seconds: float, ok: bool, reason: str) -> None: ...

    def redis_breaker(self, is_open: bool) -> None: ...

    def redis_dropped_writes(self, n: int) -> None: ...


class Breaker:
    """Opens after ``threshold`` failures in a row; stays open ``cooldown_s``; then
    (half-open) lets one call through at a time, whose success closes it and whose failure
    opens it again."""

    def __init__(
        self, threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._open_until: float | None = None
        self._probing = False  # half-open: the one call let through is under way

    def try_call(self) -> bool:
        """Whether a call may be made now; in half-open, True for one caller at a time
        (until its outcome is recorded)."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._probing:
            return False
        self._probing = True
        return True

    @property
    def is_open(self) -> bool:
        """True while calls must not be made (open and still cooling down)."""
        return self._open_until is not None and self._clock() < self._open_until

    @property
    def state(self) -> str:
        if self._open_until is None:
            return "closed"
        return "open" if self._clock() < self._open_until else "half-open"

    def success(self) -> bool:
        """Record a success; True if it closed the breaker."""
        was_open = self._open_until is not None
        self._failures = 0
        self._open_until = None
        self._probing = False
        return was_open

    def failure(self) -> bool:
        """Record a failure; True if it (re)opened the breaker."""
        self._failures += 1
        self._probing = False
        if self._failures >= self.threshold:
            opening = self._open_until is None or self._clock() >= self._open_until
            self._open_until = self._clock() + self.cooldown_s
            return opening
        return False


def redact(url: str) -> str:
    """``url`` without its password, for logs and /info."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


@dataclass(slots=True)
class _Read:
    keys: list[bytes]
    future: asyncio.Future[list[bytes | None]]


class RedisL2:
    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        ttl_s: float,
        timeout_s: float,
        breaker_threshold: int = 3,
        breaker_cooldown_s: float = 5.0,
        observer: L2Observer | None = None,
        max_pending_writes: int = MAX_PENDING_WRITES,
    ) -> None:
        self.url = url
        self.prefix = prefix.encode() + b":"
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.timeout_s = timeout_s
        self.breaker = Breaker(breaker_threshold, breaker_cooldown_s)
        self._observer = observer
        self._max_pending_writes = max_pending_writes
        self._redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            # No retries inside the client: the caller's time is the timeout, and a miss is
            # cheaper than waiting. The breaker, not a retry loop, handles an outage.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            max_connections=64,
        )
        self._reads: list[_Read] = []
        self._read_scheduled = False
        self._writes: dict[bytes, bytes] = {}
        self._writing: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- state --------------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        return {
            "url": redact(self.url),
            "key_prefix": self.prefix[:-1].decode(),
            "ttl_s": self.ttl_ms / 1000,
            "timeout_ms": self.timeout_s * 1000,
            "breaker": self.breaker.state,
            "pending_writes": len(self._writes),
        }

    @property
    def available(self) -> bool:
        return not self._closed and not self.breaker.is_open

    def redis_key(self, digest: bytes) -> bytes:
        return self.prefix + digest.hex().encode()

    # -- reads --------------------------------------------------------------------------

    def get_many(self, digests: Sequence[bytes]) -> asyncio.Future[list[bytes | None]]:
        """The stored values (None: a miss, or Redis unavailable). Never fails."""
        future: asyncio.Future[list[bytes | None]] = asyncio.get_running_loop().create_future()
        if not self.available or not digests:
            future.set_result([None] * len(digests))
            return future
        self._reads.append(_Read(list(digests), future))
        if not self._read_scheduled:
            self._read_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_reads)
        return future

    def _flush_reads(self) -> None:
        self._read_scheduled = False
        reads, self._reads = self._reads, []
        if not reads:
            return
        if self._closed or not self.breaker.try_call():
            self._answer(reads, {})  # misses: Redis is not asked for now
            return
        self._spawn(self._read(reads))

    async def _read(self, reads: list[_Read]) -> None:
        unique = list(dict.fromkeys(k for read in reads for k in read.keys))
        found: dict[bytes, bytes] = {}
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for i in range(0, len(unique), CHUNK):
                        pipe.mget([self.redis_key(d) for d in unique[i : i + CHUNK]])
                    replies = await pipe.execute()
            values = [v for reply in replies for v in reply]
            found = {d: v for d, v in zip(unique, values, strict=True) if v is not None}
            self._record("get", started, None)
        except Exception as exc:  # fail open: whatever went wrong, these are misses
            self._record("get", started, exc)
        except asyncio.CancelledError:
            self._answer(reads, found)
            raise
        self._answer(reads, found)

    @staticmethod
    def _answer(reads: list[_Read], found: dict[bytes, bytes]) -> None:
        for read in reads:
            if not read.future.done():
                read.future.set_result([found.get(k) for k in read.keys])

    # -- writes -------------------------------------------------------------------------

    def put(self, digest: bytes, value: bytes) -> None:
        """Store in the background; dropped (and counted) when Redis is unavailable or
        too many writes wait already."""
        if not self.available:
            return
        if len(self._writes) >= self._max_pending_writes and digest not in self._writes:
            if self._observer is not None:
                self._observer.redis_dropped_writes(1)
            return
        self._writes[digest] = value
        if self._writing is None:
            self._writing = self._spawn(self._write_loop())

    async def _write_loop(self) -> None:
        # One pipeline at a time: writes that arrive meanwhile go in the next one.
        try:
            while self._writes and self.breaker.try_call():
                batch = list(self._writes.items())[:CHUNK]
                for digest, _ in batch:
                    del self._writes[digest]
                await self._write(batch)
            if self._writes:  # Redis is not asked for now (breaker open, or probing)
                dropped = len(self._writes)
                self._writes.clear()
                if self._observer is not None:
                    self._observer.redis_dropped_writes(dropped)
        finally:
            self._writing = None

    async def _write(self, batch: list[tuple[bytes, bytes]]) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s * WRITE_TIMEOUT_FACTOR):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for digest, value in batch:
                        pipe.set(self.redis_key(digest), value, px=self.ttl_ms)
                    await pipe.execute()
            self._record("set", started, None)
        except Exception as exc:  # fail open: the vectors are simply not shared
            self._record("set", started, exc)
            if self._observer is not None:
                self._observer.redis_dropped_writes(len(batch))

    # -- bookkeeping --------------------------------------------------------------------

    def _record(self, op: str, started: float, exc: BaseException | None) -> None:
        seconds = time.perf_counter() - started
        if exc is None:
            if self.breaker.success():
                log.info("cache: Redis answers again; using it")
                self._breaker_changed(False)
            reason = ""
        else:
            reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            if not isinstance(exc, RedisError | OSError | TimeoutError):
                log.error("cache: unexpected error from Redis on %s", op, exc_info=exc)
            if self.breaker.failure():
                log.warning(
                    "cache: Redis failed %d calls in a row (last: %s on %s); not asking it "
                    "for %.1fs",
                    self.breaker.threshold,
                    reason,
                    op,
                    self.breaker.cooldown_s,
                )
                self._breaker_changed(True)
        if self._observer is not None:
            self._observer.redis_call(op, seconds, exc is None, reason)

    def _breaker_changed(self, is_open: bool) -> None:
        if self._observer is not None:
            self._observer.redis_breaker(is_open)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self, flush_s: float | None = None) -> None:
        """Finish the writes in hand (bounded by ``flush_s``, default one write timeout),
        then close the connections. Reads still waiting answer as misses."""
        self._closed = True
        reads, self._reads = self._reads, []
        self._answer(reads, {})
        limit = self.timeout_s * WRITE_TIMEOUT_FACTOR if flush_s is None else flush_s
        writing = self._writing
        if writing is not None:
            try:
                async with asyncio.timeout(limit):
                    await asyncio.shield(writing)
            except TimeoutError:
                pass
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._writes.clear()
        await self._redis.aclose()
