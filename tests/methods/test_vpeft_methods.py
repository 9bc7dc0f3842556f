"""The V-PEFT Bench methods (arXiv 2402.02242) held to the shared method contract.

Counts are checked twice: against the closed-form formula in each module's
docstring, and against V-PEFT Bench's published params column
(config/published/vpeft_bench_{vtab1k,fgvc}.csv) at the setting each
docstring names, to the table's rounding (two decimals, in millions).
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from peft_core.methods import get_method

from . import checks as c

ROOT = Path(__file__).resolve().parents[2]
GRIDS = ROOT / "config" / "method_grids"
PUBLISHED = ROOT / "config" / "published"
pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(c.BACKBONES)
METHODS = ["hydra", "dtl", "last", "prefix", "lst"]
MERGEABLE = ["hydra"]


# ---------------------------------------------------------------- parameter counts
COUNTS = [
    # hydra: 101,424 r + 36,864 (module docstring)
    ("hydra", {"rank": 2}, 239_712),
    ("hydra", {"rank": 1}, 138_288),
    ("hydra", {"rank": 8}, 848_256),
    # dtl: 18,432 r
    ("dtl", {"rank": 2}, 36_864),
    ("dtl", {"rank": 8, "add_from": 0}, 147_456),
    # last: 36,864 r
    ("last", {}, 663_552),
    ("last", {"rank": 16, "heads": 4}, 589_824),
    # prefix: 18,432 length
    ("prefix", {}, 184_320),
    ("prefix", {"length": 20}, 368_640),
    # lst, w = 768 / reduction: 13 (768 w + w) + 12 (12 w^2 + 13 w) + 12 + (768 w + 768)
    ("lst", {}, 2_376_300),
    ("lst", {"reduction": 16}, 13 * (768 * 48 + 48) + 12 * (12 * 48**2 + 13 * 48) + 12 + 48 * 768 + 768),
]


@pytest.mark.parametrize("name, hp, expected", COUNTS, ids=c.param_id)
def test_vit_b16_trainable_count_excluding_head(name, hp, expected):
    assert c.trainable_count(c.apply(c.vit_b16_shapes(), name, **hp)) == expected


@pytest.mark.parametrize("name, hp", [("hydra", {"rank": 2}), ("dtl", {"rank": 2}), ("last", {}), ("prefix", {}), ("lst", {})], ids=c.param_id)
def test_meta_count_equals_real_vit_b16(name, hp):
    real = c.trainable_count(c.apply(c.vit_b16(), name, **hp))
    assert real == c.trainable_count(c.apply(c.vit_b16_shapes(), name, **hp))


# our method, its hyper-parameters, published table, its row, head added to match its convention
PUBLISHED_COUNTS = [
    ("hydra", {"rank": 2}, "vtab1k", "Hydra", c.VTAB_MEAN_HEAD),
    ("dtl", {"rank": 2}, "vtab1k", "DTL", 0),
    ("last", {"rank": 18}, "vtab1k", "LAST", 0),
    ("last", {"rank": 18}, "fgvc", "LAST", 0),
    ("prefix", {"length": 10}, "fgvc", "Prefix Tuning", c.FGVC_MEAN_HEAD),
    ("lst", {"reduction": 8}, "vtab1k", "LST", 0),
]


@pytest.mark.parametrize("name, hp, table, row, head", PUBLISHED_COUNTS, ids=lambda v: c.param_id(v) if not isinstance(v, float) else "")
def test_count_matches_vpeft_bench_params_column(name, hp, table, row, head):
    published = pd.read_csv(PUBLISHED / f"vpeft_bench_{table}.csv").set_index("method")
    ours = c.trainable_count(c.apply(c.vit_b16_shapes(), name, **hp)) + head
    assert round(ours / 1e6, 2) == pytest.approx(float(published.loc[row, "params_m"]))


# ---------------------------------------------------------------- gradients
GRAD_CASES = [(f, "hydra", {"rank": 2}) for f in FAMILIES]
GRAD_CASES += [(f, "dtl", {"rank": 2, "add_from": 1}) for f in FAMILIES]
GRAD_CASES += [(f, "last", {"rank": 4, "heads": 2}) for f in FAMILIES]
GRAD_CASES += [(f, "prefix", {"length": 3}) for f in FAMILIES]
GRAD_CASES += [(f, "lst", {"reduction": 4}) for f in FAMILIES]


@pytest.mark.parametrize("family, name, hp", GRAD_CASES, ids=c.param_id)
def test_every_trainable_tensor_learns(family, name, hp):
    c.check_gradients(c.apply(c.tiny_model(family), name, **hp))


def test_hydra_trains_only_its_branches():
    model = c.apply(c.tiny_model("dinov2_reg"), "hydra", rank=2)
    expected = {
        f"blocks.{i}.{lin}.{branch}.{layer}.{t}"
        for i in range(4)
        for lin in ("attn.proj", "mlp.fc2")
        for branch in ("parallel", "sequential")
        for layer in ("down", "up")
        for t in ("weight", "bias")
    }
    c.check_gradients(model, expected=expected)


# ---------------------------------------------------------------- identity and merge
IDENTITY_CASES = [(f, "hydra", {"scale": 4.5}) for f in FAMILIES]
IDENTITY_CASES += [(f, "dtl", {"add_from": 0}) for f in FAMILIES]
IDENTITY_CASES += [(f, "last", {"scale": 10.0}) for f in FAMILIES]


@pytest.mark.parametrize("family, name, hp", IDENTITY_CASES, ids=c.param_id)
def test_identity_at_init(family, name, hp):
    c.check_identity_at_init(family, name, **hp)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", MERGEABLE)
def test_merged_equals_unmerged(family, name):
    c.check_merge(family, name)


def test_hydra_block_output_by_hand():
    base = c.tiny_model("vit")
    peft = c.apply(copy.deepcopy(base), "hydra", rank=2, scale=0.7)
    c.randomize_new_params(peft, base)
    peft.eval()
    lin = peft.blocks[1].mlp.fc2
    x = torch.randn(2, 5, lin.base.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = x @ lin.base.weight.T + lin.base.bias
        par = lin.parallel.up(lin.parallel.down(x))
        seq = lin.sequential.up(lin.sequential.down(h))
        assert torch.allclose(lin(x), h + 0.7 * (par + seq), atol=1e-6)


def test_hydra_merge_without_base_bias():
    base = c.tiny_model("vit")
    for block in base.blocks:
        block.attn.proj.bias = None
    peft = c.apply(copy.deepcopy(base), "hydra", rank=2)
    assert peft.blocks[0].attn.proj.parallel.up.bias is None
    c.randomize_new_params(peft, base)
    x = c.image_batch(base)
    peft.eval()
    with torch.no_grad():
        before = peft(x)
        after = get_method("hydra").merge(peft)(x)
    assert (before - after).abs().max().item() < 1e-5
    assert set(peft.state_dict()) == set(base.state_dict())


def test_dtl_side_network_by_hand_and_backbone_keys_unchanged():
    base = c.tiny_model("vit")
    peft = c.apply(copy.deepcopy(base), "dtl", rank=2, beta=3.0)
    c.randomize_new_params(peft, base)
    side = peft.blocks.side
    assert len(peft.blocks) == 4 and side.first == 2 and list(peft.blocks) == list(peft.blocks[:4])
    assert set(peft.state_dict()) - set(base.state_dict()) == {"blocks.side.a", "blocks.side.b"}
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(0))
    peft.eval()
    with torch.no_grad():
        h, want = 0, x
        for i, block in enumerate(peft.blocks):  # the same block objects, run by hand
            h = h + want @ side.a[i].T @ side.b[i].T
            want = block(want) + (h * torch.sigmoid(3.0 * h) if i >= 2 else 0)
        assert torch.allclose(peft.blocks(x), want, atol=1e-6)


def test_dtl_first_blocks_get_no_gradient_path():
    # the blocks before add_from are never fed side features: their input carries no grad
    model = c.apply(c.tiny_model("vit"), "dtl", add_from=3)
    seen = []
    model.blocks[2].register_forward_hook(lambda m, i, o: seen.append(i[0].requires_grad))
    model.blocks[3].register_forward_hook(lambda m, i, o: seen.append(i[0].requires_grad))
    model(c.image_batch(model))
    assert seen == [False, False]
    with pytest.raises(ValueError, match="add_from"):
        c.apply(c.tiny_model("vit"), "dtl", add_from=4)
    with pytest.raises(ValueError, match="already wrapped"):
        c.apply(c.apply(c.tiny_model("vit"), "dtl"), "dtl")


def test_last_side_network_by_hand_and_nothing_backpropagates_through_the_backbone():
    base = c.tiny_model("dinov2_reg")
    peft = c.apply(copy.deepcopy(base), "last", rank=4, heads=2)
    c.randomize_new_params(peft, base)
    side = peft.blocks.side
    assert set(peft.state_dict()) - set(base.state_dict()) == {"blocks.side.qkv", "blocks.side.out"}
    x = torch.randn(2, 21, 64, generator=torch.Generator().manual_seed(0))
    peft.eval()
    with torch.no_grad():
        s, z = torch.zeros_like(x), x
        for i, block in enumerate(peft.blocks):
            u = F.layer_norm(z + s, (64,))
            q, k, v = (u @ w.T for w in side.qkv[i].chunk(3))
            heads = []
            for hq, hk, hv in zip(q.chunk(2, -1), k.chunk(2, -1), v.chunk(2, -1)):
                heads.append(torch.softmax(hq @ hk.transpose(1, 2) / 2**0.5, -1) @ hv)
            s = s + torch.cat(heads, -1) @ side.out[i].T
            z = block(z)
        assert torch.allclose(peft.blocks(x), z + s, atol=1e-5)
    seen = []
    for block in peft.blocks:
        block.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    peft.train()
    peft(c.image_batch(peft))
    assert seen == [False] * 4


def test_prefix_attention_by_hand():
    base = c.tiny_model("clip")
    peft = c.apply(copy.deepcopy(base), "prefix", length=3)
    attn = peft.blocks[2].attn
    assert isinstance(attn.base, type(base.blocks[2].attn))
    peft.eval()
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, k, v = attn.base.qkv(x).chunk(3, dim=-1)
        k = torch.cat([attn.prefix_k.expand(2, -1, -1), k], 1)
        v = torch.cat([attn.prefix_v.expand(2, -1, -1), v], 1)
        heads = [torch.softmax(hq @ hk.transpose(1, 2) / 32**0.5, -1) @ hv
                 for hq, hk, hv in zip(q.chunk(2, -1), k.chunk(2, -1), v.chunk(2, -1))]  # fmt: skip
        want = attn.base.proj(torch.cat(heads, -1))
        assert torch.allclose(attn(x), want, atol=1e-5)
    assert all(b.attn.prefix_k.shape == b.attn.prefix_v.shape == (3, 64) for b in peft.blocks)


def test_lst_ladder_by_hand():
    base = c.tiny_model("dinov2_reg")
    peft = c.apply(copy.deepcopy(base), "lst", reduction=4)
    side = peft.blocks.side
    assert len(side.downs) == 5 and len(side.side_blocks) == 4 and side.up.in_features == 16
    with torch.no_grad():
        side.gates.copy_(torch.tensor([-0.3, 0.0, 0.2, 0.5]))
    x = torch.randn(2, 21, 64, generator=torch.Generator().manual_seed(0))
    peft.eval()
    with torch.no_grad():
        h, z = side.downs[0](x), x
        for i, block in enumerate(peft.blocks):
            z = block(z)
            mu = torch.sigmoid(side.gates[i] / 0.1)
            h = side.side_blocks[i](mu * side.downs[i + 1](z) + (1 - mu) * h)
        assert torch.allclose(peft.blocks(x), side.up(h), atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        c.apply(c.tiny_model("vit"), "lst", reduction=3)


# ---------------------------------------------------------------- contract
@pytest.mark.parametrize("name", METHODS)
def test_no_state_leaks_between_models(name):
    c.check_no_leak(name)


@pytest.mark.parametrize("name", METHODS)
def test_registry_entry(name):
    method = get_method(name)
    assert method.mergeable == (name in MERGEABLE)
    assert method.summary and len(method.summary) < 110
    for field, info in method.hparams.model_fields.items():
        assert info.description, f"{name}.{field} has no description"
    doc = method.source.read_text().split('"""')[1]
    assert "arXiv" in doc or "github" in doc.lower() or "repository" in doc


