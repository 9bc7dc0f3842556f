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


# ------------------------------------------------------------------ noise-aware promotion


def _ranked(accs: list[float], statuses: list[str] | None = None) -> list[dict]:
    statuses = statuses or ["ok"] * len(accs)
    return [{"cell": f"c{i}", "accuracy": a, "status": s, "spec": {"i": i}} for i, (a, s) in enumerate(zip(accs, statuses))]


def test_within_noise_is_the_wald_interval_of_a_difference_of_two_accuracies():
    from peft_core.halving import within_noise

    # p = 0.8 and 0.75 on 200 images: se = sqrt((0.16 + 0.1875) / 200) = 0.04169; 0.05 is 1.20 se
    assert within_noise(0.8, 0.75, 200, 1.96) and within_noise(0.8, 0.75, 200, 1.2)
    assert not within_noise(0.8, 0.75, 200, 1.19)
    assert within_noise(1.0, 0.99, 200, 1.96)  # a perfect best still has the other's variance
    assert within_noise(0.5, 0.5, 200, 0.0) and not within_noise(0.5, 0.495, 200, 0.0)  # z 0: ties only


def test_noise_aware_promotion_keeps_the_top_and_everything_within_noise_of_the_best():
    from peft_core.halving import promotions

    ranked = _ranked([0.80, 0.78, 0.76, 0.60, 0.59, float("nan")], ["ok"] * 5 + ["diverged"])
    assert promotions(ranked, 2) == 2  # plain halving: the planned room
    assert promotions(ranked, 6, eta=3, z=1.96, n_eval=200) == 3  # 0.76 is 1.0 se behind; 0.60 is 4.3 se
    assert promotions(ranked, 6, eta=2, z=1.96, n_eval=200) == 3  # the top ceil(6 / 2) = 3 in any case
    assert promotions(ranked, 6, eta=3, z=100.0, n_eval=200) == 5  # everything but the diverged one
    assert promotions(ranked, 4, eta=3, z=100.0, n_eval=200) == 4  # never beyond the plan's room
    assert promotions(ranked, 6, eta=3, z=0.0, n_eval=200) == 2  # z 0: the top ceil(6 / 3) (and ties)
    assert promotions(_ranked([0.5, 0.5, 0.5, 0.1]), 4, eta=4, z=0.0, n_eval=200) == 3  # ties with the best
    with pytest.raises(InputError, match="needs eta and the validation split's size"):
        promotions(ranked, 6, z=1.96)


def test_noise_aware_plan_has_room_for_every_configuration_and_unused_slots_give_no_spec():
    cells = [toycell.spec("lora", {"rank": r}, lr=lr) for r in (1, 2, 4) for lr in (1e-3, 1e-2)]
    r0, r1, r2 = plan_rungs(group_into_packs(cells), eta=2, min_epochs=1, epochs=4, noise_aware=True)
    assert (r0.size, r0.promote, r1.size, r1.parts, r1.promote, r2.size, r2.promote) == (
        6, 6, 6, ("c0", "c1", "c2"), 6, 6, 0)  # fmt: skip
    ranking = {"rung": 0, "capacity": 6, "promote": 3, "ranked": _ranked([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])}
    assert promoted_specs(ranking, 2, 4) == [{"i": 2}] and promoted_specs(ranking, 4, 6) == []
    with pytest.raises(InputError, match="beyond its 6 promoted"):
        promoted_specs(ranking, 6, 8)


def test_ranking_file_records_room_promotions_and_the_rule(tmp_path):
    from peft_core.halving import halving_selection, ranking
    from peft_core.results import write_json

    rows = []
    for i, acc in enumerate([0.80, 0.79, 0.50, 0.40]):
        write_json(tmp_path / f"r{i}.json", {"accuracy": acc, "status": "ok", "eval_split": "val200", "n_train": 10})
        rows.append({"cell": f"c{i}", "dir": f"d{i}", "record": str(tmp_path / f"r{i}.json"),
                     "spec": {"eval_split": "val200", "dataset": "toy", "method": "lora"}})  # fmt: skip
    write_json(tmp_path / "m.json", {"budget": 2, "code": None, "cells": rows})
    write_json(tmp_path / "empty.json", {"budget": 2, "code": None, "cells": []})  # a chunk nobody was promoted to
    r = ranking([tmp_path / "m.json", tmp_path / "empty.json"], "val200", 1, 1, 4, eta=4, keep_within_se=1.96, n_eval=200)
    assert (r["capacity"], r["promote"], r["keep_within_se"], r["n_eval"], r["images"]) == (4, 2, 1.96, 200, 40)
    plain = ranking([tmp_path / "m.json"], "val200", 1, 1, 1)
    assert (plain["capacity"], plain["promote"], plain["keep_within_se"]) == (1, 1, None)
    assert halving_selection([r])["keep_within_se"] == 1.96 and halving_selection([plain])["keep_within_se"] is None


def test_config_allows_noise_aware_promotion_only_with_halving(tiny):
    assert load_study({**tiny, "tuning": {**tiny["tuning"], "keep_within_se": 1.96}}).cfg.tuning.keep_within_se == 1.96
    for tuning, message in (({"strategy": "grid", "keep_within_se": 1.0}, "tuning.keep_within_se: only with"),
                            ({**tiny["tuning"], "keep_within_se": -1}, "tuning.keep_within_se: Input should be greater")):  # fmt: skip
        with pytest.raises(InputError) as err:
            load_study({**tiny, "tuning": tuning})
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_chunk_nobody_was_promoted_to_writes_an_empty_manifest_and_trains_nothing(tmp_path, capsys):
    from peft_core.cli import main
    from peft_core.results import write_json

    toycell.write_inputs(tmp_path)
    ranking = {"rung": 0, "capacity": 4, "promote": 1, "ranked": [{"spec": toycell.spec().model_dump(mode="json")}]}
    write_json(tmp_path / "r0.json", ranking)
    out = tmp_path / "r1" / "c1.json"
    assert main(["train-pack", "--ranking", str(tmp_path / "r0.json"), "--slots", "2", "4", "--budget", "2",
                 "--train-data", str(tmp_path / "train.pt"), "--eval-data", str(tmp_path / "eval.pt"),
                 "--checkpoint", str(tmp_path / "backbone.safetensors"), "--cells-root", str(tmp_path / "cells"),
                 "--manifest", str(out), "--device", "cpu"]) == 0  # fmt: skip
    assert read_json(out) == {"budget": 2, "code": None, "cells": []} and not (tmp_path / "cells").exists()
    assert "no configuration promoted to slots 2..3" in capsys.readouterr().out
