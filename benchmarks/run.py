"""Run the benchmark suite (or some scenarios) and write results to ``benchmarks/results/``.

python -m benchmarks.run                 # everything, about 12 minutes on 2 cores
python -m benchmarks.run --quick         # everything, shorter and narrower (~4-5 minutes)
python -m benchmarks.run --scenario naive --scenario tei
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import machine, procs, report
from benchmarks.harness import Context, Profile, QuietGate
from benchmarks.scenarios import SCENARIOS

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


async def run_all(names: list[str], ctx: Context) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in names:
        ctx.log(f"== {name}")
        started = time.perf_counter()
        try:
            results[name] = await SCENARIOS[name](ctx)
        except Exception as exc:  # one broken scenario must not lose the others' numbers
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "rows": [], "targets": []}
        finally:
            procs.stop_all()
        results[name]["elapsed_s"] = time.perf_counter() - started
        # The scenario's tables and targets as results.md will show them.
        for line in report.scenario_summary(name, results[name]):
            ctx.log(line)
        ctx.log(f"   {name} took {results[name]['elapsed_s']:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run only this scenario (repeatable); default: all, in the order listed",
    )
    p.add_argument("--quick", action="store_true", help="short runs, fewer levels (~4-5 min)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    p.add_argument("--no-calibration", action="store_true", help="skip the CPU calibration")
    p.add_argument(
        "--no-wait-quiet",
        action="store_true",
        help="start every run at once, even while other work keeps the CPU busy",
    )
    a = p.parse_args(argv)

    procs.install_cleanup()
    names = a.scenario or list(SCENARIOS)
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    quiet = None
    if not a.no_wait_quiet:
        # At most 1 s per run (6 s in all) in --quick, 8 s per run (40 s in all) otherwise.
        quiet = QuietGate(1.0, 6.0) if a.quick else QuietGate(8.0, 40.0)
    ctx = Context(profile=Profile.make(a.quick), log_dir=log_dir, quiet=quiet)
    ctx.log(f"server logs in {log_dir}")
    facts = machine.facts(calibration=not a.no_calibration)
    ctx.log(f"machine: {facts}")
    started = time.perf_counter()
    results = asyncio.run(run_all(names, ctx))
    doc: dict[str, Any] = {
        "command": command.strip(),
        "quick": a.quick,
        "scenarios": names,
        "machine": facts,
        "elapsed_s": time.perf_counter() - started,
        "quiet_wait_s": quiet.waited_s if quiet else 0.0,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "results": results,
    }
    try:
        doc["plots"] = report.write_plots(results, out)
    except Exception:  # plots are a convenience; the numbers are already safe in JSON
        traceback.print_exc()
        doc["plots"] = []
    report.write_json(doc, out / "results.json")
    report.write_markdown(doc, out / "results.md")
    ctx.log(f"wrote {out / 'results.md'}, {out / 'results.json'} and {len(doc['plots'])} plots")
    failed = [n for n, r in results.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
