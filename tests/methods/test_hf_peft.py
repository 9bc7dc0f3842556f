"""The ``peft_*`` methods (Hugging Face peft tuners) held to the shared method contract."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from peft_core.methods import get_method, list_methods
from peft_core.methods import _hf_peft as hf

from . import checks as c

peft = pytest.importorskip("peft", reason='Hugging Face peft is not installed (pip install -e ".[hf]")')

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(c.BACKBONES)
METHODS = ["peft_lora", "peft_dora", "peft_loha", "peft_lokr", "peft_oft", "peft_boft", "peft_ia3",
           "peft_vera", "peft_fourierft", "peft_adalora", "peft_glora"]  # fmt: skip
GRIDS = Path(__file__).resolve().parents[2] / "config" / "method_grids"


def test_every_peft_tuner_here_is_registered():
    assert set(METHODS) == {m for m in list_methods() if m.startswith("peft_")}


# ---------------------------------------------------------------- fused qkv
@pytest.mark.parametrize("family", FAMILIES)
def test_split_qkv_output_equals_the_fused_linear_exactly(family):
    base = c.tiny_model(family)
    split = copy.deepcopy(base)
    paths = hf.split_qkv(split)
    assert len(paths) == len(base.blocks)
    fused = base.blocks[1].attn.qkv
    x = torch.randn(2, 9, fused.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(split.blocks[1].attn.qkv(x), fused(x))
        assert torch.equal(split(c.image_batch(base)), base(c.image_batch(base)))
        refused = split.blocks[1].attn.qkv.fuse()
    assert torch.equal(refused.weight, fused.weight) and torch.equal(refused.bias, fused.bias)


def test_targeting_q_v_splits_qkv_and_leaves_k_plain_and_frozen():
    model = c.apply(c.tiny_model("vit"), "peft_lora", rank=2, targets=["q", "v"])
    attn = model.blocks[0].attn
    assert isinstance(attn.qkv, hf.SplitQKV)
    assert type(attn.qkv.k) is nn.Linear and not attn.qkv.k.weight.requires_grad
    assert isinstance(attn.qkv.q, peft.tuners.tuners_utils.BaseTunerLayer)


# ---------------------------------------------------------------- parameter counts
# ViT-B/16: d = 768, MLP 3,072, 12 blocks; fused qkv is 768 -> 2,304.
D, H, L = 768, 3072, 12
COUNTS = [
    # LoRA r: r (d_in + d_out) per linear; on the fused qkv = our lora's 36,864 r
    ("peft_lora", {"rank": 8}, L * 8 * (D + 3 * D)),  # 294,912
    ("peft_lora", {"rank": 8, "targets": ["q", "v"]}, L * 2 * 8 * (D + D)),
    ("peft_lora", {"rank": 4, "targets": ["q", "k", "v", "o", "fc1", "fc2"]}, L * 4 * (4 * 2 * D + 2 * (D + H))),
    # DoRA: LoRA + one magnitude per output row
    ("peft_dora", {"rank": 8}, L * (8 * (D + 3 * D) + 3 * D)),
    # LoHa: two rank-r pairs, 2 r (d_in + d_out)
    ("peft_loha", {"rank": 8}, L * 2 * 8 * (D + 3 * D)),
    # LoKr: 2,304 = 48 x 48, 768 = 24 x 32; W1 48 x 24 full, W2 48 x 32 at rank r (full once r >= 48 / 2)
    ("peft_lokr", {"rank": 8}, L * (48 * 24 + 8 * (48 + 32))),
    ("peft_lokr", {"rank": 32}, L * (48 * 24 + 48 * 32)),
    # OFT: d_in / b blocks of b (b - 1) / 2 (skew-symmetric upper triangle)
    ("peft_oft", {"block_size": 32}, L * (D // 32) * (32 * 31 // 2)),
    ("peft_oft", {"block_size": 16, "targets": ["qkv", "fc2"]}, L * ((D // 16) + (H // 16)) * (16 * 15 // 2)),
    # BOFT (one butterfly factor): d_in / b full b x b blocks (peft stores all b^2), + a scale per output row
    ("peft_boft", {"block_size": 4}, L * ((D // 4) * 16 + 3 * D)),
    ("peft_boft", {"block_size": 8, "targets": ["fc1"]}, L * ((D // 8) * 64 + H)),
    # (IA)^3: output vectors for k and v, an input vector for fc2
    ("peft_ia3", {}, L * (D + D + H)),  # 55,296
    ("peft_ia3", {"targets": ["qkv", "fc1"], "feedforward": []}, L * (3 * D + H)),
    # VeRA: d (r) + b (d_out) per linear; A and B are frozen shared buffers
    ("peft_vera", {"rank": 256}, L * (256 + 3 * D)),
    # FourierFT: n coefficients per linear
    ("peft_fourierft", {"n_frequency": 3000}, L * 3000),
    # AdaLoRA at init_rank r: r (d_in + d_out + 1) per linear, six linears per block
    ("peft_adalora", {"init_rank": 12}, L * 12 * (4 * (2 * D + 1) + 2 * (D + H + 1))),
    # GLoRA: A and B rank r (r (d_in + d_out) each), C rank r (r d_in + r), D and E one constant each
    ("peft_glora", {"rank": 8}, L * (2 * 8 * (D + 3 * D) + 8 * D + 8 + 2)),
]


@pytest.mark.parametrize("name, hp, expected", COUNTS)
def test_vit_b16_trainable_count_excluding_head(name, hp, expected):
    assert c.trainable_count(c.apply(c.vit_b16_shapes(), name, **hp)) == expected


@pytest.mark.parametrize("rank", [1, 8, 16, 32])
def test_peft_lora_has_our_lora_count(rank):
    ours = c.trainable_count(c.apply(c.vit_b16_shapes(), "lora", rank=rank))
    assert c.trainable_count(c.apply(c.vit_b16_shapes(), "peft_lora", rank=rank)) == ours == 36_864 * rank


@pytest.mark.parametrize("name", METHODS)
def test_peft_saves_exactly_the_tensors_we_train(name):
    """peft's adapter state dict (what it saves) holds the tensors we count, and only those."""
    model = c.apply(c.tiny_model("vit"), name)
    saved = peft.get_peft_model_state_dict(model, adapter_name=hf.ADAPTER)
    assert sum(v.numel() for v in saved.values()) == c.trainable_count(model)


