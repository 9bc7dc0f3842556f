"""Shared checks every PEFT method is held to (HF peft's ``testing_common`` idea).

Each method's test module feeds a table of cases to these functions; a new
method gets the whole contract by adding rows, not by writing new checks.
"""

from __future__ import annotations

import copy
import io

import timm
import torch
from torch import nn

from peft_core.methods import get_method
from peft_core.methods._common import count_trainable, trainable_names, unfreeze_head

# Tiny stand-ins of each ViT family a method must work on (random weights).
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)
BACKBONES = {
    "vit": ("vit_tiny_patch16_224", TINY),
    "deit": ("deit_tiny_patch16_224", TINY),
    # CLIP image tower layout: pre-norm before the blocks, quick-GELU-free timm variant
    "clip": ("vit_base_patch16_clip_224", TINY),
    # DINOv2 with layer-scale and 4 register tokens
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(TINY, img_size=28, patch_size=7)),
}
NUM_CLASSES = 5
# Methods whose defaults do not fit the width-64 tiny models: SCT tunes 96 channels
# (V-PEFT Bench's setting for ViT-B's 768), more than a tiny model has.
TINY_DEFAULTS: dict[str, dict] = {"sct": {"channels": 8}}


def tiny_model(family: str = "vit", seed: int = 0, num_classes: int = NUM_CLASSES) -> nn.Module:
    name, kwargs = BACKBONES[family]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()


def vit_b16() -> nn.Module:
    """ViT-B/16 at 224 with random weights: the reference study's architecture."""
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=NUM_CLASSES)


def image_batch(model: nn.Module, n: int = 2, seed: int = 1) -> torch.Tensor:
    size = model.patch_embed.img_size
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, *size, generator=g)


def apply(model: nn.Module, name: str, **hp) -> nn.Module:
    """Apply a method as the engine does: method first, then the new head trains."""
    method = get_method(name)
    out = method.apply(model, method.hparams(**hp))
    unfreeze_head(out)
    return out


def randomize_new_params(model: nn.Module, base: nn.Module, seed: int = 3) -> None:
    """Give every parameter the method added a random value (to test merges)."""
    base_ids = {id(p) for p in base.parameters()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in base_ids or p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def trainable_count(model: nn.Module) -> int:
    return count_trainable(model, exclude_head=True)


def check_gradients(model: nn.Module, expected: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Every trainable tensor learns; frozen ones get no gradient.

    One Adam step first (so zero-initialised factors such as LoRA's B have
    moved), then a second backward pass in which every trainable tensor must
    get a finite, nonzero gradient: a tensor that never does would never learn
    (the reference VQT's bug). Returns the second pass's gradients by name.
    """
    model.train()
    x = image_batch(model, n=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model(x).logsumexp(-1).mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: trainable but received no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name}: gradient is exactly zero (it would never learn)"
            grads[name] = p.grad
        else:
            assert p.grad is None, f"{name}: frozen but received a gradient"
    if expected is not None:
        got = set(trainable_names(model))
        assert got == expected, f"unexpected trainable set: extra {got - expected}, missing {expected - got}"
    return grads


@torch.no_grad()
def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval()
    b.eval()
    return (a(x) - b(x)).abs().max().item()


def check_identity_at_init(family: str, name: str, tol: float = 1e-6, **hp) -> float:
    """A method that promises identity at init leaves the backbone's features unchanged."""
    base = tiny_model(family)
    peft = apply(copy.deepcopy(base), name, **hp)
    x = image_batch(base)
    with torch.no_grad():
        diff = (base.eval().forward_features(x) - peft.eval().forward_features(x)).abs().max().item()
    assert diff <= tol, f"{name} on {family}: output differs from the frozen backbone by {diff:.2e}"
    return diff


def check_merge(family: str, name: str, tol: float = 1e-5, **hp) -> float:
    """Merged model: plain timm keys, loads into a fresh timm model, same logits as unmerged."""
    base = tiny_model(family)
    peft = apply(copy.deepcopy(base), name, **hp)
    randomize_new_params(peft, base)
    x = image_batch(base)
    peft.eval()
    with torch.no_grad():
        before = peft(x)
    method = get_method(name)
    assert method.mergeable, f"{name} is not registered as mergeable"
    merged = method.merge(peft)
    plain = tiny_model(family, seed=99)
    assert set(merged.state_dict()) == set(plain.state_dict()), "merged model has extra or missing tensors"
    buf = io.BytesIO()
    torch.save(merged.state_dict(), buf)
    buf.seek(0)
    plain.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    plain.eval()
    with torch.no_grad():
        diff = (plain(x) - before).abs().max().item()
    assert diff <= tol, f"{name} on {family}: merged vs unmerged logits differ by {diff:.2e}"
    return diff


def check_no_leak(name: str, **hp) -> None:
    """Two models in one process: applying a method to one never touches the other."""
    a = apply(tiny_model("vit"), name, **hp)
    n_a = trainable_count(a)
    b = apply(tiny_model("vit"), name, **hp)
    assert trainable_count(b) == n_a
    plain = tiny_model("vit")
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    apply(tiny_model("vit"), name, **hp)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    assert trainable_count(a) == n_a


# Mean head size (weight + bias on ViT-B/16's 768 features) of the 19 VTAB-1k data sets (940
# classes in all) and of the 5 FGVC ones (CUB 200, NABirds 555, Flowers 102, Dogs 120, Cars 196):
# published tables that count the head count it per data set, so their average is this.
VTAB_MEAN_HEAD = 769 * 940 / 19
FGVC_MEAN_HEAD = 769 * (200 + 555 + 102 + 120 + 196) / 5


def vit_b16_shapes() -> nn.Module:
    """ViT-B/16 on the meta device: exact parameter shapes, no memory or init time."""
    with torch.device("meta"):
        return vit_b16()


def param_id(v) -> str:
    """pytest id of a parametrize value: a dict's values joined by '-', anything else as str."""
    return "-".join(map(str, v.values())) if isinstance(v, dict) else str(v)


def check_bad_hparams(name: str, hp: dict, field: str) -> None:
    """Building ``name``'s hyper-parameters from ``hp`` fails, naming ``field``."""
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        get_method(name).hparams(**hp)
    assert field in str(err.value)
