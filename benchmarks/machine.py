"""Facts about the machine a run happened on, and a quick calibration of its CPU.

The calibration matters on small shared VMs: two vCPUs may be two hyperthreads of one core,
and other tenants' work takes CPU from the benchmark. Both are recorded with the results.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

_SPIN = (
    "import time\n"
    "t = time.perf_counter()\n"
    "x = 0\n"
    "for i in range(3_000_000): x += i\n"
    "print(time.perf_counter() - t)"
)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _spin(n: int) -> list[float]:
    """Run ``n`` CPU-bound Python loops at once, each in its own process; their times."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _SPIN], stdout=subprocess.PIPE) for _ in range(n)
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=60)
        out.append(float(stdout))
    return out


def calibrate() -> dict[str, float]:
    """How fast one core runs Python, and how much two busy processes get together."""
    one = min(_spin(1) for _ in range(2))[0]
    two = _spin(2)
    return {
        "python_loop_3M_s": one,
        # 2.0 means two real cores; about 1.2-1.4 is what two hyperthreads of one core give.
        "parallel_speedup_2_procs": 2 * one / max(two),
    }


def facts(calibration: bool = True) -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "aiohttp": _version("aiohttp"),
        "onnxruntime": _version("onnxruntime"),
        "numpy": _version("numpy"),
        "loadavg_at_start": os.getloadavg(),
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if calibration:
        info["calibration"] = calibrate()
    return info
