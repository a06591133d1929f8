"""The embedded model's in-process ceiling: ``EmbeddedUpstream.embed`` fed full batches in a
loop, with no HTTP, no proxy and no load generator in the way.

Run it in its own process (the suite does) so that the model's threads have the machine to
themselves: ``python -m benchmarks.ceiling --batch 32 --seconds 8 --text short``.
It prints one JSON object: items per second, per-call latency and CPU use.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

import orjson

from benchmarks.texts import TEXT_KINDS, TextKind, texts


async def measure(
    batch: int, seconds: float, text: TextKind, threads: int | None = None
) -> dict[str, Any]:
    # Imported here: numpy/onnxruntime are the `local` extra, needed only for this scenario.
    from proxy.upstream.base import EmbedOptions
    from proxy.upstream.embedded import EmbeddedUpstream

    upstream = EmbeddedUpstream(threads=threads)
    await upstream.start()
    try:
        pool = texts(text, max(batch * 8, 256))
        batches = [pool[i : i + batch] for i in range(0, len(pool) - batch + 1, batch)]
        options = EmbedOptions()
        await upstream.embed(batches[0], options)  # warm the kernels for this shape
        calls = 0
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        durations: list[float] = []
        while time.perf_counter() - t0 < seconds:
            started = time.perf_counter()
            await upstream.embed(batches[calls % len(batches)], options)
            durations.append(time.perf_counter() - started)
            calls += 1
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        await upstream.close()
    durations.sort()
    return {
        "batch": batch,
        "text": text,
        "threads": threads,
        "calls": calls,
        "items": calls * batch,
        "seconds": wall,
        "items_per_s": calls * batch / wall,
        "call_ms_p50": durations[len(durations) // 2] * 1000.0,
        "cpu_cores": cpu / wall,
        "pid": os.getpid(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--text", choices=TEXT_KINDS, default="short")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    a = p.parse_args(argv)
    result = asyncio.run(measure(a.batch, a.seconds, a.text, a.threads))
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
