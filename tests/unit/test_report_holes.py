"""Aggregates never hide a hole: synthetic results frames, no training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from peft_core.config import load_study
from peft_core.report import build_report, final_table, rank_frame, render_html, render_markdown, summary_frame
from peft_core.summary import HOLE

REPO = Path(__file__).resolve().parents[2]
DATASETS = {"a": "natural", "b": "natural", "c": "structured"}
HP = {"linear": {}, "lora": {"rank": 8}, "adapter": {"bottleneck": 8, "init": "lora_xavier"}}
PARAMS = {"linear": 0, "lora": 8000, "adapter": 4000}


@pytest.fixture(scope="module")
def study():
    return load_study(
        {
            "study": "syn",
            "data": {"root": "x"},
            "backbone": {"model": "vit_tiny_patch16_224", "checkpoint": "x.npz"},
            "datasets": {d: {"num_classes": 2, "group": g} for d, g in DATASETS.items()},
            "methods": {"linear": {}, "lora": {"rank": [1, 8]}, "adapter": {"init": ["zero", "lora_xavier"]}},
            "train": {"final_seeds": [0, 1, 2]},
        }
    )


def cell(dataset, method, stage, seed=0, acc=0.5, status="ok", precision="fp32", selected=False, **hp):
    hparams = {**HP[method], **hp}
    return {
        "study": "syn", "dataset": dataset, "group": DATASETS[dataset], "method": method, "stage": stage,
        "cell": f"{dataset}-{method}-{stage}-{seed}-{json.dumps(hparams, sort_keys=True)}",
        "train_split": "train800val200" if stage == "final" else "train800",
        "eval_split": "test" if stage == "final" else "val200", "seed": seed, "lr": 0.01, "weight_decay": 1e-4,
        "epochs": 1, "batch_size": 8, "hparams": json.dumps(hparams, sort_keys=True), "status": status,
        "diverged_epoch": None if status == "ok" else 1, "accuracy": acc if status == "ok" else math.nan,
        "n_eval": 100, "trainable_params": PARAMS[method], "head_params": 10, "ppt": math.nan,
        "images_per_s": 1.0, "peak_memory_mb": 1.0, "wall_time_s": 1.0, "train_s": 1.0, "device": "cpu",
        "precision": precision, "selected": selected, "backbone": "vit",
    }  # fmt: skip


def synthetic() -> pd.DataFrame:
    """lora is best everywhere but every final seed diverged on c; adapter lost a seed on b
    (diverged); linear is missing seed 2 on a; adapter on c ran one seed in bf16."""
    rows = []
    acc = {"linear": 0.50, "lora": 0.90, "adapter": 0.60}
    for d in DATASETS:
        for m in HP:
            rows.append(cell(d, m, "tune", acc=acc[m], selected=True))
            for seed in (0, 1, 2):
                status = "diverged" if (m, d) == ("lora", "c") or (m, d, seed) == ("adapter", "b", 2) else "ok"
                if (m, d, seed) == ("linear", "a", 2):
                    continue
                prec = "bf16" if (m, d, seed) == ("adapter", "c", 0) else "fp32"
                rows.append(cell(d, m, "final", seed, acc[m] + 0.01 * seed, status, prec))
    return pd.DataFrame(rows)


def test_all_seeds_diverged_never_tops_a_table(study):
    results = synthetic()
    summ = summary_frame(results, study)
    assert list(summ.method) == ["linear", "adapter", "lora"]  # complete methods first, config order
    lora = summ.set_index("method").loc["lora"]
    assert math.isnan(lora["mean"]) and math.isnan(lora.ppt) and math.isnan(lora.params) and math.isnan(lora.structured)
    assert lora.coverage == "2/3" and not lora.complete and math.isnan(lora.natural)
    assert summ.set_index("method").loc["adapter", "coverage"] == "3/3"
    ranks = rank_frame(summ, list(DATASETS))
    assert list(ranks.index) == ["adapter", "linear", "lora"] and math.isnan(ranks.loc["lora", "mean rank"])
    assert ranks.loc["adapter", "a"] == 1  # lora's better number does not push complete methods down
    assert ranks.loc["lora", "a"] == 1 and math.isnan(ranks.loc["lora", "c"])  # where it would stand, shown
    assert summ.sort_values("ppt", ascending=False, kind="stable").method.iloc[-1] == "lora"

    md = render_markdown(results, study)
    row = next(line for line in md.splitlines() if line.startswith("| lora"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert f"{HOLE} (0/3 seeds)" in cells and "2/3" in cells and cells.count(HOLE) == 6  # groups, mean, params, ppt, rank
    table = md[md.index("## Test accuracy") :]
    assert table.index("| adapter") < table.index("| lora") and table.index("| linear") < table.index("| lora")

    page = render_html(results, study)
    best = page[page.index("<h2>Test accuracy") : page.index("<h2>Accuracy vs")].split('class="best"')[1:]
    assert best and not any(b.startswith(">91") for b in best)  # lora's 91.0 on a/b is never bold
    assert '<td class="best">61.0 ± 1.0</td>' in page  # adapter: the best complete method on a


def test_partial_seeds_are_flagged(study):
    results = synthetic()
    per = final_table(results, study).set_index(["method", "dataset"])
    assert per.loc[("adapter", "b"), ["seeds_ok", "seeds_total", "diverged"]].tolist() == [2, 3, 1]
    assert per.loc[("linear", "a"), ["seeds_ok", "seeds_total", "diverged"]].tolist() == [2, 3, 0]
    md = render_markdown(results, study)
    assert "60.5 ± 0.7 (2/3 seeds)" in md  # adapter on b: seeds 0, 1
    assert "50.5 ± 0.7 (2/3 seeds)" in md  # linear on a: seed 2 missing
    assert "(2/3 seeds)" in render_html(results, study)
    assert "Split: `test`" in md and "Final seeds: [0, 1, 2]" in md and "Precision: bf16, fp32 (mixed)" in md


def test_summary_csv_and_results_parquet_columns(study, tmp_path):
    table = tmp_path / "t.parquet"
    synthetic().to_parquet(table, index=False)
    build_report(study, [table], tmp_path / "out")
    csv = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("method")
    for col in ("a", "b", "c", "natural", "structured", "mean", "params", "params_m", "ppt"):  # kept as before
        assert col in csv.columns
    for col in ("coverage", "datasets_ok", "datasets_total", "complete", "mean_rank"):
        assert col in csv.columns
    for d in DATASETS:
        for f in ("std", "seeds_ok", "seeds_total", "diverged", "split", "precision", "config"):
            assert f"{d}:{f}" in csv.columns
    ad = csv.loc["adapter"]
    assert ad["b"] == pytest.approx(60.5) and ad["b:std"] == pytest.approx(0.7071, abs=1e-4)
    assert (ad["b:seeds_ok"], ad["b:seeds_total"], ad["b:diverged"]) == (2, 3, 1)
    assert ad["b:split"] == "test" and ad["b:precision"] == "fp32" and ad["c:precision"] == "mixed"
    assert json.loads(ad["a:config"]) == {"bottleneck": 8, "init": "lora_xavier", "lr": 0.01, "weight_decay": 0.0001}
    assert csv.loc["lora", "coverage"] == "2/3" and math.isnan(csv.loc["lora", "mean"]) and not csv.loc["lora", "complete"]
    assert (csv.loc["lora", "c:seeds_ok"], csv.loc["lora", "c:diverged"]) == (0, 3)

    res = pd.read_parquet(tmp_path / "out" / "results.parquet")
    for col in ("precision", "config", "final_mean", "final_std", "seeds_ok", "seeds_total", "seeds_diverged"):
        assert col in res.columns
    row = res[(res.stage == "final") & (res.method == "adapter") & (res.dataset == "b")].iloc[0]
    assert (row.seeds_ok, row.seeds_total, row.seeds_diverged) == (2, 3, 1) and row.final_mean == pytest.approx(60.5)
    assert res[res.stage == "tune"].seeds_ok.isna().all()
    assert set(res[(res.method == "adapter") & (res.dataset == "c") & (res.stage == "final")].precision) == {"bf16", "fp32"}


def test_deviations_are_listed_from_the_registry(study, monkeypatch):
    from peft_core import methods, report

    class Fake:
        deviations = ("zero init gives an identity residual (the reference's does not)",)

    real = methods.get_method
    monkeypatch.setattr(methods, "get_method", lambda name: Fake() if name == "adapter" else real(name))
    md = report.render_markdown(synthetic(), study)
    assert "- adapter: zero init gives an identity residual" in md
    assert "zero init gives an identity residual" in report.render_html(synthetic(), study)
