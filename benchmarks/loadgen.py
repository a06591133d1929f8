"""An HTTP load generator for ``POST /embed`` (asyncio + aiohttp): open or closed loop.

* Open loop (``rate``): request ``i`` is due at ``start + i / rate`` and is sent then whether
  or not earlier ones finished. Latency runs from the *due* time, so a stalled server (or a
  late generator) shows up in the numbers instead of silently slowing the offered load; that
  is, no coordinated omission. Every request due in the window is waited for (up to its
  timeout) and counted.
* Closed loop (``concurrency``): N workers, each sends its next request when its last one
  answered. Latency runs from the send; throughput counts answers completed in the window.

Both stop at ``duration_s`` (after ``warmup_s`` that is not counted) or at ``max_requests``,
whichever comes first, and every request has a timeout, so a run always ends.

* Steps (``run_steps``): a closed loop whose number of clients changes over time, phase by
  phase (e.g. 8 clients for 5 s, 256 for 10 s, 8 for 5 s). Every request is recorded with its
  send and answer times, for latency over time. Bounded by the phases' total length, the
  request cap and each request's timeout.

Library: ``await run_load(LoadSpec(...))``, ``await run_steps(StepSpec(...))``. CLI:
``python -m benchmarks.loadgen --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import resource
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson

from benchmarks.texts import TEXT_KINDS, TextKind, UniqueBodies

# Negative pseudo-statuses for failures that have no HTTP status.
TIMEOUT, CONNECTION_ERROR, CLIENT_ERROR, UNFINISHED = -1, -2, -3, -4
_FAILURE_NAMES = {
    TIMEOUT: "timeout",
    CONNECTION_ERROR: "connection_error",
    CLIENT_ERROR: "client_error",
    UNFINISHED: "unfinished",
}
_HEADERS = {"Content-Type": "application/json"}


@dataclass(slots=True)
class LoadSpec:
    url: str  # base URL of the target, e.g. http://127.0.0.1:8080
    concurrency: int | None = None  # closed loop
    rate: float | None = None  # open loop, requests per second
    duration_s: float = 10.0
    warmup_s: float = 0.0
    max_requests: int = 200_000  # hard cap on requests sent, warm-up included
    timeout_s: float = 30.0  # per request
    text: TextKind = "short"
    path: str = "/embed"
    ramp_s: float = 0.0  # closed loop: spread the workers' first sends over this long
    max_connections: int | None = None  # default: concurrency (closed) or 20,000 (open)
    bodies: Sequence[bytes] | None = None  # default: a new text per request (UniqueBodies)

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.timeout_s <= 0:
            raise ValueError("duration and timeout must be positive, warm-up not negative")
        if self.max_requests < 1:
            raise ValueError("max_requests must be at least 1")

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "open"


@dataclass(slots=True)
class LoadResult:
    mode: str
    url: str
    text: str
    concurrency: int | None
    offered_rps: float | None
    window_s: float  # the measured window (after warm-up)
    requests: int  # counted in the window
    ok: int
    errors: dict[str, int]  # status code or failure name -> count, in the window
    throughput_rps: float  # 200 answers completed in the window, per second
    latency_ms: dict[str, float]  # of 200 answers: p50 p90 p99 max mean
    send_lag_ms: dict[str, float]  # open loop: how late the generator sent (p99, max)
    sent_total: int  # all requests sent, warm-up and drain included
    client_cpu_s: float  # CPU the generator's process used during the run
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lat = self.latency_ms
        errs = ", ".join(f"{k}:{v}" for k, v in sorted(self.errors.items())) or "none"
        load = f"c={self.concurrency}" if self.mode == "closed" else f"rate={self.offered_rps:g}/s"
        return (
            f"{self.mode} {load} {self.text}: {self.throughput_rps:.1f} req/s ok, "
            f"p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms, p99 {lat['p99']:.2f} ms, "
            f"max {lat['max']:.2f} ms; {self.ok}/{self.requests} ok; errors: {errs}"
        )


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99 plus max and mean; NaN when there are none."""
    if not values:
        nan = math.nan
        return {"p50": nan, "p90": nan, "p99": nan, "max": nan, "mean": nan}
    s = sorted(values)
    n = len(s)

    def rank(q: float) -> float:
        return s[min(n - 1, max(0, math.ceil(q * n) - 1))]

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": s[-1],
        "mean": sum(s) / n,
    }


class _Recorder:
    """Per-request (start, end, status), in flat arrays to keep 100k+ records cheap."""

    def __init__(self) -> None:
        self.start = array("d")
        self.end = array("d")
        self.status = array("i")
        self.lag = array("d")

    def add(self, start: float, end: float, status: int) -> None:
        self.start.append(start)
        self.end.append(end)
        self.status.append(status)


