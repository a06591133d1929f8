"""A job store in Redis, shared by every proxy replica that points at the same Redis.

Layout (``p`` is ``key_prefix``):

* ``p:job:{id}`` — the job's record (JSON, its ``status`` first), written as pending on
  submit and replaced by the result, each with a TTL, so any replica can answer a poll. It
  is the only place that holds the job's input.
* ``p:jobs`` — a Stream holding each unfinished job by reference (fields ``id`` and
  ``deadline``, the end of its lifetime in Unix ms). Entries are deleted once their result
  is stored, so its length is the number of unfinished jobs. A worker reads the input once,
  from the record.
* ``p:workers`` — the consumer group all replicas read ``p:jobs`` through; each replica is
  one consumer, so each job goes to one replica at a time.
* ``p:done`` (sorted set: finished ids by finish time), ``p:sizes`` (hash: id -> bytes of
  its record) and ``p:usage`` (hash: ``pending`` and ``done`` bytes, and ``reserve``, the
  room held for each unfinished job's result) — the index that bounds the store.

Bounds, kept by the Lua scripts that submit and finish jobs (atomic, so they hold across
replicas): at most ``max_jobs`` unfinished jobs; at most ``max_records`` records (unfinished
and finished); at most ``max_bytes`` of record bytes, where each unfinished job counts its
record plus room for its result (the largest growth of a record on finishing so far; a
guess before the first). Past a bound the oldest finished records are deleted; a job that
would not fit beside the unfinished ones is refused (JobQueueFullError). Records that
expired by TTL leave the index a few at a time on later submits and finishes; until then
they still count, so the bound errs on the safe side.

Delivery is at least once. A job is acknowledged (and deleted from the stream) in the same
atomic script that stores its result, so an acknowledged job always has a result. A job
whose replica died stays in the group's pending list; once idle for
``visibility_timeout_s`` another replica takes it over with XAUTOCLAIM. A live replica keeps
the jobs it is running by resetting their idle time every ``visibility_timeout_s / 3``
(XCLAIM ... JUSTID, which leaves the delivery count alone), so however long the processor
takes, retry waits included, the job is not stolen; only a replica that stops answering
Redis for longer than the visibility timeout (dead, or its event loop frozen) loses its
jobs, and then a job may run twice: the first result stored wins. A job delivered more than
``max_deliveries`` times (its replicas keep dying while running it) is failed instead of run
again. A replica that drains while a job waits to retry a temporary fault hands the job back
to the stream as a new entry, for another replica (or its own next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.errors import ErrorType
from proxy.jobs.base import (
    JobQueueFullError,
    JobRecord,
    JobStatus,
    JobStoreUnavailableError,
    Processor,
)
from proxy.jobs.memory import new_prediction_id
from proxy.jobs.retry import Backoff, attempt_job

T = TypeVar("T")

log = logging.getLogger(__name__)

# Redis unreachable, as opposed to Redis refusing a command.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Lua numbers are doubles: "no bound" is the largest integer they hold exactly.
_UNBOUNDED = 2**53
# Room held for each unfinished job's result until one is measured: a 1024-float vector in
# JSON (about 20 bytes a float).
DEFAULT_RESULT_RESERVE = 20 * 1024

# Shared by the submit and finish scripts. KEYS[1] the stream, KEYS[3] finished ids by
# finish time (ms), KEYS[4] id -> record bytes, KEYS[5] usage (pending, done, reserve).
_BOUNDS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function usage(field, default)
  return tonumber(redis.call('HGET', KEYS[5], field)) or default
end

-- Delete finished records oldest first: any past a bound, and a few that expired already
-- (their keys are gone; only the index still counts them). Never `keep`.
local function trim(max_records, max_bytes, default_reserve, ttl_ms, prefix, keep)
  local now = now_ms()
  local unfinished = redis.call('XLEN', KEYS[1])
  local held = usage('pending', 0) + unfinished * usage('reserve', default_reserve)
  local done = usage('done', 0)
  local expired_budget = 100
  while true do
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    if #oldest == 0 or oldest[1] == keep then break end
    local over = unfinished + redis.call('ZCARD', KEYS[3]) > max_records
      or held + done > max_bytes
    local expired = tonumber(oldest[2]) + ttl_ms <= now and expired_budget > 0
    if not (over or expired) then break end
    expired_budget = expired_budget - 1
    done = done - (tonumber(redis.call('HGET', KEYS[4], oldest[1])) or 0)
    redis.call('DEL', prefix .. oldest[1])
    redis.call('HDEL', KEYS[4], oldest[1])
    redis.call('ZREM', KEYS[3], oldest[1])
  end
  redis.call('HSET', KEYS[5], 'done', string.format('%d', done))
end
"""

