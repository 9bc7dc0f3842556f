"""vpt_shallow, vpt_deep and vqt held to the shared method contract, plus their token paths."""

from __future__ import annotations

import copy
import itertools
import math
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError
from timm.layers import LayerScale

from peft_core.methods import get_method

from . import checks as c

FAMILIES = list(c.BACKBONES)
PROMPT_METHODS = ["vpt_shallow", "vpt_deep"]
METHODS = PROMPT_METHODS + ["vqt"]
SMALL_HP = {"vpt_shallow": {"num_prompts": 3}, "vpt_deep": {"num_prompts": 3}, "vqt": {"num_queries": 2}}
GRIDS = Path(__file__).resolve().parents[2] / "config" / "method_grids"


@pytest.fixture(scope="module")
def vit_b16():
    # shapes are all a count needs: the meta device skips 86M parameters' init and copies
    with torch.device("meta"):
        return c.vit_b16()


# ViT-B/16: depth 12, dim 768, patch 16x16.
#   vpt_shallow: one set of n prompts            -> n * 768
#   vpt_deep:    one set of n prompts per block  -> 12 * n * 768 = 9,216 n
#   vqt:         n queries per block + the combine weights over 12 n query outputs and the
#                pooled feature (the reference's Linear(12 n + 1, 1, bias=False), counted
#                because its name has no "head") -> 12 * n * 768 + 12 * n + 1
# Rows at the reference grid values (config/method_grids/*.yaml).
@pytest.mark.parametrize(
    "name, hp, expected",
    [
        ("vpt_shallow", {"num_prompts": 5}, 3_840),
        ("vpt_shallow", {"num_prompts": 10}, 7_680),
        ("vpt_shallow", {"num_prompts": 50}, 38_400),
        ("vpt_shallow", {"num_prompts": 100}, 76_800),
        ("vpt_shallow", {"num_prompts": 200}, 153_600),
        ("vpt_deep", {"num_prompts": 5}, 46_080),
        ("vpt_deep", {"num_prompts": 10}, 92_160),
        ("vpt_deep", {"num_prompts": 50}, 460_800),
        ("vpt_deep", {"num_prompts": 100}, 921_600),
        ("vpt_deep", {"num_prompts": 10, "layers": 4}, 4 * 10 * 768),  # reference flag vpt_layer
        ("vqt", {"num_queries": 10}, 92_160 + 121),
        ("vqt", {"num_queries": 1}, 9_216 + 13),
    ],
)
def test_vit_b16_counts(vit_b16, name, hp, expected):
    model = c.apply(copy.deepcopy(vit_b16), name, **hp)
    assert c.trainable_count(model) == expected


@pytest.mark.parametrize("family", ["vit", "dinov2_reg"])
@pytest.mark.parametrize("name", METHODS)
def test_tokens_use_vpt_uniform_init(name, family):
    # +-sqrt(6 / (3 * patch_area + dim)): patch 8x8 (vit) or 7x7 (dinov2_reg), dim 64
    model = c.apply(c.tiny_model(family), name, **SMALL_HP[name])
    tokens = model.blocks.queries if name == "vqt" else model.blocks.prompts
    bound = math.sqrt(6 / (3 * math.prod(model.patch_embed.patch_size) + 64))
    assert tokens.abs().max().item() <= bound
    assert tokens.abs().max().item() > 0.8 * bound


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "name, expected",
    [
        ("vpt_shallow", {"blocks.prompts"}),
        ("vpt_deep", {"blocks.prompts"}),
        # the VQT bug test: the queries themselves must get a nonzero gradient
        ("vqt", {"blocks.queries", "fc_norm.combine"}),
    ],
)
def test_every_trainable_tensor_learns(family, name, expected):
    model = c.apply(c.tiny_model(family), name, **SMALL_HP[name])
    grads = c.check_gradients(model, expected=expected)
    assert set(grads) >= expected


def _num_patches(model) -> int:
    return model.patch_embed.num_patches