async def _send(
    session: aiohttp.ClientSession, url: str, body: bytes, limit: aiohttp.ClientTimeout
) -> int:
    try:
        async with session.post(url, data=body, headers=_HEADERS, timeout=limit) as resp:
            await resp.read()
            return resp.status
    except TimeoutError:
        return TIMEOUT
    except aiohttp.ClientConnectionError:
        return CONNECTION_ERROR
    except aiohttp.ClientError:
        return CLIENT_ERROR


def _session(limit: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, force_close=False)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


async def _closed_loop(
    spec: LoadSpec, rec: _Recorder, bodies: Sequence[bytes]
) -> tuple[float, float]:
    assert spec.concurrency is not None
    concurrency = spec.concurrency
    url = spec.url.rstrip("/") + spec.path
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    counter = itertools.count()
    t0 = time.perf_counter()
    stop_at = t0 + spec.warmup_s + spec.duration_s
    capped = False

    async with _session(spec.max_connections or concurrency) as session:

        async def worker(w: int) -> None:
            nonlocal capped
            if spec.ramp_s > 0:
                await asyncio.sleep(spec.ramp_s * w / concurrency)
            while time.perf_counter() < stop_at:
                i = next(counter)
                if i >= spec.max_requests:
                    capped = True
                    return
                start = time.perf_counter()
                status = await _send(session, url, bodies[i % len(bodies)], timeout)
                rec.add(start, time.perf_counter(), status)

        # Workers finish their last request (bounded by its timeout) before the session
        # closes, so no abandoned request keeps the target busy into the next run.
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    window_end = max(rec.end) if capped and len(rec.end) else stop_at
    return t0 + spec.warmup_s, window_end


