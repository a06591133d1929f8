"""What every scenario shares: run lengths, one measured load run, and waiting for idle."""

from __future__ import annotations

import asyncio
import math
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

from benchmarks import procs, promstats
from benchmarks.loadgen import LoadSpec, run_load
from benchmarks.texts import TextKind


@dataclass(frozen=True, slots=True)
class Profile:
    """How long and how wide the runs are; ``quick`` trades precision for time."""

    quick: bool
    warmup_s: float
    duration_s: float
    tei_levels: tuple[int, ...]
    naive_levels: tuple[int, ...]
    capacity_levels: tuple[int, ...]
    ceiling_batches: tuple[int, ...]
    ceiling_reference_batches: tuple[int, ...]  # informative only: not part of target (a)
    long_texts: bool  # also run the embedded scenario with long texts
    serial_levels: tuple[int, ...] = (1, 8, 64, 256)
    serial_extra_timer: bool = True  # also a timer batcher with 2 batches in flight
    tei_tuned_row: bool = True  # tei: also the proxy with --max-concurrent-batches 16
    mixed_levels: tuple[int, ...] = (64, 256)
    # step: (clients, seconds) phases, the latency bucket and the /metrics sampling period
    step_phases: tuple[tuple[int, float], ...] = ((8, 5.0), (256, 10.0), (8, 5.0))
    step_bucket_s: float = 0.25
    step_sample_s: float = 0.2
    memory_requests: int = 10_000

    @classmethod
    def make(cls, quick: bool) -> Profile:
        if quick:
            return cls(
                quick=True,
                warmup_s=0.5,
                duration_s=2.0,
                # All five: the tei targets are per level (8, 64, 256, 1024) and at 1 client.
                tei_levels=(1, 8, 64, 256, 1024),
                naive_levels=(1, 64),
                capacity_levels=(64,),
                ceiling_batches=(32,),
                ceiling_reference_batches=(),
                long_texts=False,
                serial_levels=(8, 64, 256),
                serial_extra_timer=False,
                tei_tuned_row=False,
                mixed_levels=(64,),
                step_phases=((8, 2.5), (256, 4.0), (8, 3.0)),
            )
        return cls(
            quick=False,
            warmup_s=2.0,
            duration_s=6.0,
            tei_levels=(1, 8, 64, 256, 1024),
            # 1024 is optional in the brief; direct at 1024 takes ~20 s just to drain.
            naive_levels=(1, 8, 64, 256),
            capacity_levels=(64, 256),
            ceiling_batches=(32, 64),
            ceiling_reference_batches=(8,),
            long_texts=True,
        )


class QuietGate:
    """Before each measured run, wait (bounded) until the machine's other work quietens.

    On a shared 2-core machine other tenants' jobs come and go; starting a run in a lull
    makes numbers comparable. The wait is capped per run and in total, so the suite's time
    stays bounded, and the CPU the others used is recorded with every run either way.
    """

    def __init__(self, per_run_s: float, budget_s: float, threshold_cores: float = 0.3) -> None:
        self.per_run_s = per_run_s
        self.budget_s = budget_s
        self.threshold = threshold_cores
        self.waited_s = 0.0

    async def wait(self) -> float:
        """Return the busy cores seen in the last sample (our servers are idle here)."""
        limit = min(self.per_run_s, max(0.0, self.budget_s - self.waited_s))
        started = time.monotonic()
        while True:
            busy = await asyncio.to_thread(_busy_cores, 0.25)
            spent = time.monotonic() - started
            if busy < self.threshold or spent >= limit:
                self.waited_s += spent
                return busy


def _busy_cores(interval_s: float) -> float:
    t0 = psutil.cpu_times()
    time.sleep(interval_s)
    t1 = psutil.cpu_times()
    return max(0.0, (procs.busy_seconds(t1) - procs.busy_seconds(t0)) / interval_s)


@dataclass(slots=True)
class Context:
    profile: Profile
    log_dir: Path
    quiet: QuietGate | None = None
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))

    async def settle(self) -> float | None:
        return await self.quiet.wait() if self.quiet is not None else None


