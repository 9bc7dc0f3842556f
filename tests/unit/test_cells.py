"""Cell identity, selection (validation only) and the PPT metric."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from peft_core.cells import CellSpec, cell_hash
from peft_core.config import load_study
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


def test_every_spec_field_is_in_the_identity(study):
    spec = study.tuning_cells("digits", "full")[0]
    changes = {"precision": "bf16", "compile": True, "schedule": "reference_epoch", "init": "reference",
               "interpolation": "bilinear"}  # fmt: skip
    for field, value in changes.items():
        assert getattr(spec, field) != value
        assert spec.model_copy(update={field: value}).cell_id != spec.cell_id, field
    other = spec.backbone.model_copy(update={"pretrain": {**spec.backbone.pretrain, "epochs": 1}})
    assert spec.model_copy(update={"backbone": other}).cell_id != spec.cell_id  # demo pre-training settings


def test_auto_precision_is_resolved_before_the_cell_id():
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    ids = {}
    for device, gpu, want in (("cpu", 0, "fp32"), ("cuda", 0, "bf16"), ("auto", 1, "bf16")):
        raw["compute"]["train"].update(device=device, gpu=gpu)
        spec = load_study(raw).tuning_cells("digits", "lora")[0]
        assert spec.precision == want
        ids[device] = spec.cell_id
    assert ids["cpu"] != ids["cuda"] == ids["auto"]  # a CPU-fp32 and a GPU-bf16 cell never share an id


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
    from peft_core.figures import pareto_front

    params = [0, 10, 5, 100, 100, 50]
    acc = [30, 40, 45, 50, 49, 45]
    # 0@30, 5@45 and 100@50 are on the front; 10@40 and 50@45 are beaten by 5@45
    assert pareto_front(params, acc) == [0, 2, 3]


def test_rank_frame_ties_share_the_best_rank():
    import pandas as pd

    from peft_core.report import rank_frame

    summ = pd.DataFrame([{"method": "a", "x": 50.0, "y": 10.0}, {"method": "b", "x": 50.0, "y": 20.0},
                         {"method": "c", "x": 40.0, "y": 30.0}])  # fmt: skip
    ranks = rank_frame(summ, ["x", "y"])
    assert ranks.loc["a", "x"] == ranks.loc["b", "x"] == 1 and ranks.loc["c", "x"] == 3
    assert list(ranks.index) == ["b", "a", "c"]  # mean ranks 1.5, 2, 2 (ties keep config order)


def test_reference_epoch_schedule_is_timms_scheduler_stepped_as_the_reference_does():
    """The reference builds timm's CosineLRScheduler and calls ``step(epoch)`` at the end of each epoch."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    from peft_core.train import lr_at

    import torch

    from .. import toycell

    spec = toycell.spec(epochs=20, warmup_epochs=4, lr=0.01, schedule="reference_epoch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=spec.lr)
    sched = CosineLRScheduler(opt, t_initial=spec.epochs, warmup_t=spec.warmup_epochs, lr_min=spec.lr_min,
                              warmup_lr_init=spec.warmup_lr_init)  # fmt: skip
    steps_per_epoch = 3
    for epoch in range(spec.epochs):
        ran = opt.param_groups[0]["lr"]
        for k in range(steps_per_epoch):
            assert lr_at(epoch * steps_per_epoch + k, steps_per_epoch, spec) == pytest.approx(ran, rel=1e-12), epoch
            sched.step_update(epoch * steps_per_epoch + k + 1)
        sched.step(epoch)
    per_step = spec.model_copy(update={"schedule": "per_step"})
    assert lr_at(1, steps_per_epoch, per_step) != lr_at(0, steps_per_epoch, per_step)  # changes within an epoch


@pytest.mark.parametrize("bad", ["data/{dataset}", "data/a\nb", ""])
def test_paths_with_braces_or_control_characters_are_refused(bad):
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    raw["data"]["root"] = bad
    with pytest.raises(InputError, match=r"^data\.root: "):
        load_study(raw)


def test_paths_with_spaces_and_shell_characters_are_accepted():
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    raw["data"]["root"] = "data/my runs; $(touch pwned) `x`"
    assert load_study(raw).cfg.data.root == raw["data"]["root"]


def test_full_fine_tuning_gets_its_own_low_lr_grid_in_the_flagship_config():
    study = load_study(REPO / "config" / "vtab1k.yaml")
    lrs = sorted({c.lr for c in study.tuning_cells("cifar100", "full")})
    assert lrs == [1e-5, 3e-5, 1e-4, 3e-4]
    assert sorted({c.lr for c in study.tuning_cells("cifar100", "lora")}) == [1e-3, 1e-2]  # PEFT: the shared grid
    grid = yaml.safe_load((REPO / "config" / "method_grids" / "full.yaml").read_text())
    assert grid["lr"] == lrs
    assert {c.schedule for c in study.tuning_cells("cifar100", "lora")} == {"reference_epoch"}