async def _open_loop(
    spec: LoadSpec, rec: _Recorder, bodies: Sequence[bytes]
) -> tuple[float, float]:
    assert spec.rate is not None
    url = spec.url.rstrip("/") + spec.path
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    total = min(spec.max_requests, math.ceil(spec.rate * (spec.warmup_s + spec.duration_s)))
    interval = 1.0 / spec.rate
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter() + 0.05

    async with _session(spec.max_connections or 20_000) as session:

        async def one(i: int, due: float) -> None:
            rec.lag.append(time.perf_counter() - due)
            try:
                status = await _send(session, url, bodies[i % len(bodies)], timeout)
            except asyncio.CancelledError:
                rec.add(due, time.perf_counter(), UNFINISHED)
                raise
            rec.add(due, time.perf_counter(), status)

        for i in range(total):
            due = t0 + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif i % 64 == 0:
                await asyncio.sleep(0)  # behind schedule: still let answers be read
            task = asyncio.create_task(one(i, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            # Bounded: each request has its own timeout; the extra second covers scheduling.
            _, pending = await asyncio.wait(set(tasks), timeout=spec.timeout_s + 1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    return t0 + spec.warmup_s, t0 + total * interval


async def run_load(spec: LoadSpec) -> LoadResult:
    """Run one load test as ``spec`` says and summarise the measured window."""
    bodies = spec.bodies if spec.bodies is not None else UniqueBodies(spec.text)
    rec = _Recorder()
    cpu0 = _cpu_seconds()
    if spec.mode == "closed":
        window = await _closed_loop(spec, rec, bodies)
    else:
        window = await _open_loop(spec, rec, bodies)
    return summarise(spec, rec, window, _cpu_seconds() - cpu0)


def summarise(
    spec: LoadSpec, rec: _Recorder, window: tuple[float, float], cpu_s: float
) -> LoadResult:
    """Closed loop: the requests that *completed* in the window. Open loop: every request
    that was *due* in the window, however late it answered (or that it never did)."""
    ws, we = window
    key = rec.start if spec.mode == "open" else rec.end
    picked = [i for i, t in enumerate(key) if ws <= t < we]
    statuses: Counter[str] = Counter()
    ok_lat: list[float] = []
    for i in picked:
        code = rec.status[i]
        if code == 200:
            ok_lat.append((rec.end[i] - rec.start[i]) * 1000.0)
        else:
            statuses[_FAILURE_NAMES.get(code, str(code))] += 1
    # Throughput (goodput): 200 answers that completed inside the window, per second.
    done_ok = sum(1 for i, e in enumerate(rec.end) if ws <= e < we and rec.status[i] == 200)
    length = max(1e-9, we - ws)
    lag = percentiles([x * 1000.0 for x in rec.lag])
    return LoadResult(
        mode=spec.mode,
        url=spec.url,
        text=spec.text,
        concurrency=spec.concurrency,
        offered_rps=spec.rate,
        window_s=length,
        requests=len(picked),
        ok=len(ok_lat),
        errors=dict(statuses),
        throughput_rps=done_ok / length,
        latency_ms=percentiles(ok_lat),
        send_lag_ms={"p99": lag["p99"], "max": lag["max"]},
        sent_total=len(rec.start),
        client_cpu_s=cpu_s,
    )


@dataclass(slots=True)
class StepSpec:
    url: str
    phases: Sequence[tuple[int, float]]  # (clients, seconds), in order
    timeout_s: float = 30.0  # per request
    max_requests: int = 200_000  # hard cap on requests sent
    text: TextKind = "short"
    path: str = "/embed"
    bodies: Sequence[bytes] | None = None  # default: a new text per request (UniqueBodies)

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("give at least one phase")
        if any(c < 1 or d <= 0 for c, d in self.phases):
            raise ValueError("every phase needs at least one client and a positive length")
        if self.timeout_s <= 0 or self.max_requests < 1:
            raise ValueError("timeout and max_requests must be positive")


@dataclass(slots=True)
class StepResult:
    """Every request of a stepped run; times are seconds since the first phase began."""

    t0: float  # time.perf_counter() when the first phase began
    boundaries: list[float]  # phase start times, then the end of the last phase
    clients: list[int]  # clients in each phase
    start: list[float]
    end: list[float]
    status: list[int]  # HTTP status, or a negative failure code (see _FAILURE_NAMES)
    capped: bool  # stopped at max_requests
    client_cpu_s: float


async def run_steps(spec: StepSpec) -> StepResult:
    """Closed loop with a number of clients that changes phase by phase.

    One worker per client at the peak; worker ``w`` sends (closed loop) while the current
    phase has more than ``w`` clients and sleeps until the next phase otherwise. A worker that
    goes idle at a step down first finishes the request it has in flight."""
    bodies = spec.bodies if spec.bodies is not None else UniqueBodies(spec.text)
    clients = [c for c, _ in spec.phases]
    bounds = [0.0]
    for _, seconds in spec.phases:
        bounds.append(bounds[-1] + seconds)
    url = spec.url.rstrip("/") + spec.path
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    counter = itertools.count()
    rec = _Recorder()
    capped = False
    cpu0 = _cpu_seconds()

    async with _session(max(clients)) as session:
        t0 = time.perf_counter()

        async def worker(w: int) -> None:
            nonlocal capped
            while True:
                now = time.perf_counter() - t0
                if now >= bounds[-1]:
                    return
                phase = next(i for i in range(len(clients)) if now < bounds[i + 1])
                if w >= clients[phase]:
                    await asyncio.sleep(max(0.0, bounds[phase + 1] - now))
                    continue
                i = next(counter)
                if i >= spec.max_requests:
                    capped = True
                    return
                start = time.perf_counter()
                status = await _send(session, url, bodies[i % len(bodies)], timeout)
                rec.add(start - t0, time.perf_counter() - t0, status)

        await asyncio.gather(*(worker(w) for w in range(max(clients))))
    return StepResult(
        t0=t0,
        boundaries=bounds,
        clients=clients,
        start=list(rec.start),
        end=list(rec.end),
        status=list(rec.status),
        capped=capped,
        client_cpu_s=_cpu_seconds() - cpu0,
    )


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def parse_args(argv: list[str] | None = None) -> LoadSpec:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen",
        description="Open- or closed-loop load on POST /embed; prints a JSON result.",
    )
    p.add_argument("--url", required=True, help="target base URL, e.g. http://127.0.0.1:8080")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--concurrency", type=int, help="closed loop with this many clients")
    g.add_argument("--rate", type=float, help="open loop at this many requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument("--max-requests", type=int, default=200_000, help="hard cap, warm-up included")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    p.add_argument("--text", choices=TEXT_KINDS, default="short")
    p.add_argument("--path", default="/embed")
    p.add_argument("--ramp", type=float, default=0.0, help="closed loop: stagger starts (s)")
    a = p.parse_args(argv)
    return LoadSpec(
        url=a.url,
        concurrency=a.concurrency,
        rate=a.rate,
        duration_s=a.duration,
        warmup_s=a.warmup,
        max_requests=a.max_requests,
        timeout_s=a.timeout,
        text=a.text,
        path=a.path,
        ramp_s=a.ramp,
    )


def main(argv: list[str] | None = None) -> None:
    spec = parse_args(argv)
    result = asyncio.run(run_load(spec))
    print(result.summary(), file=sys.stderr)
    print(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
