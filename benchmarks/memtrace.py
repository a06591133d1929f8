"""Run the proxy, unmodified, under ``tracemalloc``; SIGUSR1 writes its top allocation sites.

    python -m benchmarks.memtrace --out /tmp/proxy-mem.txt -- --upstream-url http://... --port 8081
    kill -USR1 <pid>      # appends a report to /tmp/proxy-mem.txt

Tracing slows the proxy a lot: use it to see where memory goes, never for timings.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from types import FrameType


def report(out: Path, limit: int = 25) -> None:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    current, peak = tracemalloc.get_traced_memory()
    mib = 2**20
    lines = [
        f"== {time.strftime('%H:%M:%S')} traced {current / mib:.1f} MiB, peak {peak / mib:.1f}"
    ]
    for group in ("lineno", "filename"):
        lines.append(f"-- top {limit} by {group}")
        for stat in snapshot.statistics(group)[:limit]:
            frame = stat.traceback[0]
            where = f"{frame.filename}:{frame.lineno}"
            lines.append(f"{stat.size / mib:8.2f} MiB {stat.count:8d} blocks  {where}")
    with out.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memtrace", description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frames", type=int, default=1)
    p.add_argument("proxy_args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    args = a.proxy_args[1:] if a.proxy_args[:1] == ["--"] else a.proxy_args
    tracemalloc.start(a.frames)

    def on_usr1(_signum: int, _frame: FrameType | None) -> None:
        report(a.out)

    signal.signal(signal.SIGUSR1, on_usr1)
    from proxy.__main__ import main as proxy_main

    sys.exit(proxy_main(args))


if __name__ == "__main__":
    main()
