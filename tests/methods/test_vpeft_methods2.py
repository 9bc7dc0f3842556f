"""More V-PEFT Bench methods (arXiv 2402.02242): U-Tuning, SNF, HST, held to the shared contract.

As in test_vpeft_methods.py: counts against the closed-form formula of each
module's docstring, and against V-PEFT Bench's params column where the
docstring names a setting that matches it like-with-like.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from peft_core.methods import get_method

from . import checks as c

ROOT = Path(__file__).resolve().parents[2]
GRIDS = ROOT / "config" / "method_grids"
PUBLISHED = ROOT / "config" / "published"
pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(c.BACKBONES)
METHODS = ["utuning", "snf", "hst"]
MERGEABLE: list[str] = []


# ---------------------------------------------------------------- parameter counts
COUNTS = [
    # utuning: 18,432 l + 18,444 r + 9,216 (the last two only when r > 0)
    ("utuning", {}, 175_152),
    ("utuning", {"prefix_length": 10, "bottleneck": 0}, 184_320),
    ("utuning", {"prefix_length": 0, "bottleneck": 8}, 18_444 * 8 + 9_216),
    # snf: 36,864 + 36,888 L
    ("snf", {}, 627_072),
    ("snf", {"flow_length": 0}, 36_864),
    ("snf", {"flow_length": 6}, 258_192),
    # hst: the nine terms of its docstring
    ("hst", {}, 5_120 + 83_496 + 462_312 + 432 + 166_104 + 1_296 + 9_216 + 36_864 + 56_064),
    ("hst", {"tune_norms": False}, 820_904 - 36_864),
    ("hst", {"meta_tokens": 2}, 820_904 + 9_216),
]


@pytest.mark.parametrize("name, hp, expected", COUNTS, ids=c.param_id)
def test_vit_b16_trainable_count_excluding_head(name, hp, expected):
    assert c.trainable_count(c.apply(c.vit_b16_shapes(), name, **hp)) == expected


@pytest.mark.parametrize("name, hp", [("utuning", {}), ("snf", {"flow_length": 3}), ("hst", {})], ids=c.param_id)
def test_meta_count_equals_real_vit_b16(name, hp):
    real = c.trainable_count(c.apply(c.vit_b16(), name, **hp))
    assert real == c.trainable_count(c.apply(c.vit_b16_shapes(), name, **hp))


# our method, its hyper-parameters, published table, its row, head added to match its convention
PUBLISHED_COUNTS = [
    ("utuning", {}, "fgvc", "U-Tuning", c.FGVC_MEAN_HEAD),  # our default sizes, chosen to this (docstring)
]


@pytest.mark.parametrize("name, hp, table, row, head", PUBLISHED_COUNTS, ids=lambda v: c.param_id(v) if not isinstance(v, float) else "")
def test_count_matches_vpeft_bench_params_column(name, hp, table, row, head):
    published = pd.read_csv(PUBLISHED / f"vpeft_bench_{table}.csv").set_index("method")
    ours = c.trainable_count(c.apply(c.vit_b16_shapes(), name, **hp)) + head
    assert round(ours / 1e6, 2) == pytest.approx(float(published.loc[row, "params_m"]))


def test_snf_no_flow_length_meets_the_published_column():
    # the docstring's claim: 0.25M (VTAB-1k and FGVC alike, so no head) is no single flow length
    published = pd.read_csv(PUBLISHED / "vpeft_bench_vtab1k.csv").set_index("method")
    assert float(published.loc["SNF", "params_m"]) == 0.25
    assert all(round((36_864 + 36_888 * n) / 1e6, 2) != 0.25 for n in range(40))


# ---------------------------------------------------------------- gradients
GRAD_CASES = [(f, "utuning", {"prefix_length": 2, "bottleneck": 8}) for f in FAMILIES]
GRAD_CASES += [(f, "snf", {"flow_length": 2}) for f in FAMILIES]
GRAD_CASES += [(f, "hst", {"widths": (8, 8, 16, 16), "heads": (1, 2, 2, 4)}) for f in FAMILIES]


@pytest.mark.parametrize("family, name, hp", GRAD_CASES, ids=c.param_id)
def test_every_trainable_tensor_learns(family, name, hp):
    c.check_gradients(c.apply(c.tiny_model(family), name, **hp))


def test_utuning_trains_only_its_tuners():
    model = c.apply(c.tiny_model("dinov2_reg"), "utuning", prefix_length=2, bottleneck=8)
    expected = {f"blocks.{i}.attn.prefix_{kv}" for i in range(4) for kv in "kv"}
    expected |= {f"blocks.{i}.mlp.adapter.{p}.{t}" for i in range(4) for p in ("down", "up") for t in ("weight", "bias")}
    c.check_gradients(model, expected=expected)


def test_snf_trains_only_its_flows_and_backbone_keys_are_unchanged():
    base = c.tiny_model("dinov2_reg")
    model = c.apply(copy.deepcopy(base), "snf", flow_length=2)
    expected = {
        f"blocks.side.{kind}_flows.{i}.{p}" for kind in ("attn", "mlp") for i in range(4) for p in ("mu", "log_sigma", "w", "u", "b")
    }
    assert set(model.state_dict()) - set(base.state_dict()) == expected
    assert set(base.state_dict()) <= set(model.state_dict())
    c.check_gradients(model, expected=expected)


def test_hst_trains_its_side_network_and_the_block_norms_only():
    base = c.tiny_model("dinov2_reg")
    model = c.apply(copy.deepcopy(base), "hst", widths=(8, 16), heads=(2, 4))
    side = {f"blocks.side.{n}" for n, _ in model.blocks.side.named_parameters()}
    norms = {f"blocks.{i}.{n}.{t}" for i in range(4) for n in ("norm1", "norm2") for t in ("weight", "bias")}
    c.check_gradients(model, expected=side | norms)
    assert {k for k in set(model.state_dict()) - set(base.state_dict())} == {f"blocks.side.{k}" for k in model.blocks.side.state_dict()}
    assert len(model.blocks.side.side_blocks) == 4 and model.blocks.side.per_stage == 2


# ---------------------------------------------------------------- identity
IDENTITY_CASES = [(f, "utuning", {"prefix_length": 0, "bottleneck": 4, "scale": 3.0}) for f in FAMILIES]
IDENTITY_CASES += [(f, "snf", {"flow_length": 0}) for f in FAMILIES]


@pytest.mark.parametrize("family, name, hp", IDENTITY_CASES, ids=c.param_id)
def test_identity_at_init(family, name, hp):
    c.check_identity_at_init(family, name, **hp)


def test_utuning_block_by_hand():
    base = c.tiny_model("vit")
    peft = c.apply(copy.deepcopy(base), "utuning", prefix_length=3, bottleneck=4, scale=0.5)
    c.randomize_new_params(peft, base)
    peft.eval()
    blk = peft.blocks[1]
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        u = blk.norm2(x)
        a = blk.mlp.adapter
        want = blk.mlp.base(u) + 0.5 * a.up(torch.relu(a.down(u)))
        assert torch.allclose(blk.mlp(u), want, atol=1e-6)
        # the prefix tuner is the frozen attention plus a parallel term (He et al. 2022, eq. 7)
        attn, h = blk.attn, 32
        q, k, v = attn.base.qkv(x).chunk(3, dim=-1)
        out = []
        for hq, hk, hv, pk, pv in zip(q.chunk(2, -1), k.chunk(2, -1), v.chunk(2, -1),
                                      attn.prefix_k.chunk(2, -1), attn.prefix_v.chunk(2, -1)):  # fmt: skip
            s_x, s_p = (hq @ hk.transpose(1, 2) / h**0.5).exp(), (hq @ pk.T / h**0.5).exp()
            lam = s_p.sum(-1, keepdim=True) / (s_p.sum(-1, keepdim=True) + s_x.sum(-1, keepdim=True))
            frozen = torch.softmax(hq @ hk.transpose(1, 2) / h**0.5, -1) @ hv
            tuner = torch.softmax(hq @ pk.T / h**0.5, -1) @ pv
            out.append((1 - lam) * frozen + lam * tuner)
        assert torch.allclose(attn(x), attn.base.proj(torch.cat(out, -1)), atol=1e-5)


def test_snf_blocks_by_hand():
    base = c.tiny_model("dinov2_reg")  # layer-scale blocks: the flow replaces the shortcut, not the branch
    peft = c.apply(copy.deepcopy(base), "snf", flow_length=3)
    c.randomize_new_params(peft, base)
    side = peft.blocks.side
    x = torch.randn(2, 21, 64, generator=torch.Generator().manual_seed(0))

    def flow(f, z):
        z = f.mu + f.log_sigma.exp() * z
        for j in range(3):
            z = z + f.u[j] * torch.tanh(z @ f.w[j] + f.b[j])[..., None]
        return z

    peft.eval()
    with torch.no_grad():
        want = x
        for i, blk in enumerate(peft.blocks):
            want = flow(side.attn_flows[i], want) + blk.ls1(blk.attn(blk.norm1(want)))
            want = flow(side.mlp_flows[i], want) + blk.ls2(blk.mlp(blk.norm2(want)))
        assert torch.allclose(peft.blocks(x), want, atol=1e-5)
        # with identity flows the blocks are timm's own
        for f in [*side.attn_flows, *side.mlp_flows]:
            f.mu.zero_(), f.log_sigma.zero_(), f.u.zero_()
        z = x
        for blk in peft.blocks:
            z = blk(z)
        assert torch.allclose(peft.blocks(x), z, atol=1e-6)


def test_snf_refuses_other_block_types():
    model = c.tiny_model("vit")
    model.blocks[2].__class__ = type("OtherBlock", (type(model.blocks[2]),), {})
    with pytest.raises(TypeError, match="OtherBlock"):
        c.apply(model, "snf")
    with pytest.raises(ValueError, match="already wrapped"):
        c.apply(c.apply(c.tiny_model("vit"), "snf"), "snf")


def test_hst_side_network_by_hand():
    base = c.tiny_model("vit")
    peft = c.apply(copy.deepcopy(base), "hst", widths=(8, 16), heads=(2, 4))
    side = peft.blocks.side
    c.randomize_new_params(peft, base)
    peft.eval()
    img = c.image_batch(peft)
    with torch.no_grad():
        x = peft.norm_pre(peft._pos_embed(peft.patch_embed(img)))
        metas, feats = [], []
        for i, blk in enumerate(peft.blocks):
            z = blk(torch.cat([side.meta[i].expand(2, -1, -1), x], 1))
            metas.append(z[:, :1])
            feats.append(z[:, 2:].transpose(1, 2).reshape(2, 64, 4, 4))
            x = z[:, 1:]
        y = side.stem(img)
        for s in range(2):
            y = side.downs[0](y) if s else y
            h = y.shape[-1]
            y = side.embed_norms[s](y.flatten(2).transpose(1, 2))
            for i in (2 * s, 2 * s + 1):
                vit = side.bridges[s](torch.nn.functional.interpolate(feats[i], size=(h, h), mode="bilinear").flatten(2).transpose(1, 2))
                kv = torch.cat([side.meta_norms[i](side.bridges[s](metas[i])), vit.mean(1, keepdim=True)], 1)
                blk = side.side_blocks[i]
                u = blk.norm1(y)
                heads = []
                for hq, hk, hv in zip(blk.q(u).chunk(blk.heads, -1), blk.k(kv).chunk(blk.heads, -1), blk.v(kv).chunk(blk.heads, -1)):
                    heads.append(torch.softmax(hq @ hk.transpose(1, 2) / hq.shape[-1] ** 0.5, -1) @ hv)
                y = y + blk.proj(torch.cat(heads, -1)) + vit
                y = y + blk.fc2(torch.nn.functional.gelu(blk.fc1(blk.norm2(y))))
            y = side.stage_norms[s](y).transpose(1, 2).reshape(2, -1, h, h)
        feat = side.up(y.flatten(2).mean(-1))
        want = peft.head(peft.norm(feat))
        assert torch.allclose(peft(img), want, atol=1e-5)
    assert side._image is None  # the image is not kept after the forward


def test_hst_refuses_bad_stage_splits():
    with pytest.raises(ValueError, match="widths"):
        c.apply(c.tiny_model("vit"), "hst", widths=(8, 8, 8), heads=(1, 1, 1))
    with pytest.raises(ValueError, match="already wrapped"):
        c.apply(c.apply(c.tiny_model("vit"), "hst"), "hst")


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
    assert len(method.source.read_text().splitlines()) < 400


BAD = [
    ("utuning", {"prefix_length": 0, "bottleneck": 0}, "prefix_length"),
    ("utuning", {"bottleneck": -1}, "bottleneck"),
    ("utuning", {"scale": 0}, "scale"),
    ("utuning", {"dropout": 1.0}, "dropout"),
    ("utuning", {"length": 5}, "length"),
    ("snf", {"flow_length": -1}, "flow_length"),
    ("snf", {"flow_dim": 768}, "flow_dim"),
    ("hst", {"widths": (32, 48), "heads": (2,)}, "widths"),
    ("hst", {"widths": (30,), "heads": (4,)}, "widths"),
    ("hst", {"meta_tokens": 0}, "meta_tokens"),
    ("hst", {"widths": ()}, "widths"),
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
