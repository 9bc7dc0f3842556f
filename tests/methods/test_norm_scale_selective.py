"""ln, difffit, ssf and selective held to the shared method contract."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from peft_core.errors import InputError
from peft_core.methods import get_method

from . import checks as c

FAMILIES = list(c.BACKBONES)
METHODS = ("ln", "difffit", "ssf", "selective")
GRIDS = Path(__file__).resolve().parents[2] / "config" / "method_grids"
DEPTH = c.TINY["depth"]

# ViT-B/16 (dim 768, MLP 3072, 12 blocks, no patch norm, no norm_pre):
LN_B16 = 25 * 2 * 768  # 24 block LayerNorms + final norm, weight + bias = 38,400
BITFIT_B16 = 102_912  # every bias (see test_core_methods)
DIFFFIT_B16 = BITFIT_B16 + 25 * 768 + 12 * 2 * 768  # + LN weights + gamma1/gamma2 = 140,544
# patch conv 768 + per block (norm1 768, qkv 2304, proj 768, norm2 768, fc1 3072, fc2 768) + final norm 768
SSF_B16 = 2 * (768 + 12 * (768 + 2304 + 768 + 768 + 3072 + 768) + 768)  # = 205,824
QKV, PROJ = 768 * 2304 + 2304, 768 * 768 + 768  # 1,771,776 / 590,592
FC1, FC2 = 768 * 3072 + 3072, 3072 * 768 + 768  # 2,362,368 / 2,360,064
NORMS = 2 * 2 * 768  # norm1 + norm2 = 3,072
BLOCK = QKV + PROJ + FC1 + FC2 + NORMS  # 7,087,872


@pytest.fixture(scope="module")
def b16():
    """checks.vit_b16() on the meta device: the exact architecture, no weights to initialise."""

    def build():
        with torch.device("meta"):
            return c.vit_b16()

    return build


@pytest.mark.parametrize(
    "name, hp, expected",
    [
        ("ln", {}, LN_B16),
        ("difffit", {}, DIFFFIT_B16),
        ("ssf", {}, SSF_B16),
        ("ssf", {"init": "normal", "init_std": 0.02}, SSF_B16),  # grid: config/method_grids/ssf.yaml
        # grid: config/method_grids/selective.yaml (blocks 9, 10, 11)
        ("selective", {"blocks": (9, 10, 11), "modules": ("all",)}, 3 * BLOCK),  # 21,263,616
        ("selective", {"blocks": (9, 10, 11), "modules": ("attn",)}, 3 * (QKV + PROJ)),  # 7,087,104
        ("selective", {"blocks": (9, 10, 11), "modules": ("mlp",)}, 3 * (FC1 + FC2)),  # 14,167,296
        ("selective", {"blocks": (-3, -2, -1)}, 3 * BLOCK),
        ("selective", {"blocks": (0,), "modules": ("qkv",)}, QKV),
        ("selective", {"blocks": (0, 5), "modules": ("proj", "fc2", "norm")}, 2 * (PROJ + FC2 + NORMS)),
    ],
)
def test_vit_b16_counts(b16, name, hp, expected):
    assert c.trainable_count(c.apply(b16(), name, **hp)) == expected


@pytest.mark.parametrize(
    "name, hp, expected",
    [("ln", {}, 38_400), ("difffit", {}, 140_544), ("ssf", {}, 205_824), ("selective", {"blocks": (0,)}, 7_087_872)],
)
def test_counts_on_vit_b16_are_the_hand_computed_totals(b16, name, hp, expected):
    """The applied method's count against the totals written out (not the formulas above, which could share a slip)."""
    assert c.trainable_count(c.apply(b16(), name, **hp)) == expected


@pytest.mark.parametrize("hp", [{"blocks": (1,)}, {"blocks": (1,), "modules": ("fc1",)}])
def test_selective_block_1_is_only_block_1(b16, hp):
    # the reference's substring match ('blocks.1', '1.mlp.fc1') also unfroze blocks 10 and 11
    model = c.apply(b16(), "selective", **hp)
    names = c.trainable_names(model)
    assert names and all(n.startswith("blocks.1.") for n in names)
    assert c.trainable_count(model) == (FC1 if "modules" in hp else BLOCK)


