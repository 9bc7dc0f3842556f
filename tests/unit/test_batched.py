"""Batched packs (peft_core/batched.py): a pack's cells trained as one vmapped model.

Each batched cell equals the same cell trained alone: on this tiny random-weight
ViT on CPU in fp32, LoRA's weights and logits are bit-identical and BitFit's
differ by rounding (vmap sums the bias gradients in another order; Adam's
normalised step turns that into up to ~2e-4 on a weight whose gradient is ~0,
while the logits agree to ~2e-7); losses, status and accuracy are equal.
Cells the batched path does not cover train alone, and say why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from peft_core.batched import RESUME_BATCHED, cell_reason, run_batched, run_batched_pack, spec_reason, train_batched
from peft_core.cli import main
from peft_core.sections import PaceConfig
from peft_core.methods._common import freeze_all, unfreeze_head
from peft_core.preempt import Preempted
from peft_core.results import METRICS, read_json
from peft_core.train import build_model, run_cell, train

from .. import toycell
from ..methods.checks import tiny_model

#: measured max |batched - solo| (module docstring), with a margin
WEIGHT_ATOL, LOGIT_ATOL = 1e-3, 1e-5
GRID = [(1e-3, 1e-4), (1e-3, 1e-1), (1e-2, 1e-4), (3e-2, 1e-1)]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    return toycell.enter(tmp_path, monkeypatch, n_train=72, n_eval=40)


def _pack(method="lora", hparams=None, **kw):
    hparams = {"rank": 2, "dropout": 0.0} if hparams is None else hparams
    fields = dict(epochs=2, drop_path=0.0)
    fields.update(kw)
    return [toycell.spec(method, hparams, lr=lr, weight_decay=wd, **fields) for lr, wd in GRID]


def _outputs(cell_dir: Path):
    logits = np.stack(pd.read_parquet(cell_dir / "predictions.parquet").logits)
    return load_file(cell_dir / "trainable.safetensors"), logits


@pytest.mark.parametrize("method,hparams", [("lora", None), ("bitfit", {})], ids=["lora", "bitfit"])
def test_batched_cells_equal_solo_cells(toy, method, hparams):
    specs = _pack(method, hparams)
    quiet = lambda _m: None  # noqa: E731
    solo = [run_cell(s, "train.pt", "eval.pt", "backbone.safetensors", f"solo/{s.cell_id}", device="cpu", log=quiet)
            for s in specs]  # fmt: skip
    dirs = [Path("batched") / s.cell_id for s in specs]
    batched = run_batched(specs, dirs, "train.pt", "eval.pt", "backbone.safetensors", device="cpu", log=quiet)
    finals = []
    for spec, a, b, d in zip(specs, solo, batched, dirs):
        assert not a["batched"] and b["batched"] and b["batched_cells"] == len(specs)
        for key in ("accuracy", "status", "trainable_params", "trainable_tensors", "n_eval"):
            assert a[key] == b[key], key
        assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], abs=1e-6)
        (wa, la), (wb, lb) = _outputs(Path("solo") / spec.cell_id), _outputs(d)
        assert wa.keys() == wb.keys()
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= WEIGHT_ATOL
        assert float(np.abs(la - lb).max()) <= LOGIT_ATOL
        if method == "lora":  # measured bit-identical on CPU fp32
            assert all(torch.equal(wa[k], wb[k]) for k in wa) and np.array_equal(la, lb)
        finals.append(wb)
    # each cell trained with its own lr and weight decay: no two cells ended alike
    heads = [w["head.weight"] for w in finals]
    assert all(not torch.allclose(heads[i], heads[j]) for i in range(4) for j in range(i + 1, 4))


def _head_only(seed: int):
    model = tiny_model("vit", seed=seed)
    freeze_all(model)
    unfreeze_head(model)
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(40) % 5


def test_per_cell_seed_data_order_and_frozen_tensors(tmp_path):
    """Final-run cells differ in seed: each keeps its own init, data order and (here random,
    differing) frozen backbone, and equals its solo run."""
    x, y = _data()
    specs = [toycell.spec("linear", {}, epochs=2, drop_path=0.0, num_classes=5, seed=s, lr=lr)
             for s, lr in ((0, 1e-2), (1, 1e-3), (2, 1e-2))]  # fmt: skip
    solo = []
    for spec in specs:
        model = _head_only(spec.seed)
        solo.append((model, train(model, spec, x, y, lambda _m: None)))
    models = [_head_only(s.seed) for s in specs]
    resumes = [tmp_path / f"{i}.pt" for i in range(3)]
    outs = train_batched(models, specs, x, y, lambda _m: None, resumes, None, lambda c, o: None)
    for (ref, a), model, b in zip(solo, models, outs):
        assert (a.final_loss, a.final_accuracy, a.images) == (b.final_loss, b.final_accuracy, b.images)
        for p, q in zip(ref.parameters(), model.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert len({o.final_loss for o in outs}) == 3


def test_bf16_autocast_batched_cells_stay_within_bf16_rounding_of_solo(toy):
    """The GPU path's autocast under vmap, on CPU: measured up to 2.2e-2 on weights (lr 1e-2),
    5e-5 on losses, the same training accuracy."""
    x, y = _data()
    specs = [toycell.spec("lora", {"rank": 2, "dropout": 0.0}, epochs=2, drop_path=0.0, num_classes=5, lr=lr,
                          precision="bf16") for lr in (1e-3, 1e-2)]  # fmt: skip

    def build(spec):
        torch.manual_seed(spec.seed)
        return build_model(spec, "backbone.safetensors", torch.device("cpu"))

    solo = [(m, train(m, s, x, y, lambda _m: None)) for s in specs for m in [build(s)]]
    models = [build(s) for s in specs]
    outs = train_batched(models, specs, x, y, lambda _m: None, [toy / "a.pt", toy / "b.pt"], None, lambda c, o: None)
    for (ref, a), model, b in zip(solo, models, outs):
        assert b.final_loss == pytest.approx(a.final_loss, abs=5e-4)
        assert b.final_accuracy == a.final_accuracy
        # a weight whose gradient rounds to the other sign moves by ~2 lr per Adam step
        assert max(float((p - q).detach().abs().max()) for p, q in zip(ref.parameters(), model.parameters())) < 5e-2


def test_a_diverging_cell_stops_where_it_would_alone_and_spares_the_others(tmp_path):
    x, y = _data()
    specs = [toycell.spec("linear", {}, epochs=3, drop_path=0.0, num_classes=5, lr=lr) for lr in (1e-2, 1e30)]
    solo = [train(_head_only(0), s, x, y, lambda _m: None) for s in specs]
    finished: list = []
    resumes = [tmp_path / f"{i}.pt" for i in range(2)]
    outs = train_batched([_head_only(0) for _ in specs], specs, x, y, lambda _m: None, resumes, None,
                         lambda c, o: finished.append((c, o.status, o.diverged_epoch)))  # fmt: skip
    assert solo[1].status == "diverged" and finished == [(1, "diverged", solo[1].diverged_epoch)]
    assert [(o.status, o.diverged_epoch, o.images) for o in outs] == [
        (o.status, o.diverged_epoch, o.images) for o in solo]  # fmt: skip
    assert outs[0].final_loss == solo[0].final_loss


def test_a_preempted_batch_resumes_to_the_uninterrupted_result(tmp_path):
    x, y = _data()
    specs = [toycell.spec("linear", {}, epochs=3, drop_path=0.0, num_classes=5, lr=lr) for lr in (1e-2, 1e-3)]
    resumes = [tmp_path / f"{i}" / RESUME_BATCHED for i in range(2)]
    whole = [_head_only(0) for _ in specs]
    ref = train_batched(whole, specs, x, y, lambda _m: None, resumes, None, lambda c, o: None)
    cut = [_head_only(0) for _ in specs]
    with pytest.raises(Preempted):
        train_batched(cut, specs, x, y, lambda _m: None, resumes, {"hit": True}, lambda c, o: None)
    assert all(p.is_file() for p in resumes)
    again = [_head_only(0) for _ in specs]
    lines: list[str] = []
    outs = train_batched(again, specs, x, y, lines.append, resumes, None, lambda c, o: None)
    assert any("resumed the batch" in line and "epoch 2" in line for line in lines)
    for a, b, m, n in zip(ref, outs, whole, again):
        assert (a.final_loss, a.images) == (b.final_loss, b.images)
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), n.parameters()))


@pytest.mark.parametrize(
    "spec,why",
    [(toycell.spec(drop_path=0.1), "drop_path 0.1"),
     (toycell.spec(drop_path=0.0, hparams={"rank": 2}), "dropout (p=0.1)"),
     (toycell.spec("peft_adalora", {}, drop_path=0.0), "step hook"),
     (toycell.spec("sct", {"channels": 8}, drop_path=0.0), "prestep"),
     (toycell.spec(drop_path=0.0, hparams={"rank": 2, "dropout": 0.0}, pace=PaceConfig(sigma=0.1, weight=1.0)), "pace"),
     (toycell.spec(drop_path=0.0, hparams={"rank": 2, "dropout": 0.0}, compile=True), "compile")],  # fmt: skip
    ids=["drop-path", "lora-dropout", "step-hook", "prestep", "pace", "compile"],
)
def test_cells_outside_the_batched_scope_say_why(toy, spec, why):
    assert why in cell_reason(spec, "backbone.safetensors")


def test_a_head_only_cell_on_cached_features_trains_alone():
    assert "cached features" in spec_reason(toycell.spec("linear", {}, drop_path=0.0), features=True)


def _fake(calls, batched):
    def write(spec, out):
        out.mkdir(parents=True, exist_ok=True)
        for name in ("spec.json", "predictions.parquet", "trainable.safetensors"):
            (out / name).write_text("x")
        metrics = {"cell": spec.cell_id, "code": "c1", "status": "ok", "accuracy": 0.5, "batched": batched}
        (out / METRICS).write_text(__import__("json").dumps(metrics))
        return metrics

    def solo(spec, out):
        calls.append(("solo", spec.cell_id))
        return write(spec, out)

    def batch(specs, dirs):
        calls.append(("batched", tuple(s.cell_id for s in specs)))
        return [write(s, d) for s, d in zip(specs, dirs)]

    return solo, batch


def _never(spec):
    raise AssertionError(f"{spec.cell_id}: reusable cells need no model build")


def test_batched_pack_falls_back_logs_it_and_never_mixes_training_paths(tmp_path):
    specs = _pack()
    lines: list[str] = []
    calls: list = []
    args = (tmp_path / "cells", "c1", tmp_path / "p.json")
    solo, batch = _fake(calls, batched=False)
    rows = run_batched_pack(specs, solo, batch, lambda s: "lora dropout", *args, lines.append)
    assert calls == [("solo", s.cell_id) for s in specs] and not any(r["reused"] for r in rows)
    assert sum("training alone, not batched: lora dropout" in line for line in lines) == 4
    calls.clear()
    rows = run_batched_pack(specs, solo, batch, lambda s: "lora dropout", *args, print)
    assert calls == [] and all(r["reused"] for r in rows)  # trained alone, would train alone: reused

    # now within the batched scope (say a new code stamp): results trained alone are not reused
    lines.clear()
    solo, batch = _fake(calls, batched=True)
    rows = run_batched_pack(specs, solo, batch, lambda s: None, *args, lines.append)
    assert calls == [("batched", tuple(s.cell_id for s in specs))]
    assert all(r["trained_because"] == "trained alone" for r in rows)
    assert sum("training batched with 4 cells" in line for line in lines) == 4
    calls.clear()
    rows = run_batched_pack(specs, solo, batch, _never, *args, print)
    assert calls == [] and all(r["reused"] for r in rows)


def test_train_pack_cli_batched_flag(toy, capsys):
    cells = _pack(epochs=1)[:2] + [toycell.spec(epochs=1, lr=1e-2, drop_path=0.0)]  # the last: LoRA's default dropout 0.1
    argv = ["train-pack", "--spec-json", *[c.canonical_json() for c in cells], "--train-data", "train.pt",
            "--eval-data", "eval.pt", "--checkpoint", "backbone.safetensors", "--cells-root", "cells",
            "--manifest", "pack.json", "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--batched"]) == 0
    err = capsys.readouterr().err
    assert "training alone, not batched: blocks.0.attn.qkv.dropout is a dropout (p=0.1)" in err
    rows = read_json("pack.json")["cells"]
    assert [read_json(Path(r["dir"]) / METRICS)["batched"] for r in rows] == [True, True, False]
    assert [read_json(Path(r["dir"]) / METRICS).get("batched_cells") for r in rows] == [2, 2, None]
    assert main([*argv, "--batched"]) == 0
    assert all(r["reused"] for r in read_json("pack.json")["cells"])
    assert main(argv) == 0  # without the flag: the batched cells retrain alone, the solo one is reused
    assert [r["reused"] for r in read_json("pack.json")["cells"]] == [False, False, True]
    assert [read_json(Path(r["dir"]) / METRICS)["batched"] for r in read_json("pack.json")["cells"]] == [False] * 3
