"""The fork server: forwarded commands behave exactly like in-process ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peft_core.config import BackboneSpec, CellSpec
from peft_core.data import save_atomic

from ..methods.checks import TINY, tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    sock = tmp / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "peft_core.cli", "serve", "--socket", str(sock), "--idle-timeout", "120"],
        cwd=REPO,
    )
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    yield sock
    proc.terminate()
    proc.wait(timeout=10)


def peft(args: list[str], server: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PEFT_CORE_SERVER"}
    if server is not None:
        env["PEFT_CORE_SERVER"] = str(server)
    return subprocess.run([sys.executable, "-m", "peft_core.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_input_error_is_forwarded_with_exit_status(server, tmp_path):
    out = peft(["train", "--spec", "missing.json", "--train-data", "x", "--eval-data", "y", "--out", "o"], server, tmp_path)
    assert out.returncode != 0
    assert "missing.json" in out.stderr


def test_forwarded_cell_equals_in_process_cell(server, tmp_path):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 64), ("eval", 32)):
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        save_atomic({"images": images, "labels": torch.arange(n) % 3}, tmp_path / f"{split}.pt")
    state = {k: v for k, v in tiny_model("vit").state_dict().items() if not k.startswith("head.")}
    save_file(state, str(tmp_path / "backbone.safetensors"))
    spec = CellSpec(
        dataset="toy", num_classes=3, train_split="train800", eval_split="val200", image_size=32, normalize="none",
        backbone=BackboneSpec(model="vit_tiny_patch16_224", checkpoint="backbone.safetensors", kwargs=TINY),
        method="lora", hparams={"rank": 2}, lr=1e-2, weight_decay=1e-4, epochs=2, warmup_epochs=1,
        warmup_lr_init=1e-6, lr_min=1e-5, batch_size=16, eval_batch_size=64, drop_path=0.1, seed=0,
    )  # fmt: skip
    runs = {}
    for name, sock in (("direct", None), ("served", server)):
        args = ["train", "--spec-json", spec.canonical_json(), "--train-data", "train.pt", "--eval-data", "eval.pt"]
        args += ["--checkpoint", "backbone.safetensors", "--out", name, "--threads", "1", "--device", "cpu"]
        out = peft(args, sock, tmp_path)
        assert out.returncode == 0, out.stderr
        assert "acc" in out.stderr  # the child's stderr reached the client's
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["direct"]["accuracy"] == runs["served"]["accuracy"]
    assert runs["direct"]["final_train_loss"] == runs["served"]["final_train_loss"]
