"""Turn the suite's results into ``results.md``, PNG plots and ``results.json``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson

SCENARIO_TITLES = {
    "embedded": "(a) Embedded model: batching vs one-at-a-time vs in-process ceiling",
    "tei": "(b) TEI emulator (TEI's own batching): direct vs proxied",
    "naive": "(c) Naive upstream (one call at a time): direct vs proxied",
    "lowload": "(d) Low load: one client, closed loop",
    "capacity": "(e) Proxy capacity: instant upstream vs bare aiohttp",
    "memory": "(f) Memory: requests held behind a stalled upstream",
    "overload": "(g) Overload: open loop at 3x measured capacity",
    "serial": "(h) Serial upstream: proxy vs an async-batcher timer batcher vs direct",
    "mixed": "(i) Mixed texts (80 % short, 20 % long): direct vs proxied, TEI emulator",
    "step": "(j) Step change: 8 -> 256 -> 8 clients through the proxy, over time",
    "models": "(k) Two models at once: one proxy (MODELS_CONFIG) vs a proxy each",
    "cache": "(l) Cache: Zipf and all-distinct texts, replicas sharing Redis, a full cache's RSS",
}


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.{digits}f}"
    return str(value)


def _errors(row: dict[str, Any]) -> str:
    errs = row.get("errors") or {}
    return ", ".join(f"{k}: {v}" for k, v in sorted(errs.items())) or "0"


def _cpu(row: dict[str, Any]) -> str:
    cpu = row.get("cpu_cores") or {}
    names = {
        "proxy": "px",
        "loadgen": "lg",
        "other": "oth",
        "model": "model",
        "emulator-passthrough": "hop",
        "timer-batcher": "tb",
    }
    parts = []
    for key, value in cpu.items():
        short = names.get(key, "up" if key.startswith("emulator") else key)
        if key == "steal":
            continue
        parts.append(f"{short} {value:.2f}")
    return " / ".join(parts)


def _batch(row: dict[str, Any]) -> str:
    bs = row.get("batch_sizes")
    if bs and bs.get("batches"):
        return _f(bs["mean"])
    if "batch" in row:
        return str(row["batch"])
    return "-"


def _load_table(rows: list[dict[str, Any]]) -> list[str]:
    grouped = any(r.get("group") for r in rows)
    out = [
        ("| model " if grouped else "")
        + "| run | clients | text | req/s (ok) | p50 ms | p90 ms | p99 ms | max ms | errors "
        "| mean batch | upstream mean batch | CPU cores |",
        ("|---" if grouped else "") + "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        up = r.get("upstream") or {}
        out.append(
            (f"| {r.get('group', '-')} " if grouped else "")
            + f"| {r['label']} | {_f(r.get('concurrency'))} | {r.get('text', '-')} "
            f"| {_f(r['throughput_rps'])} | {_f(r.get('p50_ms'), 2)} | {_f(r.get('p90_ms'), 2)} "
            f"| {_f(r.get('p99_ms'), 2)} | {_f(r.get('max_ms'), 2)} | {_errors(r)} "
            f"| {_batch(r)} | {_f(up.get('mean_internal_batch'))} | {_cpu(r)} |"
        )
    return out


def _ratio_table(rows: list[dict[str, Any]], base: str) -> list[str]:
    """Each proxied row next to the direct row at the same concurrency (and cost model)."""
    grouped = any(r.get("group") for r in rows)
    direct = {(r.get("group"), r["concurrency"]): r for r in rows if r["label"] == base}
    out = [
        ("| model " if grouped else "")
        + f"| clients | run | throughput vs {base} | p50 vs {base} | p99 vs {base} "
        f"| p50 added, ms |",
        ("|---" if grouped else "") + "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = direct.get((r.get("group"), r["concurrency"]))
        if r["label"] == base or d is None:
            continue
        out.append(
            (f"| {r.get('group', '-')} " if grouped else "")
            + f"| {r['concurrency']} | {r['label']} "
            f"| {_f(_div(r['throughput_rps'], d['throughput_rps']), 2)}x "
            f"| {_f(_div(r['p50_ms'], d['p50_ms']), 2)}x "
            f"| {_f(_div(r['p99_ms'], d['p99_ms']), 2)}x "
            f"| {_f(r['p50_ms'] - d['p50_ms'], 2)} |"
        )
    return out


def _tables_md(tables: list[dict[str, Any]]) -> list[str]:
    """Summary tables a scenario computed itself: ``{"title", "columns", "rows"}``."""
    out: list[str] = []
    for t in tables:
        cols = t["columns"]
        out += [f"**{t['title']}**", ""]
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "|".join("---:" for _ in cols) + "|")
        for row in t["rows"]:
            out.append("| " + " | ".join(_f(v, 2) for v in row) + " |")
        out.append("")
    return out


def _step_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| phase | clients | from s | to s | req/s (ok) | p50 ms | p99 ms | steady p50 ms "
        "| settle s | errors | in flight mean / max | limit mean / max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['label']} | {r['concurrency']} | {_f(r['from_s'])} | {_f(r['to_s'])} "
            f"| {_f(r['throughput_rps'])} | {_f(r['p50_ms'], 2)} | {_f(r['p99_ms'], 2)} "
            f"| {_f(r['steady_p50_ms'], 2)} | {_f(r['settle_s'], 2)} | {r['errors']} "
            f"| {_f(r['mean_in_flight'], 2)} / {_f(r['max_in_flight'], 0)} "
            f"| {_f(r['mean_limit'], 2)} / {_f(r['max_limit'], 0)} |"
        )
    return out


def _div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _scenario_md(name: str, res: dict[str, Any]) -> list[str]:
    lines = [f"### {SCENARIO_TITLES.get(name, name)}", ""]
    if "error" in res:
        return [*lines, f"**Failed:** `{res['error']}`", ""]
    for key, value in (res.get("setup") or {}).items():
        lines.append(f"- {key}: {value}")
    lines.append("")
    rows = res["rows"]
    if name == "memory":
        lines += [
            "| run | requests held | queued | in upstream calls | baseline RSS MB "
            "| RSS MB | peak RSS (VmHWM) MB | KB per request | fill time s | accept overflows |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['label']} | {r['requests_held']} | {r['queued']} "
                f"| {r['in_upstream_calls']} | {_f(r['baseline_rss_mb'])} | {_f(r['rss_mb'])} "
                f"| {_f(r['peak_rss_mb'])} | {_f(r['kb_per_request'], 2)} | {_f(r['fill_s'])} "
                f"| {r['listen_overflows']} |"
            )
    elif name == "overload":
        lines += [
            "| run | offered req/s | goodput req/s | ok | 429 | other errors | p50 ms "
            "| p99 ms (accepted) | max ms | send lag p99 ms | peak RSS MB | CPU cores |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            others = {k: v for k, v in (r.get("errors") or {}).items() if k != "429"}
            lines.append(
                f"| {r['label']} | {_f(r.get('offered_rps'))} | {_f(r['throughput_rps'])} "
                f"| {r.get('ok', '-')} | {r.get('errors', {}).get('429', 0)} "
                f"| {_errors({'errors': others})} | {_f(r['p50_ms'], 1)} | {_f(r['p99_ms'], 1)} "
                f"| {_f(r['max_ms'], 1)} | {_f((r.get('send_lag_ms') or {}).get('p99'), 1)} "
                f"| {_f(r.get('peak_rss_mb'))} | {_cpu(r)} |"
            )
    elif name == "step":
        lines += _step_table(rows)
        if res.get("cpu_cores"):
            lines += ["", f"CPU cores over the whole run: {_cpu(res)}"]
    else:
        lines += _load_table(rows)
        if name in ("tei", "naive", "serial"):
            lines += ["", *_ratio_table(rows, "direct")]
        if name == "capacity":
            lines += ["", *_ratio_table(rows, "bare aiohttp")]
        if name == "lowload":
            lines += ["", "| run | p50 ms | added p50 vs direct, ms |", "|---|---:|---:|"]
            for r in rows:
                lines.append(
                    f"| {r['label']} | {_f(r['p50_ms'], 2)} | {_f(r['added_p50_ms'], 2)} |"
                )
    if res.get("tables"):
        lines += ["", *_tables_md(res["tables"])]
    for note in res.get("notes") or []:
        lines += ["", f"Note: {note}"]
    lines.append("")
    return lines


def scenario_summary(name: str, res: dict[str, Any]) -> list[str]:
    """One scenario's section and its targets, for the console after it ran."""
    return [*_scenario_md(name, res), *targets_md({name: res}), ""]