# ---- exact trainable tensor sets on the tiny families ----------------------------------------


def _blocks(*subs: str, blocks=range(DEPTH)) -> set[str]:
    return {f"blocks.{i}.{s}" for i in blocks for s in subs}


def _ln_names(family: str) -> set[str]:
    extra = {"norm_pre.weight", "norm_pre.bias"} if family == "clip" else set()
    return _blocks("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias") | {"norm.weight", "norm.bias"} | extra


def _difffit_names(family: str) -> set[str]:
    biases = _blocks(*(f"{m}.bias" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")))
    patch = set() if family == "clip" else {"patch_embed.proj.bias"}  # CLIP's patch conv has no bias
    gammas = _blocks("ls1.difffit_gamma", "ls2.difffit_gamma")
    return _ln_names(family) | biases | patch | gammas


def _ssf_names(family: str) -> set[str]:
    sites = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    return {
        f"{site}.{t}"
        for site in ["patch_embed.proj", "norm", *(f"blocks.{i}.{s}" for i in range(DEPTH) for s in sites)]
        for t in ("ssf_scale", "ssf_shift")
    }


def _selective_names(family: str) -> set[str]:
    # blocks=(1, -1), modules=("all",): every tensor of blocks 1 and 3, layer-scale included
    names = {n for n, _ in c.tiny_model(family).named_parameters() if n.startswith(("blocks.1.", "blocks.3."))}
    assert ("blocks.3.ls2.gamma" in names) == (family == "dinov2_reg")
    return names


HEAD = {"head.weight", "head.bias"}
ALL_FAMILIES = [
    ("ln", {}, _ln_names),
    ("difffit", {}, _difffit_names),
    ("ssf", {}, _ssf_names),
    ("selective", {"blocks": (1, -1)}, _selective_names),
]
VIT_ONLY = [
    ("ssf", {"init": "normal"}, _ssf_names),
    ("selective", {"blocks": (0,), "modules": ("qkv", "fc2")}, lambda f: _blocks(
        "attn.qkv.weight", "attn.qkv.bias", "mlp.fc2.weight", "mlp.fc2.bias", blocks=[0])),
    ("selective", {"blocks": (2,), "modules": ("norm",)}, lambda f: _blocks(
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", blocks=[2])),
]
GRADIENT_CASES = [(f, *case) for f in FAMILIES for case in ALL_FAMILIES] + [("vit", *case) for case in VIT_ONLY]


@pytest.mark.parametrize("family, name, hp, names", GRADIENT_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_gradients_reach_exactly_the_trainable_tensors(family, name, hp, names):
    model = c.apply(c.tiny_model(family), name, **hp)
    expected = names(family)
    grads = c.check_gradients(model, expected=expected)
    assert set(grads) == expected | HEAD


@pytest.mark.parametrize(
    "family, name, hp",
    [(f, m, {}) for f in FAMILIES for m in ("difffit", "ssf")]
    # these two only unfreeze native tensors: identity by construction, checked once
    + [("vit", "ln", {}), ("vit", "selective", {"blocks": (0, 2), "modules": ("attn", "norm")})],
)
def test_identity_at_init(family, name, hp):
    c.check_identity_at_init(family, name, **hp)


def test_ssf_normal_init_is_the_reference_random_init():
    model = c.apply(c.tiny_model("vit"), "ssf", init="normal", init_std=0.02)
    scale, shift = model.blocks[0].attn.qkv.ssf_scale, model.blocks[0].attn.qkv.ssf_shift
    scale, shift = scale.detach(), shift.detach()
    assert 0.005 < float(scale.std()) < 0.05 and abs(float(scale.mean()) - 1) < 0.01
    assert 0.005 < float(shift.std()) < 0.05 and abs(float(shift.mean())) < 0.01
    with pytest.raises(AssertionError):
        c.check_identity_at_init("vit", "ssf", init="normal")


@pytest.mark.parametrize(
    "family, name, hp",
    [
        (f, m, hp)
        for f in FAMILIES
        for m, hp in [("ln", {}), ("difffit", {}), ("ssf", {}), ("selective", {"blocks": (-1,)})]
    ]
    + [(f, "ssf", {"init": "normal"}) for f in ("vit", "clip")],
)
def test_merge_matches_unmerged(family, name, hp):
    c.check_merge(family, name, **hp)


def test_ssf_merge_without_patch_bias_uses_pos_embed():
    # CLIP's patch conv has no bias: the shift goes into the patch rows of pos_embed, not a new tensor
    model = c.apply(c.tiny_model("clip"), "ssf")
    assert model.patch_embed.proj.base.bias is None
    with torch.no_grad():
        model.patch_embed.proj.ssf_shift.fill_(0.5)
    before = model.pos_embed.detach().clone()
    merged = get_method("ssf").merge(model)
    assert merged.patch_embed.proj.bias is None
    assert torch.equal(merged.pos_embed[:, :1], before[:, :1])  # class token row untouched
    assert torch.allclose(merged.pos_embed[:, 1:], before[:, 1:] + 0.5)


@pytest.mark.parametrize("name, hp", [(m, {}) for m in METHODS[:3]] + [("selective", {"blocks": (1,)})])
def test_no_state_leaks_between_models(name, hp):
    c.check_no_leak(name, **hp)


@pytest.mark.parametrize("name", METHODS)
def test_mergeable(name):
    assert get_method(name).mergeable


@pytest.mark.parametrize(
    "name, hp, field",
    [
        ("ln", {"rank": 4}, "rank"),
        ("difffit", {"gamma": 2.0}, "gamma"),
        ("ssf", {"init": "zeros"}, "init"),
        ("ssf", {"init_std": 0.0}, "init_std"),
        ("ssf", {"scale": 1.0}, "scale"),
        ("selective", {"blocks": ()}, "blocks"),
        ("selective", {"blocks": (1, 1)}, "blocks"),
        ("selective", {"blocks": ("x",)}, "blocks"),
        ("selective", {"modules": ()}, "modules"),
        ("selective", {"modules": ("attn", "ffn")}, "modules"),
        ("selective", {"modules": ("mlp", "mlp")}, "modules"),
        ("selective", {"modules": ("all", "attn")}, "modules"),
        ("selective", {"block_index": (1,)}, "block_index"),
    ],
)
def test_bad_hyper_parameters_name_the_field(name, hp, field):
    with pytest.raises(ValidationError) as err:
        get_method(name).hparams(**hp)
    assert field in str(err.value)


@pytest.mark.parametrize(
    "blocks, message",
    [
        ((0, DEPTH), f"selective.blocks: index {DEPTH} out of range for a {DEPTH}-block model"),
        ((-DEPTH - 1,), f"selective.blocks: index {-DEPTH - 1} out of range for a {DEPTH}-block model"),
        ((DEPTH - 1, -1), f"selective.blocks: {DEPTH - 1} and -1 both name block {DEPTH - 1}"),
    ],
)
def test_selective_blocks_out_of_range_is_one_line_input_error(blocks, message):
    with pytest.raises(InputError) as err:
        c.apply(c.tiny_model("vit"), "selective", blocks=blocks)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_selective_block_12_on_vit_b16_names_the_field(b16):
    with pytest.raises(InputError, match=r"^selective\.blocks: index 12 out of range for a 12-block model$"):
        c.apply(b16(), "selective", blocks=(12,))


@pytest.mark.parametrize("name", METHODS)
def test_grid_file_builds_every_point(name):
    text = (GRIDS / f"{name}.yaml").read_text()
    assert text.startswith("# Reference:") and "seed-codebase/" in text.splitlines()[0] + text.splitlines()[1]
    grid = yaml.safe_load(text)
    assert isinstance(grid, dict) and all(isinstance(v, list) and v for v in grid.values())
    hp_model = get_method(name).hparams
    points = [hp_model(**dict(zip(grid, combo))) for combo in itertools.product(*grid.values())]
    assert len(points) == {"ln": 1, "difffit": 1, "ssf": 1, "selective": 3}[name]


@pytest.mark.parametrize("name", METHODS)
def test_every_field_is_documented(name):
    method = get_method(name)
    assert method.summary and not method.summary.endswith(",")
    assert all(f.description for f in method.hparams.model_fields.values())
