"""fact_tt, fact_tk and repadapter held to the shared method contract."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import yaml
from pydantic import ValidationError
from torch import nn

from peft_core.grids import expand_grid, grid_model
from peft_core.methods import get_method

from . import checks as c

FAMILIES = list(c.BACKBONES)
METHODS = ["fact_tt", "fact_tk", "repadapter"]
GRIDS = Path(__file__).resolve().parents[2] / "config" / "method_grids"


@pytest.fixture(scope="module")
def vit_b16():
    # counts depend only on shapes: build ViT-B/16 on the meta device (no memory, no init cost)
    with torch.device("meta"):
        return c.vit_b16()


# ViT-B/16: d = 768, L = 12 blocks, MLP hidden 4d.
# FacT-TT (rank r): U (r x 768) + V (768 x r) = 1536 r, plus per block the cores
#   q, k, v, proj: 4 r^2; fc1: 4r x r; fc2: r x 4r  -> 12 r^2 per block, 144 r^2 in all.
#   r=8: 12,288 + 9,216 = 21,504; r=16: 24,576 + 36,864 = 61,440; r=32: 49,152 + 147,456 = 196,608.
# FacT-TK (rank r): U + V = 1536 r, P (r x 12 slices x 12 blocks) = 144 r, core C = r^3.
#   r=16: 24,576 + 2,304 + 4,096 = 30,976; r=32: 49,152 + 4,608 + 32,768 = 86,528;
#   r=64: 98,304 + 9,216 + 262,144 = 369,664.
# RepAdapter (bottleneck k, groups 2), 2 adapters per block (before qkv, before fc1), 24 in all:
#   A 768k + bias k, grouped B 2 x (384 x k/2) = 384k + bias 768  -> 1153 k + 768 each.
#   k=8: 24 x 9,992 = 239,808; k=16: 24 x 19,216 = 461,184; k=32: 24 x 37,664 = 903,936.
# The reference study trains exactly these tensors (its substring `fact` / `ft_*_module` selection).
@pytest.mark.parametrize(
    "name, hp, expected",
    [
        ("fact_tt", {"rank": 8}, 21_504),
        ("fact_tt", {"rank": 16}, 61_440),
        ("fact_tt", {"rank": 32}, 196_608),
        ("fact_tk", {"rank": 16}, 30_976),
        ("fact_tk", {"rank": 32}, 86_528),
        ("fact_tk", {"rank": 64}, 369_664),
        ("fact_tk", {"rank": 16, "layout": "per_slice"}, 30_976),
        ("repadapter", {"bottleneck": 8}, 239_808),
        ("repadapter", {"bottleneck": 16}, 461_184),
        ("repadapter", {"bottleneck": 32}, 903_936),
        ("repadapter", {"bottleneck": 8, "targets": ("attn",)}, 119_904),
    ],
)
def test_vit_b16_trainable_count(vit_b16, name, hp, expected):
    model = c.apply(copy.deepcopy(vit_b16), name, **hp)
    assert c.trainable_count(model) == expected


def _expected_names(name: str, depth: int) -> set[str]:
    if name == "fact_tt":
        return {"fact.u", "fact.v"} | {f"fact.cores.{i}" for i in range(4 * depth)}
    if name == "fact_tk":
        return {"fact.u", "fact.v", "fact.c", "fact.p"}
    return {
        f"blocks.{i}.{lin}.adapter.{t}"
        for i in range(depth)
        for lin in ("attn.qkv", "mlp.fc1")
        for t in ("down.weight", "down.bias", "up_weight", "up_bias")
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "name, hp", [("fact_tt", {"rank": 4}), ("fact_tk", {"rank": 4}), ("repadapter", {})]
)
def test_gradients_reach_exactly_the_method_tensors(family, name, hp):
    model = c.apply(c.tiny_model(family), name, **hp)
    c.check_gradients(model, expected=_expected_names(name, len(model.blocks)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "name, hp",
    [
        ("fact_tt", {"rank": 4, "scale": 10.0}),
        ("fact_tk", {"rank": 4, "scale": 10.0}),
        ("repadapter", {"scale": 10.0}),
    ],
)
def test_identity_at_init(family, name, hp):
    c.check_identity_at_init(family, name, tol=1e-6, **hp)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "name, hp",
    [
        ("fact_tt", {"rank": 4, "scale": 2.0}),
        ("fact_tk", {"rank": 4, "scale": 2.0}),
        ("repadapter", {"bottleneck": 4, "scale": 2.0}),
    ],
)
def test_merge_matches_unmerged(family, name, hp):
    c.check_merge(family, name, tol=1e-5, **hp)


@pytest.mark.parametrize(
    "hp", [{"bottleneck": 4, "groups": 4, "targets": ("mlp",)}, {"targets": ("attn",)}]
)
def test_repadapter_variants_merge(hp):
    c.check_merge("dinov2_reg", "repadapter", tol=1e-5, **hp)


@pytest.mark.parametrize("name", METHODS)
def test_merge_is_not_vacuous(name):
    # the randomised increments the merge check folds in really change the model
    base = c.tiny_model("vit")
    peft = c.apply(copy.deepcopy(base), name)
    c.randomize_new_params(peft, base)
    assert c.max_diff(base, peft, c.image_batch(base)) > 1e-2


def test_repadapter_merges_into_bias_free_linears():
    # qkv without bias (some CLIP/DINOv2 variants): the adapter has no bias either, merge stays exact
    name, kwargs = c.BACKBONES["clip"]
    torch.manual_seed(0)
    base = timm.create_model(
        name, pretrained=False, num_classes=c.NUM_CLASSES, qkv_bias=False, **kwargs
    ).eval()
    peft = c.apply(copy.deepcopy(base), "repadapter", bottleneck=4)
    assert all(blk.attn.qkv.adapter.down.bias is None for blk in peft.blocks)
    c.randomize_new_params(peft, base)
    x = c.image_batch(base)
    with torch.no_grad():
        before = peft.eval()(x)
    merged = get_method("repadapter").merge(peft)
    assert set(merged.state_dict()) == set(base.state_dict())
    with torch.no_grad():
        assert (merged(x) - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", METHODS)
def test_no_state_leaks_between_models(name):
    c.check_no_leak(name)


@pytest.mark.parametrize("name", ["fact_tt", "fact_tk"])
def test_fact_factors_are_owned_by_their_model(name):
    # the shared factors live on model.fact; a deep copy gets its own, and every wrapper uses them
    a = c.apply(c.tiny_model("vit"), name, rank=2)
    b = copy.deepcopy(a)
    assert b.fact is not a.fact
    assert all(
        blk.attn.qkv.factors is b.fact and blk.mlp.fc2.factors is b.fact
        for blk in b.blocks
    )
    assert len([k for k in a.state_dict() if k.startswith("fact.")]) == len(
        list(a.fact.state_dict())
    )


def test_fact_tt_matches_the_reference_slice_layout():
    # reference forward: qkv = cat_j V Q_j U x; fc1 = V applied to each r-chunk of M1 U x;
    # fc2 = V M2 cat_j(U x_j) over the 4 d-wide chunks x_j of the hidden vector
    model = c.apply(c.tiny_model("vit"), "fact_tt", rank=3, scale=0.5).eval()
    c.randomize_new_params(model, c.tiny_model("vit"))
    f, d, r = model.fact, 64, 3
    u, v = f.u.detach(), f.v.detach()
    blk = model.blocks[1]
    with torch.no_grad():
        x = torch.randn(5, d)
        m = blk.attn.qkv.factors.core(blk.attn.qkv.layer)
        ref = (
            torch.cat([x @ u.T @ m[j * r : (j + 1) * r].T @ v.T for j in range(3)], -1)
            * 0.5
        )
        assert torch.allclose(blk.attn.qkv(x) - blk.attn.qkv.base(x), ref, atol=1e-6)
        m1 = f.core(blk.mlp.fc1.layer)
        ref = ((x @ u.T @ m1.T).reshape(5, 4, r) @ v.T).reshape(5, 4 * d) * 0.5
        assert torch.allclose(blk.mlp.fc1(x) - blk.mlp.fc1.base(x), ref, atol=1e-6)
        h = torch.randn(5, 4 * d)
        m2 = f.core(blk.mlp.fc2.layer)
        ref = ((h.reshape(5, 4, d) @ u.T).reshape(5, 4 * r) @ m2.T @ v.T) * 0.5
        assert torch.allclose(blk.mlp.fc2(h) - blk.mlp.fc2.base(h), ref, atol=1e-6)


def _authors_tk_increments(U, V, C, P, s, blk, x, h):
    """The FacT authors' TK forward (their ``FacT.forward``), re-derived with plain torch ops.

    ``U`` = FacTu.weight (r x d), ``V`` = FacTv.weight (d x r), ``C`` = FacTc (r x r x r),
    ``P`` = FacTp (r x 12 L); ``x`` (n x d) feeds qkv / proj / fc1, ``h`` (n x 4d) feeds fc2.
    Returns the increments of qkv, proj, fc1 and fc2 (eval mode: no dropout).
    """
    n, d = x.shape
    r = U.shape[0]
    start = 12 * blk
    attn = torch.einsum("ijk,km->ijm", C, P[:, start : start + 4])  # FacTc @ FacTp[:, s:s+4]
    ux = x @ U.T
    qkv = torch.cat([ux @ attn[:, :, m] @ V.T for m in range(3)], dim=-1) * s
    proj = ux @ attn[:, :, 3] @ V.T * s
    mlp = torch.einsum("ijk,km->ijm", C, P[:, start + 4 : start + 12])
    fc1_core = mlp[:, :, :4].reshape(r, 4 * r)
    fc2_core = mlp[:, :, 4:].reshape(r, 4 * r)
    fc1 = ((ux @ fc1_core).reshape(n, 4, r) @ V.T).reshape(n, 4 * d) * s
    fc2 = ((h.reshape(n, 4, d) @ U.T).reshape(n, 4 * r) @ fc2_core.T) @ V.T * s
    return qkv, proj, fc1, fc2


def _random_tk(layout: str) -> nn.Module:
    model = c.apply(c.tiny_model("vit"), "fact_tk", rank=3, scale=0.5, layout=layout).eval()
    c.randomize_new_params(model, c.tiny_model("vit"))  # V, C, P all random and non-zero
    assert model.fact.v.abs().min() > 0
    return model


def _increments(model, blk, x, h):
    b = model.blocks[blk]
    return tuple(
        lin(inp) - lin.base(inp)
        for lin, inp in ((b.attn.qkv, x), (b.attn.proj, x), (b.mlp.fc1, x), (b.mlp.fc2, h))
    )


def test_fact_tk_is_the_authors_function():
    model = _random_tk("authors")
    f = model.fact
    g = torch.Generator().manual_seed(5)
    x, h = torch.randn(7, 64, generator=g), torch.randn(7, 256, generator=g)
    with torch.no_grad():
        for blk in range(len(model.blocks)):
            ref = _authors_tk_increments(f.u, f.v, f.c, f.p, 0.5, blk, x, h)
            for name, ours, want in zip(("qkv", "proj", "fc1", "fc2"), _increments(model, blk, x, h), ref):
                assert want.abs().max() > 1e-3, name  # not vacuous
                assert torch.allclose(ours, want, atol=1e-6), (blk, name)


def test_fact_tk_authors_layout_merges_exactly():
    model = _random_tk("authors")
    x = c.image_batch(model)
    with torch.no_grad():
        before = model(x)
        merged = get_method("fact_tk").merge(model)
        assert not hasattr(merged, "fact")
        assert (merged(x) - before).abs().max().item() <= 1e-5


def test_fact_tk_per_slice_variant_is_a_different_function():
    # the named variant: each d x d chunk j of fc1 / fc2 uses slice 4 + j (8 + j) alone
    authors, per_slice = _random_tk("authors"), _random_tk("per_slice")
    assert torch.equal(authors.fact.p, per_slice.fact.p)
    f, d = per_slice.fact, 64
    g = torch.Generator().manual_seed(5)
    x, h = torch.randn(7, 64, generator=g), torch.randn(7, 256, generator=g)
    with torch.no_grad():

        def slice_(m):  # V S_m U: the per-slice layout's d x d chunk for slice m
            return 0.5 * f.v @ torch.einsum("ijk,k->ij", f.c, f.p[:, m]) @ f.u

        blk = 2
        fc1 = f.delta_weight(4 * blk + 2)
        fc2 = f.delta_weight(4 * blk + 3)
        for j in range(4):
            assert torch.allclose(fc1[j * d : (j + 1) * d], slice_(12 * blk + 4 + j), atol=1e-6)
            assert torch.allclose(fc2[:, j * d : (j + 1) * d], slice_(12 * blk + 8 + j), atol=1e-6)
        ours, theirs = _increments(per_slice, blk, x, h), _increments(authors, blk, x, h)
        assert (ours[2] - theirs[2]).abs().max() > 1e-3 and (ours[3] - theirs[3]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "name, hp, field",
    [
        ("fact_tt", {"rank": 0}, "rank"),
        ("fact_tt", {"scale": 0}, "scale"),
        ("fact_tt", {"dropout": 1.0}, "dropout"),
        ("fact_tk", {"rank": -1}, "rank"),
        ("fact_tk", {"fact_dim": 8}, "fact_dim"),
        ("fact_tk", {"layout": "reference"}, "layout"),
        ("repadapter", {"bottleneck": 0}, "bottleneck"),
        ("repadapter", {"scale": -1.0}, "scale"),
        ("repadapter", {"groups": 0}, "groups"),
        ("repadapter", {"bottleneck": 8, "groups": 3}, "groups"),
        ("repadapter", {"targets": ("attn", "qkv")}, "targets"),
        ("repadapter", {"targets": ("mlp", "mlp")}, "targets"),
        ("repadapter", {"targets": ()}, "targets"),
    ],
)
def test_bad_hyper_parameters_name_the_field(name, hp, field):
    with pytest.raises(ValidationError) as err:
        get_method(name).hparams(**hp)
    assert field in str(err.value)


@pytest.mark.parametrize("name", METHODS)
def test_every_field_is_documented_and_summary_is_one_line(name):
    method = get_method(name)
    assert method.mergeable and method.summary and "\n" not in method.summary
    assert all(info.description for info in method.hparams.model_fields.values())


@pytest.mark.parametrize(
    "name, points", [("fact_tt", 15), ("fact_tk", 15), ("repadapter", 15)]
)
def test_reference_grid_builds(name, points):
    path = GRIDS / f"{name}.yaml"
    text = path.read_text()
    assert (
        text.startswith("#")
        and f"experiment/config/method/{name}.yml" in text.splitlines()[0]
    )
    hp_cls = get_method(name).hparams
    grid = grid_model(hp_cls).model_validate(yaml.safe_load(text))
    hps = expand_grid(hp_cls, grid)
    assert len(hps) == points and all(isinstance(hp, hp_cls) for hp in hps)