# ---------------------------------------------------------------- gradients
def _nonzero_biases(model: nn.Module) -> nn.Module:
    """timm initialises biases at zero; GLoRA's bias-scaling D then has zero gradient by construction."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("family, name", list(itertools.product(FAMILIES, METHODS)))
def test_every_trainable_tensor_learns(family, name):
    c.check_gradients(c.apply(_nonzero_biases(c.tiny_model(family)), name))


@pytest.mark.parametrize(
    "name, hp, paths, tensors",
    [
        ("peft_lora", {"targets": ["q", "v", "fc2"]}, ["attn.qkv.q", "attn.qkv.v", "mlp.fc2"],
         ["lora_A.default.weight", "lora_B.default.weight"]),
        ("peft_dora", {}, ["attn.qkv"],
         ["lora_A.default.weight", "lora_B.default.weight", "lora_magnitude_vector.default.weight"]),
        ("peft_ia3", {}, ["attn.qkv.k", "attn.qkv.v", "mlp.fc2"], ["ia3_l.default"]),
        ("peft_vera", {"targets": ["o"]}, ["attn.proj"], ["vera_lambda_b.default", "vera_lambda_d.default"]),
        ("peft_adalora", {"targets": ["k"]}, ["attn.qkv.k"], ["lora_A.default", "lora_B.default", "lora_E.default"]),
    ],
)  # fmt: skip
def test_only_the_adapter_tensors_of_the_targets_train(name, hp, paths, tensors):
    model = c.apply(c.tiny_model("dinov2_reg"), name, **hp)
    want = {f"blocks.{i}.{p}.{t}" for i in range(4) for p in paths for t in tensors}
    c.check_gradients(model, expected=want)


# ---------------------------------------------------------------- identity at init
IDENTITY = [(f, m, {}) for f in FAMILIES for m in METHODS if m != "peft_fourierft"]
IDENTITY += [(f, "peft_fourierft", {"init": "zero"}) for f in FAMILIES]
IDENTITY += [("vit", m, {"targets": ["q", "k", "v", "o", "fc1", "fc2"]}) for m in METHODS if m != "peft_fourierft"]


@pytest.mark.parametrize("family, name, hp", IDENTITY, ids=str)
def test_identity_at_init(family, name, hp):
    c.check_identity_at_init(family, name, **hp)


def test_fourierft_normal_init_is_not_identity():
    with pytest.raises(AssertionError, match="differs"):
        c.check_identity_at_init("vit", "peft_fourierft")


# ---------------------------------------------------------------- merge
MERGE = [(f, m, {}) for f in ("vit", "clip", "dinov2_reg") for m in METHODS]
MERGE += [("deit", m, {"targets": ["q", "v", "o", "fc1"]}) for m in METHODS if m not in ("peft_ia3",)]
MERGE += [("deit", "peft_ia3", {"targets": ["qkv", "fc1", "fc2"], "feedforward": ["fc1"]})]


@pytest.mark.parametrize("family, name, hp", MERGE, ids=str)
def test_merged_equals_unmerged_and_is_plain_timm(family, name, hp):
    c.check_merge(family, name, tol=1e-5, **hp)


@pytest.mark.parametrize("name", METHODS)
def test_no_state_leaks_between_models(name):
    c.check_no_leak(name)


# ---------------------------------------------------------------- peft_lora == our lora
@torch.no_grad()
def _copy_lora_into_peft(ours: nn.Module, theirs: nn.Module) -> None:
    for (path, mod) in [(p, m) for p, m in ours.named_modules() if hasattr(m, "lora_a")]:
        target = theirs.get_submodule(path)
        target.lora_A[hf.ADAPTER].weight.copy_(mod.lora_a)
        target.lora_B[hf.ADAPTER].weight.copy_(mod.lora_b)


@pytest.mark.parametrize(
    "ours_targets, peft_targets",
    [(["q", "k", "v"], ["qkv"]), (["q", "k", "v", "o", "fc1", "fc2"], ["qkv", "o", "fc1", "fc2"])],
)
def test_peft_lora_equals_our_lora_at_equal_weights(ours_targets, peft_targets):
    base = c.tiny_model("vit")
    ours = c.apply(copy.deepcopy(base), "lora", rank=4, scaling=2.0, targets=ours_targets)
    theirs = c.apply(copy.deepcopy(base), "peft_lora", rank=4, scaling=2.0, targets=peft_targets)
    assert c.trainable_count(ours) == c.trainable_count(theirs)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # our trainable tensors (LoRA factors, head) random, then copied into peft's
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        theirs.head.load_state_dict(ours.head.state_dict())
    _copy_lora_into_peft(ours, theirs)
    x = c.image_batch(base)
    assert c.max_diff(ours, theirs, x) <= 1e-6
    assert c.max_diff(ours, base, x) > 1e-3  # the update did contribute
    # and their merges agree
    merged_ours, merged_theirs = get_method("lora").merge(ours), get_method("peft_lora").merge(theirs)
    for k, v in merged_ours.state_dict().items():
        assert torch.allclose(v, merged_theirs.state_dict()[k], atol=1e-6), k


# ---------------------------------------------------------------- AdaLoRA's budget in the training loop
def _nonzero_singular_values(model: nn.Module) -> int:
    return sum(int(p.ne(0).sum()) for n, p in model.named_parameters() if "lora_E" in n)


def test_adalora_schedule_runs_in_our_training_loop_and_reaches_the_budget():
    from peft_core.train import train

    from .. import toycell

    spec = toycell.spec("peft_adalora", {"init_rank": 4, "target_rank": 2, "delta_t": 1, "targets": ["qkv", "fc1"]})
    model = c.apply(c.tiny_model("vit", num_classes=3), "peft_adalora", **spec.hparams)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(64) % 3
    out = train(model, spec, x, y, log=lambda msg: None)
    config = hf.tuner(model).peft_config[hf.ADAPTER]
    steps = spec.epochs * 64 // spec.batch_size  # 8
    assert out.status == "ok" and config.total_step == steps
    assert (config.tinit, config.tfinal) == (int(0.1 * steps), int(0.2 * steps))
    # 8 adapted linears (qkv and fc1 of 4 blocks), average rank 2 left of 4
    assert _nonzero_singular_values(model) == 8 * 2
    assert len(config.rank_pattern) == 8
    # what the engine saves (trainable tensors) rebuilds the same model, masks included
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fresh = c.apply(c.tiny_model("vit", num_classes=3), "peft_adalora", **spec.hparams)
    fresh.load_state_dict(saved, strict=False)
    assert c.max_diff(model, fresh, c.image_batch(model)) == 0.0


def test_only_adalora_has_a_step_hook():
    assert [m for m in list_methods() if get_method(m).step_hook is not None] == ["peft_adalora"]


class _HitAfter(dict):
    """A preemption flag that reads as set from the ``n``-th epoch end on."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.reads = n, 0

    def __getitem__(self, key):
        self.reads += 1
        return self.reads >= self.n


