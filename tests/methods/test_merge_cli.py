"""``peft-core merge``: a trained cell becomes a checkpoint plain timm loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peft_core.errors import InputError
from peft_core.merge import merge_cell
from peft_core.train import run_cell

from .. import toycell

# Loads the merged file with timm + safetensors only (no peft_core import).
PLAIN_TIMM = """
import json, sys, timm, torch
from safetensors.torch import load_file
kwargs = json.loads(sys.argv[2])
m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **kwargs)
m.load_state_dict(load_file(sys.argv[1]), strict=True)
images = torch.load(sys.argv[3], weights_only=True)["images"].float() / 255
print(json.dumps(m.eval()(images).argmax(1).tolist()))
assert "peft_core" not in sys.modules
"""


@pytest.mark.parametrize("method, hp", [("lora", {"rank": 2, "targets": ["q", "v", "fc1"]}), ("bitfit", {})])
def test_merged_cell_loads_in_plain_timm_and_predicts_the_same(tmp_path, monkeypatch, method, hp):
    monkeypatch.chdir(tmp_path)
    toycell.write_inputs(tmp_path)
    cell = toycell.spec(method, hp)
    run_cell(cell, "train.pt", "eval.pt", "backbone.safetensors", "cell", threads=1, device="cpu", log=lambda m: None)
    info = merge_cell("cell", tmp_path / "merged.safetensors")
    assert info["max_abs_diff"] <= 1e-5
    import pandas as pd

    preds = pd.read_parquet(tmp_path / "cell" / "predictions.parquet")["pred"].tolist()
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_TIMM, "merged.safetensors", json.dumps(cell.backbone.kwargs), "eval.pt"],
        capture_output=True, text=True, cwd=tmp_path, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout) == preds


def test_non_mergeable_method_says_so(tmp_path, monkeypatch):
    from peft_core.methods import get_method

    assert not get_method("vpt_deep").mergeable
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / "spec.json").write_text(toycell.spec("vpt_deep", {}).canonical_json())
    with pytest.raises(InputError, match="vpt_deep: not mergeable"):
        merge_cell("cell", tmp_path / "x.safetensors")


def _broken(method):
    """``method`` with a merge that folds the delta in slightly wrong (scaled by 1.001)."""
    import dataclasses

    import torch

    def merge(model):
        merged = method.merge(model)
        with torch.no_grad():
            merged.blocks[0].attn.qkv.weight.mul_(1.001)
        return merged

    return dataclasses.replace(method, merge=merge)


def test_merge_that_changes_outputs_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import peft_core.merge
    from peft_core.cli import main
    from peft_core.methods import get_method

    monkeypatch.chdir(tmp_path)
    toycell.write_inputs(tmp_path)
    cell = toycell.spec("lora", {"rank": 2, "targets": ["q", "v"]})
    run_cell(cell, "train.pt", "eval.pt", "backbone.safetensors", "cell", threads=1, device="cpu", log=lambda m: None)
    monkeypatch.setattr(peft_core.merge, "get_method", lambda name: _broken(get_method(name)))
    with pytest.raises(InputError, match=r"^cell: merged lora model's outputs differ .* by \S+ \(max abs"):
        merge_cell("cell", tmp_path / "merged.safetensors")
    # the CLI: one line, exit status 2, no file (not even a temporary one)
    assert main(["merge", "--cell", "cell", "--out", "merged.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-core: error: cell: merged lora model's outputs differ") and err.count("\n") == 1
    assert not [p.name for p in tmp_path.iterdir() if "merged" in p.name]
