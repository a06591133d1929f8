"""Run the proxy, unmodified, under ``tracemalloc``; SIGUSR1 writes its top allocation sites.

    python -m benchmarks.memtrace --out /tmp/proxy-mem.txt -- --upstream-url http://... --port 8081
    kill -USR2 <pid>      # optional: take a baseline (e.g. at rest, before the load)
    kill -USR1 <pid>      # appends a report to /tmp/proxy-mem.txt

With a baseline, the report is what was allocated since it and is still held (e.g. per
request held: divide by the requests). ``--frames 15`` adds a section by traceback, which
tells the coroutine frames of the request path apart: an entry whose first line is
``x.py:N`` is what the call on that line made (for ``await f()``: f's coroutine and frame).

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

_baseline: list[tracemalloc.Snapshot] = []


def report(out: Path, limit: int = 25) -> None:
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    snapshot = tracemalloc.take_snapshot().filter_traces(ignore)
    current, peak = tracemalloc.get_traced_memory()
    mib = 2**20
    since = " (held since the baseline)" if _baseline else ""
    lines = [
        f"== {time.strftime('%H:%M:%S')} traced {current / mib:.1f} MiB, peak {peak / mib:.1f}"
        + since
    ]
    groups = ["lineno", "filename"]
    if tracemalloc.get_traceback_limit() > 1:
        groups.append("traceback")
    for group in groups:
        if _baseline:
            stats = snapshot.compare_to(_baseline[0].filter_traces(ignore), group)
            rows = [(s.size_diff, s.count_diff, s.traceback) for s in stats]
        else:
            rows = [(s.size, s.count, s.traceback) for s in snapshot.statistics(group)]
        lines.append(f"-- top {limit} by {group}: {sum(r[0] for r in rows) / mib:.2f} MiB in all")
        for size, count, traceback in rows[:limit]:
            frames = list(traceback)[::-1]  # the allocating frame first, then its callers
            where = f"{frames[0].filename}:{frames[0].lineno}"
            lines.append(f"{size / mib:8.2f} MiB {count:8d} blocks  {where}")
            if group == "traceback":
                lines.extend(f"{'':30}{f.filename}:{f.lineno}" for f in frames[1:6])
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

    def on_usr2(_signum: int, _frame: FrameType | None) -> None:
        _baseline[:] = [tracemalloc.take_snapshot()]

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGUSR2, on_usr2)
    from proxy.__main__ import main as proxy_main

    sys.exit(proxy_main(args))


if __name__ == "__main__":
    main()
