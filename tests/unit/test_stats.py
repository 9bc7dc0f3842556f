"""peft_core.stats on hand-made inputs whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from peft_core import stats
from peft_core.errors import InputError


def _correct(**runs) -> dict[tuple[str, str], np.ndarray]:
    """``dataset__method=[[0/1 per image] per seed]`` -> the read_correct mapping."""
    return {tuple(k.split("__")): np.asarray(v, dtype=float) for k, v in runs.items()}


def test_mean_and_std_over_seeds_and_a_degenerate_ci():
    acc = stats.accuracy_frame(_correct(d__a=[[1, 1, 0, 0], [1, 1, 1, 0]], d__b=[[1, 1, 1, 1]]))
    a, b = acc.set_index("method").loc["a"], acc.set_index("method").loc["b"]
    assert (a.seeds, a.n_images) == (2, 4)
    assert a["mean"] == pytest.approx(62.5) and a["std"] == pytest.approx(math.sqrt(2) * 12.5)
    assert b["mean"] == 100 and math.isnan(b["std"])  # one seed: no spread
    assert (b.ci_low, b.ci_high) == (100, 100)  # every resample of an always-right method is 100%
    assert a.ci_low <= a["mean"] <= a.ci_high


def test_ci_matches_the_binomial_normal_approximation_and_is_reproducible():
    rng = np.random.default_rng(1)
    x = (rng.random(4000) < 0.7).astype(float)
    acc = stats.accuracy_frame(_correct(d__a=[x]), n_resamples=4000)
    r = acc.iloc[0]
    half = 1.96 * math.sqrt(x.mean() * (1 - x.mean()) / len(x)) * 100
    assert r.ci_low == pytest.approx(r["mean"] - half, abs=0.25)
    assert r.ci_high == pytest.approx(r["mean"] + half, abs=0.25)
    again = stats.accuracy_frame(_correct(d__a=[x]), n_resamples=4000)
    pd.testing.assert_frame_equal(acc, again)  # fixed seed: same interval
    other = stats.accuracy_frame(_correct(d__a=[x]), n_resamples=4000, seed=7)
    assert other.ci_low.iloc[0] != r.ci_low


def test_bootstrap_resamples_images_not_seeds_and_pairs_methods():
    # two methods right on complementary halves: each 50%, but paired their difference is exactly 0
    # only when the same images are drawn for both
    a = [1.0] * 50 + [0.0] * 50
    pairs = stats.pairwise_frame(_correct(d__a=[a], d__b=[a], d__c=[a[::-1]]))
    ab = pairs[(pairs.method_a == "a") & (pairs.method_b == "b")].iloc[0]
    assert (ab["diff"], ab.ci_low, ab.ci_high, ab.p, ab.significant) == (0, 0, 0, 1.0, False)
    ac = pairs[(pairs.method_a == "a") & (pairs.method_b == "c")].iloc[0]
    assert ac["diff"] == 0 and ac.ci_low < 0 < ac.ci_high and not ac.significant


def test_a_clear_difference_is_significant_and_counted_per_dataset():
    good, bad = [1.0] * 90 + [0.0] * 10, [1.0] * 10 + [0.0] * 90
    same = [1.0] * 50 + [0.0] * 50
    pairs = stats.pairwise_frame(
        _correct(d1__a=[good], d1__b=[bad], d2__a=[bad], d2__b=[good], d3__a=[same], d3__b=[same]), ["a", "b"]
    )
    assert list(pairs.dataset) == ["d1", "d2", "d3"]
    assert list(pairs["diff"]) == pytest.approx([80, -80, 0])
    assert list(pairs.significant) == [True, True, False]
    assert pairs.p.iloc[0] == pytest.approx(2 / (stats.N_RESAMPLES + 1))  # no resample crosses 0
    counts = stats.significance_counts(pairs).iloc[0]
    assert (counts.datasets, counts.a_better, counts.b_better, counts.not_significant) == (3, 1, 1, 1)


def test_friedman_nemenyi_and_critical_difference_on_a_known_table():
    # a always beats b, which always beats c, on 4 data sets: average ranks 1, 2, 3
    table = pd.DataFrame({"c": [50, 40, 30, 20], "a": [90, 80, 70, 60], "b": [70, 60, 50, 40]}, index=list("wxyz"))
    t = stats.rank_test(table)
    assert list(t.ranks.index) == ["a", "b", "c"] and list(t.ranks) == [1, 2, 3]
    # chi2_F = 12 N / (k (k + 1)) * sum R_j^2 - 3 N (k + 1) = 4 * 14 - 48 = 8; 2 df: p = exp(-4)
    assert t.statistic == pytest.approx(8.0) and t.pvalue == pytest.approx(math.exp(-4))
    # Demšar (2006), Table 5: q_0.05 = 2.343 for k = 3; CD = q sqrt(k (k + 1) / (6 N))
    assert t.cd == pytest.approx(2.343 * math.sqrt(3 * 4 / 24), abs=1e-3)
    assert t.nemenyi.shape == (3, 3) and t.nemenyi.loc["a", "c"] < 0.05 < t.nemenyi.loc["a", "b"]
    assert "Friedman" in t.caption() and "Nemenyi" in t.caption()


def test_ties_share_the_average_rank():
    table = pd.DataFrame({"a": [80, 80], "b": [80, 70], "c": [60, 70]}, index=["x", "y"])
    ranks = stats.average_ranks(table)
    assert ranks.to_dict() == {"a": 1.25, "b": 2.0, "c": 2.75}  # x: a, b tie at 1.5; y: b, c tie at 2.5


def test_rank_tests_per_group_skip_what_cannot_be_tested():
    per = pd.DataFrame(
        [(d, m, v) for d, vals in {"n1": (3, 2, 1), "n2": (3, 1, 2), "s1": (1, 2, 3)}.items()
         for m, v in zip("abc", vals)] + [("n1", "hole", 99.0)],
        columns=["dataset", "method", "mean"],
    )  # fmt: skip
    tests = stats.rank_tests(per, {"n1": "natural", "n2": "natural", "s1": "specialized"}, ["a", "b", "c", "hole"])
    assert [t.scope for t in tests] == ["all", "natural", "specialized"]
    assert "hole" not in tests[0].ranks  # only complete methods are ranked
    assert tests[0].tested and tests[1].tested and not tests[2].tested
    assert "1 data set" in tests[2].caption()
    frame = stats.ranks_frame(tests)
    assert set(frame.scope) == {"all", "natural", "specialized"} and len(frame) == 9


def _cell(root, dataset, method, cell, labels, preds):
    d = root / "cells" / dataset / method / cell
    d.mkdir(parents=True)
    pd.DataFrame({"index": range(len(labels)), "label": labels, "pred": preds}).to_parquet(d / "predictions.parquet")


def test_read_correct_from_predictions_and_refuses_misaligned_runs(tmp_path):
    rows = pd.DataFrame({"dataset": "d", "method": ["a", "a", "b", "b"], "cell": ["c0", "c1", "c2", "c3"],
                         "seed": [1, 0, 0, 1], "stage": "final", "status": ["ok", "ok", "ok", "diverged"],
                         "accuracy": [0.5, 1.0, 0.0, math.nan]})  # fmt: skip
    _cell(tmp_path, "d", "a", "c0", [0, 1], [0, 0])
    _cell(tmp_path, "d", "a", "c1", [0, 1], [0, 1])
    _cell(tmp_path, "d", "b", "c2", [0, 1], [1, 0])
    correct = stats.read_correct(rows, tmp_path)
    assert set(correct) == {("d", "a"), ("d", "b")}  # the diverged run is left out
    np.testing.assert_array_equal(correct[("d", "a")], [[1, 1], [1, 0]])  # seed order
    _cell(tmp_path, "d", "a", "c9", [1, 1], [1, 1])
    bad = pd.concat([rows, rows.iloc[[0]].assign(cell="c9", seed=2)])
    with pytest.raises(InputError, match="not the same test images"):
        stats.read_correct(bad, tmp_path)


def test_cliques_join_runs_that_no_test_separates():
    ranks = pd.Series({"c": 3.0, "a": 1.0, "b": 2.0, "d": 4.0})
    p = pd.DataFrame(1.0, index=list("abcd"), columns=list("abcd"))
    for x, y in (("a", "c"), ("a", "d"), ("b", "d")):
        p.loc[x, y] = p.loc[y, x] = 0.01
    # a~b, b~c, c~d; a-c, a-d, b-d differ: bars a-b, b-c, c-d (none inside another)
    assert stats.cliques(ranks, p) == [["a", "b"], ["b", "c"], ["c", "d"]]
    p.loc["a", "c"] = p.loc["c", "a"] = 0.5  # now a, b, c together; b-c is inside a-c
    assert stats.cliques(ranks, p) == [["a", "b", "c"], ["c", "d"]]
    assert stats.cliques(ranks, p * 0) == []  # every pair differs: no bar