def targets_md(results: dict[str, Any]) -> list[str]:
    lines = ["| id | target | measured | threshold | met |", "|---|---|---:|---:|---|"]
    for res in results.values():
        for t in res.get("targets") or []:
            lines.append(
                f"| {t['id']} | {t['text']} | {_f(t['value'], 2)} "
                f"| {t['op']} {_f(t['threshold'], 2)} | {'yes' if t['met'] else '**no**'} |"
            )
    return lines


def machine_md(machine: dict[str, Any]) -> list[str]:
    cal = machine.get("calibration") or {}
    rows = [
        ("nproc (affinity)", f"{machine['nproc']} ({machine['affinity']})"),
        ("CPU model", machine["cpu_model"]),
        ("memory", f"{machine['mem_total_gb']} GB"),
        ("Python", machine["python"]),
        ("platform", machine["platform"]),
        (
            "aiohttp / onnxruntime / numpy",
            f"{machine['aiohttp']} / {machine['onnxruntime']} / {machine['numpy']}",
        ),
        ("load average at start", ", ".join(f"{x:.2f}" for x in machine["loadavg_at_start"])),
        ("Python loop, 3M adds", f"{cal.get('python_loop_3M_s', math.nan):.3f} s"),
        (
            "2 busy processes vs 1 (2.0 = two real cores)",
            f"{cal.get('parallel_speedup_2_procs', math.nan):.2f}x",
        ),
        ("started", machine["started_at"]),
    ]
    return ["| fact | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    results = doc["results"]
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{doc['command']}`  ",
        f"Profile: {'quick' if doc['quick'] else 'full'}; wall time {doc['elapsed_s']:.0f} s; "
        f"finished {doc['finished_at']}.",
        "",
        "CPU cores column: average cores used during the measured run by px = proxy, "
        "up = upstream/emulator, hop = the aiohttp pass-through, tb = the timer batcher, "
        "lg = load generator, "
        "oth = everything else on the machine "
        "(other tenants' work; high values mean the run competed for CPU).",
        "",
        "## Machine",
        "",
        *machine_md(doc["machine"]),
        "",
        "## Targets",
        "",
        *targets_md(results),
        "",
        "## Scenarios",
        "",
    ]
    for name, res in results.items():
        lines += _scenario_md(name, res)
    plots = doc.get("plots") or []
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


# -- plots -------------------------------------------------------------------------------------


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    for name in ("tei", "naive", "serial", "capacity"):
        res = results.get(name)
        if not res or not res.get("rows"):
            continue
        fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(12, 4.5))
        for series in dict.fromkeys(_series(r) for r in res["rows"]):
            rows = sorted(
                (r for r in res["rows"] if _series(r) == series), key=lambda r: r["concurrency"]
            )
            label = series
            xs = [r["concurrency"] for r in rows]
            (line,) = ax_t.plot(xs, [r["throughput_rps"] for r in rows], "o-", label=label)
            color = line.get_color()
            ax_l.plot(xs, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{label} p50")
            ax_l.plot(xs, [r["p99_ms"] for r in rows], "s--", color=color, label=f"{label} p99")
        for ax in (ax_t, ax_l):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients (closed loop)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        ax_t.set_ylabel("successful requests / s")
        ax_t.set_title(f"{SCENARIO_TITLES[name]}\nthroughput", fontsize=9)
        ax_l.set_yscale("log")
        ax_l.set_ylabel("latency, ms (successful requests)")
        ax_l.set_title("latency percentiles", fontsize=9)
        fig.tight_layout()
        file = f"{name}.png"
        fig.savefig(out / file, dpi=110)
        plt.close(fig)
        written.append(file)
    batch_plot = _batch_plot(results, out, plt)
    if batch_plot:
        written.append(batch_plot)
    step_plot = _step_plot(results.get("step"), out, plt)
    if step_plot:
        written.append(step_plot)
    return written


def _series(row: dict[str, Any]) -> str:
    group = row.get("group")
    return f"{row['label']} [{group.split(':')[0]}]" if group else str(row["label"])


def _step_plot(res: dict[str, Any] | None, out: Path, plt: Any) -> str | None:
    """Clients, p50/p99 latency per bucket, and the proxy's limit and calls in flight."""
    if not res or not res.get("timeline"):
        return None
    tl = res["timeline"]
    samples = [s for s in res.get("samples") or [] if "error" not in s]
    fig, (ax_c, ax_l, ax_g) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    ts = [b["t"] for b in tl]
    width = ts[1] - ts[0] if len(ts) > 1 else 0.25
    mid = [t + width / 2 for t in ts]  # a bucket's numbers belong to its middle
    ax_c.step(
        [*ts, ts[-1] + width],
        [*(b["clients"] for b in tl), tl[-1]["clients"]],
        where="post",
        color="black",
        label="clients",
    )
    ax_c.set_ylabel("clients (closed loop)")
    ax_c2 = ax_c.twinx()
    ax_c2.plot(mid, [b["ok_rps"] for b in tl], color="tab:green", alpha=0.7, label="ok req/s")
    ax_c2.set_ylabel("answers / s (per bucket)")
    ax_c.set_title(SCENARIO_TITLES["step"], fontsize=9)
    ax_c.legend(loc="upper left", fontsize=8)
    ax_c2.legend(loc="upper right", fontsize=8)
    ax_l.plot(mid, [b["p50_ms"] for b in tl], "o-", ms=3, label="p50 (by send time)")
    ax_l.plot(mid, [b["p99_ms"] for b in tl], "s--", ms=2, alpha=0.6, label="p99")
    for r in res.get("rows") or []:
        steady = r.get("steady_p50_ms")
        if steady is None or math.isnan(steady):
            continue
        ax_l.fill_between(
            [r["from_s"], r["to_s"]], steady * 0.8, steady * 1.2, color="tab:blue", alpha=0.1
        )
        settle = r.get("settle_s")
        if settle is not None and not math.isnan(settle):
            ax_l.axvline(r["from_s"] + settle, color="tab:red", ls=":", lw=1)
    ax_l.set_yscale("log")
    ax_l.set_ylabel("latency, ms")
    ax_l.legend(fontsize=8, title="band: steady p50 +/-20 %; red: settled", title_fontsize=7)
    st = [s["t"] for s in samples]
    ax_g.step(st, [s.get("in_flight") for s in samples], where="post", label="upstream in flight")
    if res.get("has_limit_gauge"):
        ax_g.step(
            st, [s.get("limit") for s in samples], where="post", label="proxy_concurrency_limit"
        )
        ax_g.set_title("the proxy's concurrency limit and upstream calls in flight", fontsize=9)
    else:
        ax_g.set_title(
            "upstream calls in flight (proxy_concurrency_limit is not exported by this proxy: "
            "no limit to plot)",
            fontsize=9,
            color="tab:red",
        )
    ax_g.set_ylabel("upstream calls")
    ax_g2 = ax_g.twinx()
    ax_g2.plot(st, [s.get("queue_depth") for s in samples], color="tab:gray", alpha=0.5)
    ax_g2.set_ylabel("queued items (grey)")
    ax_g.set_xlabel("seconds since the first phase began")
    ax_g.legend(loc="upper left", fontsize=8)
    for ax in (ax_c, ax_l, ax_g):
        ax.grid(True, alpha=0.3)
        for r in res.get("rows") or []:
            ax.axvline(r["from_s"], color="black", lw=0.5, alpha=0.4)
    fig.tight_layout()
    file = "step.png"
    fig.savefig(out / file, dpi=110)
    plt.close(fig)
    return file


def _batch_plot(results: dict[str, Any], out: Path, plt: Any) -> str | None:
    panels = [
        (name, [r for r in res.get("rows", []) if (r.get("batch_sizes") or {}).get("batches")])
        for name, res in results.items()
        if name in ("embedded", "tei", "mixed", "naive", "serial", "capacity")
    ]
    panels = [(n, rows) for n, rows in panels if rows]
    if not panels:
        return None
    cols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (name, rows) in zip(axes.flat, panels, strict=False):
        # Show buckets up to the largest one any run of this panel used.
        keys = [k for k in rows[0]["batch_sizes"]["buckets"] if k != "+Inf"]
        used = [i for i, k in enumerate(keys) if any(r["batch_sizes"]["buckets"][k] for r in rows)]
        labels = keys[: (max(used) + 2 if used else len(keys))]
        for r in rows:
            buckets = r["batch_sizes"]["buckets"]
            total = sum(buckets.values()) or 1
            label = f"{_series(r)}, c={r.get('concurrency')}"
            if r.get("text") in ("long", "mixed"):
                label += f" ({r['text']})"
            ax.plot(labels, [buckets[k] / total for k in labels], "o-", label=label)
        ax.set_title(f"{SCENARIO_TITLES.get(name, name)}: upstream batch sizes", fontsize=9)
        ax.set_xlabel("batch size bucket (upper bound, from proxy_batch_size)")
        ax.set_ylabel("share of upstream calls")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    file = "batch_sizes.png"
    fig.savefig(out / file, dpi=110)
    plt.close(fig)
    return file


def main(argv: list[str] | None = None) -> None:
    """Rebuild results.md and the plots from a results.json, without measuring again."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    p.add_argument("results_json", type=Path)
    a = p.parse_args(argv)
    doc = orjson.loads(a.results_json.read_bytes())
    out = a.results_json.parent
    doc["plots"] = write_plots(doc["results"], out)
    write_markdown(doc, out / "results.md")
    print(f"wrote {out / 'results.md'} and {len(doc['plots'])} plots")


if __name__ == "__main__":
    main()
