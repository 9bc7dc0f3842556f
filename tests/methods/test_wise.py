"""WiSE-FT: alpha=0 is the pre-trained backbone, alpha=1 the fine-tuned model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from peft_core import backbones
from peft_core.data import load_split
from peft_core.errors import InputError
from peft_core.train import evaluate, run_cell
from peft_core.wise import head_keys, interpolate, wise_curve

from .. import toycell


def test_interpolate_is_linear_and_keeps_unpaired_tensors():
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2), "head.weight": torch.full((2,), 3.0)}
    out = interpolate(a, b, 0.25)
    assert torch.equal(out["w"], torch.full((2,), 0.25)) and torch.equal(out["head.weight"], b["head.weight"])


@pytest.mark.parametrize("method, hp", [("lora", {"rank": 2}), ("full", {})])
def test_wise_endpoints(tmp_path, monkeypatch, method, hp):
    monkeypatch.chdir(tmp_path)
    toycell.write_inputs(tmp_path)
    cell = toycell.spec(method, hp, lr=1e-2 if method == "lora" else 1e-3)
    run_cell(cell, "train.pt", "eval.pt", "backbone.safetensors", "cell", threads=1, device="cpu", log=lambda m: None)
    rows = wise_curve("cell", {"id": "eval.pt"}, [0.0, 0.5, 1.0])
    acc = {r["alpha"]: r["accuracy"] for r in rows}
    # alpha = 1: the fine-tuned cell's own accuracy
    tuned = pd.read_parquet(tmp_path / "cell" / "predictions.parquet")
    assert acc[1.0] == pytest.approx((tuned.pred == tuned.label).mean())
    # alpha = 0: the pre-trained backbone with the fine-tuned head
    from safetensors.torch import load_file

    plain = backbones.build(cell.backbone.model, "backbone.safetensors", 3, 0.0, cell.backbone.kwargs)
    trained = load_file("cell/trainable.safetensors")
    plain.load_state_dict({k: v for k, v in trained.items() if k in head_keys(plain)}, strict=False)
    split = load_split("eval.pt")
    expected = (evaluate(plain, cell, split.images).argmax(1) == split.labels).float().mean().item()
    assert acc[0.0] == pytest.approx(expected)


def test_wise_refuses_non_mergeable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toycell.write_inputs(tmp_path)
    cell = toycell.spec("vpt_deep", {"num_prompts": 2})
    run_cell(cell, "train.pt", "eval.pt", "backbone.safetensors", "cell", threads=1, device="cpu", log=lambda m: None)
    with pytest.raises(InputError, match="mergeable"):
        wise_curve("cell", {"id": "eval.pt"}, [0.5])
