"""``python -m proxy.drift REFERENCE CURRENT``: has the traffic moved?

Reads the vectors of two capture sets (files or folders of :mod:`proxy.capture` JSON Lines,
written with SAMPLE_VECTORS=true), runs four tests, writes a markdown report with PNG plots,
prints one verdict line and exits 0 (no drift) or 3 (drift); 2 when the input is unusable.

The tests:

* **Domain classifier** (the main one, as Evidently's default): a logistic regression learns
  to tell reference vectors from current ones; its cross-validated ROC AUC is 0.5 when it
  cannot, and drift is flagged above 0.55.
* **MMD**: the maximum mean discrepancy between the two samples with an RBF kernel whose
  width is the median pairwise distance (the median heuristic), and a permutation p-value:
  how often shuffling the reference/current labels gives an MMD as large. Drift below
  ``--alpha`` (0.05).
* **Mean vector**: the Euclidean distance between the two mean vectors (drift above 0.2,
  Evidently's default), and their cosine distance for the report.
* **Norms**: the relative change of the median vector norm (drift above 5 %): catches an
  upstream that stopped normalising, or changed model, even when directions look alike.

The verdict is **drift when the classifier or the MMD test says so**: those two look at the
whole distribution and are calibrated (an AUC near 0.5, a p-value); the mean and norm tests
explain what moved, and are reported beside them.

Needs the ``drift`` extra (numpy, scikit-learn, matplotlib).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.capture import read_records

Matrix = npt.NDArray[np.float64]

EXIT_NO_DRIFT = 0
EXIT_USAGE = 2
EXIT_DRIFT = 3
MIN_VECTORS = 10

AUC_THRESHOLD = 0.55
MEAN_DISTANCE_THRESHOLD = 0.2
NORM_CHANGE_THRESHOLD = 0.05


@dataclass
class TestResult:
    name: str
    statistic: float
    threshold: str
    drift: bool
    detail: str
    plot: dict[str, Any] = field(default_factory=dict)  # what its figure needs


class DriftInputError(Exception):
    """The capture sets cannot be compared (missing, or without vectors)."""


def load_vectors(path: Path, model: str | None = None) -> Matrix:
    """Every captured vector under ``path`` (a file or a folder), one row each."""
    if not path.exists():
        raise DriftInputError(f"{path} does not exist")
    rows: list[list[float]] = []
    for record in read_records([path]):
        if model is not None and record.get("eventMetadata", {}).get("model") != model:
            continue
        output = record.get("captureData", {}).get("endpointOutput", {}).get("data", {})
        rows.extend(v for v in output.get("vectors") or () if v is not None)
    if len(rows) < MIN_VECTORS:
        raise DriftInputError(
            f"{path} holds {len(rows)} vectors; the drift tests need at least {MIN_VECTORS} "
            "(capture with SAMPLE_RATE > 0 and SAMPLE_VECTORS=true)"
        )
    dims = {len(r) for r in rows}
    if len(dims) != 1:
        raise DriftInputError(f"{path} mixes vectors of {sorted(dims)} dimensions")
    return np.asarray(rows, dtype=np.float64)


def subsample(x: Matrix, limit: int, rng: np.random.Generator) -> Matrix:
    if len(x) <= limit:
        return x
    return x[rng.choice(len(x), size=limit, replace=False)]


def classifier_test(reference: Matrix, current: Matrix, seed: int) -> TestResult:
    """Cross-validated ROC AUC of a classifier told to separate the two samples."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score, roc_curve
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.vstack([reference, current])
    y = np.concatenate([np.zeros(len(reference)), np.ones(len(current))])
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    scores = cross_val_predict(model, x, y, cv=folds, method="predict_proba")[:, 1]
    auc = float(roc_auc_score(y, scores))
    fpr, tpr, _ = roc_curve(y, scores)
    return TestResult(
        "Domain classifier",
        auc,
        f"ROC AUC > {AUC_THRESHOLD}",
        auc > AUC_THRESHOLD,
        f"a logistic regression tells current from reference with ROC AUC {auc:.3f} "
        "(5-fold cross-validated; 0.5 = indistinguishable)",
        {"fpr": fpr, "tpr": tpr},
    )


