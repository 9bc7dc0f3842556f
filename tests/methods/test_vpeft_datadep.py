"""V-PEFT Bench's data-dependent methods, SCT and GPS: the shared contract plus their prestep.

Their selections come from the task's training data (peft_core/prestep.py);
without data they use a placeholder of the same shapes, so counts, gradients,
identity and merges are checked as for every other method, and the prestep
itself is checked on models built so the right answer is known.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch

from peft_core.methods import get_method
from peft_core.methods._prestep_data import PrestepData, supcon_loss

from . import checks as c

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "config" / "published"
pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(c.BACKBONES)

# ---------------------------------------------------------------- parameter counts
GPS_NEURONS = 12 * (2304 + 768 + 3072 + 768) + 768  # 83,712 rows: block linears + patch-embedding conv
COUNTS = [
    ("sct", {}, 12 * (96 * 96 + 96)),  # 111,744
    ("sct", {"channels": 32}, 12 * (32 * 32 + 32)),
    ("gps", {}, 2 * GPS_NEURONS),  # k = 1: 167,424
    ("gps", {"k": 2}, 3 * GPS_NEURONS),
]


@pytest.mark.parametrize("name, hp, expected", COUNTS, ids=c.param_id)
def test_vit_b16_trainable_count_excluding_head(name, hp, expected):
    assert c.trainable_count(c.apply(c.vit_b16_shapes(), name, **hp)) == expected


def test_sct_count_matches_vpeft_bench_at_k96():
    published = pd.read_csv(PUBLISHED / "vpeft_bench_vtab1k.csv").set_index("method")
    ours = c.trainable_count(c.apply(c.vit_b16_shapes(), "sct"))
    assert round(ours / 1e6, 2) == float(published.loc["SCT", "params_m"]) == 0.11


def test_gps_count_differs_from_vpeft_bench_column_as_the_docstring_says():
    published = float(pd.read_csv(PUBLISHED / "vpeft_bench_vtab1k.csv").set_index("method").loc["GPS", "params_m"])
    ours = c.trainable_count(c.apply(c.vit_b16_shapes(), "gps"))
    assert published == 0.22
    assert round(ours / 1e6, 2) == 0.17 and round((ours + c.VTAB_MEAN_HEAD) / 1e6, 2) == 0.21


# ---------------------------------------------------------------- the contract
def _expected_trainable(model, name):
    names = set()
    for path, mod in model.named_modules():
        if name == "sct" and path.endswith(".sct.linear"):
            names |= {f"{path}.weight", f"{path}.bias"}
        if name == "gps" and type(mod).__name__ == "SparseDelta":
            names.add(f"{path}.delta")
            if mod.base.bias is not None:
                names.add(f"{path}.base.bias")
        if name == "gps" and type(mod).__name__ == "LayerScale":
            names.add(f"{path}.gamma")
    return names


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["sct", "gps"])
def test_gradients_only_where_they_should_be(name, family):
    hp = {"channels": 8} if name == "sct" else {}
    model = c.apply(c.tiny_model(family), name, **hp)
    c.check_gradients(model, _expected_trainable(model, name))


@pytest.mark.parametrize("family", FAMILIES)
def test_gps_identity_at_init_and_merge(family):
    c.check_identity_at_init(family, "gps", k=2)
    c.check_merge(family, "gps", k=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_sct_zero_init_is_identity_and_reference_init_is_not(family):
    c.check_identity_at_init(family, "sct", channels=8, init="zero")
    with pytest.raises(AssertionError):
        c.check_identity_at_init(family, "sct", channels=8)


@pytest.mark.parametrize("name, hp", [("sct", {"channels": 8}), ("gps", {})])
def test_no_state_leaks(name, hp):
    c.check_no_leak(name, **hp)


@pytest.mark.parametrize("name, hp, field", [("sct", {"channels": 0}, "channels"), ("sct", {"init": "kaiming"}, "init"),
                                             ("gps", {"k": 0}, "k"), ("gps", {"temperature": 0}, "temperature")])  # fmt: skip
def test_bad_hyper_parameters_name_the_field(name, hp, field):
    c.check_bad_hparams(name, hp, field)


def test_sct_more_channels_than_the_width_is_a_one_line_error():
    with pytest.raises(ValueError, match="channels 65 > the backbone's width 64"):
        c.apply(c.tiny_model("vit"), "sct", channels=65)


def test_a_wrong_prestep_result_is_refused():
    method = get_method("sct")
    with pytest.raises(ValueError, match="no 8 channels for block 0"):
        method.build(c.tiny_model("vit"), method.hparams(channels=8), {"blocks.0.channels": torch.arange(4)})
    with pytest.raises(ValueError, match="has no prestep"):
        get_method("lora").build(c.tiny_model("vit"), get_method("lora").hparams(), {})


# ---------------------------------------------------------------- the presteps themselves
def _data(model, n=24, classes=3, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.patch_embed.img_size
    images = torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % classes
    return PrestepData(images, labels, lambda u: u.float() / 255, batch_size, seed, lambda _m: None)


def _compute(name, model, data=None, **hp):
    method = get_method(name)
    return method.prestep.compute(model, method.hparams(**hp), data or _data(model))


def test_sct_picks_a_channel_the_attention_branch_makes_salient():
    model = c.tiny_model("vit")
    with torch.no_grad():
        model.blocks[1].attn.proj.bias[5] = 50.0  # channel 5 dominates the stream from block 1 on
        model.blocks[2].attn.proj.bias[17] = 80.0
    chosen = _compute("sct", model, channels=4)
    assert sorted(chosen) == [f"blocks.{i}.channels" for i in range(4)]
    for i, idx in ((i, chosen[f"blocks.{i}.channels"]) for i in range(4)):
        assert idx.tolist() == sorted(set(idx.tolist())) and len(idx) == 4 and 0 <= idx.min() and idx.max() < 64
        assert (5 in idx.tolist()) == (i >= 1)
        assert (17 in idx.tolist()) == (i >= 2)


def test_sct_salience_is_class_aware_and_batching_does_not_change_it():
    from peft_core.methods._prestep_data import salience_after_attention

    model = c.tiny_model("vit")
    data = _data(model)
    one = salience_after_attention(model, data)
    other = salience_after_attention(model, PrestepData(data.images, data.labels, data.prepare, 5, 0, data.log))
    assert all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(one, other))
    # by hand on block 0: mean over classes of the per-class L2 norm over (images, patch tokens)
    feats = []
    hook = model.blocks[0].norm2.register_forward_pre_hook(lambda _m, a: feats.append(a[0][:, 1:]))
    with torch.no_grad():
        model(data.prepare(data.images))
    hook.remove()
    f = feats[0]
    expected = torch.stack([f[data.labels == k].pow(2).sum((0, 1)).sqrt() for k in range(3)]).mean(0)
    assert torch.allclose(one[0], expected, rtol=1e-5)


def test_gps_picks_the_largest_gradient_per_neuron():
    model = c.tiny_model("vit")
    data = _data(model, batch_size=24)  # one batch: the loss is then one SupCon term
    chosen = _compute("gps", copy.deepcopy(model), data, k=2)
    w = model.blocks[1].mlp.fc1.weight
    x = data.prepare(data.images)
    feats = model.forward_head(model.forward_features(torch.cat([x, x.flip(-1)])), pre_logits=True)
    (grad,) = torch.autograd.grad(supcon_loss(feats, data.labels, 0.07), [w])
    top = grad.abs().topk(2, dim=1).indices.sort(dim=1).values
    assert torch.equal(chosen["blocks.1.mlp.fc1"], top)
    assert chosen["patch_embed.proj"].shape == (64, 2)


def test_presteps_are_deterministic():
    for name, hp in (("sct", {"channels": 6}), ("gps", {})):
        a = _compute(name, c.tiny_model("vit"), **hp)
        b = _compute(name, c.tiny_model("vit"), **hp)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_supcon_loss_prefers_clustered_features():
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]]).repeat(2, 1)
    mixed = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0.1, 1]]).repeat(2, 1)
    assert supcon_loss(clustered, labels, 0.1) < supcon_loss(mixed, labels, 0.1)
