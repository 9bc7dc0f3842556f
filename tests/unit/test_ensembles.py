"""Diversity metrics and ensembles on hand-made predictions with known answers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from peft_core import ensembles as ens
from peft_core.ensemble_report import build_ensembles

REPO = Path(__file__).resolve().parents[2]


def logits(pred: list[int], conf: list[float], classes: int = 3) -> np.ndarray:
    """Logits with argmax ``pred`` and per-sample confidence ``conf`` (the winning logit)."""
    z = np.zeros((len(pred), classes))
    z[np.arange(len(pred)), pred] = conf
    return z


def onehot(pred: list[int], classes: int = 3, scale: float = 5.0) -> np.ndarray:
    """Logits whose argmax is ``pred`` (confidence grows with ``scale``)."""
    z = np.zeros((len(pred), classes))
    z[np.arange(len(pred)), pred] = scale
    return z


def test_disagreement_and_error_overlap_known_values():
    y = np.array([0, 1, 2, 0, 1])
    a = np.array([0, 1, 2, 1, 2])  # wrong on 3, 4
    b = np.array([0, 2, 2, 1, 1])  # wrong on 1, 3
    assert ens.disagreement(a, b) == pytest.approx(2 / 5)  # positions 1 and 4
    assert ens.error_overlap(a, b, y) == pytest.approx(1 / 3)  # both wrong {3} / either {1, 3, 4}
    assert math.isnan(ens.error_overlap(y, y, y))  # nobody errs: undefined
    d = ens.disagreement_matrix({"a": a, "b": b, "y": y})
    assert d.loc["a", "b"] == d.loc["b", "a"] == pytest.approx(0.4)
    assert (np.diag(d.to_numpy()) == 0).all() and d.loc["a", "y"] == pytest.approx(0.4)
    e = ens.error_overlap_matrix({"a": a, "b": b}, y)
    assert e.loc["a", "a"] == 1.0 and e.loc["a", "b"] == pytest.approx(1 / 3)


def test_confident_overlap_and_agreement():
    # 5 samples, q = 0.4 -> k = 2 most confident samples per method.
    pa = ens.softmax(np.array([[9, 0], [8, 0], [0, 1], [0, 1], [1, 0]], float))  # top: 0, 1
    pb = ens.softmax(np.array([[9, 0], [0, 1], [0, 7], [0, 1], [1, 0]], float))  # top: 0, 2
    c = ens.confident_agreement(pa, pb, q=0.4)
    assert (c.k, c.n_both) == (2, 1)
    assert c.overlap == pytest.approx(0.5) and c.agreement == 1.0  # shared sample 0: both say class 0
    assert list(ens.top_confident(pa, 0.4)) == [0, 1]
    with pytest.raises(ValueError):
        ens.top_confident(pa, 0.0)


def test_softmax_average_uses_probabilities_not_logits():
    # One member with a huge logit scale on class 0, two mildly sure of class 1.
    big = np.array([[100.0, 0.0, 0.0]])
    small = np.array([[0.0, 3.0, 0.0]])
    assert np.mean([big, small, small], axis=0).argmax() == 0  # a logit average would say 0
    assert ens.softmax_average([big, small, small])[0] == 1  # mean probability: (1 + 2·0.91) / 3 on class 1
    p = (ens.softmax(big) + 2 * ens.softmax(small)) / 3
    assert p[0, 1] > p[0, 0] and ens.softmax(big).sum() == pytest.approx(1.0)


def test_majority_vote_and_tie_break_by_summed_probability():
    a = np.array([[3.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # votes 0, 0
    b = np.array([[0.0, 3.0, 0.0], [0.0, 0.5, 0.0]])  # votes 1, 1
    c = np.array([[0.0, 3.0, 0.0], [0.0, 0.0, 0.4]])  # votes 1, 2
    # sample 0: 2 votes for class 1 -> 1; sample 1: one vote each -> highest summed probability
    p = ens.softmax(a[1:]) + ens.softmax(b[1:]) + ens.softmax(c[1:])
    assert p.argmax() == 0
    assert list(ens.majority_vote([a, b, c])) == [1, 0]
    # Exact tie in votes and probabilities: lower class index.
    assert ens.majority_vote([onehot([1]), onehot([0])])[0] == 0
    # Two members: a vote tie is broken by summed probability, i.e. the more confident member wins.
    assert ens.majority_vote([onehot([2], scale=1.0), onehot([1], scale=6.0)])[0] == 1
    assert list(ens.ensemble_predict([a, b, c], "majority_vote")) == [1, 0]
    with pytest.raises(ValueError):
        ens.ensemble_predict([a], "median")  # type: ignore[arg-type]


# Validation / test predictions where selecting on test would choose differently.
# y = [0, 1, 2, 0, 1, 2]; A is right on 0..2, "complement" right (and confident) on 3, 4,
# "copy" repeats A. On validation B complements A and C copies it; on test the roles swap.
Y6 = np.array([0, 1, 2, 0, 1, 2])
A_PRED, A_CONF = [0, 1, 2, 1, 2, 0], [3, 3, 3, 1, 1, 1]
COMP_PRED, COMP_CONF = [1, 2, 0, 0, 1, 1], [1, 1, 1, 3, 3, 1]


def val_test_logits() -> tuple[dict, dict]:
    a, copy, comp = logits(A_PRED, A_CONF), logits(A_PRED, A_CONF), logits(COMP_PRED, COMP_CONF)
    return {"A": a, "B": comp, "C": copy}, {"A": a, "B": copy, "C": comp}


def test_greedy_selection_on_validation_differs_from_test_selection():
    val, test = val_test_logits()
    g = ens.greedy_select(val, Y6, "softmax_average")
    # Start: best single on val (A 0.5 ties C 0.5, A listed first; B is 1/3). Adding B: 5/6; adding C: 0.5.
    assert g.trace[0] == (("A",), 0.5)
    assert g.members == ("A", "B") and g.accuracy == pytest.approx(5 / 6)
    # Adding C to A+B does not strictly improve: selection stops.
    assert len(g.trace) == 2
    # The same procedure given test predictions would pick C instead, so the choice above
    # can only have come from validation (the function takes no test argument).
    assert ens.greedy_select(test, Y6, "softmax_average").members == ("A", "C")
    assert ens.greedy_select(val, Y6, "majority_vote").members == ("A", "B")
    assert ens.greedy_select(val, Y6, "softmax_average", max_members=1).members == ("A",)


def test_seed_matched_accuracy_pairs_runs_by_seed():
    y = np.array([0, 1])
    logits = {
        "A": {0: onehot([0, 0], 2, 3.0), 1: onehot([0, 1], 2, 3.0)},
        "B": {0: onehot([1, 1], 2, 2.0), 1: onehot([1, 0], 2, 2.0), 2: onehot([0, 1], 2)},
    }
    acc = ens.seed_matched_accuracy(logits, {0: y, 1: y, 2: y}, ["A", "B"], "softmax_average")
    assert acc == {0: 0.5, 1: 1.0}  # seed 2: A has no run -> left out
    assert ens.seed_matched_accuracy(logits, {0: y}, ["B"], "majority_vote") == {0: 0.5}


# ------------------------------------------------------------------ report stage end to end (no training)


def _cell(root: Path, dataset: str, method: str, cell: str, z: np.ndarray, labels: np.ndarray) -> None:
    d = root / "cells" / dataset / method / cell
    d.mkdir(parents=True)
    frame = pd.DataFrame({"index": range(len(labels)), "label": labels, "pred": z.argmax(1), "logits": list(z)})
    frame.to_parquet(d / "predictions.parquet", index=False)


@pytest.fixture
def toy_study(tmp_path):
    """Three methods with the val/test role swap above, two final seeds, one unchosen tuning cell."""
    res = tmp_path / "results" / "toy"
    val, test = val_test_logits()
    cells = [(m, f"{m.lower()}00000000v", "tune", "val200", 0, True, z) for m, z in val.items()]
    cells.append(("A", "a0000000v2", "tune", "val200", 0, False, logits([0] * 6, [5] * 6)))
    for seed in (0, 1):
        cells += [(m, f"{m.lower()}00000000{seed}", "final", "test", seed, False, z) for m, z in test.items()]
    rows = []
    for method, cell, stage, split, seed, sel, z in cells:
        _cell(res, "toy", method, cell, z, Y6)
        rows.append({"dataset": "toy", "method": method, "cell": cell, "stage": stage, "eval_split": split,
                     "seed": seed, "selected": sel, "accuracy": float((z.argmax(1) == Y6).mean()), "status": "ok"})
    table = tmp_path / "toy.parquet"
    pd.DataFrame(rows).to_parquet(table, index=False)
    selections = []
    for m in val:
        p = tmp_path / f"sel_{m}.json"
        p.write_text(json.dumps({"dataset": "toy", "method": m, "chosen": f"{m.lower()}00000000v", "selected_on": "val200"}))
        selections.append(p)
    return {"res": res, "table": table, "selections": selections, "out": tmp_path / "report"}


def test_build_ensembles_outputs_and_val_only_selection(toy_study):
    s = toy_study
    rows = build_ensembles("toy", [s["table"]], s["out"], s["res"], s["selections"], q=0.5)
    for name in ("ensembles.parquet", "diversity.parquet", "ensembles.md", "ensembles.html"):
        assert (s["out"] / name).stat().st_size > 0, name
    greedy = rows[(rows.selection == "greedy_val") & (rows.rule == "softmax_average")]
    assert set(greedy.members) == {"A+B"}  # chosen on val; C would win on test
    assert set(greedy[greedy.stage == "tune"].split) == {"val200"}
    test = greedy[greedy.stage == "final"]
    assert set(test.split) == {"test"} and sorted(test.seed) == [0, 1]
    # On test B copies A: A+B = 0.5 = best single (A), gain 0; the all-methods ensemble gets 5/6.
    assert test.accuracy.tolist() == [0.5, 0.5] and test.gain.tolist() == [0.0, 0.0]
    assert set(test.best_single_method) == {"A"}
    every = rows[(rows.selection == "all") & (rows.rule == "softmax_average") & (rows.stage == "final")]
    assert every.accuracy.tolist() == pytest.approx([5 / 6, 5 / 6]) and every.gain.iloc[0] == pytest.approx(1 / 3)
    div = pd.read_parquet(s["out"] / "diversity.parquet")
    assert set(div.stage) == {"tune", "final"} and len(div) == 3 * 3  # 3 pairs x (val + 2 seeds)
    ab = div[(div.method_a == "A") & (div.method_b == "B") & (div.stage == "tune")].iloc[0]
    assert ab.disagreement == 1.0 and ab.error_overlap == pytest.approx(1 / 6)  # both wrong only on sample 5
    html = (s["out"] / "ensembles.html").read_text()
    assert (s["out"] / "figures" / "ensemble_gain.pdf").stat().st_size > 0
    for ns in ('xmlns="http://www.w3.org/2000/svg"', 'xmlns:xlink="http://www.w3.org/1999/xlink"'):
        html = html.replace(ns, "")  # namespace names, never fetched
    assert "<script" not in html.lower() and "<svg" in html and "http://" not in html
    md = (s["out"] / "ensembles.md").read_text()
    assert "greedy_val" in md and "softmax_average" in md and "majority_vote" in md


def test_build_ensembles_note_for_one_method(toy_study, tmp_path):
    frame = pd.read_parquet(toy_study["table"])
    one = tmp_path / "one.parquet"
    frame[frame.method == "A"].to_parquet(one, index=False)
    out = tmp_path / "one_report"
    build_ensembles("toy", [one], out, toy_study["res"])
    assert sorted(p.name for p in out.iterdir()) == ["ensembles.md"]
    assert "at least two methods" in (out / "ensembles.md").read_text()


def test_cli_ensembles_one_line_error(tmp_path):
    cmd = [sys.executable, "-m", "peft_core.cli", "ensembles", "--study", "x", "--tables", str(tmp_path / "no.parquet"),
           "--out-dir", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no.parquet: file not found" in proc.stderr
