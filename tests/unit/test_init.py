"""``peft_core.init.reference_init``: the reference study's as-run initialisation."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch

from peft_core.errors import InputError
from peft_core.init import REFERENCE_REDRAWS, reference_init
from peft_core.methods import get_method, list_methods
from peft_core.methods._common import classifier, head_param_ids

from ..methods import checks as c

# method, hyper-parameters, the tensors zero at the intended init (suffixes of their names),
# and the biases that must be zero afterwards
CASES = [
    ("lora", {"rank": 8}, ("lora_b",), ()),
    ("adapter", {"bottleneck": 8}, ("adapter.up.weight",), ("down.bias", "up.bias")),
    ("adapter", {"bottleneck": 8, "init": "xavier"}, (), ("down.bias", "up.bias")),
    ("fact_tt", {"rank": 8}, ("fact.v",), ()),
    ("fact_tk", {"rank": 8}, ("fact.v",), ()),
]


def _features(model, x):
    with torch.no_grad():
        return model.eval().forward_features(x)


def _build(name, hp):
    base = c.tiny_model("vit")
    peft = c.apply(copy.deepcopy(base), name, **{**c.TINY_DEFAULTS.get(name, {}), **hp})
    return base, peft


@pytest.mark.parametrize("name, hp, zero, biases", CASES)
def test_reference_init_redraws_the_method_tensors_only(name, hp, zero, biases):
    base, peft = _build(name, hp)
    x = c.image_batch(base)
    if name != "adapter" or hp.get("init") != "xavier":
        # intended init: the method adds nothing
        assert (_features(peft, x) - _features(base, x)).abs().max() <= 1e-6
    backbone_ids = {id(p) for p in base.parameters()}
    before = {n: p.detach().clone() for n, p in peft.named_parameters()}
    torch.manual_seed(0)
    touched = set(reference_init(peft, name))
    params = dict(peft.named_parameters())
    head = head_param_ids(peft)
    method_names = {n for n, p in params.items() if id(p) not in backbone_ids}
    # only the method's own tensors and the head changed; the backbone is untouched
    assert touched <= method_names | {n for n, p in params.items() if id(p) in head}
    for n, p in params.items():
        if n not in touched:
            assert torch.equal(p, before[n]), n
    for n in touched:
        if n.endswith(biases) and biases:
            assert torch.count_nonzero(params[n]) == 0, n
    redrawn = [n for n in touched if id(params[n]) not in head and not n.endswith(biases or ("\0",))]
    assert redrawn
    for n in redrawn:
        t = params[n]
        assert t.abs().max() <= 2.0 and abs(t.std().item() - 0.02) < 0.004, (n, t.std().item())
    for suffix in zero:
        names = [n for n in touched if n.endswith(suffix)]
        assert names and all(torch.count_nonzero(before[n]) == 0 for n in names)
        assert all(torch.count_nonzero(params[n]) == params[n].numel() for n in names)
    # identity at init no longer holds
    assert (_features(peft, x) - _features(base, x)).abs().max() > 1e-3


def test_fact_tk_core_and_factor_keep_their_init():
    _, peft = _build("fact_tk", {"rank": 4})
    c_before, p_before = peft.fact.c.detach().clone(), peft.fact.p.detach().clone()
    touched = reference_init(peft, "fact_tk")
    assert "fact.c" not in touched and "fact.p" not in touched
    assert torch.equal(peft.fact.c, c_before) and torch.equal(peft.fact.p, p_before)
    assert {"fact.u", "fact.v"} <= set(touched)


def test_fact_tt_redraws_every_core():
    _, peft = _build("fact_tt", {"rank": 4})
    touched = set(reference_init(peft, "fact_tt"))
    assert {f"fact.cores.{i}" for i in range(len(peft.fact.cores))} <= touched


def test_head_gets_pytorch_default_init():
    _, peft = _build("linear", {})
    head = classifier(peft)
    assert torch.count_nonzero(head.bias) == 0  # timm's head init: zero bias
    torch.manual_seed(0)
    touched = reference_init(peft, "linear")
    assert touched == ["head.weight", "head.bias"]
    bound = 1 / math.sqrt(head.in_features)
    assert torch.count_nonzero(head.bias) == head.bias.numel()
    assert head.bias.abs().max() <= bound and head.weight.abs().max() <= bound
    assert head.weight.std() > 0.5 * bound / math.sqrt(3)  # uniform, not trunc-normal 0.02


def test_pfeiffer_inits_start_identically_under_reference_init():
    outs = []
    for init in ("zero", "xavier", "lora_xavier", "lora_kaiming"):
        _, peft = _build("adapter", {"init": init})
        torch.manual_seed(7)
        reference_init(peft, "adapter")
        outs.append({k: v for k, v in peft.state_dict().items() if ".adapter." in k})
    assert all(o.keys() == outs[0].keys() for o in outs)
    assert all(torch.equal(o[k], outs[0][k]) for o in outs[1:] for k in o)


def test_same_seed_same_result():
    states = []
    for _ in range(2):
        _, peft = _build("lora", {})
        torch.manual_seed(11)
        reference_init(peft, "lora")
        states.append(peft.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("name", list_methods())
def test_every_method_accepts_reference_init(name):
    _, peft = _build(name, {})
    touched = reference_init(peft, name)
    assert touched[-2:] == ["head.weight", "head.bias"]
    assert (len(touched) > 2) == (name in REFERENCE_REDRAWS)


def test_missing_modules_and_unknown_methods_raise():
    _, peft = _build("linear", {})
    with pytest.raises(ValueError, match="LoRALinear"):
        reference_init(peft, "lora")
    with pytest.raises(InputError, match="unknown method"):
        reference_init(peft, "nope")


DEVIATIONS_DOC = Path(__file__).resolve().parents[2] / "docs" / "deviations.md"


@pytest.mark.parametrize("name", list_methods())
def test_deviations_are_registered_and_documented(name):
    method = get_method(name)
    assert isinstance(method.deviations, tuple)
    assert all(isinstance(d, str) and d.strip() and "\n" not in d for d in method.deviations)
    if method.deviations:
        text = DEVIATIONS_DOC.read_text()
        rows = [line for line in text.splitlines() if line.startswith("| ")]
        assert any(re.search(rf"(^\| |, ){re.escape(name)}(,| \|)", row) for row in rows), name
        doc = method.source.read_text().split('"""')[1]
        assert all(d in " ".join(doc.split()) for d in method.deviations), name


