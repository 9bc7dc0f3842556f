"""adapter, houlsby, adaptformer and convpass held to the shared method contract."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from peft_core.methods import get_method

from . import checks as c

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(c.BACKBONES)
METHODS = ["adapter", "houlsby", "adaptformer", "convpass"]
ROOT = Path(__file__).resolve().parents[2]
GRIDS = ROOT / "config" / "method_grids"
# The reference study's excerpt sits in ../shared/reference beside the repository (not in it).
REFERENCE = ROOT / ".." / "shared" / "reference" / "seed-codebase" / "experiment" / "config" / "method"


# ---------------------------------------------------------------- parameter counts
# ViT-B/16: d = 768, 12 blocks. One bottleneck adapter of width b:
#   down d*b + b, up b*d + d  ->  1537 b + 768.
# adapter / adaptformer: 12 adapters = 18,444 b + 9,216
# houlsby:               24 adapters = 36,888 b + 18,432
# One Convpass bypass: down d*b + b, conv 9 b^2 + b, up b*d + d  ->  9 b^2 + 1538 b + 768;
# convpass: 24 bypasses (attention + MLP in 12 blocks).
COUNTS = [
    # name, hyper-parameters, count, hand computation
    ("adapter", {"bottleneck": 4}, 82_992),  # 18,444*4 + 9,216
    ("adapter", {"bottleneck": 8}, 156_768),  # 18,444*8 + 9,216
    ("adapter", {"bottleneck": 16}, 304_320),  # 18,444*16 + 9,216
    ("adapter", {"bottleneck": 32}, 599_424),  # 18,444*32 + 9,216
    ("adapter", {"bottleneck": 64}, 1_189_632),  # 18,444*64 + 9,216
    ("adapter", {"bottleneck": 8, "init": "zero", "scaler": 10.0}, 156_768),  # init/scaler add nothing
    ("houlsby", {"bottleneck": 4}, 165_984),  # 36,888*4 + 18,432
    ("houlsby", {"bottleneck": 8}, 313_536),  # 36,888*8 + 18,432
    ("houlsby", {"bottleneck": 16}, 608_640),  # 36,888*16 + 18,432
    ("houlsby", {"bottleneck": 32}, 1_198_848),  # 36,888*32 + 18,432
    ("adaptformer", {"bottleneck": 4}, 82_992),  # 18,444*4 + 9,216
    ("adaptformer", {"bottleneck": 16}, 304_320),  # 18,444*16 + 9,216
    ("adaptformer", {"bottleneck": 32}, 599_424),  # 18,444*32 + 9,216
    ("convpass", {"bottleneck": 8}, 327_552),  # 24 * (576 + 12,304 + 768) = 24 * 13,648
    ("convpass", {"bottleneck": 16}, 664_320),  # 24 * (2,304 + 24,608 + 768) = 24 * 27,680
]


@pytest.mark.parametrize("name, hp, expected", COUNTS)
def test_vit_b16_trainable_count_excluding_head(name, hp, expected):
    assert c.trainable_count(c.apply(c.vit_b16_shapes(), name, **hp)) == expected


def test_meta_count_equals_real_vit_b16():
    assert c.trainable_count(c.apply(c.vit_b16(), "convpass", bottleneck=8)) == 327_552


# ---------------------------------------------------------------- gradients
# every method on every family; the other init variants on one family
# (width 16: in a tiny random-weight model fed 4 noise images, a narrower ReLU
# bottleneck can be inactive on every token of some block by chance, which is
# a property of the toy input, not a method defect)
GRAD_CASES = [(f, "adapter", {"init": "zero"}) for f in FAMILIES]
GRAD_CASES += [(f, "houlsby", {"init": "xavier"}) for f in FAMILIES]
GRAD_CASES += [(f, "adaptformer", {"scaler": 0.1}) for f in FAMILIES]
GRAD_CASES += [(f, "convpass", {"conv_init": "identity", "scaler": 1.0}) for f in FAMILIES]
GRAD_CASES += [
    ("vit", "adapter", {"init": "xavier"}),
    ("vit", "adapter", {"init": "lora_xavier"}),
    ("vit", "houlsby", {"init": "zero"}),
    ("vit", "convpass", {"conv_init": "xavier", "scaler": 1.0}),
]


@pytest.mark.parametrize("family, name, hp", GRAD_CASES, ids=c.param_id)
def test_every_trainable_tensor_learns(family, name, hp):
    c.check_gradients(c.apply(c.tiny_model(family), name, bottleneck=16, **hp))


def _names(blocks: int, parts: tuple[str, ...], layers: tuple[str, ...]) -> set[str]:
    return {
        f"blocks.{i}.{part}.adapter.{layer}.{t}"
        for i in range(blocks)
        for part in parts
        for layer in layers
        for t in ("weight", "bias")
    } | {"head.weight", "head.bias"}


@pytest.mark.parametrize(
    "name, parts, layers",
    [
        ("adapter", ("mlp",), ("down", "up")),
        ("houlsby", ("attn", "mlp"), ("down", "up")),
        ("adaptformer", ("mlp",), ("down", "up")),
        ("convpass", ("attn", "mlp"), ("down", "conv", "up")),
    ],
)
def test_only_the_adapter_tensors_train(name, parts, layers):
    model = c.apply(c.tiny_model("dinov2_reg"), name, bottleneck=16)
    c.check_gradients(model, expected=_names(4, parts, layers) - {"head.weight", "head.bias"})


# ---------------------------------------------------------------- identity at init
# every zero-init method on every family, at the largest grid scaler; other inits on one
IDENTITY_CASES = [(f, "adapter", {"init": "zero", "scaler": 10.0}) for f in FAMILIES]
IDENTITY_CASES += [(f, "houlsby", {"init": "zero", "scaler": 10.0}) for f in FAMILIES]
IDENTITY_CASES += [(f, "adaptformer", {"scaler": 0.2}) for f in FAMILIES]
IDENTITY_CASES += [(f, "convpass", {"conv_init": "identity", "scaler": 100.0}) for f in FAMILIES]
IDENTITY_CASES += [
    ("dinov2_reg", "adapter", {"init": "lora_xavier", "scaler": 10.0}),
    ("dinov2_reg", "houlsby", {"init": "lora_kaiming", "scaler": 10.0}),
    ("dinov2_reg", "adaptformer", {"init": "zero"}),
    ("dinov2_reg", "convpass", {"conv_init": "xavier", "scaler": 100.0}),
]


@pytest.mark.parametrize("family, name, hp", IDENTITY_CASES, ids=c.param_id)
def test_zero_init_variants_are_identity(family, name, hp):
    c.check_identity_at_init(family, name, bottleneck=4, **hp)


@pytest.mark.parametrize("name", ["adapter", "houlsby", "adaptformer"])
def test_xavier_init_is_not_identity(name):
    # the reference's random ("rand_*") adapters perturb the model from the start
    with pytest.raises(AssertionError, match="differs"):
        c.check_identity_at_init("vit", name, bottleneck=4, init="xavier", scaler=1.0)


# ---------------------------------------------------------------- placement in the block
def _expected_block(orig: nn.Module, new: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """The block's output written out by hand, with the original block's frozen parts."""
    attn = lambda t: orig.attn(orig.norm1(t))
    if name == "adapter":  # Pfeiffer: after the MLP, inside ls2
        y = x + orig.ls1(attn(x))
        h = orig.mlp(orig.norm2(y))
        return y + orig.ls2(h + new.mlp.adapter(h))
    if name == "houlsby":  # after attention and after the MLP, inside ls1 / ls2
        a = attn(x)
        y = x + orig.ls1(a + new.attn.adapter(a))
        h = orig.mlp(orig.norm2(y))
        return y + orig.ls2(h + new.mlp.adapter(h))
    if name == "adaptformer":  # parallel to the MLP, reading the stream before norm2
        y = x + orig.ls1(attn(x))
        return y + orig.ls2(orig.mlp(orig.norm2(y)) + new.mlp.adapter(y))
    if name == "convpass":  # parallel to both, reading the normalised input
        n1 = orig.norm1(x)
        y = x + orig.ls1(orig.attn(n1) + new.attn.adapter(n1))
        n2 = orig.norm2(y)
        return y + orig.ls2(orig.mlp(n2) + new.mlp.adapter(n2))
    raise AssertionError(name)


@pytest.mark.parametrize("name", METHODS)
def test_adapters_sit_inside_the_layer_scaled_residual_branch(name):
    base = c.tiny_model("dinov2_reg")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # layer-scale away from its 1e-5 init, so misplacement shows
        for block in base.blocks:
            for ls in (block.ls1, block.ls2):
                ls.gamma.copy_(0.5 + torch.rand(ls.gamma.shape, generator=g))
    peft = c.apply(copy.deepcopy(base), name, bottleneck=4, scaler=1.0)
    with torch.no_grad():  # give the (zero-initialised) adapters a visible effect
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    base.eval()
    peft.eval()
    x = torch.randn(2, base.num_prefix_tokens + 16, base.embed_dim, generator=g)
    with torch.no_grad():
        got = peft.blocks[1](x)
        want = _expected_block(base.blocks[1], peft.blocks[1], x, name)
        unchanged = base.blocks[1](x)
    assert (got - want).abs().max().item() < 1e-5
    assert (got - unchanged).abs().max().item() > 1e-3  # the adapter did contribute


def test_convpass_treats_every_prefix_token_as_a_1x1_image():
    model = c.apply(c.tiny_model("dinov2_reg"), "convpass", bottleneck=4, conv_init="xavier", scaler=1.0)
    bypass = model.blocks[0].mlp.adapter
    assert bypass.num_prefix_tokens == 5 and bypass.grid == (4, 4)
    bypass.eval()
    with torch.no_grad():
        bypass.conv.bias.normal_()
        bypass.up.weight.normal_()
    x = torch.randn(2, 5 + 16, model.embed_dim, generator=torch.Generator().manual_seed(0))
    act = lambda t: t * torch.sigmoid(1.702 * t)
    with torch.no_grad():
        h = act(bypass.down(x))
        prefix = bypass.conv(h[:, :5].reshape(2 * 5, 4, 1, 1)).reshape(2, 5, 4)
        grid = h[:, 5:].reshape(2, 4, 4, 4).permute(0, 3, 1, 2)
        patches = bypass.conv(grid).permute(0, 2, 3, 1).reshape(2, 16, 4)
        want = F.linear(act(torch.cat([prefix, patches], 1)), bypass.up.weight, bypass.up.bias)
        assert (bypass(x) - want).abs().max().item() < 1e-5
        # a patch token's bypass output ignores the prefix tokens
        x2 = x.clone()
        x2[:, :5] += 1.0
        assert torch.allclose(bypass(x2)[:, 5:], bypass(x)[:, 5:])


def test_adaptformer_keeps_the_frozen_norm2_inside_its_wrapper():
    model = c.apply(c.tiny_model("clip"), "adaptformer", bottleneck=4)
    for block in model.blocks:
        assert isinstance(block.norm2, nn.Identity)
        assert isinstance(block.mlp.norm, nn.LayerNorm)
        assert not any(p.requires_grad for p in block.mlp.norm.parameters())


# ---------------------------------------------------------------- contract
@pytest.mark.parametrize("name", METHODS)
def test_no_state_leaks_between_models(name):
    c.check_no_leak(name, bottleneck=4)


@pytest.mark.parametrize("name", METHODS)
def test_not_mergeable_and_docstring_says_why(name):
    method = get_method(name)
    assert method.mergeable is False
    assert method.merge is None
    doc = " ".join(method.source.read_text().split('"""')[1].split())
    assert "Not mergeable" in doc and "nonlinear" in doc
    assert method.summary and len(method.summary) < 110