def _mmd2(kernel: Matrix, first: npt.NDArray[np.intp], second: npt.NDArray[np.intp]) -> float:
    """Unbiased squared MMD from a pooled kernel matrix and each sample's rows."""
    kxx = kernel[np.ix_(first, first)]
    kyy = kernel[np.ix_(second, second)]
    kxy = kernel[np.ix_(first, second)]
    n, m = len(first), len(second)
    xx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def mmd_test(
    reference: Matrix, current: Matrix, seed: int, permutations: int, alpha: float
) -> TestResult:
    """MMD with an RBF kernel (median heuristic) and a permutation p-value."""
    from sklearn.metrics.pairwise import euclidean_distances

    pooled = np.vstack([reference, current])
    distances = euclidean_distances(pooled)
    upper = distances[np.triu_indices_from(distances, k=1)]
    sigma = float(np.median(upper[upper > 0])) if np.any(upper > 0) else 1.0
    kernel = np.exp(-(distances**2) / (2.0 * sigma**2))
    n = len(reference)
    index = np.arange(len(pooled))
    observed = _mmd2(kernel, index[:n], index[n:])
    rng = np.random.default_rng(seed)
    null = np.empty(permutations)
    for i in range(permutations):
        shuffled = rng.permutation(index)
        null[i] = _mmd2(kernel, shuffled[:n], shuffled[n:])
    p_value = float((1 + np.sum(null >= observed)) / (1 + permutations))
    return TestResult(
        "MMD (RBF kernel)",
        observed,
        f"permutation p < {alpha:g}",
        p_value < alpha,
        f"MMD² = {observed:.5f}, kernel width {sigma:.3f} (median heuristic), "
        f"p = {p_value:.4f} over {permutations} permutations",
        {"null": null, "observed": observed, "p_value": p_value},
    )


def mean_test(reference: Matrix, current: Matrix) -> TestResult:
    ref_mean, cur_mean = reference.mean(axis=0), current.mean(axis=0)
    distance = float(np.linalg.norm(ref_mean - cur_mean))
    denominator = float(np.linalg.norm(ref_mean) * np.linalg.norm(cur_mean))
    cosine = 1.0 - float(ref_mean @ cur_mean) / denominator if denominator else 0.0
    return TestResult(
        "Mean vector",
        distance,
        f"Euclidean distance > {MEAN_DISTANCE_THRESHOLD}",
        distance > MEAN_DISTANCE_THRESHOLD,
        f"the mean vectors are {distance:.3f} apart (cosine distance {cosine:.3f})",
    )


def norm_test(reference: Matrix, current: Matrix) -> TestResult:
    from scipy.stats import ks_2samp

    ref_norms = np.linalg.norm(reference, axis=1)
    cur_norms = np.linalg.norm(current, axis=1)
    ref_median = float(np.median(ref_norms))
    change = abs(float(np.median(cur_norms)) - ref_median) / ref_median if ref_median else 0.0
    ks = ks_2samp(ref_norms, cur_norms)
    return TestResult(
        "Vector norms",
        change,
        f"median norm changes > {NORM_CHANGE_THRESHOLD:.0%}",
        change > NORM_CHANGE_THRESHOLD,
        f"median norm {ref_median:.4f} → {float(np.median(cur_norms)):.4f} "
        f"({change:.2%}); KS statistic {float(ks.statistic):.3f}",
        {"reference": ref_norms, "current": cur_norms},
    )


@dataclass
class DriftResult:
    drift: bool
    tests: list[TestResult]
    reference: Matrix  # the vectors compared (after subsampling)
    current: Matrix

    @property
    def reference_count(self) -> int:
        return len(self.reference)

    @property
    def current_count(self) -> int:
        return len(self.current)

    @property
    def dimensions(self) -> int:
        return int(self.reference.shape[1])

    @property
    def verdict_line(self) -> str:
        flagged = [t.name for t in self.tests if t.drift]
        auc = self.tests[0].statistic
        p_value = self.tests[1].plot.get("p_value", float("nan"))
        head = "DRIFT" if self.drift else "NO DRIFT"
        return (
            f"{head}: classifier AUC {auc:.3f}, MMD p {p_value:.4f}; "
            f"flagged: {', '.join(flagged) if flagged else 'none'} "
            f"({self.reference_count} reference vs {self.current_count} current vectors)"
        )


