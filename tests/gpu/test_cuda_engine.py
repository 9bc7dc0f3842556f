"""The engine on CUDA (``pytest -m gpu`` on a machine with a GPU; deselected by default)."""

from __future__ import annotations

import math

import pytest
import torch

from peft_core.packs import run_pack
from peft_core.results import read_json
from peft_core.train import run_cell

from .. import toycell

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("compile_", [False, True])
def test_cells_train_on_cuda_in_bf16(tmp_path, monkeypatch, compile_):
    toycell.write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    cells = [toycell.spec(epochs=2, lr=lr, compile=compile_) for lr in (1e-3, 1e-2)]

    def train(spec, out):
        return run_cell(spec, "train.pt", "eval.pt", "backbone.safetensors", out, device="cuda", code="c")

    rows = run_pack(cells, train, tmp_path / "cells", "c", tmp_path / "pack.json", print)
    for row in rows:
        m = read_json(f"{row['dir']}/metrics.json")
        assert m["device"].startswith("cuda") and m["precision"] == "bf16" and m["compiled"] is compile_
        assert m["status"] == "ok" and math.isfinite(m["accuracy"]) and m["peak_memory_mb"] > 0
