"""Cell identity, selection (validation only) and the PPT metric."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from peft_core.config import CellSpec, cell_hash, load_study
from peft_core.errors import InputError
from peft_core.metrics import ppt
from peft_core.select import select

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def study():
    return load_study(REPO / "config" / "demo.yaml")


def test_cell_hash_is_stable(study):
    spec = study.tuning_cells("digits", "full")[0]
    assert spec.cell_id == cell_hash(spec.identity())
    assert len(spec.cell_id) == 10 and spec.cell_id == CellSpec.model_validate_json(spec.canonical_json()).cell_id


def test_fields_added_later_keep_existing_ids_at_their_defaults(study):
    spec = study.tuning_cells("digits", "full")[0]
    old = spec.model_dump(mode="json", exclude={"precision", "compile"})  # a spec from before they existed
    assert spec.cell_id == cell_hash(old) == "85153083bd"  # its id before this change
    assert spec.model_copy(update={"precision": "bf16"}).cell_id != spec.cell_id
    assert spec.model_copy(update={"compile": True}).cell_id != spec.cell_id


def test_precision_and_compile_reach_the_cells():
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    raw["train"].update(precision="bf16", compile=True)
    spec = load_study(raw).tuning_cells("digits", "lora")[0]
    assert (spec.precision, spec.compile) == ("bf16", True)
    raw["train"]["precision"] = "fp16"
    with pytest.raises(InputError, match=r"^train\.precision: "):
        load_study(raw)


def test_cell_hash_is_key_order_independent():
    a = {"x": 1, "y": {"b": 2, "a": [1, 2]}}
    b = {"y": {"a": [1, 2], "b": 2}, "x": 1}
    assert cell_hash(a) == cell_hash(b)
    assert cell_hash(a) != cell_hash({"x": 1, "y": {"b": 2, "a": [2, 1]}})


def test_cell_hash_pinned_value():
    # Pinned: a change here silently invalidates every cached result.
    assert cell_hash({"method": "lora", "hparams": {"rank": 8}}) == "f7bc6e0aa5"


def test_cells_independent_of_method_order_in_config():
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    ids = {c.cell_id for c in load_study(raw).tuning_cells("digits", "lora")}
    raw["methods"] = dict(reversed(list(raw["methods"].items())))
    assert {c.cell_id for c in load_study(raw).tuning_cells("digits", "lora")} == ids


def test_every_hyper_parameter_changes_the_identity(study):
    cells = study.tuning_cells("digits", "lora")
    assert len({c.cell_id for c in cells}) == len(cells)
    final = study.final_cell(cells[0], seed=0)
    assert final.cell_id != cells[0].cell_id and final.eval_split == "test"


def _metrics(acc, params, split="val200", status="ok"):
    return {"accuracy": acc, "trainable_params": params, "eval_split": split, "status": status}


def test_selection_by_validation_accuracy(study):
    cells = study.tuning_cells("digits", "lora")
    out = select([(c, _metrics(a, 10)) for c, a in zip(cells, [0.5, 0.7, 0.6, 0.1])], "val200")
    assert out["chosen"] == cells[1].cell_id and out["selected_on"] == "val200"


def test_selection_ties_prefer_fewer_params_then_listed_order(study):
    cells = study.tuning_cells("digits", "lora")
    out = select([(c, _metrics(0.5, p)) for c, p in zip(cells, [30, 20, 20, 40])], "val200")
    assert out["chosen"] == cells[1].cell_id


def test_diverged_cells_rank_last(study):
    cells = study.tuning_cells("digits", "lora")[:2]
    out = select([(cells[0], _metrics(float("nan"), 1, status="diverged")), (cells[1], _metrics(0.1, 9))], "val200")
    assert out["chosen"] == cells[1].cell_id


def test_selection_never_on_test(study):
    cell = study.final_cell(study.tuning_cells("digits", "lora")[0], seed=0)
    with pytest.raises(InputError, match="expected the validation split"):
        select([(cell, _metrics(0.9, 1, split="test"))], "val200")


@pytest.mark.parametrize(
    "acc, params, expected",
    [
        (0.5, 0, 0.5),
        (1.0, 1e7, math.exp(-math.log10(2))),
        (0.7, 3.0e5, 0.7 * math.exp(-math.log10(1.03))),
    ],
)
def test_ppt(acc, params, expected):
    assert ppt(acc, params) == pytest.approx(expected)


def test_ppt_reproduces_vpeft_bench_table():
    import pandas as pd

    table = pd.read_csv(REPO / "config" / "published" / "vpeft_bench_vtab1k.csv").dropna(subset=["ppt"])
    rows = [r for _, r in table.iterrows()]
    assert len(rows) >= 10, "the published table lost its PPT rows"  # else the count below proves nothing
    close = sum(abs(ppt(r.mean_acc / 100, r.params_m * 1e6) - r.ppt) <= 0.01 for r in rows)
    assert close >= len(rows) - 1  # the published RepAdapter entry (0.72) is not reproduced


def test_pareto_front():
    from peft_core.report import pareto_front

    params = [0, 10, 5, 100, 100, 50]
    acc = [30, 40, 45, 50, 49, 45]
    # 0@30, 5@45 and 100@50 are on the front; 10@40 and 50@45 are beaten by 5@45
    assert pareto_front(params, acc) == [0, 2, 3]


def test_published_comparison_uses_common_datasets_and_aliases():
    import pandas as pd

    from peft_core.report import published_frame

    summ = pd.DataFrame([{"method": "adapter", "cifar100": 70.0, "dtd": 60.0}, {"method": "mine", "cifar100": 1.0, "dtd": 1.0}])
    pub = pd.DataFrame([{"method": "lora_p_adapter", "cifar100": 71.0, "dtd": 71.28, "mean19": 73.21}])
    out = published_frame(summ, pub, ["cifar100", "dtd"])
    assert out.to_dict("records") == [
        {"method": "adapter", "published_as": "lora_p_adapter", "datasets": 2, "ours": 65.0,
         "published": pytest.approx(71.14), "diff": pytest.approx(-6.14)}
    ]  # fmt: skip


def test_rank_frame_ties_share_the_best_rank():
    import pandas as pd

    from peft_core.report import rank_frame

    summ = pd.DataFrame([{"method": "a", "x": 50.0, "y": 10.0}, {"method": "b", "x": 50.0, "y": 20.0},
                         {"method": "c", "x": 40.0, "y": 30.0}])  # fmt: skip
    ranks = rank_frame(summ, ["x", "y"])
    assert ranks.loc["a", "x"] == ranks.loc["b", "x"] == 1 and ranks.loc["c", "x"] == 3
    assert list(ranks.index) == ["b", "a", "c"]  # mean ranks 1.5, 2, 2 (ties keep config order)
