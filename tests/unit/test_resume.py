"""Preemption: SIGTERM saves the cell's state; rerunning resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd

from .. import toycell

REPO = Path(__file__).resolve().parents[2]


def _cmd(cell, out):
    return [sys.executable, "-m", "peft_core.cli", *toycell.train_args(cell, out)]


def _env():
    """This checkout's peft_core, run in-process (no fork server)."""
    env = {k: v for k, v in os.environ.items() if k != "PEFT_CORE_SERVER"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_sigterm_saves_state_and_rerun_resumes_bit_identically(tmp_path):
    toycell.write_inputs(tmp_path, n_train=512)
    cell = toycell.spec("lora", {"rank": 2}, epochs=6)
    done = subprocess.run(_cmd(cell, "uninterrupted"), cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    proc = subprocess.Popen(_cmd(cell, "cell"), cwd=tmp_path, env=_env(), stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("epoch 1/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 75, rest
    assert "preempted: state saved" in rest
    assert (tmp_path / "cell" / "resume.pt").is_file() and not (tmp_path / "cell" / "metrics.json").exists()

    again = subprocess.run(_cmd(cell, "cell"), cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr
    assert not (tmp_path / "cell" / "resume.pt").exists()
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("uninterrupted", "cell"))
    assert a["final_train_loss"] == b["final_train_loss"] and a["accuracy"] == b["accuracy"]
    pa, pb = (pd.read_parquet(tmp_path / d / "predictions.parquet") for d in ("uninterrupted", "cell"))
    assert pa["logits"].map(list).tolist() == pb["logits"].map(list).tolist()  # bit-identical on CPU


def test_kill_9_mid_cell_leaves_nothing_that_looks_complete(tmp_path):
    toycell.write_inputs(tmp_path, n_train=512)
    cell = toycell.spec("lora", {"rank": 2}, epochs=6)
    proc = subprocess.Popen(_cmd(cell, "cell"), cwd=tmp_path, env=_env(), stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("epoch 1/"):
            proc.kill()
            break
    proc.wait(timeout=60)
    left = sorted(p.name for p in (tmp_path / "cell").glob("*")) if (tmp_path / "cell").exists() else []
    # outputs are written to temporary names and renamed at the very end
    assert not {"metrics.json", "predictions.parquet", "spec.json", "trainable.safetensors"} & set(left), left
