"""Preemption: SIGTERM saves the cell's state; rerunning resumes to the same result; kill -9 loses only the cell in progress."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from peft_core.packs import CELL_FILES, cell_path, read_code_stamp, reusable_metrics
from peft_core.results import METRICS, read_json

from .. import toycell

REPO = Path(__file__).resolve().parents[2]


def _cmd(cell, out):
    return [sys.executable, "-m", "peft_core.cli", *toycell.train_args(cell, out)]


def _pack_cmd(cells) -> list[str]:
    """`train-pack` of ``cells`` on the toy inputs (code stamp code.sha256, cells under cells/)."""
    return [sys.executable, "-m", "peft_core.cli", "train-pack", "--spec-json", *[c.canonical_json() for c in cells],
            "--train-data", "train.pt", "--eval-data", "eval.pt", "--checkpoint", "backbone.safetensors",
            "--code-stamp", "code.sha256", "--cells-root", "cells", "--manifest", "pack.json", "--threads", "1",
            "--device", "cpu"]  # fmt: skip


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


def _wait_for(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 120) -> str:
    """Poll ``log`` until ``ready(text)``; fail clearly if the process ends or the time runs out first."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text() if log.is_file() else ""
        if ready(text):
            return text
        if proc.poll() is not None:
            pytest.fail(f"the process ended ({proc.returncode}) before {what}:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"no {what} within {timeout:.0f} s:\n{text[-3000:]}")
        time.sleep(0.02)


def test_kill_9_mid_pack_leaves_nothing_that_looks_complete_and_the_rerun_reuses_the_finished_cell(tmp_path):
    """kill -9 while a pack's second cell trains, its first cell done: the state a preempted pack is left in."""
    toycell.write_inputs(tmp_path, n_train=512)
    (tmp_path / "code.sha256").write_text("abc  train.py\n")
    cells = [toycell.spec("lora", {"rank": 2}, epochs=6, lr=lr) for lr in (1e-2, 1e-3)]
    first, second = (cell_path(tmp_path / "cells", c) for c in cells)
    argv = _pack_cmd(cells)
    log = tmp_path / "pack.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=err, stderr=subprocess.STDOUT)

    def second_cell_training(text: str) -> bool:
        done = f"{cells[0].cell_id}: ok"  # the first cell's last log line, after all its files are written
        return done in text and "epoch 1/6" in text.split(done, 1)[1]

    _wait_for(proc, log, second_cell_training, "the second cell's first epoch after the first cell finished")
    proc.kill()
    proc.wait(timeout=60)
    assert (first / METRICS).is_file(), "the first cell's metrics.json is missing: nothing finished was interrupted"
    stamp = (first / METRICS).stat().st_mtime_ns

    # outputs are written to temporary names and renamed, metrics.json last, and the manifest after every cell
    assert not (tmp_path / "pack.json").exists()
    assert all((first / name).is_file() for name in CELL_FILES)
    left = sorted(p.name for p in second.iterdir()) if second.exists() else []
    assert not set(CELL_FILES) & set(left), left
    assert reusable_metrics(second, cells[1], read_code_stamp(tmp_path / "code.sha256")) is None

    again = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    rows = read_json(tmp_path / "pack.json")["cells"]
    assert [(r["cell"], r["reused"], r["status"]) for r in rows] == [
        (cells[0].cell_id, True, "ok"), (cells[1].cell_id, False, "ok")]  # fmt: skip
    assert (first / METRICS).stat().st_mtime_ns == stamp  # not retrained
    assert all((second / name).is_file() for name in CELL_FILES)


def test_usr1_before_training_starts_is_kept_for_the_first_epoch_end(tmp_path):
    """SLURM's ``--signal=USR1@120`` may come while a pack still loads: it must not end the process
    (SIGUSR1's default action) with nothing saved, but save the state at the first epoch end."""
    toycell.write_inputs(tmp_path, n_train=512)
    (tmp_path / "code.sha256").write_text("abc  train.py\n")
    cell = toycell.spec("lora", {"rank": 2}, epochs=6)
    argv = _pack_cmd([cell])
    log = tmp_path / "pack.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=err, stderr=subprocess.STDOUT)
    text = _wait_for(proc, log, lambda t: "training (not trained yet)" in t, "the pack's first log line")
    assert "epoch 1/" not in text, "the cell trained before the signal could be sent: make it slower"
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75, log.read_text()
    text = log.read_text()
    assert "epoch 1/6" in text and "preempted: state saved" in text and "epoch 2/6" not in text
    assert (cell_path(tmp_path / "cells", cell) / "resume.pt").is_file()
    again = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr
