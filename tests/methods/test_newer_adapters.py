"""Adapter+, Mona and ARC (issue 22) held to the shared method contract.

Counts against the closed-form formula of each module's docstring on ViT-B/16,
with the paper's figure beside it where one exists (the papers count the head:
their figure is ours plus the mean VTAB-1k head, ``c.VTAB_MEAN_HEAD``).
"""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from peft_core.methods import get_method

from .. import toycell
from . import checks as c
from .test_merge_cli import PLAIN_TIMM

ROOT = Path(__file__).resolve().parents[2]
GRIDS = ROOT / "config" / "method_grids"
pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(c.BACKBONES)
METHODS = ["adapter_plus", "mona", "arc"]
MERGEABLE = ["arc"]
TINY_HP = {"adapter_plus": {}, "mona": {"bottleneck": 8}, "arc": {"bottleneck": 8}}


# ---------------------------------------------------------------- parameter counts
# adapter_plus: 12 (2 d r + r + 2 d) = 18,444 r + 18,432 (d = 768)
# mona:         24 (2 d m + m^2 + 88 m + 5 d)
# arc:          ARC 2 d r + 24 (r + d); ARC_att d r + 12 (r + d)
COUNTS = [
    ("adapter_plus", {}, 165_984),  # r = 8; + VTAB head 38,045 = 0.20M, the paper's figure
    ("adapter_plus", {"bottleneck": 1}, 36_876),
    ("adapter_plus", {"bottleneck": 32}, 608_640),
    ("adapter_plus", {"init": "lora", "drop_path": 0.0}, 165_984),
    ("mona", {}, 2_684_928),  # 24 * 111,872 (m = 64); the paper reports Swin only
    ("mona", {"bottleneck": 8}, 24 * (2 * 768 * 8 + 64 + 88 * 8 + 5 * 768)),
    ("arc", {}, 96_432),  # 76,800 + 19,632; + VTAB head = 0.13M, the paper's ARC figure
    ("arc", {"tuning_mode": "ARC_att"}, 48_216),  # 38,400 + 9,816; + head = 0.09M (quoted: 0.08M)
    ("arc", {"bottleneck": 10}, 2 * 768 * 10 + 24 * 778),
]


@pytest.mark.parametrize("name, hp, expected", COUNTS, ids=c.param_id)
def test_vit_b16_trainable_count_excluding_head(name, hp, expected):
    assert c.trainable_count(c.apply(c.vit_b16_shapes(), name, **hp)) == expected


@pytest.mark.parametrize("name", METHODS)
def test_meta_count_equals_real_vit_b16(name):
    assert c.trainable_count(c.apply(c.vit_b16(), name)) == c.trainable_count(c.apply(c.vit_b16_shapes(), name))


@pytest.mark.parametrize(
    "name, hp, published_m",
    [("adapter_plus", {}, 0.20), ("arc", {}, 0.13)],
    ids=c.param_id,
)
def test_count_with_the_vtab_head_is_the_papers_figure(name, hp, published_m):
    ours = c.trainable_count(c.apply(c.vit_b16_shapes(), name, **hp)) + c.VTAB_MEAN_HEAD
    assert round(ours / 1e6, 2) == published_m


# ---------------------------------------------------------------- gradients
GRAD_CASES = [(f, "adapter_plus", {}) for f in FAMILIES]
GRAD_CASES += [(f, "mona", {"bottleneck": 8}) for f in FAMILIES]
GRAD_CASES += [(f, "arc", {"bottleneck": 8}) for f in FAMILIES]
GRAD_CASES += [
    ("vit", "adapter_plus", {"init": "lora", "dropout": 0.1}),
    ("vit", "mona", {"bottleneck": 8, "init": "zero"}),
    ("vit", "arc", {"bottleneck": 8, "tuning_mode": "ARC_att"}),
]


@pytest.mark.parametrize("family, name, hp", GRAD_CASES, ids=c.param_id)
def test_every_trainable_tensor_learns(family, name, hp):
    c.check_gradients(c.apply(c.tiny_model(family), name, **hp))