def _record_blocks(model):
    """Pre- and post-hooks on every block: (input, output) per block, in order."""
    seen = []
    handles = [b.register_forward_hook(lambda m, i, o: seen.append((i[0], o))) for b in model.blocks]
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_vpt_shallow_prompts_travel_through_every_block(family):
    model = c.apply(c.tiny_model(family), "vpt_shallow", num_prompts=3).eval()
    with torch.no_grad():  # DINOv2's layer-scale starts at 1e-5: let the blocks visibly act
        for m in model.modules():
            if isinstance(m, LayerScale):
                m.gamma.fill_(1.0)
    p, n, patches = model.num_prefix_tokens, 3, _num_patches(model)
    seen, handles = _record_blocks(model)
    with torch.no_grad():
        model(c.image_batch(model))
    for h in handles:
        h.remove()
    assert len(seen) == len(model.blocks)
    prompts = model.blocks.prompts[0]
    for i, (inp, out) in enumerate(seen):
        assert inp.shape[1] == out.shape[1] == p + n + patches, f"block {i}"
        if i == 0:
            assert torch.equal(inp[0, p : p + n], prompts)  # inserted after the prefix tokens
        else:  # carried on from the previous block, never replaced
            assert torch.equal(inp[:, p : p + n], seen[i - 1][1][:, p : p + n])
    last = seen[-1][1][:, p : p + n]
    assert (last - prompts).abs().max() > 1e-3, "prompt outputs of the last block equal the initial prompts"


@pytest.mark.parametrize("family", FAMILIES)
def test_vpt_deep_replaces_prompts_before_every_block(family):
    model = c.apply(c.tiny_model(family), "vpt_deep", num_prompts=2).eval()
    p, patches = model.num_prefix_tokens, _num_patches(model)
    seen, handles = _record_blocks(model)
    with torch.no_grad():
        model(c.image_batch(model))
    for h in handles:
        h.remove()
    assert len(seen) == len(model.blocks)
    for i, (inp, out) in enumerate(seen):
        assert inp.shape[1] == out.shape[1] == p + 2 + patches
        assert torch.equal(inp[0, p : p + 2], model.blocks.prompts[i]), (
            f"block {i} does not get its own prompts"
        )


def test_vpt_deep_layers_prompts_only_the_last_blocks():
    model = c.apply(c.tiny_model("vit"), "vpt_deep", num_prompts=2, layers=1).eval()
    seen, handles = _record_blocks(model)
    with torch.no_grad():
        model(c.image_batch(model))
    for h in handles:
        h.remove()
    lengths = [inp.shape[1] for inp, _ in seen]
    assert lengths == [1 + 16] * 3 + [1 + 2 + 16]
    with pytest.raises(ValueError, match="layers"):
        c.apply(c.tiny_model("vit"), "vpt_deep", layers=5)


