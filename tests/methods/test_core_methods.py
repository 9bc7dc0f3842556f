"""linear, full, bitfit and lora held to the shared method contract."""

from __future__ import annotations

import pytest
import torch

from peft_core.errors import InputError
from peft_core.methods import get_method

from . import checks as c

FAMILIES = list(c.BACKBONES)


@pytest.fixture(scope="module")
def vit_b16_params() -> int:
    return sum(p.numel() for n, p in c.vit_b16().named_parameters() if not n.startswith("head."))


@pytest.mark.parametrize("rank", [1, 8, 16])
def test_lora_vit_b16_count_is_36864_per_rank(rank):
    model = c.apply(c.vit_b16(), "lora", rank=rank)
    assert c.trainable_count(model) == 36_864 * rank


@pytest.mark.parametrize(
    "targets, per_rank",
    [
        (("q",), 12 * (768 + 768)),
        (("q", "v"), 12 * (768 + 2 * 768)),
        (("o",), 12 * (768 + 768)),
        (("fc1", "fc2"), 12 * ((768 + 3072) + (3072 + 768))),
    ],
)
def test_lora_target_selection_counts(targets, per_rank):
    model = c.apply(c.vit_b16(), "lora", rank=4, targets=targets)
    assert c.trainable_count(model) == 4 * per_rank


def test_full_counts_every_backbone_parameter(vit_b16_params):
    model = c.apply(c.vit_b16(), "full")
    assert c.trainable_count(model) == vit_b16_params == 85_798_656


def test_linear_trains_head_only():
    model = c.apply(c.vit_b16(), "linear")
    assert c.trainable_count(model) == 0


def test_bitfit_vit_b16_count():
    # 12 blocks x (2 LN + qkv 2304 + proj 768 + fc1 3072 + fc2 768 + LN biases 2x768) + patch 768 + final LN 768
    model = c.apply(c.vit_b16(), "bitfit")
    assert c.trainable_count(model) == 102_912


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name, hp", [("linear", {}), ("full", {}), ("bitfit", {}), ("lora", {"rank": 2})])
def test_gradients_reach_exactly_the_trainable_tensors(family, name, hp):
    model = c.apply(c.tiny_model(family), name, **hp)
    grads = c.check_gradients(model)
    assert all(n.startswith("head.") for n in grads) == (name == "linear")


def test_lora_gradients_only_on_lora_tensors():
    model = c.apply(c.tiny_model("vit"), "lora", rank=2, targets=("q", "v", "fc2"))
    names = set(c.check_gradients(model))
    assert names - {"head.weight", "head.bias"} == {
        f"blocks.{i}.{m}.{t}" for i in range(4) for m in ("attn.qkv", "mlp.fc2") for t in ("lora_a", "lora_b")
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_identity_at_init(family):
    c.check_identity_at_init(family, "lora", rank=4, targets=("q", "k", "v", "o", "fc1", "fc2"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "name, hp",
    [
        ("lora", {"rank": 4, "targets": ("q", "v", "o", "fc1")}),
        ("lora", {"rank": 2, "alpha": 8.0}),
        ("bitfit", {}),
        ("full", {}),
    ],
)
def test_merge_matches_unmerged(family, name, hp):
    c.check_merge(family, name, **hp)


@pytest.mark.parametrize("name, hp", [("lora", {"rank": 2}), ("bitfit", {}), ("full", {}), ("linear", {})])
def test_no_state_leaks_between_models(name, hp):
    c.check_no_leak(name, **hp)


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_is_not_mergeable_by_pretence(family):
    # linear changes nothing in the backbone: its merge is a real one, plain timm keys and the same logits
    c.check_merge(family, "linear")


@pytest.mark.parametrize(
    "name, hp, field",
    [
        ("lora", {"rank": 0}, "rank"),
        ("lora", {"targets": ("q", "x")}, "targets"),
        ("lora", {"rnak": 4}, "rnak"),
        ("bitfit", {"rank": 4}, "rank"),
    ],
)
def test_bad_hyper_parameters_name_the_field(name, hp, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        get_method(name).hparams(**hp)
    assert field in str(err.value)


def test_unknown_method_lists_known():
    with pytest.raises(InputError, match="unknown method 'lorax'.*lora"):
        get_method("lorax")


def test_parameter_table_in_docs_is_up_to_date():
    from pathlib import Path

    from peft_core.paramtable import render

    repo = Path(__file__).resolve().parents[2]
    assert (repo / "docs" / "method_params.md").read_text() == render(
        "vit_base_patch16_224", repo / "config" / "method_grids"
    ), "regenerate: peft-core param-table --out docs/method_params.md"


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_batchnorm_probe_trains_head_only_and_folds_into_a_plain_head(family):
    """MAE's probe: a parameter-free BatchNorm before the head; merge folds it into the head exactly."""
    import copy

    base = c.tiny_model(family)
    model = c.apply(copy.deepcopy(base), "linear", norm="batchnorm")
    assert c.trainable_count(model) == 0
    c.check_gradients(model, expected=set())
    x = c.image_batch(base, n=8)
    model.train()
    for _ in range(3):  # running statistics away from (0, 1), as after training
        model(x * 3 + 1)
    model.eval()
    with torch.no_grad():
        before = model(x)
    merged = get_method("linear").merge(model)
    plain = c.tiny_model(family, seed=99)
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert (plain.eval()(x) - before).abs().max().item() <= 1e-5


def test_batchnorm_probe_cell_reloads_with_its_running_statistics(tmp_path, monkeypatch):
    """The running statistics are trained state: saved with the cell, so a reloaded cell (WiSE-FT,
    merge) gives the logits the cell gave; a linear probe's WiSE-FT curve is flat."""
    from peft_core.data import load_split
    from peft_core.merge import load_cell_model
    from peft_core.train import evaluate, run_cell
    from peft_core.wise import wise_models

    from ..toycell import spec, write_inputs

    monkeypatch.chdir(tmp_path)
    write_inputs(tmp_path)
    cell = spec("linear", {"norm": "batchnorm"}, epochs=2, drop_path=0.0)
    run_cell(cell, "train.pt", "eval.pt", "backbone.safetensors", tmp_path / "cell", log=lambda *_: None)
    import pandas as pd

    saved = pd.read_parquet(tmp_path / "cell" / "predictions.parquet")
    s, model = load_cell_model(tmp_path / "cell", None)
    images = load_split("eval.pt").images
    assert evaluate(model, s, images).argmax(1).tolist() == saved.pred.tolist()
    logits = [evaluate(m, s, images).clone() for _, m in wise_models(s, model, [0.0, 1.0])]
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