@pytest.mark.parametrize("name", METHODS)
def test_every_field_is_documented(name):
    for field, info in get_method(name).hparams.model_fields.items():
        assert info.description, f"{name}.{field} has no description"


@pytest.mark.parametrize(
    "name, hp, field",
    [
        ("adapter", {"bottleneck": 0}, "bottleneck"),
        ("adapter", {"init": "kaiming"}, "init"),
        ("adapter", {"scaler": 0}, "scaler"),
        ("adapter", {"dropout": 1.0}, "dropout"),
        ("adapter", {"bottlenek": 8}, "bottlenek"),
        ("houlsby", {"bottleneck": 0}, "bottleneck"),
        ("houlsby", {"init": "normal"}, "init"),
        ("adaptformer", {"bottleneck": 0}, "bottleneck"),
        ("adaptformer", {"init": "ones"}, "init"),
        ("adaptformer", {"scaler": -0.1}, "scaler"),
        ("convpass", {"bottleneck": 0}, "bottleneck"),
        ("convpass", {"conv_init": "zero"}, "conv_init"),
        ("convpass", {"init": "zero"}, "init"),
    ],
)
def test_bad_hyper_parameters_name_the_field(name, hp, field):
    c.check_bad_hparams(name, hp, field)


def test_non_vit_models_are_refused():
    with pytest.raises(TypeError, match="not a timm ViT"):
        c.apply(nn.Sequential(nn.Linear(2, 2)), "adapter")