def row_from(result: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Flatten a LoadResult dict into one table row."""
    lat = result["latency_ms"]
    row = {
        "concurrency": result["concurrency"],
        "offered_rps": result["offered_rps"],
        "text": result["text"],
        "throughput_rps": result["throughput_rps"],
        "p50_ms": lat["p50"],
        "p90_ms": lat["p90"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "requests": result["requests"],
        "ok": result["ok"],
        "errors": result["errors"],
        "window_s": result["window_s"],
        "send_lag_ms": result["send_lag_ms"],
    }
    row.update(extra)
    return row


async def measure(
    ctx: Context,
    label: str,
    target: procs.Server,
    spec: LoadSpec,
    *,
    servers: Sequence[procs.Server],
    proxy: procs.Server | None = None,
    emulator: procs.Server | None = None,
) -> dict[str, Any]:
    """One load run against ``target`` with before/after snapshots of the proxy's metrics,
    the emulator's counters and every process's CPU. Returns a table row."""
    await wait_idle(proxy, emulator)
    background = await ctx.settle()
    m_before = promstats.fetch(proxy.url) if proxy else None
    e_before = emulator_stats(emulator) if emulator else None
    overflows = procs.listen_overflows()
    with procs.CpuMeter(servers) as cpu:
        result = (await run_load(spec)).to_dict()
    extra: dict[str, Any] = {
        "label": label,
        "cpu_cores": {k: round(v, 3) for k, v in cpu.cores.items()},
        "client_cpu_s": result["client_cpu_s"],
        "busy_cores_before": background,
        "listen_overflows": procs.listen_overflows() - overflows,
    }
    if proxy is not None and m_before is not None:
        m_after = promstats.fetch(proxy.url)
        extra["batch_sizes"] = promstats.batch_size_histogram(m_before, m_after)
        extra["upstream_calls"] = promstats.upstream_calls(m_before, m_after)
    if emulator is not None and e_before is not None:
        extra["upstream"] = _stats_delta(e_before, emulator_stats(emulator))
    row = row_from(result, **extra)
    ctx.log(f"  {label:<22} {_short(row)}")
    return row


def proxy_settings(server: procs.Server) -> dict[str, Any] | None:
    """The ``proxy`` object of the proxy's ``/info`` (its effective settings), or None if this
    proxy version does not report one."""
    try:
        with urllib.request.urlopen(server.url + "/info", timeout=5.0) as resp:
            body = orjson.loads(resp.read())
    except (OSError, ValueError):
        return None
    settings = body.get("proxy") if isinstance(body, dict) else None
    return settings if isinstance(settings, dict) else None


def describe_proxy(server: procs.Server) -> str:
    """One line for a scenario's setup: the proxy's batching settings as it reports them."""
    s = proxy_settings(server)
    if s is None:
        return "defaults, no flags (this proxy reports no settings in /info)"
    keys = (
        "dispatch",
        "max_batch_size",
        "effective_batch_size",
        "max_concurrent_batches",
        "effective_concurrent_batches",
        "eager_batches",
        "max_wait_time_ms",
    )
    shown = ", ".join(f"{k} {s[k]}" for k in keys if k in s)
    limit = s.get("concurrency")
    if isinstance(limit, dict):  # the adaptive limit on calls in flight, at start
        adaptive = "adaptive" if limit.get("adaptive") else "fixed"
        shown += f", concurrency limit {adaptive} (ceiling {limit.get('ceiling')})"
    return f"defaults, no flags; as /info reports them: {shown}"


def _short(row: dict[str, Any]) -> str:
    load = f"c={row['concurrency']}" if row["concurrency"] else f"rate={row['offered_rps']:.0f}"
    errs = ",".join(f"{k}:{v}" for k, v in sorted(row["errors"].items())) or "-"
    bs = row.get("batch_sizes", {}).get("mean", math.nan)
    return (
        f"{load:>9} {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:8.2f}  "
        f"p99 {row['p99_ms']:8.2f} ms  errors {errs}  mean batch {bs:.1f}  "
        f"cpu {row['cpu_cores']}"
    )


def emulator_stats(server: procs.Server) -> dict[str, Any]:
    with urllib.request.urlopen(server.url + "/stats", timeout=5.0) as resp:
        stats: dict[str, Any] = orjson.loads(resp.read())
    return stats


def _stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("calls", "items", "batches", "rejected_429", "rejected_422"):
        out[key] = after[key] - before[key]
    out["mean_internal_batch"] = out["items"] / out["batches"] if out["batches"] else math.nan
    out["max_in_flight_items"] = after["max_in_flight_items"]
    return out


async def wait_idle(
    proxy: procs.Server | None, emulator: procs.Server | None, timeout_s: float = 60.0
) -> None:
    """Wait (bounded) until nothing is queued or in flight, so runs don't overlap."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = False
        if proxy is not None:
            snap = await asyncio.to_thread(promstats.fetch, proxy.url)
            busy |= (
                snap.value("proxy_queue_depth") > 0 or snap.value("proxy_upstream_in_flight") > 0
            )
        if emulator is not None:
            stats = await asyncio.to_thread(emulator_stats, emulator)
            busy |= stats["in_flight_calls"] > 0
        if not busy:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("target still busy after the previous run")


def closed(
    ctx: Context,
    url: str,
    concurrency: int,
    text: TextKind = "short",
    *,
    duration_s: float | None = None,
    timeout_s: float = 30.0,
) -> LoadSpec:
    p = ctx.profile
    return LoadSpec(
        url=url,
        concurrency=concurrency,
        duration_s=duration_s or p.duration_s,
        warmup_s=p.warmup_s,
        text=text,
        timeout_s=timeout_s,
        # Spread the first connections so a thousand SYNs don't overflow an accept queue.
        ramp_s=min(p.warmup_s, 1.0) if concurrency > 64 else 0.0,
    )