def test_only_the_method_tensors_train():
    blocks = range(4)
    ap = {f"blocks.{i}.after_mlp.{n}" for i in blocks for n in ("down.weight", "down.bias", "up.weight", "up.bias", "scale")}
    c.check_gradients(c.apply(c.tiny_model("dinov2_reg"), "adapter_plus"), expected=ap)

    layer = ["norm.weight", "norm.bias", "gamma", "gammax", "down.weight", "down.bias", "up.weight", "up.bias"]
    layer += [f"op.convs.{k}.{t}" for k in range(3) for t in ("weight", "bias")] + ["op.projector.weight", "op.projector.bias"]
    mona = {f"blocks.{i}.{pos}.{n}" for i in blocks for pos in ("after_attn", "after_mlp") for n in layer}
    c.check_gradients(c.apply(c.tiny_model("dinov2_reg"), "mona", bottleneck=8), expected=mona)

    arc = {"arc.attn", "arc.mlp"} | {f"blocks.{i}.{p}.{n}" for i in blocks for p in ("attn", "mlp") for n in ("rescale", "bias")}
    c.check_gradients(c.apply(c.tiny_model("dinov2_reg"), "arc", bottleneck=8), expected=arc)


# ---------------------------------------------------------------- identity at init
IDENTITY_CASES = [(f, "adapter_plus", {"init": "lora"}) for f in FAMILIES]
IDENTITY_CASES += [(f, "mona", {"bottleneck": 8, "init": "zero"}) for f in FAMILIES]
IDENTITY_CASES += [(f, "arc", {"bottleneck": 8, "tuning_mode": "ARC_att"}) for f in FAMILIES]


@pytest.mark.parametrize("family, name, hp", IDENTITY_CASES, ids=c.param_id)
def test_identity_at_init_where_promised(family, name, hp):
    c.check_identity_at_init(family, name, **hp)


@pytest.mark.parametrize("name, hp", [("adapter_plus", {}), ("mona", {"bottleneck": 8}), ("arc", {"bottleneck": 8})], ids=c.param_id)
def test_official_default_init_is_not_identity(name, hp):
    # Houlsby init (Adapter+), trunc-normal up-projection (Mona), Xavier MLP rescaling (ARC): as in the official code
    with pytest.raises(AssertionError, match="differs"):
        c.check_identity_at_init("vit", name, tol=1e-9, **hp)


def test_official_init_values():
    model = c.apply(c.vit_b16_shapes().to_empty(device="cpu"), "arc")
    blk = model.blocks[0]
    assert torch.equal(blk.attn.rescale, torch.zeros(1, 50)) and torch.equal(blk.attn.bias, torch.zeros(768))
    bound = (6 / 51) ** 0.5  # Xavier-uniform on the (1, 50) MLP rescaling
    assert blk.mlp.rescale.abs().max() <= bound and blk.mlp.rescale.abs().max() > bound / 2
    ap = c.apply(c.tiny_model("vit"), "adapter_plus").blocks[0].after_mlp
    assert torch.equal(ap.scale, torch.ones(64))
    for lin in (ap.down, ap.up):  # trunc-normal std 0.01 cut at 2 std, zero bias
        assert lin.weight.abs().max() <= 0.02 and lin.weight.std() > 0.005 and not lin.bias.any()
    mona = c.apply(c.tiny_model("vit"), "mona", bottleneck=8).blocks[0].after_attn
    assert torch.allclose(mona.gamma, torch.full((64,), 1e-6)) and torch.equal(mona.gammax, torch.ones(64))
    # trunc-normal std 0.02 with timm's absolute cut at ±2: in effect untruncated
    assert 0.01 < mona.up.weight.std() < 0.03 and not mona.up.bias.any()


# ---------------------------------------------------------------- merge (ARC only)
MERGE_CASES = [(f, {"bottleneck": 8}) for f in FAMILIES] + [("vit", {"bottleneck": 8, "tuning_mode": "ARC_att"})]


@pytest.mark.parametrize("family, hp", MERGE_CASES, ids=c.param_id)
def test_arc_merged_equals_unmerged(family, hp):
    assert c.check_merge(family, "arc", tol=1e-5, **hp) <= 1e-5


def test_arc_merge_is_idempotent_and_refuses_a_bias_free_linear():
    base = c.tiny_model("vit")
    model = c.apply(copy.deepcopy(base), "arc", bottleneck=8)
    c.randomize_new_params(model, base)
    merged = get_method("arc").merge(model)
    x = c.image_batch(base)
    with torch.no_grad():
        once = merged.eval()(x)
        assert torch.equal(get_method("arc").merge(merged)(x), once)
    model = c.apply(c.tiny_model("vit"), "arc", bottleneck=8)
    model.blocks[0].attn.base.qkv.bias = None
    with pytest.raises(TypeError, match="no bias"):
        get_method("arc").merge(model)


# ---------------------------------------------------------------- the functions, written out
def _tokens(model, seed=0):
    return torch.randn(2, model.num_prefix_tokens + 16, model.embed_dim, generator=torch.Generator().manual_seed(seed))


