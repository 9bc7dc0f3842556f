"""Tuning packs: grouping, ids, and reuse of finished cells by spec and code."""

from __future__ import annotations

import os

import pytest

from peft_core.cli import main
from peft_core.packs import cell_path, group_into_packs, pack_id, reusable_metrics, run_pack
from peft_core.results import METRICS, read_json, write_json

from .. import toycell


def test_packs_group_the_optimiser_grid_of_each_configuration():
    cells = [toycell.spec("lora", {"rank": r}, lr=lr, weight_decay=wd)
             for r in (1, 2) for lr in (1e-3, 1e-2) for wd in (1e-4, 1e-3)]  # fmt: skip
    packs = group_into_packs(cells)
    assert [len(p) for p in packs] == [4, 4]
    assert [c.hparams["rank"] for c in packs[1]] == [2, 2, 2, 2]
    assert pack_id(packs[0]) != pack_id(packs[1]) and len(pack_id(packs[0])) == 10
    assert pack_id(packs[0]) != pack_id(packs[0][:3])  # a pack's id names exactly its cells


def _fake_train(calls):
    def train(spec, out):
        calls.append(spec.cell_id)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("spec.json", "predictions.parquet", "trainable.safetensors"):
            (out / name).write_text("x")
        metrics = {"cell": spec.cell_id, "code": "c1", "status": "ok", "accuracy": 0.5}
        write_json(out / METRICS, metrics)
        return metrics

    return train


def test_run_pack_reuses_finished_cells_and_retrains_on_new_code(tmp_path):
    cells = [toycell.spec(lr=lr) for lr in (1e-3, 1e-2)]
    calls: list[str] = []
    rows = run_pack(cells, _fake_train(calls), tmp_path / "cells", "c1", tmp_path / "p.json", print)
    assert calls == [c.cell_id for c in cells] and not any(r["reused"] for r in rows)
    grown = cells + [toycell.spec(lr=1e-1)]  # an lr added to the grid: a new pack
    calls.clear()
    rows = run_pack(grown, _fake_train(calls), tmp_path / "cells", "c1", tmp_path / "q.json", print)
    assert calls == [grown[2].cell_id] and [r["reused"] for r in rows] == [True, True, False]
    assert read_json(tmp_path / "q.json")["pack"] == pack_id(grown)
    assert reusable_metrics(cell_path(tmp_path / "cells", cells[0]), cells[0], "c2") is None  # other code: retrain
    (cell_path(tmp_path / "cells", cells[1]) / "predictions.parquet").unlink()
    assert reusable_metrics(cell_path(tmp_path / "cells", cells[1]), cells[1], "c1") is None  # a file missing: retrain


def test_train_pack_cli_end_to_end(tmp_path, monkeypatch):
    toycell.write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PEFT_CORE_SERVER", raising=False)
    (tmp_path / "code.sha256").write_text("abc  train.py\n")
    cells = [toycell.spec(epochs=1, lr=lr) for lr in (1e-3, 1e-2)]
    argv = ["train-pack", "--spec-json", *[c.canonical_json() for c in cells], "--train-data", "train.pt",
            "--eval-data", "eval.pt", "--checkpoint", "backbone.safetensors", "--code-stamp", "code.sha256",
            "--cells-root", "cells", "--manifest", "pack.json", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    first = read_json(tmp_path / "pack.json")
    assert [r["cell"] for r in first["cells"]] == [c.cell_id for c in cells]
    stamp = os.stat(tmp_path / first["cells"][0]["dir"] / METRICS).st_mtime_ns
    assert main(argv) == 0  # rerun: both reused, nothing rewritten
    assert all(r["reused"] for r in read_json(tmp_path / "pack.json")["cells"])
    assert os.stat(tmp_path / first["cells"][0]["dir"] / METRICS).st_mtime_ns == stamp


def test_train_pack_refuses_a_missing_input_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PEFT_CORE_SERVER", raising=False)
    argv = ["train-pack", "--spec-json", toycell.spec().canonical_json(), "--train-data", "missing.pt",
            "--eval-data", "e.pt", "--cells-root", "c", "--manifest", "m.json"]  # fmt: skip
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("missing.pt: file not found")
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "c").exists()


def test_train_pack_from_a_selection_trains_one_final_cell_per_seed(tmp_path, monkeypatch, capsys):
    toycell.write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PEFT_CORE_SERVER", raising=False)
    chosen = toycell.spec(epochs=1, lr=1e-2)
    write_json(tmp_path / "selection.json", {"chosen": chosen.cell_id, "chosen_spec": chosen.model_dump(mode="json")})
    argv = ["train-pack", "--selection", "selection.json", "--final-seeds", "0", "1", "--final-train", "trainval",
            "--final-eval", "test", "--train-data", "train.pt", "--eval-data", "eval.pt",
            "--checkpoint", "backbone.safetensors", "--cells-root", "cells", "--manifest", "finals.json",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    rows = read_json(tmp_path / "finals.json")["cells"]
    specs = [read_json(tmp_path / r["dir"] / "spec.json") for r in rows]
    assert [(s["seed"], s["train_split"], s["eval_split"], s["lr"]) for s in specs] == [
        (0, "trainval", "test", 1e-2), (1, "trainval", "test", 1e-2)]  # fmt: skip
    assert len({r["cell"] for r in rows}) == 2 and chosen.cell_id not in {r["cell"] for r in rows}

    (tmp_path / "bad.json").write_text('{"chosen": "x"}')
    assert main([*argv[:2], "bad.json", *argv[3:]]) != 0
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("bad.json: not a selection file (no chosen_spec)")
