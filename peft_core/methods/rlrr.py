"""RLRR (Dong et al., CVPR 2024): residual low-rank rescaling of the frozen linears, plus SSF.

"Low-Rank Rescaled Vision Transformer Fine-Tuning: A Residual Design Approach";
official code github:zstarN70/RLRR (``models/networks.py``, ``RLRRLinear``),
commit 287c772. Every ``attn.q/k/v``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2``
of a block becomes

    W' = W + W ⊙ (s_row s_colᵀ),   b' = b + t,

a rank-one elementwise rescaling of the frozen weight (``scale_line`` (out, 1),
``scale_col`` (1, in)) added to the weight itself (the residual design) and a
learnable bias shift ``shift_bias``. timm fuses q, k, v into one ``attn.qkv``
linear; as in the reference's three separate linears, each of its three row
blocks has its own ``s_col`` (3 x in here), while ``s_row`` and ``t`` cover all
3d rows. The reference also trains SSF scale-shifts (``ssf_ada``) after the
patch embedding, after both LayerNorms of every block and after the final
LayerNorm (``fc_norm`` in pooled models, as in :mod:`.ssf`); ``ssf=False``
drops them.

ViT-B/16 (d = 768, MLP 3072): qkv 3*768 + 2304 + 2304, proj 3*768, fc1 768 +
2*3072, fc2 3072 + 2*768, both block norms 4*768 = 23,808 per block; 12 blocks
plus the patch and final scale-shifts (2*1536) = 288,768 parameters without the
head. RLRR's paper (Table 2, VTAB-1k, "Params.(M)") reports 0.33M, the head of
each task counted: 288,768 + 769*940/19 (the mean VTAB-1k head) = 326,814 = 0.33M.

Initialisation, as the reference code: ``s_col`` and ``s_row`` Kaiming-uniform
(``nn.init.kaiming_uniform_`` on the (1, in) and (out, 1) shapes: bounds
sqrt(6/in) and sqrt(6)), ``t`` zero, SSF scale ~ N(1, 0.02), shift ~ N(0, 0.02):
the model is *not* the backbone at init. ``init='zero'`` starts ``s_row`` at
zero and the scale-shifts at (1, 0), so the model is unchanged at init.

Mergeable: ``W += W ⊙ (s_row s_col)``, ``b += t``, and every scale-shift folds
into the module before it (:func:`.ssf.merge`), leaving a plain timm model. A
linear without a bias gets no shift (so the merge adds no tensor).

No deviation from the reference as run: its ``train_vtab.py`` selects the
trainable tensors by the substrings 'head', 'scale', 'shift' of their names,
which re-enables the patch-embedding scale-shift that ``RLRRTransformer`` froze;
here the same tensors are selected by module type, the patch one included.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method
from ._targets import BLOCK_LINEARS, resolve_targets, transformer_blocks
from .ssf import SSFHP, ScaleShift, _site
from .ssf import merge as merge_scale_shifts

Target = Literal["qkv", "proj", "fc1", "fc2"]


class RLRRHP(HParams):
    """RLRR hyper-parameters (the reference code has none beyond its training recipe)."""

    targets: tuple[Target, ...] = Field(
        ("qkv", "proj", "fc1", "fc2"),
        min_length=1,
        description="linears rescaled: 'qkv' (as q, k, v), 'proj', 'fc1', 'fc2' (reference: all)",
    )
    ssf: bool = Field(
        True,
        description="also train SSF scale-shifts after the patch embedding, both block norms and the final norm (reference: yes)",
    )
    init: Literal["reference", "zero"] = Field(
        "reference",
        description="'reference': Kaiming-uniform s_row, s_col and SSF ~ N(1, 0.02) as the official code; "
        "'zero': s_row = 0 and SSF (1, 0), the model unchanged at init",
    )

    @model_validator(mode="after")
    def _check(self) -> RLRRHP:
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: duplicates in {list(self.targets)}")
        return self


class RLRRLinear(nn.Module):
    """``x -> x (W + W ⊙ s_row s_col)ᵀ + b + t``; ``chunks`` row blocks with their own ``s_col``."""

    def __init__(self, base: nn.Linear, chunks: int, init: str):
        super().__init__()
        if base.out_features % chunks:
            raise ValueError(f"rlrr: {chunks} row blocks do not divide {base.out_features} outputs")
        self.base, self.chunks = base, chunks
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.scale_col = nn.Parameter(torch.empty(chunks, base.in_features, **kw))
        self.scale_row = nn.Parameter(torch.empty(base.out_features, 1, **kw))
        nn.init.kaiming_uniform_(self.scale_col)  # fan_in = in: bound sqrt(6 / in), as the reference's (1, in)
        if init == "reference":
            nn.init.kaiming_uniform_(self.scale_row)  # fan_in = 1: bound sqrt(6)
        else:
            nn.init.zeros_(self.scale_row)
        self.shift = nn.Parameter(torch.zeros(base.out_features, **kw)) if base.bias is not None else None

    def delta_weight(self) -> torch.Tensor:
        col = self.scale_col.repeat_interleave(self.base.out_features // self.chunks, dim=0)
        return self.base.weight * (self.scale_row * col)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight + self.delta_weight()
        bias = None if self.base.bias is None else self.base.bias + self.shift
        return F.linear(x, weight, bias)


def _ssf_sites(model: nn.Module) -> list[tuple[str, type[nn.Module]]]:
    """The reference's four ``ssf_ada`` sites: patch embedding output, norm1, norm2, final norm."""
    patch_norm = isinstance(getattr(model.patch_embed, "norm", None), nn.LayerNorm)
    sites = [("patch_embed.norm", nn.LayerNorm) if patch_norm else ("patch_embed.proj", nn.Conv2d)]
    for i in range(len(transformer_blocks(model))):
        sites += [(f"blocks.{i}.norm1", nn.LayerNorm), (f"blocks.{i}.norm2", nn.LayerNorm)]
    final = next((n for n in ("norm", "fc_norm") if isinstance(getattr(model, n, None), nn.LayerNorm)), None)
    if final is None:
        raise TypeError(f"rlrr: {type(model).__name__} has no final LayerNorm to scale-shift")
    return sites + [(final, nn.LayerNorm)]


def apply(model: nn.Module, hp: RLRRHP) -> nn.Module:
    freeze_all(model)
    transformer_blocks(model)
    sites = [(path, _site(model, path, kind)) for path, kind in _ssf_sites(model)] if hp.ssf else []
    for target in hp.targets:
        for path, lin in resolve_targets(model, [BLOCK_LINEARS[target]], nn.Linear):
            model.set_submodule(path, RLRRLinear(lin, 3 if target == "qkv" else 1, hp.init))
    ssf_hp = SSFHP(init="normal", init_std=0.02) if hp.init == "reference" else SSFHP()
    for path, module in sites:
        model.set_submodule(path, ScaleShift(module, ssf_hp))
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every rescaling into its frozen linear and every scale-shift into the module before it."""
    for path, mod in [(p, m) for p, m in model.named_modules() if isinstance(m, RLRRLinear)]:
        base = mod.base
        base.weight += mod.delta_weight().to(base.weight.dtype)
        if base.bias is not None:
            base.bias += mod.shift.to(base.bias.dtype)
        model.set_submodule(path, base)
    return merge_scale_shifts(model)


METHOD = register_method("rlrr", RLRRHP, apply, merge)
