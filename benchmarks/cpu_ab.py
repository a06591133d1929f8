"""Proxy CPU per request, two source trees side by side: ``A``, ``B``, ``A``, ``B``, ...

Each run starts the instant emulator and a proxy from one tree (defaults, or the extra
environment given), puts a closed-loop load of distinct short texts on ``/embed``, and
divides the proxy process's CPU (user + system, over the measured window) by the requests it
answered in that window. Alternating runs keep the machine's drift from favouring either
side; the minimum of each side is the least disturbed reading on a shared machine.

    python -m benchmarks.cpu_ab --tree-a /path/to/old --tree-b . --runs 4

A tree is a checkout of this repository (e.g. ``git worktree add /tmp/old <rev>``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.loadgen import LoadSpec, run_load
from benchmarks.procs import LOOPBACK, _clean_env, free_port


def _start(argv: list[str], tree: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    env = {**env, "PYTHONPATH": str(tree)}
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_ready(url: str, timeout_s: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout_s:g}s")


def one_run(
    tree: Path, extra_env: dict[str, str], clients: int, seconds: float, log_dir: Path
) -> tuple[float, float]:
    """(proxy CPU microseconds per answered request, requests per second)."""
    env = _clean_env()
    up_port, px_port = free_port(), free_port()
    emu = _start(
        [sys.executable, "-m", "benchmarks.emulators", "instant", "--port", str(up_port)],
        tree,
        env,
        log_dir / "cpu_ab-emulator.log",
    )
    proxy = _start(
        [sys.executable, "-m", "proxy", "--host", LOOPBACK, "--port", str(px_port)],
        tree,
        {**env, **extra_env, "UPSTREAM_URL": f"http://{LOOPBACK}:{up_port}"},
        log_dir / "cpu_ab-proxy.log",
    )
    try:
        _wait_ready(f"http://{LOOPBACK}:{up_port}/health")
        _wait_ready(f"http://{LOOPBACK}:{px_port}/health")
        ps = psutil.Process(proxy.pid)
        spec = LoadSpec(
            url=f"http://{LOOPBACK}:{px_port}",
            concurrency=clients,
            duration_s=seconds,
            warmup_s=1.0,
        )

        async def measure() -> tuple[float, float]:
            task = asyncio.create_task(run_load(spec))
            await asyncio.sleep(spec.warmup_s)
            t0 = ps.cpu_times()
            result = await task
            t1 = ps.cpu_times()
            cpu = (t1.user + t1.system) - (t0.user + t0.system)
            # The CPU window runs from the end of the warm-up to the end of the load: about
            # the measured window, plus the last in-flight answers.
            return cpu / max(1, result.ok) * 1e6, result.throughput_rps

        return asyncio.run(measure())
    finally:
        for p in (proxy, emu):
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in (proxy, emu):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_ab", description=__doc__)
    p.add_argument("--tree-a", type=Path, required=True)
    p.add_argument("--tree-b", type=Path, required=True)
    p.add_argument("--runs", type=int, default=4, help="runs per tree, alternating")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--env-a", action="append", default=[], help="NAME=VALUE for tree A's proxy")
    p.add_argument("--env-b", action="append", default=[], help="NAME=VALUE for tree B's proxy")
    p.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    a = p.parse_args(argv)
    if not 1 <= a.runs <= 20 or not 1 <= a.seconds <= 60:
        p.error("--runs 1..20 and --seconds 1..60")
    envs = {
        "A": dict(e.split("=", 1) for e in a.env_a),
        "B": dict(e.split("=", 1) for e in a.env_b),
    }
    trees = {"A": a.tree_a.resolve(), "B": a.tree_b.resolve()}
    results: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    for i in range(a.runs):
        for side in ("A", "B"):
            us, rps = one_run(trees[side], envs[side], a.clients, a.seconds, a.log_dir)
            results[side].append((us, rps))
            print(f"run {i + 1} {side}: {us:7.1f} us/request  {rps:8.1f} req/s", flush=True)
    for side in ("A", "B"):
        side_us = [r[0] for r in results[side]]
        print(
            f"{side} ({trees[side]}{' ' + str(envs[side]) if envs[side] else ''}): "
            f"min {min(side_us):.1f}  median {statistics.median(side_us):.1f} us/request"
        )
    a_min = min(r[0] for r in results["A"])
    b_min = min(r[0] for r in results["B"])
    print(f"B / A (min): {b_min / a_min:.2f}")


if __name__ == "__main__":
    main()
