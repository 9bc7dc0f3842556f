"""Cells are reused only when what they read is unchanged, by content (peft_core/fingerprint.py)."""

from __future__ import annotations

import multiprocessing
import os
import time

import torch

from peft_core.fingerprint import cell_inputs, changed_inputs, fingerprint
from peft_core.packs import cell_lock, cell_path, reuse_verdict, run_pack
from peft_core.results import METRICS, read_json, write_json, write_torch

from .. import toycell


def test_fingerprint_is_of_content_and_memoised_by_path_size_mtime(tmp_path):
    f, memo = tmp_path / "a.bin", tmp_path / "memo"
    f.write_bytes(b"one")
    first = fingerprint(f, memo)
    assert len(list(memo.iterdir())) == 1
    os.utime(f, ns=(time.time_ns() + 10**9,) * 2)  # touch: rehashed once, same digest
    assert fingerprint(f, memo) == first
    f.write_bytes(b"two")  # same path, other content
    os.utime(f, ns=(time.time_ns() + 2 * 10**9,) * 2)
    assert fingerprint(f, memo) != first
    # a stale memo for the same path is never trusted over a changed size/mtime
    saved = read_json(next(memo.iterdir()))
    assert saved["sha256"] == fingerprint(f) and saved["size"] == 3


def _inputs(tmp_path, memo=None):
    return cell_inputs("train800", tmp_path / "train.pt", "val200", tmp_path / "eval.pt",
                       tmp_path / "backbone.safetensors", memo)  # fmt: skip


def _fake_train(calls, inputs):
    def train(spec, out):
        calls.append(spec.cell_id)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("spec.json", "predictions.parquet", "trainable.safetensors"):
            (out / name).write_text("x")
        metrics = {"cell": spec.cell_id, "code": "c1", "status": "ok", "accuracy": 0.5, "inputs": inputs}
        write_json(out / METRICS, metrics)
        return metrics

    return train


def _run(tmp_path, cells, name):
    calls: list[str] = []
    inputs = _inputs(tmp_path, tmp_path / "memo")
    logs: list[str] = []
    run_pack(cells, _fake_train(calls, inputs), tmp_path / "cells", "c1", tmp_path / f"{name}.json", logs.append,
             inputs)  # fmt: skip
    return calls, logs


def test_changed_split_or_checkpoint_retrains_touch_does_not(tmp_path):
    toycell.write_inputs(tmp_path)
    cells = [toycell.spec(lr=lr) for lr in (1e-3, 1e-2)]
    calls, _ = _run(tmp_path, cells, "p1")
    assert len(calls) == 2
    # touch without change: nothing retrains
    for name in ("train.pt", "eval.pt", "backbone.safetensors"):
        os.utime(tmp_path / name, ns=(time.time_ns() + 10**9,) * 2)
    calls, logs = _run(tmp_path, cells, "p2")
    assert calls == [] and all("reused" in line for line in logs)
    # one label of the eval split changed: every cell reading it retrains, and the log says why
    data = torch.load(tmp_path / "eval.pt", weights_only=True)
    data["labels"][0] = (data["labels"][0] + 1) % 3
    write_torch(tmp_path / "eval.pt", data)
    calls, logs = _run(tmp_path, cells, "p3")
    assert calls == [c.cell_id for c in cells]
    assert all("training (val200 changed)" in line for line in logs)
    # other weights at the same checkpoint path: every cell retrains
    (tmp_path / "backbone.safetensors").write_bytes((tmp_path / "backbone.safetensors").read_bytes() + b" ")
    calls, logs = _run(tmp_path, cells, "p4")
    assert len(calls) == 2 and all("checkpoint changed" in line for line in logs)


def test_changed_inputs_names_each_difference():
    cur = {"train": {"split": "train800", "sha256": "a"}, "eval": {"split": "val200", "sha256": "b"},
           "checkpoint": {"path": "c.pt", "sha256": "c"}}  # fmt: skip
    assert changed_inputs(cur, cur) == []
    old = {**cur, "train": {"split": "train800", "sha256": "x"}, "checkpoint": {"sha256": "y"}}
    assert changed_inputs(old, cur) == ["train800 changed", "checkpoint changed"]
    assert changed_inputs(None, cur) == ["no input fingerprints recorded"]


def test_reuse_verdict_reasons(tmp_path):
    toycell.write_inputs(tmp_path)
    cell = toycell.spec()
    out = cell_path(tmp_path / "cells", cell)
    inputs = _inputs(tmp_path)
    assert reuse_verdict(out, cell, "c1", inputs) == (None, "not trained yet")
    _fake_train([], inputs)(cell, out)
    assert reuse_verdict(out, cell, "c1", inputs)[1] == ""
    assert reuse_verdict(out, cell, "c2", inputs) == (None, "code changed")
    (out / "predictions.parquet").unlink()
    assert reuse_verdict(out, cell, "c1", inputs) == (None, "outputs incomplete")


def _hold_lock(cell_dir, ready, release):
    with cell_lock(cell_dir, lambda m: None):
        ready.set()
        release.wait(30)


def test_second_writer_of_a_cell_waits_for_the_first(tmp_path):
    cell_dir = tmp_path / "cells" / "toy" / "lora" / "0123456789"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(cell_dir, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        logs: list[str] = []
        t0 = time.monotonic()
        ctx_timer = ctx.Process(target=lambda: (time.sleep(1.0), release.set()))
        ctx_timer.start()
        with cell_lock(cell_dir, logs.append):
            waited = time.monotonic() - t0
        ctx_timer.join()
        assert waited >= 0.9, "the second writer did not wait for the lock"
        assert logs and "another job is writing this cell" in logs[0]
    finally:
        release.set()
        holder.join(30)
