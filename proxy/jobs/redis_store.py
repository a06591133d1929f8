"""A job store in Redis, shared by every proxy replica that points at the same Redis.

Layout (``p`` is ``key_prefix``):

* ``p:jobs`` — a Stream holding each unfinished job (fields ``id`` and ``input``). Entries
  are deleted once their result is stored, so its length is the number of unfinished jobs.
* ``p:workers`` — the consumer group all replicas read ``p:jobs`` through; each replica is
  one consumer, so each job goes to one replica at a time.
* ``p:job:{id}`` — the job's record (JSON), written as pending on submit and replaced by the
  result, each with a TTL, so any replica can answer a poll.

Delivery is at least once. A job is acknowledged (and deleted from the stream) in the same
atomic script that stores its result, so an acknowledged job always has a result. A job
whose replica died stays in the group's pending list; once idle for
``visibility_timeout_s`` another replica takes it over with XAUTOCLAIM. A live replica keeps
the jobs it is running by resetting their idle time every ``visibility_timeout_s / 3``
(XCLAIM ... JUSTID, which leaves the delivery count alone), so however long the processor
takes, the job is not stolen; only a replica that stops answering Redis for longer than the
visibility timeout (dead, or its event loop frozen) loses its jobs, and then a job may run
twice: the first result stored wins. A job delivered more than ``max_deliveries`` times
(its replicas keep dying while running it) is failed instead of run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.errors import ApiError, ErrorType
from proxy.jobs.base import (
    JobQueueFullError,
    JobRecord,
    JobStatus,
    JobStoreUnavailableError,
    Processor,
)
from proxy.jobs.memory import error_for, new_prediction_id

log = logging.getLogger(__name__)

# Redis unreachable, as opposed to Redis refusing a command.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

# KEYS: stream, job key. ARGV: max_jobs, pending record, pending TTL ms, id, input.
# One script so that the bound holds across replicas and a job is never queued unrecorded.
_SUBMIT = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('XADD', KEYS[1], '*', 'id', ARGV[4], 'input', ARGV[5])
return 1
"""

# KEYS: job key, stream. ARGV: group, entry id, final record, TTL ms.
# Store, then ack and delete, atomically. A job that ran twice keeps its first final record.
_FINISH = """
local current = redis.call('GET', KEYS[1])
local write = true
if current then
  local ok, record = pcall(cjson.decode, current)
  if ok and type(record) == 'table' and record['status'] ~= 'pending' then write = false end
end
if write then redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4]) end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if write then return 1 end
return 0
"""

# KEYS: stream. ARGV: group, consumer, entry ids. Reset the idle time of the entries this
# consumer still owns (checked first, so it never takes back one already re-claimed).
_KEEP = """
local kept = {}
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if entry and entry[2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""

# KEYS: stream. ARGV: group, idle ms, own name. Forget consumers (replicas long gone) that
# hold no jobs, or every restart would leave one behind in the group for good.
_FORGET = """
local removed = 0
for _, fields in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #fields, 2 do info[fields[i]] = fields[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
"""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _encode(record: JobRecord) -> bytes:
    return orjson.dumps(
        {
            "id": record.prediction_id,
            "status": record.status,
            "input": record.input,
            "result": record.result,
            "error": record.error,
        }
    )


def _decode(raw: str | bytes) -> JobRecord:
    data = orjson.loads(raw)
    status: JobStatus = data["status"]
    return JobRecord(data["id"], status, data["input"], data.get("result"), data.get("error"))


def _entries(response: Any) -> list[tuple[str, dict[str, str] | None]]:
    """(entry id, fields) from XREADGROUP, in its RESP2 (list) or RESP3 (dict) shape."""
    if isinstance(response, dict):
        streams: Iterable[Any] = response.values()
    else:
        streams = (messages for _, messages in response or [])
    found: list[tuple[str, dict[str, str] | None]] = []
    for messages in streams:
        for entry_id, fields in messages:
            found.append((entry_id, fields))
    return found


class _Backoff:
    def __init__(self, first_s: float = 0.1, cap_s: float = 5.0) -> None:
        self._first_s, self._cap_s, self._next_s = first_s, cap_s, first_s

    def reset(self) -> None:
        self._next_s = self._first_s

    def delay(self) -> float:
        delay = self._next_s
        self._next_s = min(self._cap_s, self._next_s * 2)
        # Jitter, so replicas that lost Redis together don't all reconnect in step.
        return delay * random.uniform(0.5, 1.0)


class RedisJobStore:
    """Jobs on a Redis Stream read through a consumer group; see the module docstring.

    ``visibility_timeout_s`` only has to exceed how long a live replica can go without
    reaching Redis (its ownership is refreshed while jobs run), not the processor's worst
    case. Setting it low makes a dead replica's jobs move sooner, at the risk of running a
    job twice when Redis or the event loop stalls for that long.
    """

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        max_jobs: int,
        result_ttl_s: float,
        workers: int,
        visibility_timeout_s: float = 30.0,
        key_prefix: str = "proxy",
        consumer_name: str | None = None,
        max_deliveries: int = 3,
        pending_ttl_s: float = 7 * 24 * 3600.0,
        socket_timeout_s: float = 2.0,
        block_s: float = 1.0,
    ) -> None:
        if max_jobs < 1 or workers < 1 or max_deliveries < 1:
            raise ValueError("max_jobs, workers and max_deliveries must be >= 1")
        if min(result_ttl_s, visibility_timeout_s, pending_ttl_s, socket_timeout_s) <= 0:
            raise ValueError("TTLs and timeouts must be > 0")
        self._max_jobs = max_jobs
        self._result_ttl_ms = _ms(result_ttl_s)
        self._pending_ttl_ms = _ms(max(pending_ttl_s, result_ttl_s))
        self._workers = workers
        self._visibility_ms = _ms(visibility_timeout_s)
        self._max_deliveries = max_deliveries
        self._socket_timeout_s = socket_timeout_s
        # A blocking read must return before the socket timeout would call Redis dead.
        self._block_ms = _ms(min(block_s, socket_timeout_s / 2))
        self._claim_every_s = min(visibility_timeout_s / 2, 5.0)
        self._keep_every_s = visibility_timeout_s / 3
        self._forget_idle_ms = _ms(max(3600.0, 10 * visibility_timeout_s))
        self._stream = f"{key_prefix}:jobs"
        self._group = f"{key_prefix}:workers"
        self._job_prefix = f"{key_prefix}:job:"
        self.consumer_name = consumer_name or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self._redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=min(socket_timeout_s, 2.0),
            # One quick retry survives a pooled connection that went stale (Redis restarted);
            # more would only delay the 503 when Redis is really gone.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
            health_check_interval=30,
        )
        self._submit_script = self._redis.register_script(_SUBMIT)
        self._finish_script = self._redis.register_script(_FINISH)
        self._keep_script = self._redis.register_script(_KEEP)
        self._forget_script = self._redis.register_script(_FORGET)
        self._processor: Processor | None = None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closed = False
        self._reader: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._claim_cursor = "0-0"

    # -- the JobStore interface ----------------------------------------------------------

    async def start(self, processor: Processor) -> None:
        """Start consuming. Does not fail if Redis is down: the reader retries with backoff."""
        if self._processor is not None:
            raise RuntimeError("job store already started")
        self._processor = processor
        self._reader = asyncio.create_task(self._consume(), name="redis-job-reader")
        self._keeper = asyncio.create_task(self._keep_ownership(), name="redis-job-keeper")

    async def submit(self, text: str) -> str:
        """Queue a job for any replica. Raises JobQueueFullError, JobStoreUnavailableError."""
        prediction_id = new_prediction_id()
        pending = _encode(JobRecord(prediction_id, "pending", text))
        keys = [self._stream, self._job_key(prediction_id)]
        args: list[int | bytes | str] = [
            self._max_jobs,
            pending,
            self._pending_ttl_ms,
            prediction_id,
            text,
        ]
        async with self._reaching_redis():
            accepted = await self._submit_script(keys=keys, args=args)
        if not accepted:
            raise JobQueueFullError(f"{self._max_jobs} unfinished jobs (max_jobs)")
        return prediction_id

    async def get(self, prediction_id: str) -> JobRecord | None:
        if not _ID_RE.fullmatch(prediction_id):
            return None
        async with self._reaching_redis():
            raw = await self._redis.get(self._job_key(prediction_id))
        if raw is None:
            return None
        try:
            return _decode(raw)
        except (ValueError, KeyError, TypeError):
            log.error("unreadable job record %s", prediction_id)
            return None

    async def healthy(self) -> bool:
        try:
            async with asyncio.timeout(self._socket_timeout_s):
                return bool(await self._redis.ping())
        except (RedisError, OSError):  # OSError covers TimeoutError
            return False

    async def drain(self) -> None:
        """Stop reading jobs and finish (store and acknowledge) every job this replica holds.

        Jobs not yet read stay in the stream for the other replicas (or this one's next
        start). Returns within about ``block_s`` plus the longest job in hand; if Redis is
        down, storing a result is retried for up to ``visibility_timeout_s``.
        """
        self._stopping.set()
        self._slot_free.set()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        while self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def close(self) -> None:
        """Stop everything (jobs still running are left to other replicas) and disconnect."""
        self._closed = True
        self._stopping.set()
        self._slot_free.set()
        tasks = [t for t in (self._reader, self._keeper, *self._inflight.values()) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._redis.aclose()

    # -- consuming -----------------------------------------------------------------------

    def _job_key(self, prediction_id: str) -> str:
        return self._job_prefix + prediction_id

    @contextlib.asynccontextmanager
    async def _reaching_redis(self) -> AsyncIterator[None]:
        """Map Redis being unreachable to JobStoreUnavailableError, within one socket
        timeout overall (reconnecting and retrying could otherwise take several)."""
        try:
            async with asyncio.timeout(self._socket_timeout_s):
                yield
        except _UNAVAILABLE as exc:  # OSError covers asyncio's TimeoutError
            reason = str(exc) or "timed out"
            raise JobStoreUnavailableError(f"Redis job store unreachable: {reason}") from exc

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _consume(self) -> None:
        backoff = _Backoff()
        loop = asyncio.get_running_loop()
        group_ready = False
        next_claim = next_forget = 0.0
        while not self._stopping.is_set():
            try:
                if not group_ready:
                    await self._ensure_group()
                    group_ready = True
                if len(self._inflight) >= self._workers:
                    self._slot_free.clear()
                    await self._slot_free.wait()
                    continue
                now = loop.time()
                if now >= next_forget:
                    next_forget = now + 300.0
                    await self._forget_script(
                        keys=[self._stream],
                        args=[self._group, self._forget_idle_ms, self.consumer_name],
                    )
                if now >= next_claim:
                    next_claim = now + self._claim_every_s
                    await self._reclaim(self._workers - len(self._inflight))
                    if len(self._inflight) >= self._workers:
                        continue
                block_ms = min(self._block_ms, _ms(next_claim - loop.time()))
                response = await self._redis.xreadgroup(
                    self._group,
                    self.consumer_name,
                    {self._stream: ">"},
                    count=self._workers - len(self._inflight),
                    block=block_ms,
                )
                for entry_id, fields in _entries(response):
                    self._spawn(entry_id, fields, deliveries=1)
                backoff.reset()
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    # The stream or group is gone (Redis restarted without persistence?).
                    log.warning("job stream group missing; recreating it")
                    group_ready = False
                else:
                    log.exception("Redis refused a job-store command")
                await self._pause(backoff.delay())
            except _UNAVAILABLE as exc:
                delay = backoff.delay()
                log.warning("Redis job store unreachable (%s); retrying in %.1fs", exc, delay)
                await self._pause(delay)
            except Exception:
                log.exception("job-store reader failed; retrying")
                await self._pause(backoff.delay())

    async def _ensure_group(self) -> None:
        try:
            # From id 0, so jobs submitted before any replica created the group still run.
            await self._redis.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _reclaim(self, count: int) -> None:
        """Take over jobs left idle by replicas that stopped; fail those delivered too often."""
        response = await self._redis.xautoclaim(
            self._stream,
            self._group,
            self.consumer_name,
            min_idle_time=self._visibility_ms,
            start_id=self._claim_cursor,
            count=count,
        )
        self._claim_cursor = str(response[0])
        claimed = [(eid, fields) for eid, fields in response[1] if eid not in self._inflight]
        if not claimed:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in claimed:
                pipe.xpending_range(self._stream, self._group, entry_id, entry_id, 1)
            pending: list[list[dict[str, Any]]] = await pipe.execute()
        deliveries = {p[0]["message_id"]: int(p[0]["times_delivered"]) for p in pending if p}
        for entry_id, fields in claimed:
            count_now = deliveries.get(entry_id, 2)
            log.warning("re-claimed job entry %s (delivery %d)", entry_id, count_now)
            self._spawn(entry_id, fields, deliveries=count_now)

    def _spawn(self, entry_id: str, fields: dict[str, str] | None, *, deliveries: int) -> None:
        task = asyncio.create_task(self._run(entry_id, fields or {}, deliveries))
        self._inflight[entry_id] = task

        def finished(_: asyncio.Task[None]) -> None:
            self._inflight.pop(entry_id, None)
            self._slot_free.set()

        task.add_done_callback(finished)

    async def _run(self, entry_id: str, fields: dict[str, str], deliveries: int) -> None:
        prediction_id, text = fields.get("id"), fields.get("input")
        if prediction_id is None or text is None:
            log.error("dropping malformed job entry %s: %r", entry_id, fields)
            await self._store(entry_id, None, None)
            return
        assert self._processor is not None
        if deliveries > self._max_deliveries:
            log.error("job %s delivered %d times; failing it", prediction_id, deliveries)
            error = {
                "error": f"Job abandoned after {deliveries - 1} attempts: the replicas "
                "running it stopped before it finished",
                "error_type": str(ErrorType.BACKEND),
                "status": 500,
            }
            record = JobRecord(prediction_id, "failed", text, error=error)
        else:
            try:
                vector = await self._processor(text)
                result = [float(x) for x in vector]
                record = JobRecord(prediction_id, "done", text, result=result)
            except Exception as exc:
                if not isinstance(exc, ApiError):
                    log.exception("job %s failed unexpectedly", prediction_id)
                record = JobRecord(prediction_id, "failed", text, error=error_for(exc))
        await self._store(entry_id, prediction_id, record)

    async def _store(
        self, entry_id: str, prediction_id: str | None, record: JobRecord | None
    ) -> None:
        """Store the record and acknowledge the entry; retried while Redis is unreachable,
        up to the visibility timeout (by then another replica will have re-claimed it)."""
        deadline = time.monotonic() + self._visibility_ms / 1000
        backoff = _Backoff()
        while not self._closed:
            try:
                if record is None or prediction_id is None:
                    async with self._redis.pipeline(transaction=True) as pipe:
                        pipe.xack(self._stream, self._group, entry_id)
                        pipe.xdel(self._stream, entry_id)
                        await pipe.execute()
                else:
                    await self._finish_script(
                        keys=[self._job_key(prediction_id), self._stream],
                        args=[self._group, entry_id, _encode(record), self._result_ttl_ms],
                    )
                return
            except (RedisError, OSError) as exc:
                delay = backoff.delay()
                if time.monotonic() + delay > deadline:
                    log.error("could not store job entry %s (%s); leaving it", entry_id, exc)
                    return
                log.warning("storing job entry %s failed (%s); retrying", entry_id, exc)
                await asyncio.sleep(delay)

    async def _keep_ownership(self) -> None:
        # Checks _closed too: a cancellation can get lost inside redis-py (seen under CPU
        # starvation), and then this loop would run on and close() would wait forever.
        while not self._closed:
            await asyncio.sleep(self._keep_every_s)
            held = list(self._inflight)
            if not held:
                continue
            try:
                kept = await self._keep_script(
                    keys=[self._stream], args=[self._group, self.consumer_name, *held]
                )
            except (RedisError, OSError) as exc:
                log.warning("could not refresh ownership of %d jobs: %s", len(held), exc)
                continue
            # Entries finished meanwhile are not lost, just acknowledged.
            lost = [e for e in held if e not in set(kept) and e in self._inflight]
            if lost:
                log.warning("jobs %s were re-claimed by another replica", lost)