BAD = [
    ("hydra", {"rank": 0}, "rank"),
    ("hydra", {"scale": 0}, "scale"),
    ("hydra", {"dropout": 1.0}, "dropout"),
    ("hydra", {"dim": 2}, "dim"),
    ("dtl", {"rank": 0}, "rank"),
    ("dtl", {"beta": 0}, "beta"),
    ("dtl", {"add_from": -1}, "add_from"),
    ("last", {"rank": 0}, "rank"),
    ("last", {"rank": 18, "heads": 4}, "heads"),
    ("last", {"scale": -1}, "scale"),
    ("prefix", {"length": 0}, "length"),
    ("prefix", {"num_prompts": 10}, "num_prompts"),
    ("lst", {"reduction": 0}, "reduction"),
    ("lst", {"temperature": 0}, "temperature"),
]


@pytest.mark.parametrize("name, hp, field", BAD, ids=c.param_id)
def test_bad_hyper_parameters_name_the_field(name, hp, field):
    c.check_bad_hparams(name, hp, field)


# ---------------------------------------------------------------- grids
@pytest.mark.parametrize("name", METHODS)
def test_every_grid_point_builds_the_hparams_and_the_study_uses_the_grid(name):
    grid = yaml.safe_load((GRIDS / f"{name}.yaml").read_text())
    hparams = get_method(name).hparams
    assert set(grid) <= set(hparams.model_fields)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    assert len({hparams(**p) for p in points}) == len(points)
    study = yaml.safe_load((ROOT / "config" / "vtab1k.yaml").read_text())
    assert study["methods"][name] == grid
    assert name not in yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())["methods"]
