"""Cached frozen features for the linear probe (peft_core/features.py).

The head trained on cached features is the head trained on the images, bit for
bit, on CPU in fp32 (and under CPU bf16 autocast): same weights, logits, losses
and accuracy. The cache's
content key follows the split's content and the checkpoint's bytes; a cell
refuses a stale or corrupt file in one line naming it.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_core import cli
from peft_core.errors import InputError
from peft_core.features import (
    code_checksum,
    content_key,
    expected_key,
    extract,
    feature_spec,
    model_reason,
    plan_reason,
    read_features,
)
from peft_core.fingerprint import cell_inputs
from peft_core.packs import reuse_verdict
from peft_core.results import read_json, write_torch
from peft_core.train import build_model, run_cell

from .. import toycell
from ..methods.checks import TINY


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PEFT_CORE_SERVER", raising=False)
    toycell.write_inputs(tmp_path, n_train=72, n_eval=40)
    torch.set_num_threads(1)
    return tmp_path


def _linear(norm="none", **kw):
    fields = dict(epochs=3, drop_path=0.0, lr=0.05, batch_size=16, eval_batch_size=16)
    fields.update(kw)
    return toycell.spec("linear", {"norm": norm}, **fields)


def _extract(cell):
    paths = []
    for split, data in ((cell.train_split, "train.pt"), (cell.eval_split, "eval.pt")):
        out = f"features_{split}.safetensors"
        extract(feature_spec(cell, split), data, "backbone.safetensors", out, device="cpu", log=lambda _m: None)
        paths.append(out)
    return tuple(paths)


def _run(cell, out, features=None):
    return run_cell(cell, "train.pt", "eval.pt", "backbone.safetensors", out, device="cpu", log=lambda _m: None,
                    features=features)  # fmt: skip


@pytest.mark.parametrize(
    "cell",
    [_linear("none"), _linear("batchnorm"), _linear("none", schedule="reference_epoch", warmup_epochs=1, epochs=3),
     _linear("batchnorm", precision="bf16")],  # fmt: skip
    ids=["plain-head", "batchnorm-head", "reference-schedule", "bf16-autocast"],
)
def test_head_on_cached_features_equals_head_on_images(toy, cell):
    features = _extract(cell)
    images, cached = _run(cell, "images"), _run(cell, "cached", features)
    assert not images["feature_cache"] and cached["feature_cache"]
    for key in ("accuracy", "final_train_loss", "final_train_accuracy", "trainable_params", "head_params",
                "trainable_tensors", "status"):  # fmt: skip
        assert images[key] == cached[key], key
    # bit-identical: every trained tensor (head weight, bias, BatchNorm running statistics) and every logit
    a, b = load_file("images/trainable.safetensors"), load_file("cached/trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = pd.read_parquet("images/predictions.parquet"), pd.read_parquet("cached/predictions.parquet")
    assert (pa["pred"] == pb["pred"]).all() and all((x == y).all() for x, y in zip(pa["logits"], pb["logits"]))
    assert cached["accuracy"] > 0  # it learned something (3 classes, 40 images)


def test_rows_do_not_depend_on_the_batch(toy):
    cell = _linear()
    (train, _) = _extract(cell)
    _, _, feats, labels = read_features(train)
    assert feats.shape == (72, 64) and torch.equal(labels, torch.arange(72) % 3)
    model = build_model(cell, "backbone.safetensors", torch.device("cpu")).train()
    seen = []
    model.head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.load("train.pt", weights_only=True)["images"]
    idx = torch.randperm(72)[:16]
    model(x[idx].float() / 255)  # a training batch, in train mode
    assert torch.equal(seen[0], feats[idx])


def test_key_follows_split_content_and_checkpoint_bytes(toy):
    cell = _linear()
    fspec = feature_spec(cell, "train800")
    key = expected_key(fspec, "train.pt", "backbone.safetensors")
    assert key == expected_key(fspec, "train.pt", "backbone.safetensors")
    assert expected_key(fspec, "eval.pt", "backbone.safetensors") != key  # other images
    data = torch.load("train.pt", weights_only=True)
    data["labels"] = data["labels"].roll(1)  # one change: the labels
    write_torch(toy / "relabelled.pt", data)
    assert expected_key(fspec, "relabelled.pt", "backbone.safetensors") != key
    state = load_file("backbone.safetensors")
    state["blocks.0.norm1.weight"] = state["blocks.0.norm1.weight"] + 1e-3
    save_file(state, "other.safetensors")
    assert expected_key(fspec, "train.pt", "other.safetensors") != key
    assert content_key(fspec, "a" * 64, "b" * 64, code_checksum()) != content_key(fspec, "a" * 64, "b" * 64, "x")
    # what the plan names the file by: the split, size, backbone and precision (not the optimiser grid)
    assert feature_spec(_linear(lr=0.1, norm="batchnorm"), "train800").key == fspec.key
    assert feature_spec(_linear(precision="bf16"), "train800").key != fspec.key
    assert feature_spec(cell, "val200").key != fspec.key
    # a stale file (made from other weights) is refused, naming it
    extract(fspec, "train.pt", "other.safetensors", "stale.safetensors", device="cpu", log=lambda _m: None)
    (_, ev) = _extract(cell)
    with pytest.raises(InputError, match=r"^stale\.safetensors: stale feature cache"):
        _run(cell, "c", ("stale.safetensors", ev))


def test_corrupt_or_foreign_file_is_a_one_line_error_naming_it(toy, capsys):
    cell = _linear(epochs=1)
    train, ev = _extract(cell)
    blob = (toy / train).read_bytes()
    (toy / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    (toy / "junk.safetensors").write_bytes(b"not a safetensors file")
    save_file({"features": torch.zeros(72, 64)}, "foreign.safetensors")  # no metadata, no labels
    for bad in ("cut.safetensors", "junk.safetensors", "foreign.safetensors"):
        assert cli.main(toycell.train_args(cell, "c") + ["--features", bad, ev]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"peft-core: error: {bad}: not a feature cache") and len(err.splitlines()) == 1, err
    assert cli.main(toycell.train_args(cell, "c") + ["--features", ev, train]) == 2  # the splits swapped
    assert "features of toy/val200" in capsys.readouterr().err
    assert cli.main(toycell.train_args(cell, "c") + ["--features", "missing.safetensors", ev]) == 2
    assert "missing.safetensors: feature cache not found" in capsys.readouterr().err
    assert not (toy / "c").exists()


def test_cli_records_the_files_and_reuse_follows_their_bytes(toy):
    cell = _linear(epochs=1)
    train, ev = _extract(cell)
    spec_json = feature_spec(cell, "train800").canonical_json()
    args = ["features", "--spec-json", spec_json, "--data", "train.pt", "--checkpoint", "backbone.safetensors",
            "--out", "again.safetensors", "--device", "cpu"]  # fmt: skip
    assert cli.main(args) == 0
    assert (toy / "again.safetensors").read_bytes() == (toy / train).read_bytes()  # deterministic bytes
    assert cli.main(toycell.train_args(cell, "cell") + ["--features", train, ev]) == 0
    metrics = read_json(toy / "cell" / "metrics.json")
    assert metrics["feature_cache"] and metrics["inputs"]["features"]["train"]["path"] == train
    base = ("train800", "train.pt", "val200", "eval.pt", "backbone.safetensors")
    assert reuse_verdict(toy / "cell", cell, None, cell_inputs(*base, features=(train, ev)))[1] == ""
    assert reuse_verdict(toy / "cell", cell, None, cell_inputs(*base))[1] == ""  # cache turned off: same result
    feats = load_file(train)
    feats["features"][0, 0] += 1
    meta = __import__("safetensors").safe_open(train, "pt").metadata()
    save_file(feats, train, metadata=meta)
    why = reuse_verdict(toy / "cell", cell, None, cell_inputs(*base, features=(train, ev)))[1]
    assert why == "train800 features changed"


def test_when_the_cache_applies():
    assert plan_reason(_linear()) is None
    assert "feature_cache is false" in plan_reason(_linear(), enabled=False)
    assert "trains more than the head" in plan_reason(toycell.spec("lora"))
    assert "drop_path 0.1" in plan_reason(_linear(drop_path=0.1))
    backbone = _linear().backbone.model_copy(update={"kwargs": dict(TINY, proj_drop_rate=0.1)})
    assert "proj_drop_rate" in plan_reason(_linear(backbone=backbone))
    model = build_model(_linear(drop_path=0.1), None, torch.device("cpu"))
    assert "drop-path" in model_reason(model)
    assert model_reason(build_model(_linear(), None, torch.device("cpu"))) is None
    assert "trains outside the head" in model_reason(build_model(toycell.spec("lora"), None, torch.device("cpu")))


def test_a_model_that_needs_the_images_falls_back_to_them(toy):
    cell = _linear(drop_path=0.1, epochs=1)  # planned without the cache; given one anyway
    features = _extract(cell)
    images, cached = _run(cell, "images"), _run(cell, "cached", features)
    assert not cached["feature_cache"] and images["accuracy"] == cached["accuracy"]
