"""NOAH (neural prompt search): the shared contract on its subnets, its closed-form count, and its search.

The search is a prestep read from the tuning splits (train: supernet; val:
selection); here it runs on tiny models with a handful of epochs and subnets.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from peft_core.methods import get_method
from peft_core.methods._noah_modules import subnet_params
from peft_core.methods._prestep_data import PrestepData

from . import checks as c

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(c.BACKBONES)

# NOAH's released CIFAR-100 subnet (experiments/NOAH/subnet/VTAB/ViT-B_prompt_cifar100.yaml, RETRAIN)
CIFAR100 = {
    "prompt": [10, 5, 10, 1, 5, 1, 10, 1, 10, 5, 1, 10],
    "lora": [10, 1, 5, 5, 1, 10, 1, 1, 1, 10, 1, 1],
    "adapter": [5, 10, 10, 10, 5, 1, 1, 1, 10, 10, 10, 1],
}


def _sizes(spec=CIFAR100) -> torch.Tensor:
    return torch.tensor([spec["prompt"], spec["lora"], spec["adapter"]]).T.contiguous()


def _build(model, sizes, **hp):
    method = get_method("noah")
    out = method.build(model, method.hparams(**hp), {"subnet": sizes})
    from peft_core.methods._common import unfreeze_head

    unfreeze_head(out)
    return out


def test_placeholder_is_the_largest_subnet_on_vit_b16():
    assert c.trainable_count(c.apply(c.vit_b16_shapes(), "noah")) == 12 * (7_680 + 30_720 + 16_138) == 654_456


def test_released_cifar100_subnet_count_against_the_formula_and_vpeft_bench():
    model = _build(c.vit_b16_shapes(), _sizes())
    ours = c.trainable_count(model)
    assert ours == subnet_params(_sizes(), 768, 2304) == 69 * 768 + 47 * 3072 + (2 * 74 * 768 + 74 + 12 * 768) == 320_330
    published = pd.read_csv(ROOT / "config/published/vpeft_bench_vtab1k.csv").set_index("method")
    assert float(published.loc["NOAH", "params_m"]) == 0.43 and round((ours + 769 * 100) / 1e6, 2) == 0.40


def test_a_size_of_zero_allocates_nothing():
    sizes = torch.tensor([[0, 2, 0], [3, 0, 4], [0, 0, 0], [1, 1, 1]])
    model = _build(c.tiny_model("vit"), sizes)
    assert c.trainable_count(model) == subnet_params(sizes, 64, 192)
    assert not any(p.numel() == 0 for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_only_on_noah_tensors(family):
    model = _build(c.tiny_model(family), torch.tensor([[2, 3, 4]] * 4))
    grads = c.check_gradients(model)
    assert {n.split(".")[-1] for n in grads} <= {"lora_a", "lora_b", "weight", "bias"} | {f"prompt_{i}" for i in range(4)}
    assert all(".base." not in n for n in grads) and "head.weight" in grads


@pytest.mark.parametrize("family", FAMILIES)
def test_without_prompts_the_subnet_is_the_identity_at_init(family):
    base = c.tiny_model(family)
    peft = _build(c.tiny_model(family), torch.tensor([[0, 3, 4]] * 4))
    x = c.image_batch(base)
    with torch.no_grad():
        assert (base.forward_features(x) - peft.eval().forward_features(x)).abs().max() <= 1e-6


def test_no_state_leaks():
    c.check_no_leak("noah", choices=(2, 4))


@pytest.mark.parametrize("hp, field", [({"choices": ()}, "choices"), ({"choices": (0,)}, "choices"),
                                       ({"choices": (2, 2)}, "choices"), ({"param_limit": 0}, "param_limit"),
                                       ({"mutation_prob": 2}, "mutation_prob"), ({"population": 1}, "population")])  # fmt: skip
def test_bad_hyper_parameters_name_the_field(hp, field):
    c.check_bad_hparams("noah", hp, field)


def _data(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.patch_embed.img_size
    x = torch.randint(0, 256, (40, 3, *size), dtype=torch.uint8, generator=g)
    y = torch.arange(40) % 4
    return PrestepData(x[:24], y[:24], lambda u: u.float() / 255, 8, seed, lambda _m: None, x[24:], y[24:])


CHEAP = dict(choices=(0, 2, 4), supernet_epochs=2, population=6, iterations=2, parents=2, param_limit=0.004)


def _search(model, **hp):
    method = get_method("noah")
    return method.prestep.compute(model, method.hparams(**{**CHEAP, **hp}), _data(model))


def test_search_returns_a_subnet_within_the_limit_and_is_deterministic():
    a = _search(c.tiny_model("vit"))
    b = _search(c.tiny_model("vit"))
    assert torch.equal(a["subnet"], b["subnet"]) and torch.equal(a["val_accuracy"], b["val_accuracy"])
    assert a["subnet"].shape == (4, 3) and set(a["subnet"].flatten().tolist()) <= {0, 2, 4}
    assert subnet_params(a["subnet"], 64, 192) <= 4_000
    assert 0 <= float(a["val_accuracy"]) <= 1 and int(a["scored"]) >= 2
    # the chosen subnet builds, with exactly its count
    assert c.trainable_count(_build(c.tiny_model("vit"), a["subnet"])) == subnet_params(a["subnet"], 64, 192)


def test_search_never_reads_past_validation_and_a_limit_below_every_subnet_is_an_error():
    with pytest.raises(ValueError, match="below the smallest subnet"):
        _search(c.tiny_model("vit"), choices=(2, 4), param_limit=0.0001)
    method = get_method("noah")
    data = _data(c.tiny_model("vit"))
    no_val = PrestepData(data.images, data.labels, data.prepare, 8, 0, data.log)
    with pytest.raises(ValueError, match="reads the validation split"):
        method.prestep.compute(c.tiny_model("vit"), method.hparams(**CHEAP), no_val)
