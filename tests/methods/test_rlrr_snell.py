"""RLRR and SNELL held to the shared method contract, and checked against their reference code by hand."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from peft_core.grids import expand_grid, grid_model
from peft_core.methods import get_method

from . import checks as c

ROOT = Path(__file__).resolve().parents[2]
GRIDS = ROOT / "config" / "method_grids"
pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(c.BACKBONES)
METHODS = ["rlrr", "snell"]
# small enough for the tiny models, every option on
SMALL = {"rlrr": {}, "snell": {"rank": 4, "sparsity": 0.5}}

# ---------------------------------------------------------------- parameter counts
# RLRR on ViT-B/16 (d 768, MLP 3072), per block: qkv 3 s_col of 768 + s_row 2304 + shift 2304 = 6,912;
#   proj 3 x 768 = 2,304; fc1 768 + 2 x 3072 = 6,912; fc2 3072 + 2 x 768 = 4,608; SSF after norm1 and
#   norm2 4 x 768 = 3,072 -> 23,808; 12 blocks 285,696, + SSF after the patch embedding and the final
#   norm 2 x 1,536 = 288,768. Paper (Dong et al. 2024, Table 2, VTAB-1k): 0.33M, the head counted:
#   288,768 + 769 x 940 / 19 = 326,814 -> 0.33M.
# SNELL, r (in + out) per weight: 12 x (4 x 1536 + 2 x 3840) r = 165,888 r, + the class token 768.
#   The paper reports no count ("we justify our choice to omit to report the volume of learnable
#   parameters", Appendix E.1); r = 8 is 1,327,872.
#   mixk adds alpha, gamma, beta per weight: 12 x 6 x 3 = 216.
COUNTS = [
    ("rlrr", {}, 288_768),
    ("rlrr", {"ssf": False}, 288_768 - 12 * 3_072 - 2 * 1_536),
    ("rlrr", {"targets": ("qkv",)}, 12 * 6_912 + 12 * 3_072 + 2 * 1_536),
    ("snell", {}, 165_888 * 8 + 768),
    ("snell", {"rank": 16}, 165_888 * 16 + 768),
    ("snell", {"rank": 32}, 5_309_184),
    ("snell", {"rank": 8, "kernel": "mixk"}, 1_327_872 + 216),
    ("snell", {"tune_cls_token": False}, 1_327_104),
    ("snell", {"targets": ("fc1", "fc2")}, 12 * 2 * 3_840 * 8 + 768),
]


@pytest.mark.parametrize("name, hp, expected", COUNTS, ids=c.param_id)
def test_vit_b16_trainable_count_excluding_head(name, hp, expected):
    assert c.trainable_count(c.apply(c.vit_b16_shapes(), name, **hp)) == expected


def test_rlrr_count_rounds_to_the_papers_figure():
    # RLRR Table 2 (VTAB-1k), "Params. (M)" 0.33, heads included
    assert round((288_768 + c.VTAB_MEAN_HEAD) / 1e6, 2) == 0.33


@pytest.mark.parametrize("name", METHODS)
def test_meta_count_equals_real_vit_b16(name):
    real = c.trainable_count(c.apply(c.vit_b16(), name))
    assert real == c.trainable_count(c.apply(c.vit_b16_shapes(), name))


# ---------------------------------------------------------------- gradients
def _expected(name: str, depth: int, hp: dict) -> set[str]:
    lins = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    if name == "rlrr":
        names = {f"blocks.{i}.{lin}.{t}" for i in range(depth) for lin in lins for t in ("scale_col", "scale_row", "shift")}
        ssf = {f"blocks.{i}.{n}" for i in range(depth) for n in ("norm1", "norm2")} | {"patch_embed.proj", "norm"}
        return names | {f"{s}.ssf_{t}" for s in ssf for t in ("scale", "shift")}
    extra = ("alpha", "gamma", "beta") if hp.get("kernel") == "mixk" else ()
    names = {f"blocks.{i}.{lin}.{t}" for i in range(depth) for lin in lins for t in ("in_factors", "out_factors", *extra)}
    return names | {"cls_token"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name, hp", [("rlrr", {}), ("snell", SMALL["snell"]), ("snell", {"rank": 4, "kernel": "mixk"})], ids=c.param_id)
def test_every_trainable_tensor_learns(family, name, hp):
    model = c.apply(c.tiny_model(family), name, **hp)
    c.check_gradients(model, expected=_expected(name, len(model.blocks), hp))


# ---------------------------------------------------------------- identity / not identity at init
@pytest.mark.parametrize("family", FAMILIES)
def test_rlrr_zero_init_is_identity(family):
    c.check_identity_at_init(family, "rlrr", init="zero")


@pytest.mark.parametrize("name", METHODS)
def test_reference_init_is_not_identity(name):
    # both official codes start away from the backbone (Kaiming-uniform factors, SSF ~ N(1, 0.02))
    base = c.tiny_model("vit")
    peft = c.apply(copy.deepcopy(base), name, **SMALL[name])
    assert c.max_diff(base, peft, c.image_batch(base)) > 1e-4


# ---------------------------------------------------------------- merge
MERGE_CASES = [(f, "rlrr", {}) for f in FAMILIES]
MERGE_CASES += [(f, "snell", SMALL["snell"]) for f in FAMILIES]
MERGE_CASES += [("vit", "snell", {"rank": 4, "kernel": "mixk", "mask": "binary", "sparsity": 0.9})]
MERGE_CASES += [("dinov2_reg", "snell", {"rank": 6, "num_kernels": 3, "sparsity": 0.0, "norm_p": 1.0})]
MERGE_CASES += [("clip", "rlrr", {"ssf": False, "targets": ("qkv", "fc2")})]


@pytest.mark.parametrize("family, name, hp", MERGE_CASES, ids=c.param_id)
def test_merge_matches_unmerged(family, name, hp):
    c.check_merge(family, name, tol=1e-5, **hp)


@pytest.mark.parametrize("name", METHODS)
def test_merge_is_not_vacuous(name):
    base = c.tiny_model("vit")
    peft = c.apply(copy.deepcopy(base), name, **SMALL[name])
    c.randomize_new_params(peft, base)
    assert c.max_diff(base, peft, c.image_batch(base)) > 1e-2


@pytest.mark.parametrize("name", METHODS)
def test_no_state_leaks_between_models(name):
    c.check_no_leak(name, **SMALL[name])


# ---------------------------------------------------------------- by hand, against the reference formulas
def test_rlrr_linear_by_hand():
    # the reference's RLRRLinear on q, k, v separately: W + W * scale_col * scale_line, b + shift_bias
    peft = c.apply(c.tiny_model("vit"), "rlrr")
    lin = peft.blocks[1].attn.qkv
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = []
        for k in range(3):
            rows = slice(64 * k, 64 * (k + 1))
            w = lin.base.weight[rows]
            w = w * lin.scale_col[k : k + 1] * lin.scale_row[rows] + w
            outs.append(F.linear(x, w, lin.base.bias[rows] + lin.shift[rows]))
        assert torch.allclose(lin(x), torch.cat(outs, -1), atol=1e-6)
    # init bounds of the reference's kaiming_uniform_ on (1, in) and (out, 1)
    assert lin.scale_col.abs().max() <= math.sqrt(6 / 64) and lin.scale_row.abs().max() <= math.sqrt(6)
    assert lin.scale_row.abs().max() > 1.0 and float(lin.shift.detach().abs().max()) == 0


def test_snell_update_by_hand():
    # the reference's SNELL: cdist(In_Qs, Out_Qs) weighted by 0.1 * (+1, -1), quantile threshold,
    # kept entries times their detached magnitude; F.linear(x, W_sparse.T)
    peft = c.apply(c.tiny_model("vit"), "snell", rank=4, sparsity=0.7)
    lin = peft.blocks[0].mlp.fc1
    in_qs, out_qs = lin.in_factors[0], lin.out_factors[0]  # (H, in, r/H), (H, out, r/H)
    with torch.no_grad():
        w = torch.sum(0.1 * torch.tensor([1.0, -1.0]).view(2, 1, 1) * torch.cdist(in_qs, out_qs, p=2), 0)  # (in, out)
        thres = torch.quantile(w.abs().flatten(), 0.7)
        w_sparse = w * F.threshold(w.abs(), float(thres), 0)
        assert torch.allclose(lin.delta_weight()[0], w_sparse.T, atol=1e-7)
        kept = (lin.delta_weight() != 0).float().mean().item()
        assert kept == pytest.approx(0.3, abs=0.01)
        lin.eval()
        x = torch.randn(3, 64)
        assert torch.allclose(lin(x), lin.base(x) + F.linear(x, w_sparse.T), atol=1e-6)


def test_snell_thresholds_q_k_v_separately():
    peft = c.apply(c.tiny_model("vit"), "snell", rank=4, sparsity=0.5, mask="binary")
    delta = peft.blocks[0].attn.qkv.delta_weight()
    assert delta.shape == (3, 64, 64)
    assert all((d != 0).float().mean().item() == pytest.approx(0.5, abs=0.01) for d in delta)


# ---------------------------------------------------------------- hyper-parameters and grids
@pytest.mark.parametrize(
    "name, hp, field",
    [
        ("rlrr", {"targets": ()}, "targets"),
        ("rlrr", {"targets": ("qkv", "qkv")}, "targets"),
        ("rlrr", {"init": "kaiming"}, "init"),
        ("rlrr", {"scale": 1.0}, "scale"),
        ("snell", {"rank": 0}, "rank"),
        ("snell", {"rank": 5}, "rank"),
        ("snell", {"sparsity": 1.0}, "sparsity"),
        ("snell", {"sparsity": -0.1}, "sparsity"),
        ("snell", {"kernel": "rbf"}, "kernel"),
        ("snell", {"norm_p": 0}, "norm_p"),
        ("snell", {"dropout": 1.0}, "dropout"),
        ("snell", {"targets": ("q",)}, "targets"),
    ],
    ids=c.param_id,
)
def test_bad_hyper_parameters_name_the_field(name, hp, field):
    c.check_bad_hparams(name, hp, field)


@pytest.mark.parametrize("name", METHODS)
def test_grid_files_are_valid(name):
    hp_cls = get_method(name).hparams
    grid = grid_model(hp_cls).model_validate(yaml.safe_load((GRIDS / f"{name}.yaml").read_text()))
    assert expand_grid(hp_cls, grid)


@pytest.mark.parametrize("name", METHODS)
def test_registered_mergeable(name):
    assert get_method(name).mergeable