def _tiny(family: str, **overrides):
    name, kwargs = c.BACKBONES[family]
    torch.manual_seed(0)
    return timm.create_model(
        name, pretrained=False, num_classes=c.NUM_CLASSES, **{**kwargs, **overrides}
    ).eval()


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_prompts_are_removed_before_pooling(name, family, pool):
    model = c.apply(_tiny(family, global_pool=pool), name, num_prompts=3).eval()
    p, patches = model.num_prefix_tokens, _num_patches(model)
    seen, handles = _record_blocks(model)
    x = c.image_batch(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    for h in handles:
        h.remove()
    assert feats.shape == (2, p + patches, model.embed_dim)
    last = seen[-1][1]
    tokens = torch.cat([last[:, :p], last[:, p + 3 :]], dim=1)  # the last block's output without the prompts
    with torch.no_grad():
        assert torch.equal(feats, model.norm(tokens))
        assert torch.allclose(logits, model.forward_head(model.norm(tokens)), atol=1e-6)
        expected = (
            tokens[:, 0] if pool == "token" else tokens[:, p:].mean(1)
        )  # timm's pooling on the right tokens
        assert torch.allclose(
            model.forward_head(feats, pre_logits=True), model.fc_norm(model.norm(expected)), atol=1e-6
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_vqt_tokens_never_see_the_queries(family):
    # the queries only read: forward_features is the frozen backbone's, also in eager attention
    c.check_identity_at_init(family, "vqt", tol=1e-5, num_queries=3)
    base = c.tiny_model(family)
    model = c.apply(copy.deepcopy(base), "vqt", num_queries=3)
    for block in model.blocks:
        block.attn.fused_attn = False
    x = c.image_batch(model)
    with torch.no_grad():
        assert (base.forward_features(x) - model.forward_features(x)).abs().max() < 1e-5


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("family", FAMILIES)
def test_vqt_head_reads_the_query_outputs(family, pool):
    model = c.apply(_tiny(family, global_pool=pool), "vqt", num_queries=2).eval()
    n, p = model.num_prefix_tokens + _num_patches(model), model.num_prefix_tokens
    with torch.no_grad():
        model.fc_norm.combine.uniform_(0.5, 1.5)
    seen, handles = _record_blocks(model)
    x = c.image_batch(model)
    with torch.no_grad():
        logits = model(x)
    for h in handles:
        h.remove()
    assert [inp.shape[1] for inp, _ in seen] == [n + 2] * len(model.blocks)
    queries = torch.cat([out[:, n:] for _, out in seen], dim=1)  # each block's query outputs
    final = model.norm(seen[-1][1][:, :n])
    pooled = final[:, 0] if pool == "token" else final[:, p:].mean(1)
    feats = torch.cat([F.normalize(queries, dim=-1), F.normalize(pooled, dim=-1)[:, None]], dim=1)
    combined = (feats * model.fc_norm.combine[None, :, None]).sum(1)
    with torch.no_grad():
        expected = model.head(model.fc_norm.norm(combined))
    assert torch.allclose(logits, expected, atol=1e-5)


def test_vqt_forward_head_needs_forward_features():
    model = c.apply(c.tiny_model("vit"), "vqt", num_queries=2).eval()
    x = c.image_batch(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        model.forward_head(feats)
        with pytest.raises(RuntimeError, match="forward_features"):
            model.forward_head(feats)


@pytest.mark.parametrize("name", METHODS)
def test_model_survives_deepcopy_and_state_dict_round_trip(name):
    model = c.apply(c.tiny_model("dinov2_reg"), name, **SMALL_HP[name])
    model.train()
    model(c.image_batch(model)).sum().backward()
    model.forward_features(c.image_batch(model))  # leaves VQT's query outputs pending
    twin = copy.deepcopy(model).eval()
    model.eval()
    plain_keys = set(c.tiny_model("dinov2_reg").state_dict())
    new_keys = set(model.state_dict()) - plain_keys
    assert plain_keys <= set(model.state_dict()), "the backbone's keys changed"
    assert new_keys == set(c.trainable_names(model))
    fresh = c.apply(c.tiny_model("dinov2_reg", seed=5), name, **SMALL_HP[name]).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = c.image_batch(model)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("name", METHODS)
def test_applying_twice_is_refused(name):
    model = c.apply(c.tiny_model("vit"), name, **SMALL_HP[name])
    with pytest.raises(ValueError, match="already"):
        get_method(name).apply(model, get_method(name).hparams())


@pytest.mark.parametrize("name", METHODS)
def test_gradient_checkpointing_is_refused(name):
    model = c.tiny_model("vit")
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="checkpointing"):
        c.apply(model, name)


@pytest.mark.parametrize("name", METHODS)
def test_no_state_leaks_between_models(name):
    c.check_no_leak(name, **SMALL_HP[name])


@pytest.mark.parametrize("name", METHODS)
def test_not_mergeable_and_documented(name):
    method = get_method(name)
    assert not method.mergeable
    assert method.summary and "ergeable" in method.source.read_text().split('"""')[1]
    for field, info in method.hparams.model_fields.items():
        assert info.description, f"{name}.{field} has no description"


@pytest.mark.parametrize(
    "name, hp, field",
    [
        ("vpt_shallow", {"num_prompts": 0}, "num_prompts"),
        ("vpt_shallow", {"dropout": 1.0}, "dropout"),
        ("vpt_shallow", {"num_promts": 4}, "num_promts"),
        ("vpt_deep", {"num_prompts": -1}, "num_prompts"),
        ("vpt_deep", {"layers": 0}, "layers"),
        ("vqt", {"num_queries": 0}, "num_queries"),
        ("vqt", {"dropout": -0.1}, "dropout"),
        ("vqt", {"num_prompts": 4}, "num_prompts"),
    ],
)
def test_bad_hyper_parameters_name_the_field(name, hp, field):
    with pytest.raises(ValidationError) as err:
        get_method(name).hparams(**hp)
    assert field in str(err.value)


REFERENCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "seed-codebase"


def reference_grid(name: str) -> dict[str, list[int]]:
    """The reference study's grid in our field names: its method config file, or (VQT has none) its README command."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference study not found at {REFERENCE} (../shared/reference)")
    if name == "vqt":
        return {"num_queries": sorted({int(n) for n in re.findall(r"--vqt_num (\d+)", (REFERENCE / "README.md").read_text())})}
    ref = yaml.safe_load((REFERENCE / "experiment" / "config" / "method" / f"{name}.yml").read_text())
    assert ref["vpt_mode"] == name.removeprefix("vpt_")
    return {"num_prompts": ref["vpt_num"]}


@pytest.mark.parametrize("name", METHODS)
def test_grid_file_is_the_reference_grid(name):
    loaded = yaml.safe_load((GRIDS / f"{name}.yaml").read_text())
    assert loaded == reference_grid(name)


@pytest.mark.parametrize("name", METHODS)
def test_grid_file_builds_every_point(name):
    loaded = yaml.safe_load((GRIDS / f"{name}.yaml").read_text())
    hparams = get_method(name).hparams
    points = [hparams(**dict(zip(loaded, values))) for values in itertools.product(*loaded.values())]
    assert points and len(set(points)) == len(points)
