"""Read the proxy's Prometheus ``/metrics`` and diff two snapshots.

The benchmarks take one snapshot before a run and one after; the difference of the
``proxy_batch_size`` histogram is the distribution of upstream batch sizes in that run.
"""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass(slots=True)
class Snapshot:
    # (metric sample name, sorted label items) -> value
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        total = 0.0
        for (n, items), v in self.samples.items():
            if n == name and all((k, val) in items for k, val in labels.items()):
                total += v
        return total

    def has(self, name: str) -> bool:
        """Whether any sample is called ``name`` (a metric this proxy version exports)."""
        return any(n == name for n, _ in self.samples)


def parse(text: str) -> Snapshot:
    snap = Snapshot()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            snap.samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return snap


def fetch(base_url: str, timeout_s: float = 5.0) -> Snapshot:
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
        return parse(resp.read().decode("utf-8"))


def batch_size_histogram(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """Upstream batches dispatched between the snapshots, by ``proxy_batch_size`` bucket.

    Returns per-bucket counts (non-cumulative, keyed by the bucket's upper bound), the
    number of batches, items and the mean batch size.
    """
    cumulative: dict[float, float] = {}
    for (name, items), v in after.samples.items():
        if name != "proxy_batch_size_bucket":
            continue
        le = float(dict(items)["le"])
        cumulative[le] = cumulative.get(le, 0.0) + v - before.samples.get((name, items), 0.0)
    buckets: dict[str, int] = {}
    previous = 0.0
    for le in sorted(cumulative):
        label = "+Inf" if math.isinf(le) else f"{le:g}"
        buckets[label] = round(cumulative[le] - previous)
        previous = cumulative[le]
    count = after.value("proxy_batch_size_count") - before.value("proxy_batch_size_count")
    total = after.value("proxy_batch_size_sum") - before.value("proxy_batch_size_sum")
    return {
        "buckets": buckets,
        "batches": round(count),
        "items": round(total),
        "mean": total / count if count else math.nan,
    }


def upstream_calls(before: Snapshot, after: Snapshot) -> dict[str, int]:
    """Upstream calls between the snapshots, by outcome label."""
    out: dict[str, int] = {}
    for (name, items), v in after.samples.items():
        if name != "proxy_upstream_calls_total":
            continue
        outcome = dict(items).get("outcome", "?")
        delta = round(v - before.samples.get((name, items), 0.0))
        if delta:
            out[outcome] = out.get(outcome, 0) + delta
    return out


def gauge(snapshot: Snapshot, name: str) -> float:
    return snapshot.value(name)
