"""The committed demo results show what the studies found (issue 16), and the checks themselves can fail.

The demo's numbers are regenerated and committed with the code that makes them
(``reports/demo/summary.csv``); a change that makes the demo stop learning, or
its backbone stop transferring, fails here rather than in a newcomer's hands.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from peft_core.config import load_study
from peft_core.findings import ensemble_findings, headline, learnt, robustness_findings, sensitivity

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = ROOT / "reports/demo/summary.csv"


@pytest.fixture(scope="module")
def demo():
    return load_study(ROOT / "config/demo.yaml")


@pytest.fixture(scope="module")
def summary():
    return pd.read_csv(SUMMARY)


def per_from_summary(summ: pd.DataFrame, study) -> pd.DataFrame:
    rows = [
        {"method": r.method, "dataset": d, "mean": getattr(r, d)}
        for r in summ.itertuples()
        for d in study.dataset_names()
    ]
    return pd.DataFrame(rows)


def test_committed_summary_covers_every_demo_method_and_data_set(demo, summary):
    assert list(summary.method) == demo.method_names()
    assert set(demo.dataset_names()) <= set(summary.columns)
    assert summary.complete.all(), "a demo method has a hole"


def test_every_demo_data_set_is_learnt_and_the_linear_probe_is_at_least_twice_chance(demo, summary):
    per = per_from_summary(summary, demo)
    for dataset in demo.dataset_names():
        chance = 100 / demo.cfg.datasets[dataset].num_classes
        g = per[per.dataset == dataset]
        assert g["mean"].max() >= 100 - 0.5 * (100 - chance), f"{dataset}: best method not far above chance"
        linear = float(g[g.method == "linear"]["mean"].iloc[0])
        assert linear >= 2 * chance, f"{dataset}: linear probe {linear:.1f} < 2 x chance {chance:.1f}"
    assert all(f.holds for f in learnt(per, demo))


def test_peft_beats_the_linear_probe_on_the_structured_tasks(demo, summary):
    found = {f.name: f for f in headline(summary.assign(complete=summary.complete.astype(bool)))}
    assert found["structured_above_linear"].holds, found["structured_above_linear"].statement


def test_the_committed_reports_state_the_findings():
    for name in ("summary.md", "robustness.md", "ensembles.md"):
        text = (ROOT / "reports/demo" / name).read_text()
        assert "## Findings (checked on these numbers)" in text, name
    assert "Backbone pre-trained on the demo's upstream task" in (ROOT / "reports/demo/summary.md").read_text()


# ------------------------------------------------------------ the checks can fail


def _summ(rows):
    return pd.DataFrame(rows).assign(complete=True)


def test_learnt_fails_at_chance_and_names_the_data_set(demo):
    per = pd.DataFrame(
        [{"method": "linear", "dataset": "digits", "mean": 12.0}, {"method": "lora", "dataset": "digits", "mean": 40.0}]
    )
    (f,) = learnt(per, demo)
    assert not f.holds and "digits" in f.statement and "1.2x chance" in f.statement
    per.loc[:, "mean"] = [25.0, 96.0]
    assert learnt(per, demo)[0].holds


def test_headline_fails_when_one_method_runs_away_and_when_peft_is_not_above_linear():
    spread = _summ(
        [
            {"method": "linear", "mean": 30.0, "structured": 20.0},
            {"method": "full", "mean": 80.0, "structured": 70.0},
            {"method": "a", "mean": 80.0, "structured": 70.0},
            {"method": "b", "mean": 40.0, "structured": 21.0},
            {"method": "c", "mean": 35.0, "structured": 19.0},
        ]
    )
    found = {f.name: f for f in headline(spread)}
    assert not found["peft_close"].holds and "1 of 3" in found["peft_close"].statement
    assert not found["structured_above_linear"].holds
    close = spread.assign(mean=[30.0, 80.0, 80.0, 78.0, 77.0], structured=[20.0, 70.0, 70.0, 66.0, 65.0])
    assert all(f.holds for f in headline(close))


def test_sensitivity_compares_grid_spread_with_method_spread():
    sel = pd.DataFrame([{"method": "a", "grid_size": 2, "grid_spread": 1.0}, {"method": "b", "grid_size": 2, "grid_spread": 1.0}])
    summ = _summ([{"method": "a", "mean": 90.0}, {"method": "b", "mean": 60.0}, {"method": "c", "mean": 50.0}])
    assert not sensitivity(sel, summ)[0].holds
    assert sensitivity(sel.assign(grid_spread=25.0), summ)[0].holds


def test_ensemble_finding_says_none_did():
    per = pd.DataFrame(
        [
            {"dataset": "d1", "selection": "greedy_val", "rule": "softmax_average", "stage": "final", "members": "a+b", "gain": -0.01},
            {"dataset": "d2", "selection": "greedy_val", "rule": "softmax_average", "stage": "final", "members": "a", "gain": 0.0},
        ]
    )
    (f,) = ensemble_findings(per)
    assert not f.holds and "none did" in f.statement
    per.loc[0, "gain"] = 0.02
    (f,) = ensemble_findings(per)
    assert f.holds and "d1 (+2.0)" in f.statement


def test_robustness_findings_on_a_flat_noisy_shift_and_on_a_real_one():
    def curves(lin_ood, full_ood, lora_ood):
        rows = []
        for method, ood in (("linear", lin_ood), ("full", full_ood), ("lora", lora_ood)):
            for alpha in (0.0, 0.5, 1.0):
                rows.append({"dataset": "d", "method": method, "mergeable": True, "alpha": alpha, "seeds": 1,
                             "id": 0.9, "shift": ood * (0.5 + alpha / 2) if method != "linear" else ood})  # fmt: skip
        return pd.DataFrame(rows)

    noise = {f.name: f for f in robustness_findings(curves(0.11, 0.10, 0.10), "id", {"d": 10.0})}
    assert not noise["shift:d"].holds
    real = {f.name: f for f in robustness_findings(curves(0.6, 0.3, 0.7), "id", {"d": 10.0})}
    assert real["shift:d"].holds and real["wise_not_flat:d"].holds
    assert real["full_loses_more:d"].holds and "loses more robustness than PEFT" in real["full_loses_more:d"].statement