# KEYS: stream, job key, finished index, sizes, usage. ARGV: max_jobs, pending record,
# pending TTL ms, id, deadline ms, max_records, max_bytes, default reserve, result TTL ms,
# job key prefix. One script so that the bounds hold across replicas and a job is never
# queued unrecorded. 0: too many unfinished jobs; -1: too many bytes.
_SUBMIT = (
    _BOUNDS
    + """
local unfinished = redis.call('XLEN', KEYS[1])
if unfinished >= tonumber(ARGV[1]) then return 0 end
local size = #ARGV[2]
local reserve = usage('reserve', tonumber(ARGV[8]))
if usage('pending', 0) + size + (unfinished + 1) * reserve > tonumber(ARGV[7]) then
  return -1
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('XADD', KEYS[1], '*', 'id', ARGV[4], 'deadline', ARGV[5])
redis.call('HSET', KEYS[4], ARGV[4], string.format('%d', size))
redis.call('HINCRBY', KEYS[5], 'pending', string.format('%d', size))
trim(tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10], false)
return 1
"""
)

# KEYS: stream, job key, finished index, sizes, usage. ARGV: group, entry id, id, final
# record ('' to only acknowledge), result TTL ms, max_records, max_bytes, default reserve,
# job key prefix, 1 if the record holds a result. Store, then ack and delete, atomically.
# Only a pending record is replaced: a job that ran twice keeps its first final record, and
# one evicted meanwhile stays gone. The status is read from the record's first bytes
# (GETRANGE), not by decoding what may be megabytes of JSON; `"status":"pending"` cannot
# occur inside a JSON string, whose quotes are escaped, so it is found only as the field.
_FINISH = (
    _BOUNDS
    + """
local head = redis.call('GETRANGE', KEYS[2], 0, 63)
local written = 0
if ARGV[4] ~= '' and string.find(head, '"status":"pending"', 1, true) then
  local old = tonumber(redis.call('HGET', KEYS[4], ARGV[3])) or 0
  local size = #ARGV[4]
  redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
  redis.call('HSET', KEYS[4], ARGV[3], string.format('%d', size))
  -- Numbers go to Redis as integers ('%d'): Lua would write -0 or 1e+15, which Redis
  -- refuses, and a script that fails halfway keeps what it wrote.
  redis.call('HINCRBY', KEYS[5], 'pending', string.format('%d', -old))
  redis.call('HINCRBY', KEYS[5], 'done', string.format('%d', size))
  redis.call('ZADD', KEYS[3], string.format('%d', now_ms()), ARGV[3])
  local grew = size - old
  if ARGV[10] == '1' and old > 0 then
    local reserve = tonumber(redis.call('HGET', KEYS[5], 'reserve'))
    if not reserve or grew > reserve then
      redis.call('HSET', KEYS[5], 'reserve', string.format('%d', grew))
    end
  end
  written = 1
elseif head == '' and not redis.call('ZSCORE', KEYS[3], ARGV[3]) then
  -- Its pending record expired before it ran: forget its bytes.
  local old = tonumber(redis.call('HGET', KEYS[4], ARGV[3]))
  if old then
    redis.call('HINCRBY', KEYS[5], 'pending', string.format('%d', -old))
    redis.call('HDEL', KEYS[4], ARGV[3])
  end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
trim(tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[5]), ARGV[9], ARGV[3])
return written
"""
)

