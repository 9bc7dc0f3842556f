"""DiffFit (Xie et al., 2023): biases, LayerNorms and per-block branch scales gamma.

As in the reference study (``model/block.py``), every transformer block gets
two learnable per-channel vectors: ``gamma1`` multiplies the attention
branch and ``gamma2`` the MLP branch before each is added to the residual
stream (``x + gamma1 * ls1(attn(norm1(x)))``, likewise for the MLP). They are
placed by wrapping the block's ``ls1`` / ``ls2`` (layer-scale or identity)
module, so they act exactly on the branch output; they start at 1, so the
model is unchanged at initialisation. Besides the gammas, every bias (as in
BitFit: linears, the patch-embedding conv, LayerNorms) and every LayerNorm
weight trains. ViT-B/16: 102,912 biases + 25 x 768 LayerNorm weights +
12 x 2 x 768 gammas = 140,544 parameters.

Mergeable: the branch ends in a linear (``attn.proj``, ``mlp.fc2``) followed
only by per-channel or per-sample scalings (dropout, layer-scale, drop-path),
so ``gamma`` folds into that linear's weight rows and bias.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ._common import freeze_all
from ._registry import HParams, register_method
from ._targets import transformer_blocks

# (wrapped branch-end module, the linear its scale folds into)
_BRANCHES = (("ls1", "attn.proj"), ("ls2", "mlp.fc2"))


class DiffFitHP(HParams):
    """DiffFit has no hyper-parameters of its own (gammas start at 1, as in the reference)."""


class BranchScale(nn.Module):
    """``difffit_gamma * inner(x)``: a learnable per-channel scale of a residual branch."""

    def __init__(self, inner: nn.Module, dim: int, like: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.difffit_gamma = nn.Parameter(torch.ones(dim, device=like.device, dtype=like.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.difffit_gamma * self.inner(x)


def _branch_linear(block: nn.Module, path: str, index: int) -> nn.Linear:
    try:
        lin = block.get_submodule(path)
    except AttributeError:
        lin = None
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"difffit: blocks.{index}.{path} is not an nn.Linear; the branch scale can not be placed")
    return lin


def apply(model: nn.Module, hp: DiffFitHP) -> nn.Module:
    freeze_all(model)
    for i, block in enumerate(transformer_blocks(model)):
        if not isinstance(block, Block):
            raise TypeError(f"difffit: blocks.{i} is a {type(block).__name__}, not a timm vision_transformer.Block")
        for ls_name, lin_path in _BRANCHES:
            lin = _branch_linear(block, lin_path, i)
            setattr(block, ls_name, BranchScale(getattr(block, ls_name), lin.out_features, lin.weight))
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
        bias = module._parameters.get("bias")
        if isinstance(bias, nn.Parameter):
            bias.requires_grad_(True)
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold each gamma into the branch's last linear and unwrap ``ls1`` / ``ls2``."""
    for i, block in enumerate(transformer_blocks(model)):
        for ls_name, lin_path in _BRANCHES:
            wrapper = getattr(block, ls_name, None)
            if not isinstance(wrapper, BranchScale):
                continue
            lin = _branch_linear(block, lin_path, i)
            gamma = wrapper.difffit_gamma.to(lin.weight.dtype)
            lin.weight.mul_(gamma[:, None])
            if lin.bias is not None:
                lin.bias.mul_(gamma)
            setattr(block, ls_name, wrapper.inner)
    return model


METHOD = register_method("difffit", DiffFitHP, apply, merge)
