"""The benchmark scenarios. Each starts its own servers on loopback, measures, stops them,
and returns ``{"rows": [...], "targets": [...], "notes": [...], "setup": {...}}``.

Numbers in ``targets`` are computed from the rows measured in the same call: nothing here is
a constant result.
"""

from __future__ import annotations

import asyncio
import math
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import psutil

from benchmarks import procs, promstats
from benchmarks.harness import Context, closed, measure
from benchmarks.loadgen import LoadSpec, run_load
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
            "proxy": "defaults (max-batch-size 32, adaptive, max-concurrent-batches 2)",
            "ceiling": f"EmbeddedUpstream.embed in a loop, batches {p.ceiling_batches}",
            "clients": "64, closed loop",
        },
    }


# -- (b) TEI emulator, (c) naive upstream: direct vs proxied ------------------------------


async def _direct_vs_proxy(
    ctx: Context,
    kind: str,
    levels: tuple[int, ...],
    emulator_opts: dict[str, Any],
    proxies: list[tuple[str, tuple[str, ...]]],
) -> list[dict[str, Any]]:
    emu = procs.emulator(kind, ctx.log_dir, **emulator_opts)
    rows: list[dict[str, Any]] = []
    with procs.running(emu):
        pxs = [(label, procs.proxy(ctx.log_dir, emu.url, *flags)) for label, flags in proxies]
        with procs.running(*(px for _, px in pxs)):
            for c in levels:
                # Side by side at each level, so drift in the machine hits both alike.
                spec = closed(ctx, emu.url, c)
                rows.append(await measure(ctx, "direct", emu, spec, servers=[emu], emulator=emu))
                for label, px in pxs:
                    spec = closed(ctx, px.url, c)
                    rows.append(
                        await measure(
                            ctx, label, px, spec, servers=[px, emu], proxy=px, emulator=emu
                        )
                    )
    return rows


def _by(rows: list[dict[str, Any]], label: str) -> dict[int, dict[str, Any]]:
    return {r["concurrency"]: r for r in rows if r["label"] == label}


async def tei(ctx: Context) -> dict[str, Any]:
    opts = {"a_ms": COST_A_MS, "b_ms": COST_B_MS, **TEI_LIMITS}
    proxies = [("proxy", ()), ("proxy mcb=16", TEI_TUNED_FLAGS)]
    rows = await _direct_vs_proxy(ctx, "tei", ctx.profile.tei_levels, opts, proxies)
    direct = _by(rows, "direct")
    targets = []
    for label in ("proxy", "proxy mcb=16"):
        px = _by(rows, label)
        worst = min(_ratio(px[c]["throughput_rps"], direct[c]["throughput_rps"]) for c in px)
        targets.append(
            target(
                f"b1 [{label}]",
                f"TEI emulator: {label} / direct throughput, worst level",
                worst,
                1.0,
            )
        )
        for c in (256, 1024):
            if c in px:
                targets.append(
                    target(
                        f"b2 [{label}] c={c}",
                        f"TEI emulator: {label} p99 / direct p99 at {c} clients",
                        _ratio(px[c]["p99_ms"], direct[c]["p99_ms"]),
                        1.0,
                        higher_is_better=False,
                    )
                )
    return {
        "rows": rows,
        "targets": targets,
        "setup": {
            "upstream": f"TEI emulator, a={COST_A_MS:g} ms, b={COST_B_MS:g} ms per item, "
            f"{TEI_LIMITS}",
            "proxy": "defaults (max-batch-size 32, max-concurrent-batches 2, adaptive)",
            "proxy mcb=16": "max-concurrent-batches 16 (= 512 / 32, TEI's admission limit)",
            "clients": "closed loop, short texts; a 429 is answered at once and the client "
            "sends its next request straight away",
        },
    }


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
            "proxy": "defaults (max-batch-size 32, max-concurrent-batches 2, adaptive)",
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
        "targets": [target("e1", "proxy / bare aiohttp throughput, worst level", worst, 0.5)],
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


SCENARIOS: dict[str, Scenario] = {
    "embedded": embedded,
    "tei": tei,
    "naive": naive,
    "lowload": lowload,
    "capacity": capacity,
    "memory": memory,
    "overload": overload,
}
