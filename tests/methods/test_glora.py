"""GLoRA with its per-layer search: the contract on any configuration, its closed-form count, and the search."""

from __future__ import annotations

import copy

import pytest
import torch

from peft_core.methods import get_method
from peft_core.methods._common import unfreeze_head
from peft_core.methods._prestep_data import PrestepData
from peft_core.methods.glora import COMPONENTS, SPACE, config_params, decode, target_layers

from . import checks as c

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(c.BACKBONES)


def _random_genes(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor([len(SPACE[k]) for k in COMPONENTS] * len(target_layers(model)))
    return (torch.rand(n.shape, generator=g) * n).long()


def _build(model, genes):
    method = get_method("glora")
    out = method.build(model, method.hparams(), {"genes": genes})
    unfreeze_head(out)
    return out


def _stream_constants(model):
    """The constant-E tensors of residual-writing layers: LayerNorm removes them, so they get no gradient."""
    return {n for n, _ in model.named_parameters() if n.endswith(("attn.proj.E_const", "mlp.fc2.E_const"))}


def _check_gradients(model):
    model = copy.deepcopy(model)
    invariant = _stream_constants(model)
    for name, p in model.named_parameters():
        if name in invariant:
            p.requires_grad_(False)
    c.check_gradients(model)  # every other trainable tensor learns
    if invariant:  # and the excluded ones change nothing the head sees
        x = c.image_batch(model)
        with torch.no_grad():
            before = model.eval()(x)
            for name, p in model.named_parameters():
                if name in invariant:
                    p.add_(0.5)
            assert (model(x) - before).abs().max() <= 1e-4


def test_largest_configuration_on_vit_b16():
    # per layer (out x in) at rank 4: A, B 4 (out + in) each, C 4 in + 4, D, E out each
    def layer(o, i):
        return 2 * 4 * (o + i) + 4 * i + 4 + 2 * o

    expected = 12 * (layer(2304, 768) + layer(768, 768) + layer(3072, 768) + layer(768, 3072))
    assert c.trainable_count(c.apply(c.vit_b16_shapes(), "glora")) == expected == 1_603_776


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_any_configuration_counts_its_formula_starts_as_identity_learns_and_merges(family, seed):
    base = c.tiny_model(family)
    with torch.no_grad():  # pre-trained biases are not zero (timm's init is): D scales them
        for name, p in base.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    genes = _random_genes(base, seed)
    model = _build(copy.deepcopy(base), genes)
    shapes = [(m.out_features, m.in_features) for _, m in target_layers(base)]
    assert c.trainable_count(model) == config_params(decode(genes, len(shapes)), shapes, 4)
    x = c.image_batch(base)
    with torch.no_grad():
        assert (base.forward_features(x) - model.eval().forward_features(x)).abs().max() <= 1e-6
    _check_gradients(model)
    c.randomize_new_params(model, base)
    with torch.no_grad():
        before = model.eval()(x)
    plain = c.tiny_model(family, seed=9)
    plain.load_state_dict(get_method("glora").merge(model).state_dict(), strict=True)
    with torch.no_grad():
        assert (plain.eval()(x) - before).abs().max() <= 1e-5


def test_no_state_leaks_and_bad_hyper_parameters():
    c.check_no_leak("glora")
    for hp, field in [({"rank": 0}, "rank"), ({"param_limit": 0}, "param_limit"), ({"population": 1}, "population")]:
        c.check_bad_hparams("glora", hp, field)


def _data(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, *model.patch_embed.img_size), dtype=torch.uint8, generator=g)
    y = torch.arange(40) % 4
    return PrestepData(x[:24], y[:24], lambda u: u.float() / 255, 8, 0, lambda _m: None, x[24:], y[24:])


def test_search_is_deterministic_within_the_limit_and_reads_validation():
    method = get_method("glora")
    hp = method.hparams(rank=2, param_limit=0.01, supernet_epochs=2, population=6, iterations=2, parents=2)
    a = method.prestep.compute(c.tiny_model("vit"), hp, _data(c.tiny_model("vit")))
    b = method.prestep.compute(c.tiny_model("vit"), hp, _data(c.tiny_model("vit")))
    assert torch.equal(a["genes"], b["genes"]) and torch.equal(a["val_accuracy"], b["val_accuracy"])
    layers = target_layers(c.tiny_model("vit"))
    shapes = [(m.out_features, m.in_features) for _, m in layers]
    assert config_params(decode(a["genes"], len(layers)), shapes, 2) <= 10_000
    data = _data(c.tiny_model("vit"))
    with pytest.raises(ValueError, match="reads the validation split"):
        method.prestep.compute(c.tiny_model("vit"), hp, PrestepData(data.images, data.labels, data.prepare, 8, 0, data.log))
