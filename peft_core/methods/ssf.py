"""SSF (Lian et al., 2022): a learnable per-channel scale and shift after each operation.

Sites, as in the reference study (``model/ssf.py`` and where ``block.py``,
``attention.py``, ``mlp.py``, ``patch_embed.py``, ``vision_transformer.py``
call ``ssf_ada``): after the patch-embedding conv (and its LayerNorm, if the
model has one), after ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
``mlp.fc1`` and ``mlp.fc2`` of every block, and after the final LayerNorm
(``norm``; ``fc_norm`` for models that pool before normalising, where the
reference's site would follow an identity). CLIP's ``norm_pre`` gets none,
as in the reference. ViT-B/16: 2 x (768 + 12 x (4 x 768 + 2304 + 3072) + 768)
= 205,824 parameters.

``init='identity'`` (default) starts at scale 1, shift 0, so the model is
unchanged at initialisation; ``init='normal'`` is the reference study's
random init, scale ~ N(1, init_std), shift ~ N(0, init_std).

Mergeable: ``(W x + b) * s + t`` folds into ``W' = diag(s) W``,
``b' = s b + t`` of the preceding linear / conv / LayerNorm. A patch conv
without a bias (CLIP) takes its shift into the patch rows of ``pos_embed``.

Deviations from the reference codebase (``METHOD.deviations``, docs/deviations.md):

* default init='identity' (scale 1, shift 0; model unchanged at init); the reference draws scale ~ N(1, 0.02), shift ~ N(0, 0.02): init='normal' reproduces it
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method
from ._targets import transformer_blocks

_BLOCK_SITES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
_PATCH_PROJ = "patch_embed.proj"


class SSFHP(HParams):
    """SSF initialisation; which tensors are scaled and shifted is fixed (see the module doc)."""

    init: Literal["identity", "normal"] = Field(
        "identity",
        description="'identity': scale 1, shift 0 (model unchanged at init); "
        "'normal': the reference study's scale ~ N(1, init_std), shift ~ N(0, init_std)",
    )
    init_std: float = Field(0.02, gt=0, le=1, description="standard deviation of init='normal' (reference: 0.02)")


class ScaleShift(nn.Module):
    """``base(x) * ssf_scale + ssf_shift`` over the channel dimension of ``base``'s output."""

    def __init__(self, base: nn.Module, hp: SSFHP):
        super().__init__()
        self.base = base
        if isinstance(base, nn.Linear):
            dim, self.channel_dim = base.out_features, -1
        elif isinstance(base, nn.Conv2d):
            dim, self.channel_dim = base.out_channels, 1
        elif isinstance(base, nn.LayerNorm) and len(base.normalized_shape) == 1:
            dim, self.channel_dim = base.normalized_shape[-1], -1
        else:
            raise TypeError(f"ssf: can not scale-shift a {type(base).__name__}")
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.ssf_scale = nn.Parameter(torch.ones(dim, **kw))
        self.ssf_shift = nn.Parameter(torch.zeros(dim, **kw))
        if hp.init == "normal":
            nn.init.normal_(self.ssf_scale, mean=1.0, std=hp.init_std)
            nn.init.normal_(self.ssf_shift, mean=0.0, std=hp.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.channel_dim == 1:
            return y * self.ssf_scale.view(1, -1, 1, 1) + self.ssf_shift.view(1, -1, 1, 1)
        return y * self.ssf_scale + self.ssf_shift


def _site(model: nn.Module, path: str, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> nn.Module:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, kind):
        raise TypeError(f"ssf: {type(model).__name__}.{path} is not a {getattr(kind, '__name__', kind)}")
    # merge folds the shift into the bias (a bias-less patch conv uses pos_embed instead)
    if getattr(module, "weight", None) is None or (getattr(module, "bias", None) is None and path != _PATCH_PROJ):
        raise TypeError(f"ssf: {path} has no weight or no bias to fold a scale-shift into")
    return module


def _sites(model: nn.Module) -> list[str]:
    """Paths of the modules followed by a scale-shift, in forward order."""
    blocks = transformer_blocks(model)
    sites: list[tuple[str, type[nn.Module]]] = [(_PATCH_PROJ, nn.Conv2d)]
    if isinstance(getattr(model.patch_embed, "norm", None), nn.LayerNorm):
        sites.append(("patch_embed.norm", nn.LayerNorm))
    for i in range(len(blocks)):
        for sub in _BLOCK_SITES:
            sites.append((f"blocks.{i}.{sub}", nn.LayerNorm if sub.startswith("norm") else nn.Linear))
    final = next((n for n in ("norm", "fc_norm") if isinstance(getattr(model, n, None), nn.LayerNorm)), None)
    if final is not None:
        sites.append((final, nn.LayerNorm))
    for path, kind in sites:
        _site(model, path, kind)
    if model.get_submodule(_PATCH_PROJ).bias is None and _patch_pos_embed(model) is None:
        raise TypeError(f"ssf: {_PATCH_PROJ} has no bias and no pos_embed follows it to take its shift")
    return [path for path, _ in sites]


def apply(model: nn.Module, hp: SSFHP) -> nn.Module:
    freeze_all(model)
    for path in _sites(model):
        model.set_submodule(path, ScaleShift(model.get_submodule(path), hp))
    return model


def _patch_pos_embed(model: nn.Module) -> torch.Tensor | None:
    """The ``pos_embed`` rows added to the patch tokens right after the patch embedding, if any.

    A bias-less patch conv folds its shift there: ``(patch + t) + pos = patch + (pos + t)``.
    Only valid when nothing (no patch LayerNorm) sits between the conv and ``pos_embed``.
    """
    pos = getattr(model, "pos_embed", None)
    if not isinstance(pos, nn.Parameter) or not isinstance(getattr(model.patch_embed, "norm", None), nn.Identity):
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
    return pos[:, prefix:]


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every scale-shift into the module before it and remove the wrappers."""
    for path, mod in [(p, m) for p, m in model.named_modules() if isinstance(m, ScaleShift)]:
        base = mod.base
        scale = mod.ssf_scale.to(base.weight.dtype)
        shift = mod.ssf_shift.to(base.weight.dtype)
        base.weight.mul_(scale.view(-1, *([1] * (base.weight.dim() - 1))))
        if base.bias is not None:
            base.bias.mul_(scale).add_(shift)
        elif path == _PATCH_PROJ and _patch_pos_embed(model) is not None:
            _patch_pos_embed(model).add_(shift)
        elif bool(shift.ne(0).any()):
            raise ValueError(f"ssf: {path} has no bias to take its shift; this model can not be merged")
        model.set_submodule(path, base)
    return model


DEVIATIONS = (
    "default init='identity' (scale 1, shift 0; model unchanged at init); the reference draws scale ~ N(1, 0.02), shift ~ N(0, 0.02): init='normal' reproduces it",
)

METHOD = register_method("ssf", SSFHP, apply, merge, deviations=DEVIATIONS)