# ---------------------------------------------------------------- grids
def _grid(name: str) -> dict[str, list]:
    return yaml.safe_load((GRIDS / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", METHODS)
def test_every_grid_point_builds_the_hparams(name):
    grid = _grid(name)
    hparams = get_method(name).hparams
    assert set(grid) <= set(hparams.model_fields)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    assert len({hparams(**p) for p in points}) == len(points)


# our field -> (reference key, translation of a reference value)
_SAME = {
    "bottleneck": ("adapter_bottleneck", int),
    "scaler": ("adapter_scaler", float),
    "init": ("adapter_init", str),
}
REFERENCE_GRIDS = [
    ("adapter", ["zero_adapter", "rand_p_adapter", "lora_p_adapter"], _SAME),
    ("houlsby", ["rand_h_adapter"], _SAME),
    ("adaptformer", ["adaptformer"], _SAME),
    (
        "convpass",
        ["convpass"],
        {
            "bottleneck": ("convpass_bottleneck", int),
            "scaler": ("convpass_scaler", float),
            "conv_init": ("convpass_xavier_init", lambda v: "xavier" if v else "identity"),
        },
    ),
]


@pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference study's configs not found at {REFERENCE} (../shared/reference)")
@pytest.mark.parametrize("name, files, fields", REFERENCE_GRIDS)
def test_grid_is_the_reference_grid(name, files, fields):
    grid = _grid(name)
    assert set(grid) == set(fields)
    for field, (key, translate) in fields.items():
        values = set()
        for f in files:
            ref = yaml.safe_load((REFERENCE / f"{f}.yml").read_text())[key]
            values |= {translate(v) for v in (ref if isinstance(ref, list) else [ref])}
        assert set(grid[field]) == values, field