def test_methods_reference_init_changes_have_a_deviation():
    # every method whose tensors reference_init redraws says so in its deviations
    for name in REFERENCE_REDRAWS:
        assert any("init='reference'" in d for d in get_method(name).deviations), name


def test_the_cell_spec_init_option_reaches_the_model(tmp_path):
    """``train.init`` in the config -> CellSpec.init -> build_model: the as-run init only when asked."""
    from safetensors.torch import save_file

    from peft_core.train import build_model

    from .. import toycell

    state = {k: v for k, v in c.tiny_model("vit").state_dict().items() if not k.startswith("head.")}
    save_file(state, str(tmp_path / "backbone.safetensors"))
    ckpt = tmp_path / "backbone.safetensors"
    torch.manual_seed(0)
    intended = build_model(toycell.spec("lora", {"rank": 4}), ckpt, torch.device("cpu"))
    torch.manual_seed(0)
    as_run = build_model(toycell.spec("lora", {"rank": 4}, init="reference"), ckpt, torch.device("cpu"))
    b_intended = [p for n, p in intended.named_parameters() if n.endswith("lora_b")]
    b_as_run = [p for n, p in as_run.named_parameters() if n.endswith("lora_b")]
    assert b_intended and all(float(p.abs().max()) == 0 for p in b_intended)
    assert all(float(p.abs().max()) > 0 for p in b_as_run)
