"""The newer methods' published VTAB-1k numbers (config/published/newer_methods_vtab1k.csv) and their mapping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from peft_core.published import MEAN_KINDS, NEWER_AS, mapping_for, published_frame, vtab_mean
from peft_core.vtab import DATASETS

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "config" / "published" / "newer_methods_vtab1k.csv"
GROUPS = ["natural", "specialized", "structured"]
TASKS = list(DATASETS)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return pd.read_csv(TABLE)


def test_columns_follow_the_existing_published_format(table):
    assert list(table.columns) == ["method", "params_m", "mean_acc", "mean_kind", *GROUPS, *TASKS, "source"]
    vpeft = pd.read_csv(REPO / "config" / "published" / "vpeft_bench_vtab1k.csv")
    assert set(TASKS) <= set(vpeft.columns) and {"method", "params_m", "mean_acc", "source"} <= set(vpeft.columns)
    assert table.method.is_unique and table.source.notna().all()
    assert {"GLoRA", "SPT-LoRA", "SPT-Adapter", "RLRR", "ARC", "Adapter+", "Mona"} <= set(table.method)
    assert any(m.startswith("SNELL") for m in table.method)


def test_every_mean_says_its_kind(table):
    for r in table.itertuples():
        assert pd.isna(r.mean_acc) == pd.isna(r.mean_kind), r.method
        if not pd.isna(r.mean_kind):
            assert r.mean_kind in MEAN_KINDS
        if pd.isna(r.mean_acc):  # nothing found: every number empty, and the source says so
            assert table.loc[table.method == r.method, [*GROUPS, *TASKS, "params_m"]].isna().all(axis=None)
            assert "not found" in r.source


def test_numbers_are_consistent_with_the_means_they_report(table):
    # a transcription slip in a task would move its group mean; each mean is checked against its kind
    for _, r in table[table.mean_acc.notna()].iterrows():
        if not pd.isna(r[GROUPS]).any():
            assert vtab_mean({d: r[g] for d, (g, _) in DATASETS.items()}, "groups") == pytest.approx(
                sum(r[g] for g in GROUPS) / 3
            )
            if r.mean_kind == "groups":
                assert abs(sum(r[g] for g in GROUPS) / 3 - r.mean_acc) <= 0.05 + 1e-9, r.method
        if r[TASKS].notna().all():
            values = {d: float(r[d]) for d in TASKS}
            for g in GROUPS:  # a group mean the source does not print stays empty (GLoRA as quoted by PACE)
                if pd.isna(r[g]):
                    continue
                mean = sum(v for d, v in values.items() if DATASETS[d][0] == g) / sum(DATASETS[d][0] == g for d in TASKS)
                assert abs(mean - r[g]) <= 0.1, (r.method, g)
            assert abs(vtab_mean(values, r.mean_kind) - r.mean_acc) <= 0.1, r.method
        else:
            assert r[TASKS].isna().all(), f"{r.method}: partial per-task rows are not kept"


def test_glora_has_pace_s_per_task_row_and_mona_none(table):
    # GLoRA: the 19 numbers of PACE's Table 1 (a mean of group means, 78.0), no group means or parameter count printed there
    glora = table.set_index("method").loc["GLoRA"]
    assert glora.mean_kind == "groups" and glora.mean_acc == 78.0 and "PACE" in glora.source
    assert glora[TASKS].notna().all() and glora[[*GROUPS, "params_m"]].isna().all()
    values = {d: float(glora[d]) for d in TASKS}
    assert round(vtab_mean(values, "groups"), 1) == 78.0 and round(vtab_mean(values, "tasks19"), 1) == 75.8
    assert (values["cifar100"], values["sun397"], values["retinopathy"], values["smallnorb_ele"]) == (76.4, 57.8, 76.0, 41.4)
    # Mona: no VTAB-1k ViT-B/16 numbers anywhere read (its abstract and README classify with Swin on three data sets)
    mona = table.set_index("method").loc["Mona"]
    assert mona[["mean_acc", *GROUPS, *TASKS, "params_m"]].isna().all() and "not found" in mona.source
    assert "glora" not in NEWER_AS and "mona" not in NEWER_AS  # GLoRA's row: configuration not stated


def test_the_two_kinds_of_mean_differ_and_rlrr_reports_the_19_task_one(table):
    rlrr = table.set_index("method").loc["RLRR"]
    values = {d: float(rlrr[d]) for d in TASKS}
    assert rlrr.mean_kind == "tasks19" and round(vtab_mean(values, "tasks19"), 1) == 74.5
    assert vtab_mean(values, "groups") - 74.5 > 2  # the other kind (76.75): never compared with 74.5
    with pytest.raises(ValueError, match="mean_kind"):
        vtab_mean(values, "mean")
    with pytest.raises(ValueError, match="19 tasks"):
        vtab_mean({"cifar100": 1.0}, "tasks19")


def test_mapping_is_chosen_for_this_table_and_names_its_rows(table):
    assert mapping_for(table) is NEWER_AS
    assert {to.row for to in NEWER_AS.values()} <= set(table.method)


def _summary(method: str, values: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame([{"method": method, **values}])


def _per(method: str, hp: dict, tasks=TASKS) -> pd.DataFrame:
    return pd.DataFrame([{"method": method, "dataset": d, "config": json.dumps(hp)} for d in tasks])


def test_rows_with_per_task_numbers_are_compared_task_by_task(table):
    ours = {d: 70.0 for d in TASKS}
    out = published_frame(_summary("rlrr", ours), table, TASKS).iloc[0]
    rlrr = table.set_index("method").loc["RLRR"]
    assert (out.published_as, out.datasets, out.note) == ("RLRR", 19, "")
    assert out.published == pytest.approx(rlrr[TASKS].astype(float).mean())
    # SNELL-16's numbers are compared only where ours selected rank 16
    per = _per("snell", {"rank": 16, "sparsity": 0.4})
    out = published_frame(_summary("snell", ours), table, TASKS, per).iloc[0]
    assert (out.published_as, out.datasets) == ("SNELL-16", 19)
    out = published_frame(_summary("snell", ours), table, TASKS, _per("snell", {"rank": 8})).iloc[0]
    assert out.datasets == 0 and "not comparable" in out.note


def test_group_mean_rows_compare_with_our_group_mean_only_on_all_19_tasks(table):
    # ours: natural 90, specialized 80, structured 50 -> 19-task mean 69.47, mean of groups 73.33
    ours = {d: {"natural": 90.0, "specialized": 80.0, "structured": 50.0}[g] for d, (g, _) in DATASETS.items()}
    out = published_frame(_summary("spt_lora", ours), table, TASKS).iloc[0]
    assert out.published_as == "SPT-LoRA" and out.published == pytest.approx(76.4)
    assert out.ours == pytest.approx(220 / 3) and out["diff"] == pytest.approx(220 / 3 - 76.4)
    assert out.ours != pytest.approx(sum(ours.values()) / 19)
    assert "mean of the three group means" in out.note and out.datasets == 19
    # one task missing: no mean of ours can be formed, so no comparison
    partial = {d: v for d, v in ours.items() if d != "dmlab"}
    out = published_frame(_summary("spt_adapter", partial), table, TASKS).iloc[0]
    assert out.datasets == 0 and math.isnan(out.ours) and "18 of the 19" in out.note


def test_tables_without_mean_kind_are_read_as_before():
    # V-PEFT Bench's table has no mean_kind: a row without per-task numbers is skipped, not compared by its mean
    pub = pd.DataFrame([{"method": "SSF", "mean_acc": 73.1, "cifar100": float("nan")}])
    out = published_frame(_summary("ssf", {"cifar100": 70.0}), pub, ["cifar100"], mapping={"ssf": NEWER_AS["rlrr"].__class__("SSF")})
    assert out.empty
