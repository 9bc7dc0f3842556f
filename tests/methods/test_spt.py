"""SPT-LoRA and SPT-Adapter: sensitivity-aware allocation (a prestep) and the contract on what it allocates."""

from __future__ import annotations

import copy

import pytest
import torch

from peft_core.methods import get_method
from peft_core.methods import _spt
from peft_core.methods._common import unfreeze_head
from peft_core.methods._prestep_data import PrestepData

from . import checks as c

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(c.BACKBONES)
NAMES = ["spt_lora", "spt_adapter"]


def test_placeholder_counts_on_vit_b16():
    # cls token 768, then rank-8 LoRAs in model order while they fit 0.4M: q, k, v, proj 12,288 each,
    # fc1, fc2 30,720 each (110,592 a block): 3 blocks, then q, k, v, proj of block 3 and q of block 4
    lora = c.trainable_count(c.apply(c.vit_b16_shapes(), "spt_lora"))
    assert lora == 768 + 3 * 110_592 + 5 * 12_288 == 393_984
    # adapter: out r + r out + r + out = 13,064 (768 out), 52,232 (fc1: 3072 out)
    assert c.trainable_count(c.apply(c.vit_b16_shapes(), "spt_adapter")) == 392_616


def _data(model, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, *model.patch_embed.img_size), dtype=torch.uint8, generator=g)
    return PrestepData(x, torch.arange(n) % 5, lambda u: u.float() / 255, 8, seed, lambda _m: None)


def _allocated(name, family="vit", **hp):
    method = get_method(name)
    hp = method.hparams(**{"budget": 0.005, "alpha": 1.0, "rank": 2, "sweep_step": 0.0005, **hp})
    state = method.prestep.compute(c.tiny_model(family), hp, _data(c.tiny_model(family)))
    model = method.build(c.tiny_model(family), hp, state)
    unfreeze_head(model)
    return model, state


@pytest.mark.parametrize("name", NAMES)
def test_allocation_mixes_structured_and_sparse_and_counts_what_it_allocates(name):
    model, state = _allocated(name)
    modes = {int(v) for k, v in state.items() if k.endswith(".mode")}
    assert modes == {_spt.STRUCTURED, _spt.SPARSE}
    kind = name.split("_")[1]
    expected = 64  # the class token
    for u in _spt.units(c.tiny_model("vit")):
        mode = int(state.get(f"{u.name}.mode", torch.tensor(0)))
        rows = _spt._rows(c.tiny_model("vit"), u)
        if mode == _spt.STRUCTURED:
            expected += _spt.structured_cost(u, rows.shape, kind, 2) if u.matrix else rows.numel()
        elif mode == _spt.SPARSE:
            expected += state[f"{u.name}.index"].numel()
    assert c.trainable_count(model) == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_gradients_and_identity_at_init(name, family):
    model, _ = _allocated(name, family)
    base = c.tiny_model(family)
    x = c.image_batch(base)
    with torch.no_grad():
        assert (base.forward_features(x) - model.eval().forward_features(x)).abs().max() <= 1e-6
    c.check_gradients(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_spt_lora_merges(family):
    model, _ = _allocated("spt_lora", family)
    base = c.tiny_model(family)
    c.randomize_new_params(model, base)
    x = c.image_batch(base)
    with torch.no_grad():
        before = model.eval()(x)
        merged = get_method("spt_lora").merge(model)
    plain = c.tiny_model(family, seed=9)
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert (plain.eval()(x) - before).abs().max() <= 1e-5


def test_sensitivity_is_the_summed_squared_gradient_and_deterministic():
    model = c.tiny_model("vit")
    hp = get_method("spt_lora").hparams(sensitivity_batches=2)
    data = _data(model)
    s = _spt.sensitivity(copy.deepcopy(model), hp, data)
    w = model.blocks[1].mlp.fc2.weight
    total = torch.zeros_like(w)
    for b, (x, y) in enumerate(data.batches()):
        if b >= 2:
            break
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), [w])
        total += g**2
    unit = [i for i, u in enumerate(_spt.units(model)) if u.name == "blocks.1.mlp.fc2"][0]
    assert torch.allclose(s[unit], total, rtol=1e-4, atol=1e-12)
    again = _spt.sensitivity(copy.deepcopy(model), hp, data)
    assert all(torch.equal(a, b) for a, b in zip(s, again))


def test_no_state_leaks_and_bad_hyper_parameters():
    for name in NAMES:
        c.check_no_leak(name, budget=0.01)
        c.check_bad_hparams(name, {"budget": 0}, "budget")
        c.check_bad_hparams(name, {"rank": 0}, "rank")
