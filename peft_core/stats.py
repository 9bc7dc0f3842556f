"""How sure the numbers are: computed from ``results.parquet`` and the saved predictions alone.

No model is loaded (no torch import): everything comes from the final runs'
rows and their ``predictions.parquet`` (label and prediction per test image).

Per (data set, method), on the final runs:

* **mean ± std over seeds** of the test accuracy (std with ddof=1; one seed has none);
* a **95% bootstrap CI over test images**: per image, the correctness averaged
  over the method's seeds; the test images are resampled with replacement
  (percentile method, ``n_resamples`` draws from ``numpy.random.default_rng(seed)``).

One resampling of a data set's images is drawn and shared by every method, so
the bootstrap is *paired*: the difference of two methods is evaluated on the
same resampled images, and its CI is the percentile interval of those paired
differences. A difference is significant when that interval excludes 0; per
method pair we count the data sets where it is.

Across data sets (complete methods only, mean test accuracy per data set): average
ranks (1 = best, ties averaged), the Friedman test (``scipy.stats.friedmanchisquare``)
and the Nemenyi post-hoc test (``scikit_posthocs.posthoc_nemenyi_friedman``), whose
critical difference (Demšar, 2006) is ``q_alpha * sqrt(k (k + 1) / (6 N))`` with
``q_alpha`` the studentized range quantile over sqrt(2) (``scipy.stats.studentized_range``).
They run overall and per VTAB group when there are >= 2 data sets and >= 3 methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as st

from .errors import InputError
from .results import PREDICTIONS

LEVEL = 0.95  # confidence level of every interval
N_RESAMPLES = 2000
SEED = 0  # the bootstrap's fixed seed: the same inputs give the same intervals
ALPHA = 0.05  # significance level of the rank tests
_BATCH = 250  # resamples drawn at once (bounds memory on 20k-image test sets)

Correct = dict[tuple[str, str], np.ndarray]  # (dataset, method) -> (seeds, images) of 0/1


# ------------------------------------------------------------------ inputs


def final_runs(results: pd.DataFrame) -> pd.DataFrame:
    """The finished final runs (status ok, an accuracy)."""
    f = results[(results.stage == "final") & (results.status == "ok")]
    return f[f.accuracy.notna()]


def read_correct(results: pd.DataFrame, results_root: Path) -> Correct:
    """Per (data set, method), the 0/1 correctness of each final seed on each test image.

    Predictions are read from ``<results_root>/cells/<dataset>/<method>/<cell>/predictions.parquet``;
    every run of a data set must cover the same images with the same labels.
    """
    out: dict[tuple[str, str], list[np.ndarray]] = {}
    ref: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    for r in final_runs(results).sort_values("seed", kind="stable").itertuples():
        path = Path(results_root) / "cells" / r.dataset / r.method / r.cell / PREDICTIONS
        if not path.is_file():
            raise InputError(f"{path}: file not found (final run {r.dataset}/{r.method} seed {r.seed})")
        p = pd.read_parquet(path, columns=["index", "label", "pred"]).sort_values("index")
        index, labels = p["index"].to_numpy(), p["label"].to_numpy()
        if r.dataset not in ref:
            ref[r.dataset] = (index, labels, str(path))
        elif not (np.array_equal(index, ref[r.dataset][0]) and np.array_equal(labels, ref[r.dataset][1])):
            raise InputError(f"{path}: not the same test images or labels as {ref[r.dataset][2]}")
        out.setdefault((r.dataset, r.method), []).append((p["pred"].to_numpy() == labels).astype(np.float64))
    return {k: np.stack(v) for k, v in out.items()}


# ------------------------------------------------------------------ bootstrap


def image_resamples(n_images: int, n_resamples: int = N_RESAMPLES, seed: int = SEED):
    """Batches of bootstrap draws of ``n_images`` images: each a (batch, n_images) count matrix
    (how often each image is drawn), from one fixed-seed generator."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        b = min(_BATCH, n_resamples - done)
        draws = rng.integers(0, n_images, size=(b, n_images)) + np.arange(b)[:, None] * n_images
        yield np.bincount(draws.ravel(), minlength=b * n_images).reshape(b, n_images).astype(np.float64)
        done += b


