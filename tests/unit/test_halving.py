"""Successive halving (peft_core/halving.py): the plan, the ranking, and rung-by-rung training
that ends in the grid's own cell, bit for bit on CPU fp32."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from peft_core.config import load_study
from peft_core.errors import InputError
from peft_core.halving import budgets, plan_rungs, promoted_specs, rank, rung_sizes, run_rung
from peft_core.packs import group_into_packs, rung_record_path
from peft_core.results import METRICS, read_json
from peft_core.train import run_cell

from .. import toycell

REPO = Path(__file__).resolve().parents[2]


def test_budgets_grow_by_eta_up_to_the_full_budget():
    assert budgets(4, 3, 100) == [4, 12, 36, 100]
    assert budgets(2, 3, 6) == [2, 6]
    assert budgets(10, 2, 10) == [10]  # min_epochs = epochs: the grid
    assert rung_sizes(38, 3, 4) == [38, 13, 5, 2]
    assert rung_sizes(2, 3, 3) == [2, 1, 1]


def test_plan_rung_zero_is_the_packs_and_later_rungs_chunks_of_ranked_slots():
    cells = [toycell.spec("lora", {"rank": r}, lr=lr) for r in (1, 2, 4) for lr in (1e-3, 1e-2)]
    packs = group_into_packs(cells)
    r0, r1, r2 = plan_rungs(packs, eta=2, min_epochs=1, epochs=4)
    assert (r0.epochs, r0.size, r0.promote, len(r0.parts)) == (1, 6, 3, 3)
    assert (r1.epochs, r1.previous, r1.size, r1.parts, r1.promote) == (2, 1, 3, ("c0", "c1"), 2)
    assert [r1.slots(p) for p in r1.parts] == [(0, 2), (2, 3)]
    assert (r2.epochs, r2.size, r2.promote, r2.parts) == (4, 2, 0, ("c0",))
    assert [r.slots("c0") for r in plan_rungs(packs, 2, 1, 4, chunk=1)[1:]] == [(0, 1), (0, 1)]


def _row(cell: str, split: str = "val200") -> dict:
    return {"cell": cell, "dir": cell, "spec": {"eval_split": split}}


def test_ranking_is_by_validation_accuracy_ties_by_cell_id_diverged_last():
    rows = [_row(c) for c in ("bb", "aa", "cc", "dd")]
    records = [{"accuracy": 0.5, "status": "ok", "eval_split": "val200"},
               {"accuracy": 0.5, "status": "ok", "eval_split": "val200"},
               {"accuracy": float("nan"), "status": "diverged", "eval_split": "val200"},
               {"accuracy": 0.7, "status": "ok", "eval_split": "val200"}]  # fmt: skip
    ranked = rank(rows, records, "val200")
    assert [r["cell"] for r in ranked] == ["dd", "aa", "bb", "cc"]
    assert promoted_specs({"rung": 0, "promote": 2, "ranked": ranked}, 0, 2) == [{"eval_split": "val200"}] * 2
    with pytest.raises(InputError, match="beyond its 2 promoted"):
        promoted_specs({"rung": 0, "promote": 2, "ranked": ranked}, 2, 3)
    records[0] = {**records[0], "eval_split": "test"}
    with pytest.raises(InputError, match="expected the validation split"):
        rank(rows, records, "val200")


def _train(root: Path, log: list[str]):
    def train_cell(spec, out, stop_at=None):
        return run_cell(spec, root / "train.pt", root / "eval.pt", root / "backbone.safetensors", out, device="cpu",
                        log=log.append, code="c1", stop_at=stop_at)  # fmt: skip

    return train_cell


def test_a_cell_trained_rung_by_rung_is_the_cell_trained_straight_through(tmp_path):
    toycell.write_inputs(tmp_path, n_train=128)
    cell = toycell.spec("lora", {"rank": 2}, epochs=6)  # drop_path 0.1 and dropout: RNG state matters too
    straight = run_cell(cell, tmp_path / "train.pt", tmp_path / "eval.pt", tmp_path / "backbone.safetensors",
                        tmp_path / "straight", device="cpu", log=lambda m: None, code="c1")  # fmt: skip
    log: list[str] = []
    cells = tmp_path / "cells"
    rows = run_rung([cell], 2, _train(tmp_path, log), cells, "c1", tmp_path / "r0.json", log.append)
    out = Path(rows[0]["dir"])
    assert (out / "resume.pt").is_file() and not (out / METRICS).exists()  # stopped at the budget, state kept
    assert read_json(rung_record_path(out, 2))["epochs"] == 2 and rows[0]["record"].endswith("e2.json")
    rows = run_rung([cell], 6, _train(tmp_path, log), cells, "c1", tmp_path / "r1.json", log.append)
    assert any(m.startswith("resumed from") and "at epoch 3" in m for m in log)
    assert not (out / "resume.pt").exists()
    a, b = read_json(tmp_path / "straight" / METRICS), read_json(out / METRICS)
    assert a["cell"] == b["cell"] == cell.cell_id  # the grid's cell: same id, same directory layout
    assert (a["final_train_loss"], a["accuracy"]) == (b["final_train_loss"], b["accuracy"])
    wa, wb = load_file(tmp_path / "straight" / "trainable.safetensors"), load_file(out / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    pa, pb = (pd.read_parquet(d / "predictions.parquet") for d in (tmp_path / "straight", out))
    assert pa["logits"].map(list).tolist() == pb["logits"].map(list).tolist()

    log.clear()  # a rerun reuses both rungs; new code retrains the rung-0 state from scratch
    run_rung([cell], 2, _train(tmp_path, log), cells, "c1", tmp_path / "r0.json", log.append)
    assert any("reused at 2 epochs" in m for m in log)
    run_rung([cell], 4, _train(tmp_path, log), cells, "c1", tmp_path / "r.json", log.append)
    run_rung([cell], 2, _train(tmp_path, log), cells, "c2", tmp_path / "r0.json", log.append)
    assert any("training from scratch (its saved state is at epoch 4, not before 2)" in m for m in log)


@pytest.fixture
def tiny() -> dict:
    return yaml.safe_load((REPO / "tests" / "configs" / "tiny_halving.yaml").read_text())


def test_config_names_the_field_and_halving_keeps_the_grid_cell_ids(tiny):
    halving = load_study(tiny)
    grid_cfg = copy.deepcopy(tiny)
    del grid_cfg["tuning"]
    grid = load_study(grid_cfg)
    assert grid.cfg.tuning.strategy == "grid"
    ids = lambda s: [c.cell_id for c in s.tuning_cells("digits", "lora")]  # noqa: E731
    assert ids(halving) == ids(grid)  # the tuning block is no part of a cell's identity
    for bad, message in (({"eta": 1}, "tuning.eta: Input should be greater than or equal to 2"),
                         ({"min_epochs": 7}, "tuning.min_epochs: 7 exceeds train.epochs (6)"),
                         ({"strategy": "hyperband"}, "tuning.strategy: Input should be 'grid' or 'halving'")):  # fmt: skip
        with pytest.raises(InputError) as err:
            load_study({**tiny, "tuning": {**tiny["tuning"], **bad}})
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_selection_cost_in_training_images():
    from peft_core.halving import halving_selection, last_rung_cells
    from peft_core.select import grid_selection

    cells = [toycell.spec(lr=lr, epochs=6) for lr in (1e-3, 1e-2)]
    assert grid_selection([(c, {"n_train": 800}) for c in cells]) == {"strategy": "grid", "selection_images": 9600}
    assert grid_selection([(cells[0], {})])["selection_images"] is None  # a cell recorded before n_train
    rankings = [{"rung": 0, "epochs": 2, "images": 3200, "ranked": [{}, {}]},
                {"rung": 1, "epochs": 6, "images": 3200, "ranked": [{"dir": "a", "spec": {"epochs": 6}}]}]  # fmt: skip
    sel = halving_selection(rankings)
    assert sel["strategy"] == "halving" and sel["selection_images"] == 6400
    assert [(r["epochs"], r["configurations"]) for r in sel["rungs"]] == [(2, 2), (6, 1)]
    assert last_rung_cells(rankings) == ["a"]
    with pytest.raises(InputError, match="not the cells' full budget"):
        last_rung_cells([{**rankings[1], "epochs": 4}])


def test_a_preempted_rung_resumes_from_its_saved_state(tmp_path):
    """A state with no rung record at its epoch (a preemption, SIGTERM at an epoch end) is resumed,
    as run_cell always did; the rung then ends at its budget with the straight-through record."""
    toycell.write_inputs(tmp_path, n_train=64)
    cell = toycell.spec("lora", {"rank": 2}, epochs=4)
    log: list[str] = []
    train = _train(tmp_path, log)
    straight = run_rung([cell], 3, train, tmp_path / "a", "c1", tmp_path / "a.json", log.append)
    out = tmp_path / "b" / cell.dataset / cell.method / cell.cell_id
    train(cell, out, 1)  # what a preemption after epoch 1 leaves: resume.pt, no record
    assert (out / "resume.pt").is_file() and not rung_record_path(out, 1).exists()
    log.clear()
    resumed = run_rung([cell], 3, train, tmp_path / "b", "c1", tmp_path / "b.json", log.append)
    assert any(m.startswith("resumed from") and "at epoch 2" in m for m in log)
    assert resumed[0]["accuracy"] == straight[0]["accuracy"]
    a, b = (torch.load(d / cell.dataset / cell.method / cell.cell_id / "resume.pt", weights_only=True)
            for d in (tmp_path / "a", tmp_path / "b"))  # fmt: skip
    assert a["epoch"] == b["epoch"] == 3 and all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