@pytest.mark.parametrize("stop_after", [1, 4])  # while budgeting; once the ranks are fixed
def test_adalora_resumes_exactly_where_it_stopped(tmp_path, stop_after):
    from peft_core.train import Preempted, train

    from .. import toycell

    hp = {"init_rank": 4, "target_rank": 2, "delta_t": 1, "final": 0.4, "targets": ["qkv"]}
    spec = toycell.spec("peft_adalora", hp, epochs=5)  # 4 steps per epoch, ranks fixed from step 12
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(64) % 3

    def fresh():
        return c.apply(c.tiny_model("vit", num_classes=3), "peft_adalora", **hp)

    torch.manual_seed(0)
    whole = fresh()
    train(whole, spec, x, y, log=lambda msg: None)
    torch.manual_seed(0)
    with pytest.raises(Preempted):
        train(fresh(), spec, x, y, log=lambda msg: None, resume=tmp_path / "resume.pt", flag=_HitAfter(stop_after))
    resumed = fresh()
    train(resumed, spec, x, y, log=lambda msg: None, resume=tmp_path / "resume.pt")
    for (n, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    assert _nonzero_singular_values(resumed) == 4 * 2


# ---------------------------------------------------------------- hyper-parameters, grids
@pytest.mark.parametrize("name", METHODS)
def test_every_field_is_documented_and_merge_is_peft(name):
    method = get_method(name)
    for field, info in method.hparams.model_fields.items():
        assert info.description, f"{name}.{field} has no description"
    assert method.mergeable and method.merge is hf.merge
    assert method.summary and len(method.summary) < 110
    assert "_hf_peft.py" in {p.name for p in method.code_files}


@pytest.mark.parametrize(
    "name, hp, field",
    [
        ("peft_lora", {"rank": 0}, "rank"),
        ("peft_lora", {"targets": ["qkv", "q"]}, "targets"),
        ("peft_lora", {"targets": ["q", "q"]}, "targets"),
        ("peft_lora", {"targets": ["query"]}, "targets"),
        ("peft_lora", {"targets": []}, "targets"),
        ("peft_dora", {"dropout": 1.0}, "dropout"),
        ("peft_loha", {"alpha": 0}, "alpha"),
        ("peft_lokr", {"decompose_factor": -2}, "decompose_factor"),
        ("peft_oft", {"block_size": 1}, "block_size"),
        ("peft_boft", {"butterfly_factor": 2}, "butterfly_factor"),
        ("peft_ia3", {"feedforward": ["fc1"]}, "feedforward"),
        ("peft_vera", {"rank": 0}, "rank"),
        ("peft_fourierft", {"init": "ones"}, "init"),
        ("peft_adalora", {"target_rank": 16}, "target_rank"),
        ("peft_adalora", {"warmup": 0.5, "final": 0.5}, "warmup + final"),
        ("peft_glora", {"c": "constant"}, "c"),
        ("peft_glora", {"rnak": 4}, "rnak"),
    ],
)
def test_bad_hyper_parameters_name_the_field(name, hp, field):
    c.check_bad_hparams(name, hp, field)


@pytest.mark.parametrize("name", METHODS)
def test_every_grid_point_builds_applies_and_cites_a_source(name):
    path = GRIDS / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#"), f"{path}: say where the grid comes from"
    grid = yaml.safe_load(text) or {}
    hparams = get_method(name).hparams
    assert set(grid) <= set(hparams.model_fields)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    assert len({hparams(**p) for p in points}) == len(points)
    for p in points:
        c.apply(c.vit_b16_shapes(), name, **p)


def test_peft_glora_is_the_tuner_peft_ships():
    assert hasattr(peft, "GloraConfig")


# ---------------------------------------------------------------- through the engine
@pytest.mark.parametrize(
    "method, hp",
    [
        ("peft_lora", {"rank": 2, "targets": ["q", "v", "fc1"]}),
        ("peft_vera", {"rank": 16}),  # frozen projections rebuilt from prng_key, not saved
        ("peft_adalora", {"init_rank": 4, "target_rank": 2, "targets": ["qkv"]}),  # the step hook runs in run_cell
    ],
)
def test_cell_trains_saves_reloads_and_merges_to_plain_timm(tmp_path, monkeypatch, method, hp):
    import pandas as pd
    import timm
    from safetensors.torch import load_file

    from peft_core.merge import load_cell_model, merge_cell
    from peft_core.train import run_cell

    from .. import toycell

    monkeypatch.chdir(tmp_path)
    toycell.write_inputs(tmp_path)
    cell = toycell.spec(method, hp)
    metrics = run_cell(cell, "train.pt", "eval.pt", "backbone.safetensors", "cell", threads=1, device="cpu",
                       log=lambda m: None)  # fmt: skip
    assert metrics["status"] == "ok"
    assert metrics["trainable_params"] == c.trainable_count(c.apply(c.tiny_model("vit", num_classes=3), method, **hp))
    images = torch.load("eval.pt", weights_only=True)["images"].float() / 255
    preds = pd.read_parquet("cell/predictions.parquet")["pred"].tolist()
    _, reloaded = load_cell_model(tmp_path / "cell", None)
    with torch.no_grad():
        assert reloaded(images).argmax(1).tolist() == preds
    assert merge_cell("cell", "merged.safetensors")["max_abs_diff"] <= 1e-5
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **cell.backbone.kwargs)
    plain.load_state_dict(load_file("merged.safetensors"), strict=True)
    with torch.no_grad():
        assert plain.eval()(images).argmax(1).tolist() == preds