# KEYS: stream. ARGV: group, consumer, entry id, id, deadline ms. Hand a job this consumer
# holds back to the stream as a new entry, for any replica to read now, unless another
# replica re-claimed it meanwhile. The stream's length (unfinished jobs) stays the same.
_REQUEUE = """
local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)[1]
if not entry or entry[2] ~= ARGV[2] then return 0 end
redis.call('XADD', KEYS[1], '*', 'id', ARGV[4], 'deadline', ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
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
    # The status first: the finish script reads it from the record's first bytes.
    data: dict[str, Any] = {
        "status": record.status,
        "id": record.prediction_id,
        "input": record.input,
        "result": record.result,
        "error": record.error,
    }
    if record.model is not None:
        data["model"] = record.model
    return orjson.dumps(data)


def _decode(raw: str | bytes) -> JobRecord:
    data = orjson.loads(raw)
    status: JobStatus = data["status"]
    return JobRecord(
        data["id"],
        status,
        data["input"],
        data.get("result"),
        data.get("error"),
        data.get("model"),
    )


def _deadline_ms(entry_id: str, field: str | None, job_timeout_s: float) -> int:
    """When the job's lifetime ends (Unix ms): its entry says, or (an entry of an earlier
    version) its entry id's time plus the job timeout."""
    try:
        return int(field) if field is not None else int(entry_id.split("-")[0]) + _ms(job_timeout_s)
    except ValueError:
        return _ms(time.time() + job_timeout_s)


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
        max_records: int | None = None,
        max_bytes: int | None = None,
        job_timeout_s: float = 600.0,
        retry_first_s: float = 0.25,
        retry_cap_s: float = 10.0,
    ) -> None:
        if max_jobs < 1 or workers < 1 or max_deliveries < 1:
            raise ValueError("max_jobs, workers and max_deliveries must be >= 1")
        timeouts = (result_ttl_s, visibility_timeout_s, pending_ttl_s, socket_timeout_s)
        if min(*timeouts, job_timeout_s) <= 0:
            raise ValueError("TTLs and timeouts must be > 0")
        if max_records is not None and max_records < max_jobs:
            raise ValueError(f"max_records ({max_records}) must be >= max_jobs ({max_jobs})")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._max_jobs = max_jobs
        self._max_records = min(max_records or _UNBOUNDED, _UNBOUNDED)
        self._max_bytes = min(max_bytes or _UNBOUNDED, _UNBOUNDED)
        self._job_timeout_s = job_timeout_s
        self._retry = (retry_first_s, retry_cap_s)
        self._result_ttl_ms = _ms(result_ttl_s)
        # A pending record must outlive its job: the stream entry only refers to it.
        self._pending_ttl_ms = _ms(max(pending_ttl_s, result_ttl_s, 2 * job_timeout_s))
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
        self._done = f"{key_prefix}:done"
        self._sizes = f"{key_prefix}:sizes"
        self._usage = f"{key_prefix}:usage"
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
        self._requeue_script = self._redis.register_script(_REQUEUE)
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

    async def submit(self, text: str, model: str | None = None) -> str:
        """Queue a job for any replica. Raises JobQueueFullError, JobStoreUnavailableError."""
        prediction_id = new_prediction_id()
        pending = _encode(JobRecord(prediction_id, "pending", text, model=model))
        deadline_ms = round((time.time() + self._job_timeout_s) * 1000)
        args: list[int | bytes | str] = [
            self._max_jobs,
            pending,
            self._pending_ttl_ms,
            prediction_id,
            deadline_ms,
            *self._bounds_args(),
        ]
        async with self._reaching_redis():
            accepted = await self._submit_script(keys=self._keys(prediction_id), args=args)
        if accepted == 0:
            raise JobQueueFullError(f"{self._max_jobs} unfinished jobs (max_jobs)")
        if accepted != 1:
            raise JobQueueFullError(f"unfinished jobs would exceed {self._max_bytes} bytes")
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

    def _keys(self, prediction_id: str) -> list[str]:
        """The keys of the submit and finish scripts, in their order."""
        return [self._stream, self._job_key(prediction_id), self._done, self._sizes, self._usage]

    def _bounds_args(self) -> list[int | str]:
        return [
            self._max_records,
            self._max_bytes,
            DEFAULT_RESULT_RESERVE,
            self._result_ttl_ms,
            self._job_prefix,
        ]

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
        backoff = Backoff()
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
        prediction_id = fields.get("id")
        if prediction_id is None or not _ID_RE.fullmatch(prediction_id):
            log.error("dropping malformed job entry %s: %r", entry_id, fields)
            await self._retrying(f"drop job entry {entry_id}", lambda: self._drop(entry_id))
            return
        # Entries queued by earlier versions carried the input themselves (and no model).
        text = fields.get("input")
        model: str | None = None
        if text is None:
            loaded = await self._load_input(entry_id, prediction_id)
            if loaded is None:
                return
            text, model = loaded
        deadline_ms = _deadline_ms(entry_id, fields.get("deadline"), self._job_timeout_s)
        assert self._processor is not None
        if deliveries > self._max_deliveries:
            log.error("job %s delivered %d times; failing it", prediction_id, deliveries)
            error = {
                "error": f"Job abandoned after {deliveries - 1} attempts: the replicas "
                "running it stopped before it finished",
                "error_type": str(ErrorType.BACKEND),
                "status": 500,
            }
            record = JobRecord(prediction_id, "failed", text, error=error, model=model)
        else:
            first_s, cap_s = self._retry
            outcome = await attempt_job(
                self._processor,
                prediction_id,
                text,
                model=model,
                # The lifetime is wall-clock time (shared by replicas); attempts count on
                # this process's monotonic clock.
                deadline=time.monotonic() + (deadline_ms / 1000 - time.time()),
                job_timeout_s=self._job_timeout_s,
                stopping=self._stopping,
                retry_first_s=first_s,
                retry_cap_s=cap_s,
            )
            if outcome.interrupted:
                # Draining: another replica can retry it, sooner than a re-claim would.
                if not self._closed:
                    await self._retrying(
                        f"hand back job {prediction_id}",
                        lambda: self._requeue(entry_id, prediction_id, deadline_ms),
                    )
                return
            if outcome.result is not None:
                record = JobRecord(prediction_id, "done", text, result=outcome.result, model=model)
            else:
                record = JobRecord(prediction_id, "failed", text, error=outcome.error, model=model)
        await self._store(entry_id, prediction_id, record)

    async def _load_input(self, entry_id: str, prediction_id: str) -> tuple[str, str | None] | None:
        """The job's input and model, read from its record; None (the entry acknowledged) if the
        record is gone or already final (a job that ran twice), or if Redis stays out of
        reach (the entry is left for a re-claim)."""
        job_key = self._job_key(prediction_id)
        loaded = await self._retrying(f"read job {prediction_id}", lambda: self._redis.get(job_key))
        if loaded is None:
            return None
        raw = loaded[0]
        if raw is not None:
            try:
                record = _decode(raw)
            except (ValueError, KeyError, TypeError):
                log.error("unreadable job record %s", prediction_id)
            else:
                if record.status == "pending":
                    return record.input, record.model
        # Nothing to run: only acknowledge (and forget its bytes if the record expired).
        await self._store(entry_id, prediction_id, None)
        return None

    async def _drop(self, entry_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self._stream, self._group, entry_id)
            pipe.xdel(self._stream, entry_id)
            await pipe.execute()

    async def _requeue(self, entry_id: str, prediction_id: str, deadline_ms: int) -> None:
        args: list[str | int] = [
            self._group,
            self.consumer_name,
            entry_id,
            prediction_id,
            deadline_ms,
        ]
        if await self._requeue_script(keys=[self._stream], args=args):
            log.info("handed job %s back to the stream", prediction_id)

    async def _store(self, entry_id: str, prediction_id: str, record: JobRecord | None) -> None:
        """Store the final record (None: only acknowledge) and acknowledge the entry."""
        args: list[int | bytes | str] = [
            self._group,
            entry_id,
            prediction_id,
            _encode(record) if record is not None else "",
            self._result_ttl_ms,
            *self._bounds_args(),
            1 if record is not None and record.result is not None else 0,
        ]
        keys = self._keys(prediction_id)
        await self._retrying(
            f"store job entry {entry_id}", lambda: self._finish_script(keys=keys, args=args)
        )

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> tuple[T] | None:
        """``call()``'s result (in a 1-tuple, as it may be None), retried while Redis is out of
        reach, up to the visibility timeout (by then another replica will have re-claimed
        the entry); None if it never succeeded."""
        deadline = time.monotonic() + self._visibility_ms / 1000
        backoff = Backoff()
        while not self._closed:
            try:
                return (await call(),)
            except (RedisError, OSError) as exc:
                delay = backoff.delay()
                if time.monotonic() + delay > deadline:
                    log.error("could not %s (%s); leaving it", what, exc)
                    return None
                log.warning("could not %s (%s); retrying", what, exc)
                await asyncio.sleep(delay)
        return None

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
