"""The demo's upstream pre-training: deterministic to the byte, and its accuracies readable without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from peft_core.demo import NO_LABEL, UPSTREAM_ATTRIBUTES, upstream_metadata, upstream_task

BACKBONE = {
    "model": "vit_tiny_patch16_224",
    "checkpoint": "unused.safetensors",
    "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
    "pretrain": {"images": 300, "epochs": 1, "lr": 0.001, "batch_size": 128, "seed": 0},
}


def _pretrain(out) -> None:
    """In a fresh process each time: safetensors orders its metadata map per process."""
    cmd = [sys.executable, "-m", "peft_core.cli", "pretrain-demo", "--backbone-json", json.dumps(BACKBONE),
           "--out", str(out), "--threads", "1"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)


def test_two_processes_write_the_same_bytes_and_the_header_reads_back(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _pretrain(a)
    _pretrain(b)
    assert a.read_bytes() == b.read_bytes()
    meta = upstream_metadata(a)
    assert meta is not None and meta["images"] == 300
    assert set(meta["accuracy"]) == {*UPSTREAM_ATTRIBUTES, "mean"}
    assert all(0.0 <= v <= 1.0 for v in meta["accuracy"].values())


def test_upstream_task_labels_every_attribute_and_only_patterned_backgrounds_have_an_orientation():
    images, labels = upstream_task(400, seed=0)
    assert images.shape == (400, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (400, len(UPSTREAM_ATTRIBUTES))
    names = list(UPSTREAM_ATTRIBUTES)
    for j, (name, n) in enumerate(UPSTREAM_ATTRIBUTES.items()):
        seen = set(labels[:, j]) - {NO_LABEL}
        assert seen == set(range(n)), name
    flat_or_blocks = np.isin(labels[:, names.index("background")], [0, 3])
    assert (labels[flat_or_blocks, names.index("bg_orientation")] == NO_LABEL).all()
    assert (labels[~flat_or_blocks, names.index("bg_orientation")] != NO_LABEL).all()
    again_images, again_labels = upstream_task(400, seed=0)
    assert np.array_equal(images, again_images) and np.array_equal(labels, again_labels)


def test_other_checkpoints_have_no_upstream_metadata(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    assert upstream_metadata(tmp_path / "plain.safetensors") is None
    assert upstream_metadata(tmp_path / "missing.safetensors") is None