def detect(
    reference: Matrix,
    current: Matrix,
    *,
    seed: int = 0,
    permutations: int = 200,
    alpha: float = 0.05,
    max_samples: int = 1000,
) -> DriftResult:
    if reference.shape[1] != current.shape[1]:
        raise DriftInputError(
            f"reference vectors have {reference.shape[1]} dimensions, current "
            f"{current.shape[1]}: not the same model"
        )
    rng = np.random.default_rng(seed)
    reference = subsample(reference, max_samples, rng)
    current = subsample(current, max_samples, rng)
    tests = [
        classifier_test(reference, current, seed),
        mmd_test(reference, current, seed, permutations, alpha),
        mean_test(reference, current),
        norm_test(reference, current),
    ]
    return DriftResult(tests[0].drift or tests[1].drift, tests, reference, current)


# -- the report ------------------------------------------------------------------------------


def _figures(result: DriftResult, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    names: list[str] = []
    reference, current = result.reference, result.current

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        names.append(name)

    points = PCA(n_components=2, random_state=0).fit(np.vstack([reference, current]))
    fig, ax = plt.subplots(figsize=(5, 4))
    for data, label, color in (
        (reference, "reference", "#2f6fdb"),
        (current, "current", "#e07b00"),
    ):
        xy = points.transform(data)
        ax.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.5, label=label, color=color)
    ax.set_title("Vectors on their first two principal components")
    ax.legend()
    save(fig, "pca.png")

    classifier, mmd, _, norms = result.tests
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(classifier.plot["fpr"], classifier.plot["tpr"], color="#2f6fdb")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"Domain classifier ROC (AUC {classifier.statistic:.3f})")
    save(fig, "classifier_roc.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(mmd.plot["null"], bins=30, color="#9aa5b1", label="shuffled labels")
    ax.axvline(mmd.plot["observed"], color="#c62828", label="observed")
    ax.set(xlabel="MMD²", ylabel="permutations")
    ax.set_title(f"MMD permutation test (p = {mmd.plot['p_value']:.4f})")
    ax.legend()
    save(fig, "mmd.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(norms.plot["reference"], bins=30, alpha=0.6, label="reference", color="#2f6fdb")
    ax.hist(norms.plot["current"], bins=30, alpha=0.6, label="current", color="#e07b00")
    ax.set(xlabel="L2 norm", ylabel="vectors")
    ax.set_title("Vector norms")
    ax.legend()
    save(fig, "norms.png")
    return names


def write_report(result: DriftResult, out: Path, sources: tuple[Path, Path]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    images = _figures(result, out)
    lines = [
        "# Embedding drift report",
        "",
        f"**{'Drift' if result.drift else 'No drift'}.** {result.verdict_line}",
        "",
        f"- Reference: `{sources[0]}` ({result.reference_count} vectors)",
        f"- Current: `{sources[1]}` ({result.current_count} vectors)",
        f"- Dimensions: {result.dimensions}",
        "",
        "The verdict is drift when the domain classifier or the MMD test flags it; the mean "
        "and norm tests say what moved.",
        "",
        "| Test | Statistic | Drift when | Drift? | Detail |",
        "|---|---|---|---|---|",
    ]
    for test in result.tests:
        flag = "**yes**" if test.drift else "no"
        lines.append(
            f"| {test.name} | {test.statistic:.4f} | {test.threshold} | {flag} | {test.detail} |"
        )
    lines.append("")
    for image in images:
        lines += [f"![{image.removesuffix('.png')}]({image})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.drift",
        description="Compare two capture sets' vectors; exit 0 for no drift, 3 for drift.",
    )
    parser.add_argument("reference", type=Path, help="capture file or folder (the baseline)")
    parser.add_argument("current", type=Path, help="capture file or folder (to check)")
    parser.add_argument("--out", type=Path, default=Path("drift-report"), help="report folder")
    parser.add_argument("--model", help="only this model's records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--alpha", type=float, default=0.05, help="MMD significance level")
    parser.add_argument(
        "--max-samples", type=int, default=1000, help="vectors per side at most (subsampled)"
    )
    args = parser.parse_args(argv)
    try:
        reference = load_vectors(args.reference, args.model)
        current = load_vectors(args.current, args.model)
        result = detect(
            reference,
            current,
            seed=args.seed,
            permutations=args.permutations,
            alpha=args.alpha,
            max_samples=args.max_samples,
        )
    except DriftInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report = write_report(result, args.out, (args.reference, args.current))
    print(f"{result.verdict_line}; report: {report}")
    return EXIT_DRIFT if result.drift else EXIT_NO_DRIFT


if __name__ == "__main__":
    sys.exit(main())