def test_adapter_plus_reads_the_block_output():
    base = c.tiny_model("dinov2_reg")  # layer-scale: the adapter sits outside ls2, on the stream
    peft = c.apply(copy.deepcopy(base), "adapter_plus", bottleneck=4)
    c.randomize_new_params(peft, base)
    peft.eval(), base.eval()
    blk = peft.blocks[1]
    a = blk.after_mlp
    x = _tokens(base)
    with torch.no_grad():
        y = x + blk.ls1(blk.attn(blk.norm1(x)))
        y = y + blk.ls2(blk.mlp(blk.norm2(y)))
        want = y + a.scale * a.up(F.gelu(a.down(y)))
        assert (blk(x) - want).abs().max().item() < 1e-5
        assert (blk(x) - y).abs().max().item() > 1e-3


def test_mona_layers_by_hand_and_prefix_tokens_are_1x1_images():
    base = c.tiny_model("dinov2_reg")  # 1 class + 4 register tokens, 4 x 4 patch grid
    peft = c.apply(copy.deepcopy(base), "mona", bottleneck=8)
    c.randomize_new_params(peft, base)
    peft.eval(), base.eval()
    blk = orig = peft.blocks[2]  # its frozen parts, adopted under their own names
    x = _tokens(base)

    def mona(m, t):
        h = m.down(m.norm(t) * m.gamma + t * m.gammax)
        grid = h[:, 5:].transpose(1, 2).reshape(2, 8, 4, 4)
        z = sum(F.conv2d(grid, cv.weight, cv.bias, padding=cv.padding, groups=8) for cv in m.op.convs) / 3 + grid
        z = z + m.op.projector(z)
        # a prefix token is a 1x1 image: each zero-padded filter sees only its centre tap
        one = h[:, :5].reshape(10, 8, 1, 1)
        q = sum(F.conv2d(one, cv.weight, cv.bias, padding=cv.padding, groups=8) for cv in m.op.convs) / 3 + one
        q = (q + m.op.projector(q)).reshape(2, 5, 8)
        h = torch.cat([q, z.flatten(2).transpose(1, 2)], 1)
        return t + m.up(F.gelu(h))

    with torch.no_grad():
        y = mona(blk.after_attn, x + orig.ls1(orig.attn(orig.norm1(x))))
        want = mona(blk.after_mlp, y + orig.ls2(orig.mlp(orig.norm2(y))))
        assert (blk(x) - want).abs().max().item() < 1e-5
        # one Mona layer: patch tokens ignore the prefix tokens and vice versa (no conv across them)
        layer = blk.after_attn
        x2 = x.clone()
        x2[:, :5] += 1.0
        assert torch.allclose(layer(x2)[:, 5:], layer(x)[:, 5:])
        x3 = x.clone()
        x3[:, 5:] += 1.0
        assert torch.allclose(layer(x3)[:, :5], layer(x)[:, :5])


def test_arc_adapts_the_sub_layer_inputs_with_shared_projections():
    base = c.tiny_model("vit")
    peft = c.apply(copy.deepcopy(base), "arc", bottleneck=8)
    c.randomize_new_params(peft, base)
    peft.eval(), base.eval()
    d_att, d_mlp = peft.arc.attn, peft.arc.mlp
    assert all(b.attn.down is d_att and b.mlp.down is d_mlp for b in peft.blocks)
    # stored and counted once, however many blocks use it
    assert [k for k in peft.state_dict() if k.startswith("arc.")] == ["arc.attn", "arc.mlp"]
    names = [n for n, _ in peft.named_parameters()]
    assert names.count("arc.attn") == 1 and not any(n.endswith(".down") for n in names)
    blk = peft.blocks[1]
    orig = torch.nn.Module()  # the frozen sub-layers inside the wrappers
    orig.norm1, orig.attn, orig.norm2, orig.mlp = blk.norm1, blk.attn.base, blk.norm2, blk.mlp.base
    x = _tokens(base)
    with torch.no_grad():
        h = orig.norm1(x)
        y = x + orig.attn(h + (h @ (d_att * blk.attn.rescale)) @ d_att.T + blk.attn.bias)
        g = orig.norm2(y)
        want = y + orig.mlp(g + (g @ (d_mlp * blk.mlp.rescale)) @ d_mlp.T + blk.mlp.bias)
        assert (blk(x) - want).abs().max().item() < 1e-5
    copied = copy.deepcopy(peft)  # the copy shares its own projections, not the original's
    assert copied.blocks[3].attn.down is copied.arc.attn and copied.arc.attn is not d_att