def bootstrap_means(per_image: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Bootstrap distribution (n_resamples, rows) of the mean of each row of ``per_image``
    (rows, images), every row resampled with the same draws (paired)."""
    per_image = np.atleast_2d(per_image)
    n = per_image.shape[1]
    return np.concatenate([counts @ per_image.T / n for counts in image_resamples(n, n_resamples, seed)])


def percentile_ci(dist: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of a bootstrap distribution."""
    lo, hi = np.percentile(dist, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_p(diff: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference being 0: twice the smaller tail at 0, counted
    as (1 + hits) / (1 + draws) so it is never 0 (at best 2 / (n_resamples + 1)), at most 1."""
    tail = min(np.sum(diff <= 0), np.sum(diff >= 0))
    return float(min(1.0, 2 * (1 + tail) / (1 + len(diff))))


# ------------------------------------------------------------------ per data set


def _resampled(correct: Correct, dataset: str, methods: list[str], n_resamples: int, seed: int, memo: dict | None):
    """Per-image seed-averaged correctness (methods, images) and its bootstrap means (n_resamples, methods)."""
    key = (dataset, tuple(methods), n_resamples, seed)
    if memo is None or key not in memo:
        per_image = np.stack([correct[(dataset, m)].mean(axis=0) for m in methods])
        value = (per_image, bootstrap_means(per_image, n_resamples, seed))
        if memo is None:
            return value
        memo[key] = value
    return memo[key]


def accuracy_frame(correct: Correct, n_resamples: int = N_RESAMPLES, seed: int = SEED, memo: dict | None = None) -> pd.DataFrame:
    """Per (data set, method): seeds, test accuracy mean and std over seeds, and the bootstrap CI
    over images of the seed-averaged accuracy (all in %). ``memo`` shares the resampling with
    :func:`pairwise_frame`."""
    rows = []
    for dataset in dict.fromkeys(d for d, _ in correct):
        methods = [m for d, m in correct if d == dataset]
        per_image, dist = _resampled(correct, dataset, methods, n_resamples, seed, memo)
        for j, m in enumerate(methods):
            acc = correct[(dataset, m)].mean(axis=1) * 100  # per seed
            lo, hi = percentile_ci(dist[:, j] * 100)
            rows.append({"dataset": dataset, "method": m, "seeds": len(acc), "n_images": per_image.shape[1],
                         "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else math.nan,
                         "ci_low": lo, "ci_high": hi})  # fmt: skip
    return pd.DataFrame(rows, columns=["dataset", "method", "seeds", "n_images", "mean", "std", "ci_low", "ci_high"])


def pairwise_frame(
    correct: Correct, methods: list[str] | None = None, n_resamples: int = N_RESAMPLES, seed: int = SEED,
    memo: dict | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Per data set and method pair (a before b in ``methods`` order): diff = acc(a) - acc(b) (%),
    its paired-bootstrap CI and p-value, and whether the CI excludes 0."""
    rows = []
    for dataset in dict.fromkeys(d for d, _ in correct):
        have = [m for m in (methods or [m for d, m in correct if d == dataset]) if (dataset, m) in correct]
        if len(have) < 2:
            continue
        per_image, dist = _resampled(correct, dataset, have, n_resamples, seed, memo)
        dist = dist * 100
        for (i, a), (j, b) in combinations(enumerate(have), 2):
            d = dist[:, i] - dist[:, j]
            lo, hi = percentile_ci(d)
            diff = float((per_image[i].mean() - per_image[j].mean()) * 100)
            rows.append({"dataset": dataset, "method_a": a, "method_b": b, "diff": diff, "ci_low": lo, "ci_high": hi,
                         "p": bootstrap_p(d), "significant": bool(lo > 0 or hi < 0)})  # fmt: skip
    cols = ["dataset", "method_a", "method_b", "diff", "ci_low", "ci_high", "p", "significant"]
    return pd.DataFrame(rows, columns=cols)


def significance_counts(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per method pair: data sets compared, data sets where a (b) is significantly better."""
    cols = ["method_a", "method_b", "datasets", "a_better", "b_better", "not_significant"]
    if pairs.empty:
        return pd.DataFrame(columns=cols)
    g = pairs.assign(a=pairs.significant & (pairs["diff"] > 0), b=pairs.significant & (pairs["diff"] < 0))
    out = g.groupby(["method_a", "method_b"], sort=False).agg(
        datasets=("dataset", "size"), a_better=("a", "sum"), b_better=("b", "sum")
    )
    out["not_significant"] = out.datasets - out.a_better - out.b_better
    return out.reset_index()[cols]


# ------------------------------------------------------------------ across data sets


@dataclass
class RankTest:
    """Average ranks, Friedman and Nemenyi over the data sets of one scope (all, or one group)."""

    scope: str
    datasets: list[str]
    ranks: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))  # method -> average rank
    statistic: float = math.nan
    pvalue: float = math.nan
    cd: float = math.nan  # Nemenyi critical difference of average ranks at ALPHA
    nemenyi: pd.DataFrame = field(default_factory=pd.DataFrame)  # method x method p-values
    note: str = ""  # why there is no test

    @property
    def label(self) -> str:
        return "all data sets" if self.scope == "all" else f"{self.scope} data sets"

    @property
    def tested(self) -> bool:
        return not math.isnan(self.statistic)

    def caption(self) -> str:
        """What the test was, for a figure or table caption."""
        n, k = len(self.datasets), len(self.ranks)
        if not self.tested:
            return f"{self.label}: {self.note}."
        return (f"{self.label}: average ranks over {n} data sets, {k} methods; Friedman test "
                f"χ²={self.statistic:.2f}, p={self.pvalue:.3g}; Nemenyi post-hoc, critical difference "
                f"CD={self.cd:.2f} at α={ALPHA:g} (methods joined by a bar are not significantly different).")  # fmt: skip


def average_ranks(table: pd.DataFrame) -> pd.Series:
    """``table`` (data sets x methods, accuracy): mean over data sets of each method's rank
    (1 = best, ties averaged), sorted best first."""
    ranks = table.apply(lambda row: pd.Series(st.rankdata(-row.to_numpy(float)), index=table.columns), axis=1)
    return ranks.mean().sort_values(kind="stable")


def critical_difference(k: int, n: int, alpha: float = ALPHA) -> float:
    """Nemenyi's critical difference of average ranks for k methods on n data sets (Demšar, 2006)."""
    q = st.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(k * (k + 1) / (6 * n)))


def rank_test(table: pd.DataFrame, scope: str = "all") -> RankTest:
    """Average ranks, Friedman and Nemenyi on ``table`` (data sets x methods, no holes)."""
    table = table.dropna(axis=1, how="any")
    out = RankTest(scope, list(table.index))
    n, k = table.shape
    if n and k:
        out.ranks = average_ranks(table)
    if n < 2 or k < 3:
        out.note = f"no rank test ({n} data set(s), {k} complete method(s); it needs >= 2 and >= 3)"
        return out
    import scikit_posthocs as sp  # ~1 s of imports: only when there is a test to run

    res = st.friedmanchisquare(*(table[c].to_numpy(float) for c in table.columns))
    out.statistic, out.pvalue = float(res.statistic), float(res.pvalue)
    out.nemenyi = sp.posthoc_nemenyi_friedman(table.to_numpy(float))
    out.nemenyi.index = out.nemenyi.columns = list(table.columns)
    out.cd = critical_difference(k, n)
    return out


def cliques(ranks: pd.Series, pvalues: pd.DataFrame, alpha: float = ALPHA) -> list[list[str]]:
    """Maximal runs of methods, consecutive by average rank, that no pairwise test separates
    (every p >= ``alpha``): the bars of a critical-difference diagram, best-ranked first."""
    names = list(ranks.sort_values(kind="stable").index)
    spans: list[tuple[int, int]] = []
    for i in range(len(names)):
        j = i
        while j + 1 < len(names) and all(pvalues.loc[a, names[j + 1]] >= alpha for a in names[i : j + 1]):
            j += 1
        if j > i and not any(a <= i and j <= b for a, b in spans):
            spans.append((i, j))
    return [names[a : b + 1] for a, b in spans]


def rank_tests(per: pd.DataFrame, groups: dict[str, str], methods: list[str] | None = None) -> list[RankTest]:
    """``per`` (dataset, method, mean): the overall test, then one per group (in ``groups`` order)."""
    table = per.pivot_table(index="dataset", columns="method", values="mean", sort=False)
    if methods is not None:
        table = table[[m for m in methods if m in table.columns]]
    complete = table.dropna(axis=1, how="any")
    tests = [rank_test(complete, "all")]
    for g in dict.fromkeys(groups.values()):
        rows = [d for d in complete.index if groups.get(d) == g]
        tests.append(rank_test(complete.loc[rows], g))
    return tests


def ranks_frame(tests: list[RankTest]) -> pd.DataFrame:
    """One row per (scope, method): average rank, with the scope's test results repeated."""
    rows = [{"scope": t.scope, "method": m, "average_rank": float(r), "datasets": len(t.datasets),
             "friedman_chi2": t.statistic, "friedman_p": t.pvalue, "nemenyi_cd": t.cd}
            for t in tests for m, r in t.ranks.items()]  # fmt: skip
    return pd.DataFrame(rows, columns=["scope", "method", "average_rank", "datasets", "friedman_chi2", "friedman_p", "nemenyi_cd"])


@dataclass
class Stats:
    """Everything the report shows about uncertainty and significance."""

    accuracy: pd.DataFrame  # accuracy_frame
    pairs: pd.DataFrame  # pairwise_frame
    counts: pd.DataFrame  # significance_counts
    tests: list[RankTest]


def compute_stats(
    results: pd.DataFrame, results_root: Path, groups: dict[str, str], methods: list[str],
    n_resamples: int = N_RESAMPLES, seed: int = SEED,
) -> Stats:  # fmt: skip
    """All of the above for a study: ``groups`` maps data set -> VTAB group, in config order."""
    correct = read_correct(results, results_root)
    order = {(d, m): i for i, (d, m) in enumerate((d, m) for d in groups for m in methods)}
    correct = dict(sorted(correct.items(), key=lambda kv: order.get(kv[0], len(order))))
    memo: dict = {}  # one resampling per data set, shared by both frames
    acc = accuracy_frame(correct, n_resamples, seed, memo)
    pairs = pairwise_frame(correct, methods, n_resamples, seed, memo)
    return Stats(acc, pairs, significance_counts(pairs), rank_tests(acc, groups, methods))