def test_wrapped_or_foreign_blocks_are_refused():
    for name in ("adapter_plus", "mona"):
        with pytest.raises(TypeError, match="pre-norm Block"):
            c.apply(c.apply(c.tiny_model("vit"), name, **TINY_HP[name]), name, **TINY_HP[name])
    with pytest.raises(ValueError, match="already has an `arc`"):
        c.apply(c.apply(c.tiny_model("vit"), "arc", bottleneck=8), "arc", bottleneck=8)
    with pytest.raises(TypeError, match="not a timm ViT"):
        c.apply(torch.nn.Sequential(torch.nn.Linear(2, 2)), "mona")


def test_mona_refuses_tokens_off_the_grid():
    model = c.apply(c.tiny_model("vit"), "mona", bottleneck=8)
    with pytest.raises(ValueError, match="patch grid"):
        model.blocks[0](torch.randn(1, 1 + 15, 64))


# ---------------------------------------------------------------- contract
@pytest.mark.parametrize("name", METHODS)
def test_no_state_leaks_between_models(name):
    c.check_no_leak(name, **TINY_HP[name])


@pytest.mark.parametrize("name", METHODS)
def test_registry_entry(name):
    method = get_method(name)
    assert method.mergeable == (name in MERGEABLE)
    assert method.summary and len(method.summary) < 110
    for field, info in method.hparams.model_fields.items():
        assert info.description, f"{name}.{field} has no description"
    doc = " ".join(method.source.read_text().split('"""')[1].split())
    assert "repository" in doc and "arXiv" in doc and "ViT-B/16" in doc
    assert ("Not mergeable" in doc) == (name not in MERGEABLE)
    assert len(method.source.read_text().splitlines()) < 400


BAD = [
    ("adapter_plus", {"bottleneck": 0}, "bottleneck"),
    ("adapter_plus", {"init": "xavier"}, "init"),
    ("adapter_plus", {"drop_path": 1.0}, "drop_path"),
    ("adapter_plus", {"dropout": -0.1}, "dropout"),
    ("adapter_plus", {"scaling": "channel"}, "scaling"),
    ("mona", {"bottleneck": 0}, "bottleneck"),
    ("mona", {"dropout": 1.0}, "dropout"),
    ("mona", {"init": "xavier"}, "init"),
    ("arc", {"bottleneck": 0}, "bottleneck"),
    ("arc", {"tuning_mode": "ARC_mlp"}, "tuning_mode"),
    ("arc", {"dropout": 1.5}, "dropout"),
    ("arc", {"adapter_dim": 50}, "adapter_dim"),
]


@pytest.mark.parametrize("name, hp, field", BAD, ids=c.param_id)
def test_bad_hyper_parameters_name_the_field(name, hp, field):
    c.check_bad_hparams(name, hp, field)


# ---------------------------------------------------------------- grids
@pytest.mark.parametrize("name", METHODS)
def test_every_grid_point_builds_and_the_studies_use_the_grid(name):
    grid = yaml.safe_load((GRIDS / f"{name}.yaml").read_text())
    hparams = get_method(name).hparams
    assert set(grid) <= set(hparams.model_fields)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    assert len({hparams(**p) for p in points}) == len(points)
    assert "repository" in (GRIDS / f"{name}.yaml").read_text().split("\n\n")[0]
    study = yaml.safe_load((ROOT / "config" / "vtab1k.yaml").read_text())
    assert study["methods"][name] == grid
    assert name not in yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())["methods"]
    demo = yaml.safe_load((ROOT / "config" / "demo_methods.yaml").read_text())["methods"]
    hparams(**demo[name])


# ---------------------------------------------------------------- the engine
@pytest.mark.parametrize("name", METHODS)
def test_a_toy_cell_trains_and_arc_merges_into_plain_timm(tmp_path, monkeypatch, name):
    import pandas as pd

    from peft_core.merge import merge_cell
    from peft_core.train import run_cell

    monkeypatch.chdir(tmp_path)
    toycell.write_inputs(tmp_path)
    cell = toycell.spec(name, TINY_HP[name], epochs=1)
    run_cell(cell, "train.pt", "eval.pt", "backbone.safetensors", "cell", threads=1, device="cpu", log=lambda m: None)
    preds = pd.read_parquet(tmp_path / "cell" / "predictions.parquet")["pred"].tolist()
    assert len(preds) == 32
    if name not in MERGEABLE:
        return
    assert merge_cell("cell", tmp_path / "merged.safetensors")["max_abs_diff"] <= 1e-5
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_TIMM, "merged.safetensors", json.dumps(cell.backbone.kwargs), "eval.pt"],
        capture_output=True, text=True, cwd=tmp_path, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout) == preds
